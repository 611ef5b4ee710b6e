"""Pure parts of the MCP package: ids, tokens, the loopback guard, the text budget, result shaping."""
from kcgevent.mcp.listener import bearer_token, find_initialize, is_loopback_host, is_loopback_origin
from kcgevent.mcp.tools import Budget, shape_code_result
from kcgevent.mcp.workspaces import mint_id, slug, valid_id, valid_token


def test_workspace_ids():
    assert slug("My  Data -- Project!!") == "my-data-project"
    assert slug("Ünïcode ✓") == "n-code"
    assert slug("") == slug("!!!") == "workspace"
    assert slug("a" * 30 + "-b") == "a" * 24
    assert slug("abcdefghijklmnopqrstuvw-xyz") == "abcdefghijklmnopqrstuvw"  # no trailing hyphen after the cut
    minted = mint_id("Data")
    assert minted.startswith("data-") and len(minted) == 11 and valid_id(minted)
    for good in ("a", "kept-1", "x" * 40, "a-b-c"):
        assert valid_id(good), good
    for bad in ("", "-a", "a-", "A", "a/b", "../x", "a b", "x" * 41, None, 7):
        assert not valid_id(bad), bad
    assert valid_token("ab" * 32) and not valid_token("AB" * 32) and not valid_token("ab" * 31)


def test_loopback_guard():
    for host in ("127.0.0.1", "127.0.0.1:8080", "localhost", "LOCALHOST:1", "127.9.8.7:80", "[::1]", "[::1]:9",
                 "::1"):
        assert is_loopback_host(host), host
    for host in ("evil.example", "127.0.0.1.evil.example", "127.0.0.1.evil.example:80", "10.0.0.1", "[::2]:1",
                 "localhost.evil", "0.0.0.0", ""):
        assert not is_loopback_host(host), host
    assert is_loopback_origin("http://localhost:3000") and is_loopback_origin("https://127.0.0.1")
    for origin in ("null", "file://", "http://evil.example", "ftp://127.0.0.1", "http://127.0.0.1.evil.example"):
        assert not is_loopback_origin(origin), origin


def test_bearer_and_initialize_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bEaReR   abc  ") == "abc"
    assert bearer_token("Bearer") is None and bearer_token("Basic abc") is None and bearer_token(None) is None
    body = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"clientInfo":{"name":"n","version":"1"}}}'
    assert find_initialize(body) == {"name": "n", "version": "1"}
    assert find_initialize(b'[{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}]') == {}
    assert find_initialize(b'{"jsonrpc":"2.0","id":1,"method":"ping"}') is None
    assert find_initialize(b"not json") is None and find_initialize(b"") is None


def test_text_budget_is_shared():
    budget = Budget(10)
    assert budget.take("12345") == "12345" and budget.take("") == ""
    assert budget.take("abcdefgh") == "abcde\n[... 3 bytes omitted ...]" and budget.clipped
    assert budget.take("later") == "\n[... 5 bytes omitted ...]"


def test_code_result_shape():
    reply = {"status": "error", "execution_count": 3, "data": {"text/plain": "1", "image/png": "iVBO\n"},
             "output": [{"type": "stream", "stream_name": "stdout", "text": "a"},
                        {"type": "stream", "stream_name": "stderr", "text": "b"},
                        {"type": "display_data", "data": {"image/jpeg": "/9j/", "text/plain": "<Figure>"},
                         "metadata": {}},
                        {"type": "error", "error_name": "E", "error_message": "m", "error_traceback": ["t"]}],
             "error_name": "E", "error_message": "m", "error_traceback": ["t"]}
    structured, images = shape_code_result(reply, "s1", 12)
    assert structured == {"status": "error", "execution_count": 3, "stdout": "a", "stderr": "b",
                          "result": {"text/plain": "1"}, "images": 2,
                          "error": {"name": "E", "message": "m", "traceback": ["t"]},
                          "truncated": False, "session_id": "s1", "elapsed_ms": 12}
    assert [(i.mime_type, i.data) for i in images] == [("image/jpeg", "/9j/"), ("image/png", "iVBO")]

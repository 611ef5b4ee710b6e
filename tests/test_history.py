"""Execution history bookkeeping and clipping (pure: no server, no kernel)."""
from kcgevent.session.history import (MAX_ENTRIES, ExecutionHistory, clip_error, clip_middle, render_bundle)


def run(history, msg_id, code, messages, content=None, metadata=None):
    history.started(msg_id, {"code": code, **(content or {})}, metadata, now=1700000000.5)
    for msg_type, body in messages + [("execute_reply", {"status": "ok"}),
                                      ("status", {"execution_state": "idle"})]:
        history.observe(msg_id, msg_type, body)


def test_entry_collects_output_and_attribution():
    history = ExecutionHistory()
    run(history, "m1", "print(1); x", [("stream", {"name": "stdout", "text": "1\n"}),
                                       ("execute_result", {"data": {"text/plain": "42"}}),
                                       ("display_data", {"data": {"image/png": "...", "text/html": "<b>"}})],
        metadata={"attribution": {"source": "agent", "agent_name": "claude-code"}})
    assert history.to_json() == [{"input": "print(1); x", "output": "1\n42\n[image/png, text/html]\n",
                                  "timestamp": 1700000000500, "source": "agent", "agent": "claude-code",
                                  "truncated": False}]
    assert not history.open  # the reply and the idle closed it


def test_silent_requests_and_evaluate_code_are_not_recorded():
    history = ExecutionHistory()
    assert history.started("a", {"code": "1", "silent": True}) is None
    evaluate = {"attribution": {"source": "agent", "tool": "evaluate_code"}}
    assert history.started("b", {"code": "1", "store_history": False}, evaluate) is None
    assert history.to_json() == []
    assert history.started("c", {"code": "2", "store_history": False}) is not None  # any other origin is kept


def test_errors_from_the_error_message_or_the_reply():
    history = ExecutionHistory()
    run(history, "m1", "1/0", [("error", {"ename": "ZeroDivisionError", "evalue": "division by zero",
                                         "traceback": ["tb1", "tb2"]})])
    history.started("m2", {"code": "boom"})
    history.observe("m2", "execute_reply", {"status": "error", "ename": "E", "evalue": "v", "traceback": []})
    first, second = history.to_json()
    assert first["error"] == {"name": "ZeroDivisionError", "message": "division by zero", "traceback": ["tb1", "tb2"]}
    assert second["error"] == {"name": "E", "message": "v", "traceback": []}


def test_output_keeps_both_ends_of_100_kb_with_the_exact_count():
    history = ExecutionHistory()
    text = "".join(f"line {i:06d}\n" for i in range(8000))  # 96 000 bytes, in many messages
    run(history, "m1", "loop()", [("stream", {"name": "stdout", "text": text[i:i + 1000]})
                                  for i in range(0, len(text), 1000)])
    entry = history.to_json()[0]
    assert entry["truncated"] is True
    assert entry["output"].startswith(text[:2048]) and entry["output"].endswith(text[-2048:])
    assert f"\n[... {len(text) - 4096} bytes omitted ...]\n" in entry["output"]
    assert len(entry["output"].encode()) == 4096 + len(f"\n[... {len(text) - 4096} bytes omitted ...]\n")


def test_clipping_rules():
    assert clip_middle("short") == ("short", False)
    clipped, cut = clip_middle("é" * 3000)  # 6000 bytes; halves are cut on character boundaries
    assert cut and "[... 1904 bytes omitted ...]" in clipped
    long_code = "a" * 5000
    history = ExecutionHistory()
    run(history, "m1", long_code, [])
    assert history.to_json()[0]["input"] == "a" * 2048 + "\n[... 904 bytes omitted ...]\n" + "a" * 2048
    error, cut = clip_error("N" * 300, "M" * 3000, [f"frame {i}\n" * 20 for i in range(100)])
    assert cut and len(error["name"]) == 256 and len(error["message"]) == 2048
    assert error["traceback"][-1] == "frame 99\n" * 20  # the end of the traceback is kept
    assert sum(len(x) for x in error["traceback"]) + 256 + 2048 <= 4096
    assert render_bundle({"text/plain": ["a", "b"]}) == "ab"


def test_only_the_last_hundred_are_kept():
    history = ExecutionHistory()
    for i in range(MAX_ENTRIES + 5):
        run(history, f"m{i}", str(i), [])
    entries = history.to_json()
    assert len(entries) == MAX_ENTRIES and entries[0]["input"] == "5"
    assert [e["input"] for e in history.to_json(3)] == ["102", "103", "104"]
    assert history.to_json(0) == []

"""The HTTP API, endpoint by endpoint, against real servers and the fake kernel.

Each endpoint's success and error answers, authentication on every protected
endpoint (and on the channel upgrade), body validation, the session state
machine as seen through GET, adopt, server configuration, heartbeat and
shutdown. Every wait is bounded.
"""
import json
import os
import re
import signal
import subprocess
import time
import uuid

import psutil
import pytest
import websocket
from conftest import (
    FAKE_KERNEL,
    PYTHON,
    ServerProcess,
    fake_kernel_session,
    get_session,
    new_id,
    pid_gone,
    raw_request,
    replies_to,
    start_session,
    stream_text,
    wait_for,
)

from kcgevent.session.session import free_ports

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RFC3339_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
CONNECTION_INFO_KEYS = ["control_port", "shell_port", "stdin_port", "hb_port", "iopub_port",
                        "signature_scheme", "key", "transport", "ip"]


# -- helpers ------------------------------------------------------------------------------------


def status_of(server, session_id):
    return get_session(server, session_id)["status"]


def assert_error(status, body, http_status, code, message_part=None):
    assert status == http_status, (status, body)
    assert isinstance(body, dict), body
    assert body.get("code") == code, body
    assert isinstance(body.get("message"), str) and body["message"], body
    if message_part is not None:
        assert message_part.lower() in body["message"].lower(), body


def assert_startup_error(status, body, code):
    assert status == 500, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One token-less TCP server for the tests that only add their own sessions."""
    server = ServerProcess(tmp_path_factory.mktemp("shared"), ["--transport", "tcp"])
    server.client.wait_ready()
    yield server
    leaked = server.stop()
    assert not leaked, f"processes left behind: {[p.pid for p in leaked]}"


def started_fake(server, *flags, **overrides):
    session_id = new_id("fake")
    kernel_info = start_session(server.client, fake_kernel_session(session_id, *flags, **overrides))
    assert kernel_info["implementation"] == "fake"
    return session_id


# -- authentication -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A TCP server with a token; one never-started session "auth-target" exists on it."""
    directory = tmp_path_factory.mktemp("auth")
    token_file = directory / "token"
    token_file.write_text("s3cret-" + uuid.uuid4().hex + "\n")
    server = ServerProcess(directory, ["--transport", "tcp"], token=str(token_file))
    server.client.wait_ready()
    assert not token_file.exists(), "the server must delete the token file"
    assert server.info["bearer_token"] == token_file_token(server)
    server.client.call("PUT", "/sessions", fake_kernel_session("auth-target"))
    yield server
    leaked = server.stop()
    assert not leaked, f"processes left behind: {[p.pid for p in leaked]}"


def token_file_token(server):
    token = server.info["bearer_token"]
    assert isinstance(token, str) and token.startswith("s3cret-")
    return token


ADOPT_BODY = {"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, "iopub_port": 5,
              "signature_scheme": "hmac-sha256", "key": "k", "transport": "tcp", "ip": "127.0.0.1"}

PROTECTED = [
    ("GET", "/sessions", None),
    ("PUT", "/sessions", fake_kernel_session("auth-new")),
    ("GET", "/sessions/auth-target", None),
    ("DELETE", "/sessions/auth-target", None),
    ("POST", "/sessions/auth-target/start", None),
    ("POST", "/sessions/auth-target/restart", {}),
    ("POST", "/sessions/auth-target/kill", None),
    ("PUT", "/sessions/auth-target/adopt", ADOPT_BODY),
    ("GET", "/sessions/auth-target/connection_info", None),
    ("POST", "/sessions/auth-target/interrupt", None),
    ("GET", "/sessions/auth-target/channels", None),
    ("POST", "/shutdown", None),
    ("POST", "/client_heartbeat", {}),
    ("GET", "/server_configuration", None),
    ("POST", "/server_configuration", {"idle_shutdown_hours": 7}),
]


@pytest.mark.parametrize("credentials", ["no-token", "wrong-token"])
@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_endpoint_needs_the_token(auth_server, method, path, body, credentials):
    headers = {"Authorization": "Bearer wrong-" + uuid.uuid4().hex} if credentials == "wrong-token" else {}
    status, _, decoded = raw_request(auth_server, method, path, body, headers=headers, token=False)
    assert_error(status, decoded, 401, "401")
    # ... and the request did nothing.
    if path == "/shutdown":
        time.sleep(0.5)
    assert auth_server.process.poll() is None, "the server exited after an unauthenticated request"
    session = auth_server.client.call("GET", "/sessions/auth-target")
    assert session["status"] == "uninitialized"
    assert "process_id" not in session
    assert auth_server.client.request("GET", "/sessions/auth-new")[0] == 404
    config = auth_server.client.call("GET", "/server_configuration")
    assert config.get("idle_shutdown_hours", -1) == -1


def test_token_accepted_and_status_open(auth_server):
    client = auth_server.client
    assert client.call("GET", "/sessions")["total"] >= 1
    assert client.call("GET", "/server_configuration")["resource_sample_interval_ms"] == 1000
    # GET /status answers without a token, and with a wrong one.
    status, _, body = raw_request(auth_server, "GET", "/status", token=False)
    assert status == 200 and body["process_id"] == auth_server.pid
    status, _, body = raw_request(auth_server, "GET", "/status", token=False,
                                  headers={"Authorization": "Bearer nope"})
    assert status == 200 and body["version"] == "0.1.64"


def test_openapi_needs_the_token(auth_server):
    status, headers, body = raw_request(auth_server, "GET", "/openapi.json", token=False,
                                        headers={"X-Span-ID": "span-401"})
    assert_error(status, body, 401, "401")
    assert headers.get("x-span-id") == "span-401"
    status, _, body = raw_request(auth_server, "GET", "/openapi.json", token=False,
                                  headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, body = raw_request(auth_server, "GET", "/openapi.json")
    assert status == 200
    assert "/sessions" in body["paths"] and "/sessions/{session_id}/adopt" in body["paths"]


def test_channel_upgrade_needs_the_token(auth_server):
    url = f"ws://127.0.0.1:{auth_server.info['port']}/sessions/auth-target/channels"
    for header in ([], ["Authorization: Bearer wrong-token"]):
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(url, header=header, timeout=10)
        assert info.value.status_code == 401
    ws = websocket.create_connection(url, header=[f"Authorization: Bearer {auth_server.info['bearer_token']}"],
                                     timeout=10)
    try:
        assert ws.connected
    finally:
        ws.close()


# -- bodies ----------------------------------------------------------------------------------------


def _without(field):
    def mutate(body):
        del body[field]
        return body
    return mutate


def _with(field, value):
    def mutate(body):
        body[field] = value
        return body
    return mutate


BAD_NEW_SESSION = [
    ("missing-language", _without("language"), "language"),
    ("missing-argv", _without("argv"), "argv"),
    ("argv-not-a-list", _with("argv", "python"), "argv"),
    ("timeout-not-int", _with("connection_timeout", "soon"), "connection_timeout"),
    ("bad-interrupt-mode", _with("interrupt_mode", "shout"), "interrupt_mode"),
    ("bad-session-mode", _with("session_mode", "party"), "session_mode"),
    ("bad-startup-environment", _with("startup_environment", "magic"), "startup_environment"),
    ("env-item-without-name", _with("env", [{"action": "replace", "value": "1"}]), "env"),
    ("bad-env-action", _with("env", [{"action": "explode", "name": "A", "value": "1"}]), "env"),
]


@pytest.mark.parametrize("mutate,field", [(m, f) for _, m, f in BAD_NEW_SESSION],
                         ids=[name for name, _, _ in BAD_NEW_SESSION])
def test_put_session_rejects_bad_body(shared, mutate, field):
    session_id = new_id("bad")
    status, _, body = raw_request(shared, "PUT", "/sessions", mutate(fake_kernel_session(session_id)))
    assert_error(status, body, 400, "400")
    assert "newsession" in body["message"].lower(), body
    assert field in body["message"], body
    assert shared.client.request("GET", f"/sessions/{session_id}")[0] == 404


@pytest.mark.parametrize("raw_body,expected", [
    (b"{not json", "json"),
    (b"", "missing"),
    (b"   ", "missing"),
    (b"[1, 2]", "object"),
    (b'"a string"', "object"),
], ids=["not-json", "empty", "blank", "array", "string"])
def test_put_session_rejects_unusable_body(shared, raw_body, expected):
    status, _, body = raw_request(shared, "PUT", "/sessions", raw_body=raw_body)
    assert_error(status, body, 400, "400", expected)
    assert "newsession" in body["message"].lower(), body


def test_unknown_fields_are_ignored_with_a_warning(shared):
    session_id = new_id("extra")
    body = fake_kernel_session(session_id)
    body["frobnicate"] = 42
    status, headers, decoded = raw_request(shared, "PUT", "/sessions", body)
    assert status == 200 and decoded == {"session_id": session_id}
    assert "frobnicate" in (headers.get("warning") or ""), dict(headers)
    status, headers, _ = raw_request(shared, "PUT", "/sessions", fake_kernel_session(new_id("plain")))
    assert status == 200 and headers.get("warning") is None


def test_legacy_body_is_accepted(shared):
    session_id = new_id("legacy")
    body = fake_kernel_session(session_id)
    del body["session_mode"]
    del body["startup_environment"]
    del body["connection_timeout"]
    body.pop("protocol_version", None)
    body["run_in_shell"] = True
    status, _, decoded = raw_request(shared, "PUT", "/sessions", body)
    assert status == 200, decoded
    session = get_session(shared, session_id)
    assert session["session_mode"] == "console"
    assert session["status"] == "uninitialized"


def test_put_session_kernel_path_not_found(shared):
    session_id = new_id("nopath")
    body = fake_kernel_session(session_id)
    body["argv"] = ["/definitely/not/here/kernel", "{connection_file}"]
    status, _, decoded = raw_request(shared, "PUT", "/sessions", body)
    assert_error(status, decoded, 400, "KS-19", "/definitely/not/here/kernel")
    body["argv"] = ["no-such-kernel-" + uuid.uuid4().hex]
    status, _, decoded = raw_request(shared, "PUT", "/sessions", body)
    assert_error(status, decoded, 400, "KS-19")
    assert shared.client.request("GET", f"/sessions/{session_id}")[0] == 404
    # A bare name found on PATH is fine, and so is an empty argv (a session to adopt into).
    assert shared.client.call("PUT", "/sessions", {**body, "argv": ["python3"]}) == {"session_id": session_id}
    other = new_id("empty")
    assert shared.client.call("PUT", "/sessions", {**body, "session_id": other, "argv": []}) == \
        {"session_id": other}


def test_put_duplicate_session(shared):
    session_id = new_id("dup")
    shared.client.call("PUT", "/sessions", fake_kernel_session(session_id, display_name="First"))
    status, _, body = raw_request(shared, "PUT", "/sessions", fake_kernel_session(session_id, display_name="Second"))
    assert_error(status, body, 400, "KS-0", f"Session {session_id} already exists")
    assert get_session(shared, session_id)["display_name"] == "First"


# -- sessions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,suffix,body", [
    ("GET", "", None),
    ("DELETE", "", None),
    ("POST", "/start", None),
    ("POST", "/restart", None),
    ("POST", "/kill", None),
    ("POST", "/interrupt", None),
    ("PUT", "/adopt", ADOPT_BODY),
    ("GET", "/connection_info", None),
    ("GET", "/channels", None),
])
def test_unknown_session_is_404(shared, method, suffix, body):
    session_id = "missing-" + uuid.uuid4().hex[:6]
    status, _, decoded = raw_request(shared, method, f"/sessions/{session_id}{suffix}", body)
    assert_error(status, decoded, 404, "KS-1", f"Session {session_id} not found")


def test_unknown_session_channel_upgrade_fails(shared):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://127.0.0.1:{shared.info['port']}/sessions/nobody-here/channels",
                                    timeout=10)
    assert info.value.status_code == 404


def test_session_list_in_creation_order(server):
    client = server.client
    assert client.call("GET", "/sessions") == {"total": 0, "sessions": []}
    ids = ["zeta-" + uuid.uuid4().hex[:4], "alpha-" + uuid.uuid4().hex[:4], "mid-" + uuid.uuid4().hex[:4]]
    for session_id in ids:
        client.call("PUT", "/sessions", fake_kernel_session(session_id))
    listing = client.call("GET", "/sessions")
    assert listing["total"] == 3
    assert [s["session_id"] for s in listing["sessions"]] == ids
    client.call("DELETE", f"/sessions/{ids[1]}")
    listing = client.call("GET", "/sessions")
    assert listing["total"] == 2
    assert [s["session_id"] for s in listing["sessions"]] == [ids[0], ids[2]]
    status = client.call("GET", "/status")
    assert status["sessions"] == 2


def test_new_session_is_uninitialized_and_deletable(shared):
    session_id = new_id("fresh")
    body = fake_kernel_session(session_id, notebook_uri="file:///tmp/x.ipynb", session_mode="notebook")
    shared.client.call("PUT", "/sessions", body)
    session = get_session(shared, session_id)
    assert session["session_id"] == session_id
    assert session["status"] == "uninitialized"
    assert "process_id" not in session
    assert session["argv"] == body["argv"]  # the placeholder is still there
    assert "{connection_file}" in session["argv"][-1]
    assert session["kernel_info"] == {}
    assert session["initial_env"] == {}
    assert session["connected"] is False
    assert session["session_mode"] == "notebook"
    assert session["notebook_uri"] == "file:///tmp/x.ipynb"
    assert session["display_name"] == body["display_name"] and session["language"] == "fake"
    assert session["username"] == body["username"] and session["interrupt_mode"] == "message"
    assert session["input_prompt"] == body["input_prompt"]
    assert session["continuation_prompt"] == body["continuation_prompt"]
    assert session["execution_queue"] == {"length": 0, "pending": []}
    assert RFC3339_RE.match(session["started"]), session["started"]
    assert isinstance(session["idle_seconds"], int) and session["busy_seconds"] == 0
    status, _, decoded = raw_request(shared, "DELETE", f"/sessions/{session_id}")
    assert (status, decoded) == (200, None)
    assert shared.client.request("GET", f"/sessions/{session_id}")[0] == 404


def test_status_transitions_and_verbs(shared):
    client = shared.client
    session_id = new_id("life")
    client.call("PUT", "/sessions", fake_kernel_session(session_id))
    assert status_of(shared, session_id) == "uninitialized"
    status, _, info = raw_request(shared, "POST", f"/sessions/{session_id}/start")
    assert status == 200, info
    assert info["status"] == "ok" and info["implementation"] == "fake"
    session = get_session(shared, session_id)
    assert session["status"] == "idle"
    pid = session["process_id"]
    assert psutil.pid_exists(pid)
    assert session["kernel_info"] == info
    assert session["initial_env"].get("PATH") == os.environ.get("PATH")
    assert client.call("GET", "/status")["active"] >= 1

    # A running session cannot be deleted.
    status, _, body = raw_request(shared, "DELETE", f"/sessions/{session_id}")
    assert_error(status, body, 400, "KS-2", f"Session {session_id} is running")

    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/kill")
    assert (status, body) == (200, None)
    assert pid_gone(pid), "kill returned before the kernel process was gone"
    wait_for(lambda: status_of(shared, session_id) == "exited", 5, what="status exited")
    assert "process_id" not in get_session(shared, session_id)

    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/kill")
    assert_error(status, body, 400, "KS-3", f"Session {session_id} is not running")
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/interrupt")
    assert_error(status, body, 400, "KS-10")
    status, _, body = raw_request(shared, "DELETE", f"/sessions/{session_id}")
    assert (status, body) == (200, None)
    assert client.request("GET", f"/sessions/{session_id}")[0] == 404


def test_kill_ends_the_whole_tree(shared, open_channel):
    session_id = started_fake(shared)
    pid = get_session(shared, session_id)["process_id"]
    channel = open_channel(shared, session_id)
    request = channel.execute("spawn_child")
    frames = channel.until_idle(request)
    match = re.search(r"child (\d+)", stream_text(frames))
    assert match, frames
    child = int(match.group(1))
    assert psutil.pid_exists(child)
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/kill")
    assert (status, body) == (200, None)
    assert pid_gone(pid)
    wait_for(lambda: pid_gone(child), 5, what=f"grandchild {child} gone")


def test_interrupt(shared, open_channel):
    # Never started: nothing to interrupt, in either mode.
    for mode in ("message", "signal"):
        session_id = new_id("int")
        shared.client.call("PUT", "/sessions", fake_kernel_session(session_id, interrupt_mode=mode))
        status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/interrupt")
        assert_error(status, body, 400, "KS-10")
        shared.client.call("DELETE", f"/sessions/{session_id}")
    # Signal mode: SIGINT reaches the kernel and aborts a running sleep.
    session_id = started_fake(shared, interrupt_mode="signal")
    channel = open_channel(shared, session_id)
    request = channel.execute("sleep 30")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                  and f["content"].get("execution_state") == "busy")
    started = time.monotonic()
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/interrupt")
    assert (status, body) == (200, None)
    frames = channel.until_idle(request, timeout=10)
    assert time.monotonic() - started < 10
    reply = replies_to(frames, request, "execute_reply")
    assert reply and reply[0]["content"]["status"] == "error"
    assert reply[0]["content"]["ename"] == "KeyboardInterrupt"


def test_execution_queue_shape(shared, open_channel):
    session_id = started_fake(shared)
    channel = open_channel(shared, session_id)
    first = channel.execute("sleep 30")
    second = channel.execute("print queued")
    queue = wait_for(lambda: (lambda q: q if q["length"] == 1 and "active" in q else None)(
        get_session(shared, session_id)["execution_queue"]), 5, what="one active and one pending")
    assert queue["active"]["header"]["msg_id"] == first["header"]["msg_id"]
    assert queue["active"]["header"]["msg_type"] == "execute_request"
    assert queue["active"]["content"]["code"] == "sleep 30"
    assert [m["header"]["msg_id"] for m in queue["pending"]] == [second["header"]["msg_id"]]
    assert queue["pending"][0]["content"]["code"] == "print queued"
    assert "kind" not in queue["active"]
    wait_for(lambda: status_of(shared, session_id) == "busy", 5, what="busy")
    # A message-mode interrupt aborts the sleep and drops what was queued.
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/interrupt")
    assert (status, body) == (200, None)
    channel.until_idle(first, timeout=10)
    wait_for(lambda: get_session(shared, session_id)["execution_queue"] == {"length": 0, "pending": []}, 5,
             what="empty queue")
    wait_for(lambda: status_of(shared, session_id) == "idle", 5, what="idle")


def test_restart_of_a_never_started_session_starts_it(shared):
    session_id = new_id("restart")
    shared.client.call("PUT", "/sessions", fake_kernel_session(session_id))
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/restart")
    assert (status, body) == (200, None)
    session = get_session(shared, session_id)
    assert session["status"] == "idle" and session["kernel_info"]["implementation"] == "fake"
    assert psutil.pid_exists(session["process_id"])
    shared.client.call("POST", f"/sessions/{session_id}/kill")


def test_restart_of_an_exited_session_starts_it(shared):
    session_id = started_fake(shared)
    first_pid = get_session(shared, session_id)["process_id"]
    shared.client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: status_of(shared, session_id) == "exited", 5, what="exited")
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/restart",
                                  {"working_directory": "", "env": []})
    assert (status, body) == (200, None)
    session = get_session(shared, session_id)
    assert session["status"] == "idle" and session["process_id"] != first_pid
    shared.client.call("POST", f"/sessions/{session_id}/kill")


def test_restart_of_a_running_session(shared):
    session_id = started_fake(shared)
    first_pid = get_session(shared, session_id)["process_id"]
    # A new process replaces the old one (an unusable body means "no options").
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/restart", raw_body=b"{garbage")
    assert (status, body) == (200, None)
    session = get_session(shared, session_id)
    assert session["status"] == "idle"
    assert session["process_id"] != first_pid
    assert pid_gone(first_pid)
    # And again, with options.
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/restart",
                                  {"env": [{"action": "replace", "name": "KCG_RESTARTED", "value": "yes"}]})
    assert (status, body) == (200, None)
    session = get_session(shared, session_id)
    assert session["status"] == "idle" and session["initial_env"].get("KCG_RESTARTED") == "yes"
    shared.client.call("POST", f"/sessions/{session_id}/kill")


def test_connection_info(shared):
    session_id = new_id("conn")
    shared.client.call("PUT", "/sessions", fake_kernel_session(session_id))
    status, _, info = raw_request(shared, "GET", f"/sessions/{session_id}/connection_info")
    assert status == 200, info
    assert list(info) == CONNECTION_INFO_KEYS
    ports = [info[k] for k in CONNECTION_INFO_KEYS[:5]]
    assert all(isinstance(p, int) and 0 < p < 65536 for p in ports) and len(set(ports)) == 5
    assert re.fullmatch(r"[0-9a-f]{32}", info["key"]), info["key"]
    assert (info["signature_scheme"], info["transport"], info["ip"]) == ("hmac-sha256", "tcp", "127.0.0.1")
    # Stable until the kernel starts.
    assert shared.client.call("GET", f"/sessions/{session_id}/connection_info") == info

    shared.client.call("POST", f"/sessions/{session_id}/start")
    after = shared.client.call("GET", f"/sessions/{session_id}/connection_info")
    assert list(after) == CONNECTION_INFO_KEYS
    assert after["key"] == info["key"]
    # It is what the kernel was actually given.
    cmdline = psutil.Process(get_session(shared, session_id)["process_id"]).cmdline()
    kernel_file = cmdline[-1]
    with open(kernel_file) as f:
        given = json.load(f)
    for key in CONNECTION_INFO_KEYS:
        assert after[key] == given[key], key
    shared.client.call("POST", f"/sessions/{session_id}/kill")


@pytest.fixture
def own_kernel(tmp_path):
    """A fake kernel we start ourselves (not through the server): (connection info, Popen)."""
    ports = free_ports(5)
    info = dict(zip(CONNECTION_INFO_KEYS[:5], ports))
    info.update({"signature_scheme": "hmac-sha256", "key": uuid.uuid4().hex + "-adopted",
                 "transport": "tcp", "ip": "127.0.0.1"})
    conn_file = tmp_path / "own-kernel.json"
    conn_file.write_text(json.dumps(info))
    out = open(tmp_path / "own-kernel.out", "w+")
    process = subprocess.Popen([PYTHON, FAKE_KERNEL, str(conn_file)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "fake kernel ready" in (tmp_path / "own-kernel.out").read_text(), 15,
                 what="own fake kernel ready")
        yield info, process
    finally:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)
        out.close()


def test_adopt_a_kernel_we_started(shared, own_kernel, open_channel):
    info, process = own_kernel
    session_id = new_id("adopt")
    body = fake_kernel_session(session_id, argv=[], connection_timeout=10)
    body["argv"] = []
    shared.client.call("PUT", "/sessions", body)
    status, _, reply = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt", info)
    assert status == 200, reply
    assert reply["implementation"] == "fake" and reply["status"] == "ok"
    session = get_session(shared, session_id)
    assert session["kernel_info"] == reply
    assert session["status"] not in ("uninitialized", "exited", "starting")
    assert "process_id" not in session
    assert shared.client.call("GET", f"/sessions/{session_id}/connection_info") == info

    # Messages are signed with the adopted key: a round trip works.
    channel = open_channel(shared, session_id)
    request = channel.execute("print hi")
    frames = channel.until_idle(request, timeout=10)
    assert stream_text(replies_to(frames, request)) == "hi\n"
    assert replies_to(frames, request, "execute_reply")[0]["content"]["status"] == "ok"

    # We have no process to kill.
    status, _, body = raw_request(shared, "POST", f"/sessions/{session_id}/kill")
    assert_error(status, body, 400, "KS-12")
    assert process.poll() is None

    # A second adopt of a session that is running is refused.
    status, _, body = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt", info)
    assert status in (400, 500), (status, body)


def test_adopt_errors(shared):
    session_id = new_id("adopt-bad")
    shared.client.call("PUT", "/sessions", {**fake_kernel_session(session_id), "argv": [],
                                            "connection_timeout": 1})
    # Bad bodies.
    partial = dict(ADOPT_BODY)
    del partial["key"]
    status, _, body = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt", partial)
    assert_error(status, body, 400, "400", "key")
    assert "connectioninfo" in body["message"].lower()
    status, _, body = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt", raw_body=b"")
    assert_error(status, body, 400, "400")
    status, _, body = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt",
                                  {**ADOPT_BODY, "shell_port": "two"})
    assert_error(status, body, 400, "400", "shell_port")
    # Nobody listening: a bounded timeout.
    ports = free_ports(5)
    info = {**ADOPT_BODY, **dict(zip(CONNECTION_INFO_KEYS[:5], ports))}
    started = time.monotonic()
    status, _, body = raw_request(shared, "PUT", f"/sessions/{session_id}/adopt", info)
    assert time.monotonic() - started < 5
    assert status == 500 and body["code"] in ("KS-6", "KS-7"), body
    assert status_of(shared, session_id) != "idle"


# -- server ------------------------------------------------------------------------------------------


def test_status_fields(shared):
    status, _, body = raw_request(shared, "GET", "/status")
    assert status == 200
    for key in ("sessions", "active", "idle_seconds", "busy_seconds", "uptime_seconds", "process_id"):
        assert isinstance(body[key], int) and not isinstance(body[key], bool), key
    assert isinstance(body["busy"], bool)
    assert body["version"] == "0.1.64"
    assert body["process_id"] == shared.pid
    assert UUID_RE.match(body["server_id"]), body["server_id"]
    assert body["server_id"] == shared.info["server_id"]
    assert RFC3339_RE.match(body["started"]), body["started"]
    assert body["sessions"] == shared.client.call("GET", "/sessions")["total"]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc/<pid>/maps")
def test_an_idle_server_has_not_loaded_the_kernel_machinery(server):
    """ZeroMQ (and the rest of what kernels need) is loaded by the first session, not at start: a
    server that has only answered /status stays small (tools/bench_memory.py measures how small)."""
    def zmq_loaded():
        with open(f"/proc/{server.pid}/maps") as f:
            return "libzmq" in f.read()

    assert server.client.call("GET", "/status")["sessions"] == 0
    assert not zmq_loaded()
    start_session(server.client, fake_kernel_session(new_id("lazy")))
    assert zmq_loaded()


def test_span_id_is_echoed(shared):
    span = "span-" + uuid.uuid4().hex
    for method, path, body in (("GET", "/status", None), ("GET", "/sessions", None),
                               ("GET", "/sessions/not-there", None), ("PUT", "/sessions", {"x": 1})):
        _, headers, _ = raw_request(shared, method, path, body, headers={"X-Span-ID": span})
        assert headers.get("x-span-id") == span, (method, path, dict(headers))
    _, headers, _ = raw_request(shared, "GET", "/status")
    assert UUID_RE.match(headers.get("x-span-id") or ""), dict(headers)


def test_json_errors_for_unknown_paths_and_methods(shared):
    status, _, body = raw_request(shared, "GET", "/no/such/path")
    assert status == 404 and body["code"] == "404"
    status, _, body = raw_request(shared, "PATCH", "/sessions")
    assert status == 405 and body["code"] == "405"


def test_server_configuration(server):
    client = server.client
    config = client.call("GET", "/server_configuration")
    assert config["resource_sample_interval_ms"] == 1000
    assert config.get("idle_shutdown_hours", -1) == -1
    status, _, body = raw_request(server, "POST", "/server_configuration", {})
    assert (status, body) == (200, None)
    assert client.call("GET", "/server_configuration") == config

    # Partial updates.
    client.call("POST", "/server_configuration", {"idle_shutdown_hours": 12})
    config = client.call("GET", "/server_configuration")
    assert config["idle_shutdown_hours"] == 12 and config["resource_sample_interval_ms"] == 1000
    client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 250})
    config = client.call("GET", "/server_configuration")
    assert config["idle_shutdown_hours"] == 12 and config["resource_sample_interval_ms"] == 250
    client.call("POST", "/server_configuration", {"idle_shutdown_hours": -1})
    assert client.call("GET", "/server_configuration").get("idle_shutdown_hours", -1) == -1
    client.call("POST", "/server_configuration", {"idle_shutdown_hours": 65535})
    assert client.call("GET", "/server_configuration")["idle_shutdown_hours"] == 65535
    client.call("POST", "/server_configuration", {"idle_shutdown_hours": -5})
    assert client.call("GET", "/server_configuration").get("idle_shutdown_hours", -1) == -1

    # The sampling interval: 1..99 is clamped to 100, 0 turns sampling off.
    client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 5})
    assert client.call("GET", "/server_configuration")["resource_sample_interval_ms"] == 100
    client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 99})
    assert client.call("GET", "/server_configuration")["resource_sample_interval_ms"] == 100
    client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 0})
    assert client.call("GET", "/server_configuration")["resource_sample_interval_ms"] == 0

    # Errors, which change nothing.
    client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 500})
    before = client.call("GET", "/server_configuration")
    status, _, body = raw_request(server, "POST", "/server_configuration", {"idle_shutdown_hours": 65536})
    assert_error(status, body, 400, "400", "idle_shutdown_hours")
    status, _, body = raw_request(server, "POST", "/server_configuration", {"resource_sample_interval_ms": -1})
    assert_error(status, body, 400, "400", "resource_sample_interval_ms")
    status, _, body = raw_request(server, "POST", "/server_configuration",
                                  {"idle_shutdown_hours": 3, "resource_sample_interval_ms": -1})
    assert_error(status, body, 400, "400", "resource_sample_interval_ms")
    status, _, body = raw_request(server, "POST", "/server_configuration", {"idle_shutdown_hours": "soon"})
    assert_error(status, body, 400, "400", "idle_shutdown_hours")
    assert "serverconfiguration" in body["message"].lower()
    status, _, body = raw_request(server, "POST", "/server_configuration", {"log_level": "chatty"})
    assert_error(status, body, 400, "400", "log_level")
    status, _, body = raw_request(server, "POST", "/server_configuration", raw_body=b"")
    assert_error(status, body, 400, "400")
    status, _, body = raw_request(server, "POST", "/server_configuration", raw_body=b"[]")
    assert_error(status, body, 400, "400")
    assert client.call("GET", "/server_configuration") == before

    # A valid log level is accepted.
    status, _, body = raw_request(server, "POST", "/server_configuration", {"log_level": "debug"})
    assert (status, body) == (200, None)
    assert client.call("GET", "/status")["process_id"] == server.pid


def test_client_heartbeat(shared):
    status, _, body = raw_request(shared, "POST", "/client_heartbeat", {})
    assert (status, body) == (200, None)
    status, _, body = raw_request(shared, "POST", "/client_heartbeat", {"process_id": os.getpid()})
    assert (status, body) == (200, None)
    status, _, body = raw_request(shared, "POST", "/client_heartbeat", raw_body=b"")
    assert_error(status, body, 400, "400")
    status, _, body = raw_request(shared, "POST", "/client_heartbeat", {"process_id": "me"})
    assert_error(status, body, 400, "400", "process_id")
    status, _, body = raw_request(shared, "POST", "/client_heartbeat", raw_body=b"not json")
    assert_error(status, body, 400, "400")


def test_shutdown(start_server):
    server = start_server("--transport", "tcp")
    session_id = started_fake(server)
    pid = get_session(server, session_id)["process_id"]
    idle_id = new_id("never")  # a never-started session must not hold the shutdown up
    server.client.call("PUT", "/sessions", fake_kernel_session(idle_id))
    server.descendants()
    status, _, body = raw_request(server, "POST", "/shutdown")
    assert (status, body) == (200, None)
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 10 s of POST /shutdown")
    assert code == 0
    wait_for(lambda: pid_gone(pid), 5, what="kernel gone")
    assert not server.alive_spawned()


"""Hostile input and noisy neighbours (issue "Nothing breaks it"): each case once made a 500, a dead
background duty, a stuck session or a stalled server. Real servers, real sockets, the fake kernel.
"""
import base64
import http.client
import json
import os
import socket
import struct
import time

import gevent
import pytest
from conftest import (FAKE_KERNEL, PYTHON, fake_kernel_session, get_session, new_id, pid_gone, raw_request,
                      wait_for)

from kcgevent.websocket import accept_key


def request(server, method, path, body=None, *, raw=None, headers=None, timeout=30):
    """(status, headers, decoded JSON or text) of a request without a token, always typed as JSON."""
    return raw_request(server, method, path, body, raw_body=raw, token=False, timeout=timeout,
                       headers={"Content-Type": "application/json", **(headers or {})})


def assert_400(answer, code="400", part=None):
    status, _, body = answer
    assert status == 400, answer
    assert isinstance(body, dict) and body["code"] == code and body["message"], answer
    if part:
        assert part in body["message"], body


# -- item 1: unknown fields, argv [], adopt -----------------------------------------------------

def test_unknown_non_latin1_field_names_are_ignored_with_a_warning(server):
    body = {**fake_kernel_session(new_id("warn")), "café中": 1}
    status, headers, decoded = request(server, "PUT", "/sessions", body)
    assert status == 200, decoded
    assert "caf" in headers["warning"] and "\\u4e2d" in headers["warning"], headers
    status, headers, decoded = request(server, "POST", "/client_heartbeat", {"café中": 1, "\ud83d\ude00": 2})
    assert status == 200 and decoded is None, decoded
    assert headers["warning"].startswith("Ignoring unknown fields"), headers
    many = {**fake_kernel_session(new_id("many")), **{f"field\n{i}": i for i in range(5000)}}
    status, headers, decoded = request(server, "PUT", "/sessions", many)
    assert status == 200 and len(headers["warning"]) <= 1000, (status, len(headers.get("warning", "")))


@pytest.mark.parametrize("change, part", [
    ({"transport": "nonsense"}, "transport"),
    ({"transport": "udp"}, "transport"),
    ({"shell_port": 70000}, "shell_port"),
    ({"iopub_port": -1}, "iopub_port"),
    ({"hb_port": 2**70}, "hb_port"),
    ({"control_port": 0}, "control_port"),
    ({"signature_scheme": "hmac-md5"}, "signature_scheme"),
    ({"ip": ""}, "ip"),
])
def test_adopt_refuses_unusable_connection_info(server, change, part):
    session_id = new_id("adopt")
    server.client.call("PUT", "/sessions", {**fake_kernel_session(session_id), "argv": []})
    info = {"control_port": 5001, "shell_port": 5002, "stdin_port": 5003, "hb_port": 5004, "iopub_port": 5005,
            "signature_scheme": "hmac-sha256", "key": "k", "transport": "tcp", "ip": "127.0.0.1", **change}
    assert_400(request(server, "PUT", f"/sessions/{session_id}/adopt", info), part=part)
    assert get_session(server, session_id)["status"] == "uninitialized"


# -- item 2: heartbeat pid; background duties survive -----------------------------------------

def test_heartbeat_pid_out_of_range_is_refused_and_idle_shutdown_still_happens(start_server):
    server = start_server("--transport", "tcp", "--idle-shutdown-seconds", "2")
    for pid in (2**31, -5, 2**64):
        assert_400(request(server, "POST", "/client_heartbeat", {"process_id": pid}), part="process_id")
    assert request(server, "POST", "/client_heartbeat", {"process_id": 2**31 - 1})[0] == 200  # no such process
    # The idle watch is alive: the server shuts itself down.
    assert server.process.wait(30) == 0


def test_sampling_survives_an_absurd_interval(fake_session, open_channel):
    """A sample interval of 2^62 ms, then 100 ms again: sampling resumes (it once slept for ages)."""
    server, session_id = fake_session
    server.client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 2**62})
    channel = open_channel(server, session_id)
    gevent.sleep(1.5)  # the sampler takes up the absurd interval
    server.client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 100})
    frames = channel.until(lambda f: f.get("kind") == "kernel" and "resourceUsage" in f, timeout=15)
    assert frames[-1]["resourceUsage"]["sampling_period_ms"] == 100


# -- item 8: session ids; unexpected start failures ---------------------------------------------

@pytest.mark.parametrize("session_id", ["../../x", "a/b", "", "x" * 10240, "\ud800", "a b", "y" * 300, ".hidden",
                                        "tab\there", "%2e%2e"])
def test_unaddressable_session_ids_are_refused(server, session_id):
    assert_400(request(server, "PUT", "/sessions", fake_kernel_session(session_id)), part="session_id")
    assert server.client.call("GET", "/sessions")["total"] == 0


def test_positron_style_ids_are_fine(server):
    for session_id in ("python-1a2b3c4d", "r-9f8e7d6c", "notebook_x.ipynb:3", "a" * 128):
        assert request(server, "PUT", "/sessions", fake_kernel_session(session_id))[0] == 200
        assert get_session(server, session_id)["session_id"] == session_id


def test_missing_working_directory_is_refused(server, tmp_path):
    body = fake_kernel_session(new_id("cwd"), working_directory=str(tmp_path / "gone"))
    assert_400(request(server, "PUT", "/sessions", body), code="KS-9", part="working_directory")


def server_with_fd_limit(start_server, monkeypatch, soft, hard, *args):
    """A server started with RLIMIT_NOFILE (soft, hard)."""
    import conftest
    resource = pytest.importorskip("resource")  # (POSIX)
    real_popen = conftest.subprocess.Popen

    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    monkeypatch.setattr(conftest.subprocess, "Popen", lambda *a, **kw: real_popen(*a, preexec_fn=preexec, **kw))
    try:
        return start_server("--transport", "tcp", *args)
    finally:
        monkeypatch.undo()


def test_start_failing_at_the_fd_limit_cleans_up(start_server, monkeypatch):
    """With few fds, some start fails in an unforeseen place: it must answer a KS error, leave the
    session exited (deletable) and no process behind; the server keeps answering."""
    server = server_with_fd_limit(start_server, monkeypatch, 60, 60)
    failed = None
    started = []
    for _ in range(30):
        session_id = new_id("fd")
        server.client.call("PUT", "/sessions", fake_kernel_session(session_id, connection_timeout=5))
        status, _, body = request(server, "POST", f"/sessions/{session_id}/start", timeout=60)
        if status != 200:
            failed = (session_id, status, body)
            break
        started.append(session_id)
    assert failed is not None, "60 fds were enough for 30 kernels?"
    session_id, status, body = failed
    assert status == 500 and body["error"]["code"].startswith("KS-"), body
    state = get_session(server, session_id)
    assert state["status"] == "exited" and "process_id" not in state, state
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)
    for sid in started:
        server.client.call("POST", f"/sessions/{sid}/kill")
    wait_for(lambda: all(get_session(server, sid)["status"] == "exited" for sid in started), 20, "kills")
    assert server.client.call("GET", "/status")["sessions"] == len(started)


# -- item 9: size limits, depth, StartupError output, racing starts -----------------------------

def test_big_body_is_refused_before_it_is_read(start_server):
    server = start_server("--transport", "tcp", "--max-body-bytes", "1000")
    assert request(server, "PUT", "/sessions", raw=b"{" + b" " * 2000 + b"}")[0] == 413
    # A claimed 200 MB body gets its 413 without the server waiting for the bytes.
    sock = socket.create_connection(("127.0.0.1", server.info["port"]), timeout=20)
    try:
        sock.sendall(b"PUT /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200000000\r\n\r\n{\"session_id\":")
        head = b""
        while not head.endswith(b"}\n"):
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"code":"413"' in head.replace(b" ", b"") and b"200000000 bytes" in head, head
    assert server.client.call("GET", "/status")["sessions"] == 0


def nested(depth):
    return "[" * depth + "]" * depth


def test_too_deep_json_is_a_400(server):
    raw = ('{"session_id": "deep", "env": ' + nested(10000) + "}").encode()
    assert_400(request(server, "PUT", "/sessions", raw=raw), part="nested too deeply")
    assert_400(request(server, "POST", "/client_heartbeat", raw=('{"x":' + nested(100) + "}").encode()),
               part="nested too deeply")


def test_too_deep_channel_frame_is_an_error_event(fake_session, open_channel):
    server, session_id = fake_session
    channel = open_channel(server, session_id)
    channel.ws.send('{"header":' + nested(10000) + "}")
    frame = channel.until(lambda f: f.get("kind") == "kernel" and "error" in f)[-1]
    assert frame["error"]["code"] == "invalid_message" and "deep" in frame["error"]["message"]
    request_ = channel.execute("print still here")
    assert "still here" in json.dumps(channel.until_idle(request_))


def test_lone_surrogates_in_a_channel_frame(fake_session, open_channel):
    server, session_id = fake_session
    channel = open_channel(server, session_id)
    channel.ws.send('{"header":{"msg_id":"s1","msg_type":"kernel_info_request"},"channel":"shell",'
                    '"content":{},"metadata":{"x":"\\ud800"}}')
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "kernel_info_reply")
    request_ = channel.execute("print still here")
    assert "still here" in json.dumps(channel.until_idle(request_))


def raw_websocket(server, session_id):
    sock = socket.create_connection(("127.0.0.1", server.info["port"]), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /sessions/{session_id}/channels HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101") and accept_key(key).encode() in head, head
    return sock


def read_close_code(sock, timeout=20):
    """Skip frames until a Close; its code (None if the connection ends without one)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F if buf[1] & 0x7F < 126 else 0):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        head = 2
        if length == 126:
            while len(buf) < 4:
                buf += sock.recv(65536)
            length, head = struct.unpack("!H", buf[2:4])[0], 4
        while len(buf) < head + length:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
        payload, buf = buf[head:head + length], buf[head + length:]
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0]


def test_websocket_frame_claiming_2_62_bytes_is_closed_1009(fake_session):
    server, session_id = fake_session
    sock = raw_websocket(server, session_id)
    try:
        sock.sendall(bytes((0x81, 0x80 | 127)) + (2**62).to_bytes(8, "big") + os.urandom(4) + b"x" * 1000)
        assert read_close_code(sock) == 1009
    finally:
        sock.close()
    assert get_session(server, session_id)["status"] == "idle"


def test_startup_error_output_keeps_a_bounded_tail(server):
    session_id = new_id("loud")
    body = fake_kernel_session(session_id)
    body["argv"] = ["/bin/sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' 'x'; echo; echo the-real-error; exit 3",
                    "{connection_file}"]
    server.client.call("PUT", "/sessions", body)
    status, _, answer = request(server, "POST", f"/sessions/{session_id}/start", timeout=60)
    assert status == 500 and answer["exit_code"] == 3, str(answer)[:300]
    assert answer["output"].endswith("the-real-error")
    assert len(answer["output"]) <= 70 * 1024, len(answer["output"])


def test_racing_starts_one_wins_the_others_409(server):
    session_id = new_id("race")
    server.client.call("PUT", "/sessions", fake_kernel_session(session_id, "--startup-delay", "0.5"))
    answers = [a.get() for a in gevent.joinall(
        [gevent.spawn(request, server, "POST", f"/sessions/{session_id}/start") for _ in range(8)], timeout=60)]
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] + [409] * 7, answers
    assert all(body["error"]["code"] == "KS-16" for status, _, body in answers if status == 409)
    server.client.call("POST", f"/sessions/{session_id}/kill")


# -- item 3: a kernel flooding its stdout -------------------------------------------------------

def test_output_flood_does_not_stall_the_server(server):
    """A kernel writing 20 MB of 2-byte lines before it starts: its start completes, and meanwhile
    GET /status keeps answering (each within a generous bound; it once stalled for 15 s+)."""
    session_id = new_id("flood")
    body = fake_kernel_session(session_id)
    body["argv"] = ["/bin/sh", "-c", f"yes a | head -c 20000000; exec {PYTHON} {FAKE_KERNEL} \"$0\"",
                    "{connection_file}"]
    server.client.call("PUT", "/sessions", body)
    start = gevent.spawn(request, server, "POST", f"/sessions/{session_id}/start", timeout=120)
    answered = 0
    while not start.ready():
        status, _, _ = request(server, "GET", "/status", timeout=10)
        assert status == 200
        answered += 1
        gevent.sleep(0.05)
    status, _, info = start.get()
    assert status == 200 and info["implementation"] == "fake", info
    pid = get_session(server, session_id)["process_id"]
    server.client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: pid_gone(pid), 10, "the flooding kernel to die")


# -- item 6: idle and half-open connections -----------------------------------------------------

def test_idle_and_half_open_connections_are_closed(start_server):
    server = start_server("--transport", "tcp", "--http-timeout", "1")
    idle = socket.create_connection(("127.0.0.1", server.info["port"]), timeout=20)
    half = socket.create_connection(("127.0.0.1", server.info["port"]), timeout=20)
    try:
        half.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert idle.recv(1) == b"", "the server must close an idle connection"
        answer = b""
        while chunk := half.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "408", answer
    finally:
        idle.close()
        half.close()


def test_serves_on_after_running_out_of_fds(start_server, monkeypatch):
    """More idle connections than fds: once they time out, new connections are served again."""
    server = server_with_fd_limit(start_server, monkeypatch, 200, 200, "--http-timeout", "2")
    hogs = []
    try:
        for _ in range(250):
            try:
                hogs.append(socket.create_connection(("127.0.0.1", server.info["port"]), timeout=5))
            except OSError:
                break
        deadline = time.monotonic() + 60
        while True:
            try:
                assert server.client.call("GET", "/status", timeout=5)["sessions"] == 0
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline, "the server did not recover from running out of fds"
    finally:
        for sock in hogs:
            sock.close()


def test_soft_fd_limit_is_raised_to_the_hard_limit(start_server, monkeypatch):
    resource = pytest.importorskip("resource")  # (POSIX)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    server = server_with_fd_limit(start_server, monkeypatch, 256, hard)
    limits = open(f"/proc/{server.pid}/limits").read().split("Max open files")[1].split()
    assert limits[0] == limits[1] == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard)), limits


# -- item 15: what the log says ----------------------------------------------------------------

def test_the_log_tells_the_story_of_a_session(start_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("log-token")
    server = start_server("--transport", "tcp", "--access-log", token=str(token_file))
    session_id = new_id("story")
    server.client.call("PUT", "/sessions", fake_kernel_session(session_id))
    server.client.call("POST", f"/sessions/{session_id}/start")
    pid = get_session(server, session_id)["process_id"]
    first = server.client.open_channel(session_id)
    wait_for(lambda: get_session(server, session_id)["connected"], 10, "the client")
    second = server.client.open_channel(session_id)
    server.client.call("POST", f"/sessions/{session_id}/interrupt")
    server.client.call("POST", f"/sessions/{session_id}/restart")
    server.client.call("POST", f"/sessions/{session_id}/kill")
    second.close()
    first.close()
    failing = new_id("fails")
    body = fake_kernel_session(failing, "--exit-at-start", "4")
    server.client.call("PUT", "/sessions", body)
    assert server.client.request("POST", f"/sessions/{failing}/start")[0] == 500
    assert server.client.request("GET", "/sessions", token=False)[0] == 401
    wait_for(lambda: "disconnected" in open(server.log_file).read(), 10, "the disconnect in the log")
    text = open(server.log_file).read()
    for expected in (f"session {session_id}: started kernel pid {pid}: ", "fake_kernel.py",
                     f"session {session_id}: client connected",
                     f"session {session_id}: a new client takes the channel over",
                     f"session {session_id}: interrupt (message)", f"session {session_id}: restarting",
                     f"session {session_id}: killing kernel pid", f"session {session_id}: kernel exited with code",
                     f"session {session_id}: client disconnected",
                     f"session {failing}: start failed: ", "fatal: exiting with 4",
                     "401 GET /sessions: no bearer token",
                     "GET /status HTTP/1.1"):  # the access log
        assert expected in text, f"{expected!r} not in the log:\n{text[-3000:]}"

"""End to end: the Unix-socket transport with real server processes.

Every server here runs `python -m kcgevent --transport socket --socket-dir D` with D a short
directory under /tmp (socket paths are limited to 104 bytes). Unit tests of the listeners and of
the announce helpers live in test_transports.py and test_announce.py; these tests drive whole
servers the way Positron does: HTTP over the main socket, `GET /sessions/{id}/channels` for the
per-session socket, a WebSocket upgrade at /api/channels/<id> on it, the handshake socket, and the
files left behind (or not) at shutdown.
"""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import websocket

from conftest import wait_for, PYTHON, fake_kernel_session, new_id, replies_to, start_session, stream_text
from kcgevent.client import Client, python_kernel_session

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "s3cret-unix-token"


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def socket_dir():
    """A short private directory under /tmp for the server's sockets."""
    path = tempfile.mkdtemp(prefix="kcu-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def socket_server(start_server, socket_dir, token_file):
    """A socket-transport server with a bearer token."""
    return start_server("--transport", "socket", "--socket-dir", socket_dir, token=token_file)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)



def raw_handshake(path, session_id, token=None, timeout=10):
    """Send a WebSocket upgrade on a per-session socket; return (status code, raw response head)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        lines = [f"GET /api/channels/{session_id} HTTP/1.1", "Host: localhost", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version: 13"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head = data.decode("latin-1")
    match = re.match(r"HTTP/1\.[01] (\d{3})", head)
    assert match, f"no HTTP status line in {head!r}"
    return int(match.group(1)), head


def channel_path(server, session_id):
    path = server.client.call("GET", f"/sessions/{session_id}/channels")
    assert isinstance(path, str), f"channels must return a JSON string, got {path!r}"
    return path


def private_dir_of(path, socket_dir):
    """The per-session socket's directory, checked to be a direct subdirectory of socket_dir."""
    directory = os.path.dirname(path)
    assert os.path.dirname(directory) == os.path.realpath(socket_dir) or \
        os.path.dirname(directory) == socket_dir, f"{path} is not in a subdirectory of {socket_dir}"
    return directory


def session_status(server, session_id):
    return server.client.call("GET", f"/sessions/{session_id}")["status"]


def shut_down_and_check(server, session_ids, how):
    """Shut `server` down (POST /shutdown or SIGTERM) and check that it exits 0 within 10 s and
    leaves no socket, private directory or kernel behind."""
    main_socket = server.info["socket_path"]
    channel_paths = [channel_path(server, sid) for sid in session_ids]
    private_dirs = {os.path.dirname(p) for p in channel_paths}
    for path in [main_socket, *channel_paths]:
        assert stat.S_ISSOCK(os.lstat(path).st_mode), path
    kernels = server.descendants()
    assert len(kernels) >= len(session_ids), "expected a kernel process per session"

    if how == "shutdown":
        assert server.client.request("POST", "/shutdown", token=False)[0] == 401
        assert server.client.call("POST", "/shutdown") is None
    else:
        server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 10 s after {how}")
    assert code == 0, f"server exited with {code} after {how}"

    left = [p for p in [main_socket, *channel_paths, *private_dirs] if os.path.lexists(p)]
    assert not left, f"left behind after {how}: {left}"
    _, alive = psutil.wait_procs(kernels, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"kernels still alive after {how}: {[p.pid for p in alive]}"


# -- end to end with ipykernel ---------------------------------------------------------------------


def test_ipykernel_round_trip_over_unix_sockets(socket_server, socket_dir, open_channel):
    server = socket_server
    client = server.client
    main_socket = server.info["socket_path"]
    assert main_socket == os.path.join(socket_dir, f"kc-{server.pid}.sock")
    assert mode(main_socket) == 0o600

    status = client.call("GET", "/status")
    assert status["process_id"] == server.pid
    assert status["sessions"] == 0

    session_id = new_id("py")
    body = python_kernel_session(session_id, PYTHON, working_directory=HERE)
    assert client.request("PUT", "/sessions", body, token=False)[0] == 401
    client.call("PUT", "/sessions", body)
    client.call("POST", f"/sessions/{session_id}/start")

    # The channel endpoint is authenticated in socket mode and answers with a path.
    assert client.request("GET", f"/sessions/{session_id}/channels", token=False)[0] == 401
    assert client.request("GET", "/sessions/no-such-session/channels")[0] == 404
    path = channel_path(server, session_id)
    assert os.path.isabs(path)
    private = private_dir_of(path, socket_dir)
    assert private != socket_dir
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert mode(path) == 0o600
    assert mode(private) == 0o700
    assert os.lstat(private).st_uid == os.getuid()
    # Asking again gives the same socket.
    assert channel_path(server, session_id) == path

    # Not connected yet: no socket_path in the session.
    assert "socket_path" not in client.call("GET", f"/sessions/{session_id}")

    # The per-session socket wants the bearer token too.
    code, head = raw_handshake(path, session_id)
    assert code == 401, head
    code, head = raw_handshake(path, session_id, token="wrong")
    assert code == 401, head
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://localhost/api/channels/{session_id}", timeout=10,
                                    socket=_connected(path))
    assert info.value.status_code == 401

    channel = open_channel(server, session_id)  # Client.open_channel: GET path, connect, upgrade with token
    request = channel.execute("print(1+1)")
    frames = channel.until_idle(request, timeout=20)
    assert stream_text(replies_to(frames, request)) == "2\n"
    if not replies_to(frames, request, "execute_reply"):
        frames += channel.until(lambda f: bool(replies_to([f], request, "execute_reply")), timeout=10)
    assert replies_to(frames, request, "execute_reply")[0]["content"]["status"] == "ok"

    described = wait_for(lambda: (lambda s: s if s.get("connected") else None)(
        client.call("GET", f"/sessions/{session_id}")), 5, "the session to show connected")
    assert described["socket_path"] == path

    client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: session_status(server, session_id) == "exited", 10, "the kernel to exit")


def _connected(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


# -- connection file ---------------------------------------------------------------------------------


SOCKET_KEYS = ["socket_path", "transport", "server_path", "server_pid", "bearer_token", "log_path", "server_id"]
TCP_KEYS = ["port", "base_path", "transport", "server_path", "server_pid", "bearer_token", "log_path",
            "server_id"]


def test_socket_connection_file_shape(socket_server, socket_dir):
    server = socket_server
    with open(server.connection_file) as f:
        text = f.read()
    info = json.loads(text)
    assert list(info) == SOCKET_KEYS
    assert "port" not in info and "base_path" not in info
    assert info["transport"] == "socket"
    assert info["socket_path"] == os.path.join(socket_dir, f"kc-{server.pid}.sock")
    assert info["server_pid"] == server.pid
    assert info["bearer_token"] == TOKEN
    assert info["log_path"] == server.log_file
    assert info["server_id"] == server.client.call("GET", "/status")["server_id"]
    assert text.startswith('{\n  "socket_path": ') and not text.endswith("\n")


def test_tcp_connection_file_shape(start_server):
    server = start_server("--transport", "tcp")
    assert list(server.info) == TCP_KEYS
    assert server.info["base_path"] == f"http://127.0.0.1:{server.info['port']}"
    assert server.info["transport"] == "tcp"
    assert server.info["bearer_token"] is None
    assert "socket_path" not in server.info


# -- handshake socket ----------------------------------------------------------------------------------


def test_handshake_socket(tmp_path, socket_dir):
    handshake_dir = tempfile.mkdtemp(prefix="kch-", dir="/tmp")
    os.chmod(handshake_dir, 0o700)
    handshake_path = os.path.join(handshake_dir, "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(handshake_path)
    os.chmod(handshake_path, 0o600)
    listener.listen(1)
    listener.settimeout(20)
    out = open(tmp_path / "hs.out", "wb")
    process = subprocess.Popen([PYTHON, "-m", "kcgevent", "--transport", "socket", "--socket-dir", socket_dir,
                                "--handshake-socket", handshake_path], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            pytest.fail(f"no handshake connection within 20 s (exit code {process.poll()}): "
                        f"{(tmp_path / 'hs.out').read_text()}")
        conn.settimeout(10)
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        else:
            pytest.fail(f"the server did not half-close the handshake within 10 s; got {data!r}")
        conn.close()

        text = data.decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1, repr(text)
        info = json.loads(text)
        assert info["transport"] == "socket"
        assert info["socket_path"] == os.path.join(socket_dir, f"kc-{process.pid}.sock")
        assert info["server_pid"] == process.pid
        assert re.fullmatch(r"[0-9a-f]{16}", info["bearer_token"] or ""), info["bearer_token"]
        assert re.fullmatch(r"[0-9a-f-]{36}", info["server_id"]), info["server_id"]
        assert "port" not in info and "base_path" not in info
        assert mode(info["socket_path"]) == 0o600

        client = Client(info, timeout=10)
        status = client.wait_ready(10)
        assert status["server_id"] == info["server_id"]
        assert status["process_id"] == process.pid
        assert client.request("POST", "/shutdown", token=False)[0] == 401
        assert client.call("POST", "/shutdown") is None
        try:
            assert process.wait(10) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("server still running 10 s after POST /shutdown")
        assert not os.path.lexists(info["socket_path"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        out.close()
        listener.close()
        shutil.rmtree(handshake_dir, ignore_errors=True)


# -- cleanup at shutdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["shutdown", "sigterm"])
def test_shutdown_removes_sockets_and_kernels(socket_server, open_channel, how):
    server = socket_server
    ids = [new_id("fake"), new_id("fake")]
    for session_id in ids:
        start_session(server.client, fake_kernel_session(session_id))
    channel = open_channel(server, ids[0])  # one session with a client attached, one without
    request = channel.execute("print up")
    assert stream_text(channel.until_idle(request)) == "up\n"
    shut_down_and_check(server, ids, how)


# -- several servers, several sessions -------------------------------------------------------------------


def test_two_servers_share_a_socket_dir(start_server, socket_dir):
    first = start_server("--transport", "socket", "--socket-dir", socket_dir)
    second = start_server("--transport", "socket", "--socket-dir", socket_dir)
    paths = [first.info["socket_path"], second.info["socket_path"]]
    assert paths[0] != paths[1]
    assert all(os.path.dirname(p) == socket_dir for p in paths)
    statuses = [first.client.call("GET", "/status"), second.client.call("GET", "/status")]
    assert [s["process_id"] for s in statuses] == [first.pid, second.pid]
    assert statuses[0]["server_id"] != statuses[1]["server_id"]
    # And their session sockets do not collide either.
    for server in (first, second):
        start_session(server.client, fake_kernel_session("same-id"))
    assert channel_path(first, "same-id") != channel_path(second, "same-id")


def test_long_common_prefix_ids_get_their_own_channels(socket_server, socket_dir, open_channel):
    server = socket_server
    one = "python-" + "a" * 40 + "1"
    two = "python-" + "a" * 40 + "2"
    for session_id in (one, two):
        start_session(server.client, fake_kernel_session(session_id))
    path_one, path_two = channel_path(server, one), channel_path(server, two)
    assert path_one != path_two
    for path in (path_one, path_two):
        assert len(os.fsencode(path)) <= 104
        private_dir_of(path, socket_dir)
        assert mode(path) == 0o600

    channel_one = open_channel(server, one)
    channel_two = open_channel(server, two)
    request_one = channel_one.execute("print one")
    request_two = channel_two.execute("print two")
    frames_one = channel_one.until_idle(request_one)
    frames_two = channel_two.until_idle(request_two)
    assert stream_text(frames_one) == "one\n"
    assert stream_text(frames_two) == "two\n"
    assert not replies_to(frames_one, request_two)
    assert not replies_to(frames_two, request_one)
    for session_id, path in ((one, path_one), (two, path_two)):
        described = server.client.call("GET", f"/sessions/{session_id}")
        assert described["connected"] is True
        assert described["socket_path"] == path


def test_delete_closes_the_channel_socket(socket_server, open_channel):
    server = socket_server
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    path = channel_path(server, session_id)
    channel = open_channel(server, session_id)
    request = channel.execute("print hi")
    assert stream_text(channel.until_idle(request)) == "hi\n"

    server.client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: session_status(server, session_id) == "exited", 10, "the kernel to exit")
    server.client.call("DELETE", f"/sessions/{session_id}")
    assert server.client.request("GET", f"/sessions/{session_id}")[0] == 404
    assert not os.path.lexists(path), f"{path} still exists after DELETE"
    with pytest.raises(OSError):
        _connected(path).close()
    # The server is still fine: a new session with the same id gets a working channel again.
    start_session(server.client, fake_kernel_session(session_id))
    channel = open_channel(server, session_id)
    request = channel.execute("print again")
    assert stream_text(channel.until_idle(request)) == "again\n"


# -- the newcomer command ---------------------------------------------------------------------------------


def test_run_command_over_socket_transport():
    try:
        result = subprocess.run([PYTHON, "-m", "kcgevent", "run", "--transport", "socket", "-c", "print(6*7)"],
                                capture_output=True, text=True, timeout=45, cwd=HERE)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`kcgevent run` did not finish within 45 s: {exc.stdout!r} {exc.stderr!r}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42", (result.stdout, result.stderr)

"""Transport selection and listeners, over real sockets. Every wait is bounded; every file is made
under a private temp dir that is removed afterwards (tempfile.tempdir and XDG_RUNTIME_DIR point into
it, so the "temp dir" fallbacks stay inside too)."""
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile

import gevent
import gevent.queue
import pytest
import requests
from flask import Flask, jsonify, request
from gevent import socket as gsocket

from kcgevent.transports import (TransportError, choose_transport, open_listener, session_channels,
                                 set_nodelay)
from kcgevent.transports.named_pipe import (NamedPipeListener, PipeWSGIServer, SessionPipes,
                                            pipe_name_for_server, pipe_name_for_session)
from kcgevent.transports.unix import MAX_PATH_BYTES, SessionSockets, UnixListener

unix_only = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
TIMEOUT = 5


@pytest.fixture
def base(monkeypatch):
    """A short private directory; the temp dir and XDG_RUNTIME_DIR point inside it."""
    root = tempfile.mkdtemp(prefix="kct-")
    os.mkdir(os.path.join(root, "tmp"))
    os.mkdir(os.path.join(root, "xdg"), 0o700)
    monkeypatch.setattr(tempfile, "tempdir", os.path.join(root, "tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.path.join(root, "xdg"))
    yield root
    shutil.rmtree(root)


def make_app():
    app = Flask(__name__)

    @app.route("/", defaults={"rest": ""})
    @app.route("/<path:rest>")
    def echo(rest):
        env = request.environ
        return jsonify(path=request.path, host=request.host, remote_addr=env.get("REMOTE_ADDR"),
                       server_name=env.get("SERVER_NAME"), server_port=env.get("SERVER_PORT"))

    @app.route("/nodelay")
    def nodelay():
        sock = request.environ["wsgi.input"].rfile.raw._sock
        return jsonify(nodelay=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    return app


def in_thread(func, *args, **kwargs):
    """Run a blocking client call in a native thread so the hub keeps serving."""
    return gevent.get_hub().threadpool.spawn(func, *args, **kwargs).get(timeout=TIMEOUT * 2)


def http_get(sock, target, version="1.1"):
    """Raw HTTP GET over a connected socket; returns (status, parsed JSON body)."""
    sock.settimeout(TIMEOUT)
    host = "Host: localhost\r\n" if version == "1.1" else ""
    sock.sendall(f"GET {target} HTTP/{version}\r\n{host}Connection: close\r\n\r\n".encode())
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def unix_get(path, target, version="1.1"):
    sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return http_get(sock, target, version)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- selection (behavior section 1.2) ------------------------------------------------------------

VALID = [
    # transport, unix_socket, connection_file, port, platform -> effective
    (None, None, None, 0, "linux", "tcp"),
    (None, None, None, None, "linux", "tcp"),
    (None, None, None, 8080, "linux", "tcp"),
    ("tcp", None, None, 8080, "linux", "tcp"),
    ("tcp", None, "c.json", 0, "linux", "tcp"),
    ("tcp", None, "c.json", 8080, "win32", "tcp"),
    (None, "/s.sock", None, 0, "linux", "socket"),
    (None, "/s.sock", "c.json", 0, "darwin", "socket"),
    (None, None, "c.json", 0, "linux", "socket"),
    (None, None, "c.json", 0, "darwin", "socket"),
    (None, None, "c.json", 0, "win32", "named-pipe"),
    (None, None, None, 0, "win32", "tcp"),
    ("socket", None, None, 0, "linux", "socket"),
    ("socket", "/s.sock", "c.json", 0, "linux", "socket"),
    ("named-pipe", None, None, 0, "win32", "named-pipe"),
    ("named-pipe", None, "c.json", 0, "win32", "named-pipe"),
]

INVALID = [
    ("udp", None, None, 0, "linux", "Invalid transport type 'udp'. Valid values are 'tcp', "
                                    "'socket' (Unix only), and 'named-pipe' (Windows only)."),
    ("", None, None, 0, "linux", "Invalid transport type ''"),
    ("TCP", None, None, 0, "linux", "Invalid transport type 'TCP'"),
    ("named-pipe", None, None, 0, "linux", "The named-pipe transport is only supported on Windows; "
                                           "use --transport socket or --transport tcp"),
    ("named-pipe", None, None, 0, "darwin", "only supported on Windows"),
    ("socket", None, None, 0, "win32", "The socket transport is not supported on Windows; "
                                       "use --transport named-pipe or --transport tcp"),
    ("socket", None, None, 8080, "linux", "--port can only be used with the tcp transport "
                                          "(current: socket); remove --port or add --transport tcp"),
    (None, None, "c.json", 8080, "linux", "--port can only be used with the tcp transport "
                                          "(current: socket)"),
    (None, "/s.sock", None, 8080, "linux", "(current: socket)"),
    (None, None, "c.json", 8080, "win32", "--port can only be used with the tcp transport "
                                         "(current: named-pipe)"),
    ("named-pipe", None, None, 1, "win32", "(current: named-pipe)"),
    ("tcp", "/s.sock", None, 0, "linux", "--unix-socket can only be used with the socket transport "
                                         "(current: tcp); remove --unix-socket or use --transport "
                                         "socket"),
    (None, "/s.sock", None, 0, "win32", "--unix-socket is not supported on Windows; remove "
                                        "--unix-socket"),
    ("named-pipe", "/s.sock", None, 0, "win32", "--unix-socket is not supported on Windows"),
]


@pytest.mark.parametrize("transport,unix_socket,connection_file,port,platform,expected", VALID)
def test_choose_transport(transport, unix_socket, connection_file, port, platform, expected):
    assert choose_transport(transport, unix_socket, connection_file, port, platform) == expected


@pytest.mark.parametrize("transport,unix_socket,connection_file,port,platform,message", INVALID)
def test_choose_transport_rejects(transport, unix_socket, connection_file, port, platform, message):
    with pytest.raises(TransportError) as info:
        choose_transport(transport, unix_socket, connection_file, port, platform)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_choose_transport_defaults_to_this_platform():
    assert choose_transport(None, None, None, 0) == "tcp"


# --- tcp ------------------------------------------------------------------------------------------

def test_tcp_listener_serves_flask():
    listener = open_listener("tcp")
    server = listener.wsgi_server(make_app(), log=None)
    server.start()
    try:
        port = listener.port
        assert port > 0
        assert listener.transport == "tcp"
        assert listener.describe() == {"port": port, "base_path": f"http://127.0.0.1:{port}"}
        assert list(listener.describe()) == ["port", "base_path"]
        assert listener.listening_line() == f"Listening at 127.0.0.1:{port}"
        assert listener.socket.getsockname() == ("127.0.0.1", port)

        reply = in_thread(requests.get, f"http://127.0.0.1:{port}/sessions/x", timeout=TIMEOUT)
        assert reply.status_code == 200
        assert reply.json()["path"] == "/sessions/x"
        assert reply.json()["remote_addr"] == "127.0.0.1"
        reply = in_thread(requests.get, f"http://127.0.0.1:{port}/nodelay", timeout=TIMEOUT)
        assert reply.json()["nodelay"] != 0
    finally:
        server.stop()
        listener.close()
        listener.close()


def test_tcp_bind_failure_is_a_transport_error():
    first = open_listener("tcp")
    try:
        with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{first.port}: .*in use"):
            open_listener("tcp", port=first.port)
    finally:
        first.close()


def test_set_nodelay():
    listener = open_listener("tcp")
    client = gsocket.create_connection(("127.0.0.1", listener.port), timeout=TIMEOUT)
    try:
        set_nodelay(client)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
        listener.close()


@unix_only
def test_set_nodelay_ignores_unix_sockets():
    left, right = gsocket.socketpair()
    set_nodelay(left)
    left.close()
    right.close()


# --- unix: main socket ----------------------------------------------------------------------------

@unix_only
def test_generated_socket_path_and_permissions(base):
    listener = open_listener("socket", socket_dir=base, pid=4242)
    path = os.path.join(base, "kc-4242.sock")
    try:
        assert listener.path == path
        assert listener.transport == "socket"
        assert listener.describe() == {"socket_path": path}
        assert listener.listening_line() == f"Listening on Unix socket: {path}"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert mode(path) == 0o600
    finally:
        listener.close()
    assert not os.path.exists(path)
    listener.close()  # idempotent


@unix_only
def test_default_socket_dir_is_xdg_runtime_dir(base):
    listener = UnixListener(pid=4243)
    try:
        assert listener.path == os.path.join(base, "xdg", "kc-4243.sock")
    finally:
        listener.close()


@unix_only
def test_xdg_too_long_falls_back_to_temp_dir(base, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent/" + "x" * 100)
    listener = UnixListener(pid=4244)
    try:
        assert listener.path == os.path.join(base, "tmp", "kc-4244.sock")
    finally:
        listener.close()


@unix_only
def test_unset_xdg_uses_temp_dir(base, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    listener = UnixListener(pid=4245)
    try:
        assert listener.path == os.path.join(base, "tmp", "kc-4245.sock")
    finally:
        listener.close()


@unix_only
def test_too_long_path_is_an_error(base):
    deep = os.path.join(base, "d" * 120)
    with pytest.raises(TransportError) as info:
        UnixListener(socket_dir=deep, pid=1)
    path = os.path.join(deep, "kc-1.sock")
    assert str(info.value) == (f"Unix socket path too long: {len(path)} characters "
                               f"(maximum: {MAX_PATH_BYTES}). Path: {path}")
    assert not os.path.exists(deep)
    with pytest.raises(TransportError, match="too long"):
        UnixListener(unix_socket=os.path.join(base, "s" * 110 + ".sock"))


@unix_only
def test_distinct_pids_get_distinct_sockets(base):
    first = UnixListener(socket_dir=base, pid=1)
    second = UnixListener(socket_dir=base, pid=2)
    try:
        assert first.path != second.path
        assert os.path.exists(first.path) and os.path.exists(second.path)
    finally:
        first.close()
        second.close()


@unix_only
def test_explicit_path_creates_parents(base):
    path = os.path.join(base, "a", "b", "main.sock")
    listener = open_listener("socket", unix_socket=path)
    try:
        assert listener.path == path
        assert mode(path) == 0o600
        assert mode(os.path.dirname(path)) == 0o700
    finally:
        listener.close()
    assert not os.path.exists(path)


@unix_only
def test_stale_socket_is_replaced(base):
    path = os.path.join(base, "stale.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()  # the file stays, nobody listens
    os.chmod(path, 0o644)
    listener = UnixListener(unix_socket=path)
    try:
        assert mode(path) == 0o600  # a new file (inode numbers may be reused, modes are not)
        probe = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(TIMEOUT)
        probe.connect(path)
        probe.close()
    finally:
        listener.close()


@unix_only
def test_live_socket_is_not_stolen(base):
    path = os.path.join(base, "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(TransportError, match="in use by another process"):
            UnixListener(unix_socket=path)
        assert os.path.exists(path)
    finally:
        live.close()


@unix_only
def test_regular_file_is_not_removed(base):
    path = os.path.join(base, "file.sock")
    with open(path, "w") as handle:
        handle.write("keep me")
    with pytest.raises(TransportError, match="is not a socket"):
        UnixListener(unix_socket=path)
    with open(path) as handle:
        assert handle.read() == "keep me"


@unix_only
def test_close_only_unlinks_our_file(base):
    path = os.path.join(base, "mine.sock")
    listener = UnixListener(unix_socket=path)
    os.unlink(path)
    with open(path, "w") as handle:
        handle.write("someone else's")
    listener.close()
    assert os.path.isfile(path)


@unix_only
def test_http_over_main_unix_socket(base):
    listener = open_listener("socket", socket_dir=base, pid=4246)
    server = listener.wsgi_server(make_app(), log=None)
    server.start()
    try:
        status, body = unix_get(listener.path, "/sessions?x=1")
        assert status == 200
        assert body == {"path": "/sessions", "host": "localhost", "remote_addr": "",
                        "server_name": "localhost", "server_port": "80"}
        status, body = unix_get(listener.path, "/status", version="1.0")  # no Host header
        assert (status, body["host"]) == (200, "localhost")
    finally:
        server.stop()
        listener.close()
    assert not os.path.exists(listener.path)


# --- unix: per-session sockets --------------------------------------------------------------------

@unix_only
def test_session_sockets(base):
    sessions = SessionSockets(base, 4247)
    app = make_app()
    prefix = "python-" + "a" * 33
    first, second = prefix + "-one", prefix + "-two"
    try:
        path1 = sessions.open(first, app)
        path2 = sessions.open(second, app)
        private = os.path.join(base, "kc-4247.d")
        assert path1 != path2
        assert os.path.dirname(path1) == os.path.dirname(path2) == private
        assert re.fullmatch(r"[0-9a-f]{16}\.sock", os.path.basename(path1))
        assert mode(private) == 0o700
        assert mode(path1) == mode(path2) == 0o600
        assert sessions.open(first, app) == path1
        assert sessions.path_for(first) == path1

        status, body = unix_get(path1, f"/api/channels/{first}")
        assert (status, body["path"]) == (200, f"/api/channels/{first}")
        status, body = unix_get(path2, "/")
        assert (status, body["path"]) == (200, "/")

        sessions.close(first)
        assert not os.path.exists(path1)
        assert sessions.path_for(first) is None
        assert os.path.exists(path2)
        sessions.close(first)  # idempotent
    finally:
        sessions.close_all()
    assert not os.path.exists(path2)
    assert not os.path.exists(private)


@unix_only
def test_session_sockets_default_dir_and_long_dir_fallback(base):
    sessions = SessionSockets(pid=4248)
    try:
        path = sessions.open("s", make_app())
        assert os.path.dirname(path) == os.path.join(base, "xdg", "kc-4248.d")
    finally:
        sessions.close_all()
    sessions = SessionSockets(os.path.join(base, "d" * 90), 4249)
    try:
        path = sessions.open("s", make_app())
        assert os.path.dirname(path) == os.path.join(base, "tmp", "kc-4249.d")
    finally:
        sessions.close_all()


@unix_only
def test_session_dir_owned_by_nobody_else(base):
    os.symlink(base, os.path.join(base, "kc-4250.d"))
    sessions = SessionSockets(base, 4250)
    with pytest.raises(TransportError, match="not a directory owned by this user"):
        sessions.open("s", make_app())


@unix_only
def test_session_channels_factory(base):
    assert session_channels("tcp") is None
    assert isinstance(session_channels("socket", socket_dir=base), SessionSockets)
    assert isinstance(session_channels("named-pipe"), SessionPipes)


# --- named pipes (pure parts; the Windows I/O is untested on Linux) ------------------------------

def test_pipe_names():
    assert pipe_name_for_server(1234) == r"\\.\pipe\kallichore-1234"
    first, second = pipe_name_for_session(), pipe_name_for_session()
    assert re.fullmatch(r"\\\\\.\\pipe\\kallichore-[0-9a-f]{32}", first)
    assert first != second


def test_pipe_listener_describe():
    listener = NamedPipeListener.__new__(NamedPipeListener)  # no pipe: describing needs only a name
    listener.name = pipe_name_for_server(77)
    assert listener.transport == "named-pipe"
    assert listener.describe() == {"named_pipe": r"\\.\pipe\kallichore-77"}
    assert listener.listening_line() == r"Listening on named pipe: \\.\pipe\kallichore-77"


class SocketPairListener:
    """Stand-in for NamedPipeListener built on real socket pairs, to drive PipeWSGIServer's
    accept loop (the part of the pipe transport that does not touch _winapi)."""

    name = r"\\.\pipe\kallichore-test"

    def __init__(self):
        self._queue = gevent.queue.Queue()

    def connect(self):
        server_end, client_end = gsocket.socketpair()
        self._queue.put(server_end)
        return client_end

    def accept(self):
        conn = self._queue.get()
        if conn is None:
            raise OSError("closed")
        return conn, self.name

    def close(self):
        self._queue.put(None)


@unix_only
def test_pipe_wsgi_server_accept_loop():
    listener = SocketPairListener()
    server = PipeWSGIServer(listener, make_app(), log=None)
    server.start()
    try:
        for target in ("/api/channels/abc", "/status"):
            status, body = http_get(listener.connect(), target)
            assert (status, body["path"], body["server_name"]) == (200, target, "localhost")
    finally:
        server.stop()
    assert server.closed


@pytest.mark.skipif(sys.platform != "win32", reason="named pipes are Windows-only")
def test_named_pipe_listener_serves_http():
    listener = open_listener("named-pipe", pid=os.getpid())
    server = listener.wsgi_server(make_app(), log=None)
    server.start()
    try:
        def get():
            with open(listener.name, "r+b", buffering=0) as pipe:
                pipe.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return pipe.read(65536)
        assert in_thread(get).startswith(b"HTTP/1.1 200")
    finally:
        server.stop()

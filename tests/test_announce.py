"""Connection file and handshake socket, with real listeners and a test-owned handshake socket."""
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time

import gevent
import pytest
from gevent import socket as gsocket

from kcgevent.announce import AnnounceError, connection_info, send_handshake, write_connection_file
from kcgevent.transports import open_listener
from kcgevent.transports.named_pipe import NamedPipeListener

unix_only = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
COMMON = ["transport", "server_path", "server_pid", "bearer_token", "log_path", "server_id"]
SERVER_ID = "9b2f4c3e-5a1d-4e7f-8c6b-0d2e1f3a4b5c"


@pytest.fixture
def base():
    root = tempfile.mkdtemp(prefix="kca-")
    yield root
    shutil.rmtree(root)


def info_for(listener, token="4dea37b8a3b3e09f", log_path=None):
    return connection_info(listener, server_path="/usr/bin/kcgevent", server_pid=12345,
                           bearer_token=token, log_path=log_path, server_id=SERVER_ID)


def read_back(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return text, json.loads(text)


def test_tcp_connection_file(base):
    listener = open_listener("tcp")
    try:
        info = info_for(listener, token=None)
    finally:
        listener.close()
    path = os.path.join(base, "connection.json")
    write_connection_file(path, info)
    text, data = read_back(path)
    assert list(data) == ["port", "base_path"] + COMMON
    assert data == {"port": listener.port, "base_path": f"http://127.0.0.1:{listener.port}",
                    "transport": "tcp", "server_path": "/usr/bin/kcgevent", "server_pid": 12345,
                    "bearer_token": None, "log_path": None, "server_id": SERVER_ID}
    assert text.startswith('{\n  "port": ')
    assert '\n  "bearer_token": null,\n' in text
    assert not text.endswith("\n")
    assert text == json.dumps(info, indent=2)
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(base) == ["connection.json"]  # no temp file left behind


@unix_only
def test_socket_connection_file_replaces_old_one(base):
    listener = open_listener("socket", socket_dir=base, pid=777)
    try:
        info = info_for(listener, log_path="/var/log/kc.log")
    finally:
        listener.close()
    path = os.path.join(base, "connection.json")
    with open(path, "w") as handle:
        handle.write("old")
    write_connection_file(path, info)
    text, data = read_back(path)
    assert list(data) == ["socket_path"] + COMMON
    assert data["socket_path"] == os.path.join(base, "kc-777.sock")
    assert (data["transport"], data["bearer_token"], data["log_path"]) == (
        "socket", "4dea37b8a3b3e09f", "/var/log/kc.log")
    assert not text.endswith("\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_named_pipe_connection_info():
    listener = NamedPipeListener.__new__(NamedPipeListener)  # describing needs only a name
    listener.name = r"\\.\pipe\kallichore-12345"
    info = info_for(listener)
    assert list(info) == ["named_pipe"] + COMMON
    assert (info["named_pipe"], info["transport"]) == (r"\\.\pipe\kallichore-12345", "named-pipe")


def test_unwritable_connection_file(base):
    with pytest.raises(AnnounceError, match="Cannot write connection file"):
        write_connection_file(os.path.join(base, "missing", "c.json"), {"a": 1})


class HandshakeServer:
    """The client's side of the handshake: accept once, read to EOF, then close (or hold on)."""

    def __init__(self, path, hold_open=False):
        self.sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.hold_open = hold_open
        self.greenlet = gevent.spawn(self._serve)

    def _serve(self):
        conn, _ = self.sock.accept()
        conn.settimeout(5)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        if self.hold_open:
            gevent.sleep(5)
        conn.close()
        return b"".join(chunks)

    def close(self):
        self.greenlet.kill()
        self.sock.close()


@unix_only
def test_handshake_payload(base):
    path = os.path.join(base, "s.sock")
    server = HandshakeServer(path)
    listener = open_listener("tcp")
    try:
        info = info_for(listener)
        send_handshake(path, info, timeout=5)
        payload = server.greenlet.get(timeout=5)
    finally:
        listener.close()
        server.close()
    assert payload.endswith(b"\n") and payload.count(b"\n") == 1
    data = json.loads(payload)
    assert data == info
    assert list(data) == ["port", "base_path"] + COMMON
    assert data["server_id"] == SERVER_ID


@unix_only
def test_handshake_is_bounded_when_client_never_closes(base):
    path = os.path.join(base, "s.sock")
    server = HandshakeServer(path, hold_open=True)
    try:
        started = time.monotonic()
        send_handshake(path, {"transport": "tcp"}, timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        server.close()


@unix_only
def test_handshake_without_listener_fails(base):
    with pytest.raises(AnnounceError, match="Cannot send handshake to .*s.sock"):
        send_handshake(os.path.join(base, "s.sock"), {"transport": "tcp"}, timeout=1)

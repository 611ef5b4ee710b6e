"""How clients learn where we listen: the connection file (legacy) and the handshake socket (current
Positron). See kallichore-behavior.md section 1.4 and positron-client-contract.md section 1.3.
"""
import json
import os
import socket
import sys
import tempfile
import time

from gevent import socket as gsocket


class AnnounceError(Exception):
    """The connection details could not be delivered; the message says where and why."""


def connection_info(listener, *, server_path, server_pid, bearer_token, log_path, server_id):
    """The connection details in kcserver's key order: transport fields first, then `transport`.

    bearer_token and log_path are None (JSON null) when auth is off / there is no log file.
    """
    return {
        **listener.describe(),
        "transport": listener.transport,
        "server_path": server_path,
        "server_pid": server_pid,
        "bearer_token": bearer_token,
        "log_path": log_path,
        "server_id": server_id,
    }


def write_connection_file(path, info):
    """Write info as 2-space-indented JSON without a trailing newline, 0600 (it holds the token),
    atomically: a client polling for the file never sees it half-written."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)  # mode 0600
    except OSError as exc:
        raise AnnounceError(f"Cannot write connection file {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(info, indent=2, ensure_ascii=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise AnnounceError(f"Cannot write connection file {path}: {exc}") from exc


def send_handshake(path, info, timeout=10):
    """Send info as one JSON line to the client's handshake socket (a named pipe on Windows), then
    half-close and drain until the client closes or `timeout` seconds have passed in total."""
    payload = (json.dumps(info, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
    if sys.platform == "win32":
        _send_to_pipe(path, payload)
    else:
        _send_to_socket(path, payload, timeout)


def _send_to_socket(path, payload, timeout):
    deadline = time.monotonic() + timeout
    sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        sock.close()
        raise AnnounceError(f"Cannot send handshake to {path}: {exc}") from exc
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(4096):
                break
    except OSError:
        pass  # the payload is delivered; a slow or rude close is the client's business
    finally:
        sock.close()


def _send_to_pipe(path, payload):
    """Untested (Linux CI). A pipe cannot be half-closed, so closing it ends the message; the client
    reads up to the newline or EOF."""
    try:
        with open(path, "wb", buffering=0) as pipe:
            pipe.write(payload)
    except OSError as exc:
        raise AnnounceError(f"Cannot send handshake to {path}: {exc}") from exc

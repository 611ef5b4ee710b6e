"""A small blocking client for a Kallichore-compatible server, over TCP or a Unix socket.

Used by the `run` / `sessions` commands, the tests and the benchmarks. It is
deliberately plain (http.client + websocket-client) so that it exercises the
server the way an outside client does.
"""
import http.client
import json
import socket
import time
import uuid
from urllib.parse import quote

import websocket


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class ApiResponseError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Client:
    """Talks to one server, described by its connection file's fields."""

    def __init__(self, info, timeout=60):
        self.info = info
        self.token = info.get("bearer_token")
        self.timeout = timeout

    def _connection(self, timeout=None):
        timeout = timeout or self.timeout
        if self.info.get("socket_path") and not self.info.get("port"):
            return UnixHTTPConnection(self.info["socket_path"], timeout)
        return http.client.HTTPConnection("127.0.0.1", self.info["port"], timeout=timeout)

    def headers(self, token=True):
        headers = {}
        if token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def exchange(self, method, path, body=None, *, token=True, timeout=None, raw_body=None, headers=None):
        """(status, response headers, decoded JSON, text or None) of one request. `body` is sent as
        JSON, `raw_body` as given; `headers` are added to (and override) the usual ones."""
        conn = self._connection(timeout)
        all_headers = self.headers(token)
        all_headers.update(headers or {})
        data = raw_body
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = payload.decode(errors="replace")
        return response.status, response.headers, decoded

    def request(self, method, path, body=None, *, token=True, timeout=None, raw_body=None):
        """(status, decoded JSON or None) of one request."""
        status, _, decoded = self.exchange(method, path, body, token=token, timeout=timeout, raw_body=raw_body)
        return status, decoded

    def call(self, method, path, body=None, **kwargs):
        """Like `request`, but raise ApiResponseError unless the status is 200."""
        status, decoded = self.request(method, path, body, **kwargs)
        if status != 200:
            raise ApiResponseError(status, decoded)
        return decoded

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("GET", "/status", timeout=2)
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def open_channel(self, session_id, after=None, timeout=30):
        """A websocket-client connection to the session's channel, on whichever transport."""
        query = "" if after is None else f"?after={after}"
        session_id = quote(session_id, safe="")
        header = [f"{k}: {v}" for k, v in self.headers().items()]
        if self.info.get("port"):
            return websocket.create_connection(
                f"ws://127.0.0.1:{self.info['port']}/sessions/{session_id}/channels{query}",
                header=header, timeout=timeout, enable_multithread=True,
                skip_utf8_validation=True)
        path = self.call("GET", f"/sessions/{session_id}/channels")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return websocket.create_connection(f"ws://localhost/api/channels/{session_id}{query}", header=header,
                                           timeout=timeout, socket=sock, enable_multithread=True,
                                           skip_utf8_validation=True)


def python_kernel_session(session_id, python, **overrides):
    """A NewSession body for an ipykernel run by `python`."""
    body = {
        "session_id": session_id,
        "display_name": "Python",
        "language": "python",
        "username": "kcgevent",
        "input_prompt": "In [{}]: ",
        "continuation_prompt": "   ...: ",
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "session_mode": "console",
        "working_directory": "",
        "env": [],
        "connection_timeout": 30,
        "interrupt_mode": "message",
        "startup_environment": "none",
    }
    body.update(overrides)
    return body


def jupyter_message(msg_type, content, channel="shell", msg_id=None, parent=None):
    """A client->server channel frame (a bare Jupyter message, as Positron sends)."""
    return {
        "header": {"msg_id": msg_id or uuid.uuid4().hex, "msg_type": msg_type},
        "parent_header": parent,
        "channel": channel,
        "content": content,
        "metadata": {},
        "buffers": [],
    }


def execute_request(code, msg_id=None):
    return jupyter_message("execute_request", {"code": code, "silent": False, "store_history": True,
                                               "user_expressions": {}, "allow_stdin": True,
                                               "stop_on_error": True}, msg_id=msg_id)

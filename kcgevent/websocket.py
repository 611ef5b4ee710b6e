"""Server side of a WebSocket connection, for gevent.

Modelled on simple-websocket (which flask-sock uses) but made for a relay:
- every write is a `sendall` (simple-websocket calls `socket.send` and ignores
  partial writes, which under gevent corrupts large or back-pressured streams);
- many frames leave in one write (`send_frames`), and text frames are framed
  from bytes directly, so relayed JSON is never decoded and re-encoded;
- no permessage-deflate (Kallichore offers no extensions either);
- pings carry an 8-byte big-endian counter, as Kallichore's do, so a peer
  that stops answering is noticed after `MAX_UNANSWERED_PINGS`;
- TCP_NODELAY is set: without it each small frame waits for Nagle (40 ms).
Incoming frames are parsed by wsproto.
"""
import base64
import hashlib
import socket
import struct

import gevent
from gevent.lock import Semaphore
from wsproto.connection import Connection, ConnectionType, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9
MAX_UNANSWERED_PINGS = 3
RECV_BYTES = 65536


class HandshakeError(Exception):
    """The request is not a valid WebSocket upgrade."""


class ConnectionClosed(Exception):
    """The connection is closed (by either side, or by a socket error)."""


def frame(opcode, payload):
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def is_upgrade_request(environ):
    return "websocket" in environ.get("HTTP_UPGRADE", "").lower()


def socket_from_environ(environ):
    """The client socket under a gevent.pywsgi request (as simple-websocket finds it)."""
    wsgi_input = environ["wsgi.input"]
    rfile = getattr(wsgi_input, "rfile", wsgi_input)
    raw = getattr(rfile, "raw", None)
    sock = getattr(raw, "_sock", None)
    if sock is None:
        raise HandshakeError("WebSocket upgrade needs gevent.pywsgi (no socket in the WSGI environ)")
    return sock


class WebSocket:
    """One accepted WebSocket; `receive` from one greenlet, `send_frames` from any."""

    def __init__(self, sock):
        self.sock = sock
        self._conn = Connection(ConnectionType.SERVER)
        self._send_lock = Semaphore()
        self._pending_text = []
        self.closed = False
        self.close_code = None
        self.pings_sent = 0
        self.last_pong = 0
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def accept(cls, environ):
        """Answer the upgrade request in `environ` with 101 and return the connection."""
        if not is_upgrade_request(environ):
            raise HandshakeError("expected a WebSocket upgrade request (Upgrade: websocket)")
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
        if not key:
            raise HandshakeError("the WebSocket upgrade request has no Sec-WebSocket-Key header")
        sock = socket_from_environ(environ)
        ws = cls(sock)
        ws._sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
        )
        return ws

    # -- sending -------------------------------------------------------------

    def _sendall(self, data):
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from None

    def send_frames(self, payloads):
        """Send JSON payloads (bytes) as text frames, in one write."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        self._sendall(b"".join(frame(OP_TEXT, p) for p in payloads))

    def send(self, payload):
        self.send_frames((payload,))

    def ping(self):
        """Send the next counter ping; False if the peer is too far behind."""
        if self.pings_sent - self.last_pong > MAX_UNANSWERED_PINGS:
            return False
        self.pings_sent += 1
        self._sendall(frame(OP_PING, struct.pack("!Q", self.pings_sent)))
        return True

    def close(self, code=1000, reason=""):
        """Send a Close frame (once) and shut the socket down; never raises."""
        if not self.closed:
            self.closed = True
            try:
                with gevent.Timeout(2):
                    with self._send_lock:
                        self.sock.sendall(frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120]))
            except (OSError, gevent.Timeout):
                pass
        self.shutdown()

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- receiving -----------------------------------------------------------

    def receive(self, timeout=None):
        """The next text message (str), or None on timeout; raise ConnectionClosed at the end."""
        while True:
            for event in self._conn.events():
                message = self._handle(event)
                if message is not None:
                    return message
            if self.closed or self._conn.state is ConnectionState.CLOSED:
                raise ConnectionClosed(f"closed ({self.close_code})")
            try:
                with gevent.Timeout(timeout, False):
                    data = self.sock.recv(RECV_BYTES)
                    if not data:
                        self.closed = True
                        raise ConnectionClosed("peer closed the connection")
                    self._conn.receive_data(data)
                    continue
                return None
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from None
            except RemoteProtocolError as exc:
                self.close(1002, "protocol error")
                raise ConnectionClosed(f"protocol error: {exc}") from None

    def _handle(self, event):
        if isinstance(event, TextMessage):
            self._pending_text.append(event.data)
            if event.message_finished:
                text, self._pending_text = "".join(self._pending_text), []
                return text
        elif isinstance(event, Ping):
            self._send_control(event.response())
        elif isinstance(event, Pong):
            if len(event.payload) == 8:
                self.last_pong = max(self.last_pong, struct.unpack("!Q", event.payload)[0])
        elif isinstance(event, CloseConnection):
            self.close_code = event.code
            if not self.closed:
                self._send_control(event.response())
            self.closed = True
            raise ConnectionClosed(f"closed by peer ({event.code})")
        elif isinstance(event, BytesMessage):
            pass  # Kallichore ignores binary frames; so do we.
        return None

    def _send_control(self, event):
        try:
            self._sendall(self._conn.send(event))
        except (ConnectionClosed, LocalProtocolError):
            pass

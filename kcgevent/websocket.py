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
Incoming frames are parsed by wsproto, except the common case: a whole,
final, masked text frame outside a fragmented message is unmasked and decoded
here (wsproto's generic path costs tens of microseconds per frame). Every other
frame is handed to wsproto whole, and at the first frame this module does not
recognise as well-formed wsproto gets every byte from then on, so wsproto's
checks and answers (close codes, pongs, protocol errors) stay the same.
"""
import base64
import hashlib
import socket
import struct

import gevent
from gevent.lock import Semaphore
from wsproto.connection import Connection, ConnectionType, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import XorMaskerSimple
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9
MAX_UNANSWERED_PINGS = 3
RECV_BYTES = 65536
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a client message past this closes the connection with 1009


_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))  # continuation, text, binary, close, ping, pong
FIN_TEXT = 0x80 | OP_TEXT


def client_frame_extent(buf):
    """(header length, frame length) of the whole client frame at the start of `buf`.

    None while the frame is incomplete; (0, 0) if the frame is not well-formed
    by RFC 6455 as wsproto checks it (reserved bits or opcodes, no mask, a long
    or fragmented control frame, a non-minimal length): wsproto must judge it.
    """
    n = len(buf)
    if n < 2:
        return None
    b0, b1 = buf[0], buf[1]
    opcode = b0 & 0x0F
    if b0 & 0x70 or not b1 & 0x80 or opcode not in _OPCODES:
        return 0, 0
    length = b1 & 0x7F
    if opcode & 0x8 and (length > 125 or not b0 & 0x80):
        return 0, 0
    if length < 126:
        head = 6
    elif length == 126:
        if n < 4:
            return None
        length, head = buf[2] << 8 | buf[3], 8
        if length < 126:
            return 0, 0
    else:
        if n < 10:
            return None
        length, head = int.from_bytes(buf[2:10], "big"), 14
        if length < 65536 or length >> 63:
            return 0, 0
    if n < head + length:
        return None
    return head, head + length


def declared_length(buf):
    """The payload length the frame header at the start of `buf` claims, or None until it is all here."""
    if len(buf) < 2:
        return None
    length = buf[1] & 0x7F
    if length == 126:
        return buf[2] << 8 | buf[3] if len(buf) >= 4 else None
    if length == 127:
        return int.from_bytes(buf[2:10], "big") if len(buf) >= 10 else None
    return length


class MessageTooBig(Exception):
    """A client message (or the frame header announcing it) exceeds the limit: close with 1009."""


class HandshakeError(Exception):
    """The request is not a valid WebSocket upgrade."""


class ConnectionClosed(Exception):
    """The connection is closed (by either side, or by a socket error)."""


_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack
_TEXT_HEADS = [bytes((0x80 | OP_TEXT, n)) for n in range(126)]  # the common case, ready-made


def frame_header(opcode, n):
    """The header of one unmasked, final server frame with an `n`-byte payload."""
    if n < 126:
        return _TEXT_HEADS[n] if opcode == OP_TEXT else bytes((0x80 | opcode, n))
    if n < 65536:
        return _HEAD16(0x80 | opcode, 126, n)
    return _HEAD64(0x80 | opcode, 127, n)


def frame(opcode, payload):
    """One unmasked, final server frame."""
    return frame_header(opcode, len(payload)) + payload


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def is_upgrade_request(environ):
    return "websocket" in environ.get("HTTP_UPGRADE", "").lower()


def check_upgrade(environ):
    """Raise HandshakeError unless `environ` is a valid RFC 6455 opening handshake."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError(f"a WebSocket upgrade must be a GET (got {environ.get('REQUEST_METHOD')})")
    if not is_upgrade_request(environ):
        raise HandshakeError("expected a WebSocket upgrade request (Upgrade: websocket)")
    connection = {token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")}
    if "upgrade" not in connection:
        raise HandshakeError("the WebSocket upgrade request lacks 'Connection: Upgrade'")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise HandshakeError("unsupported WebSocket version (Sec-WebSocket-Version must be 13)")
    if not environ.get("HTTP_SEC_WEBSOCKET_KEY"):
        raise HandshakeError("the WebSocket upgrade request has no Sec-WebSocket-Key header")


def socket_from_environ(environ):
    """The client socket under gunicorn's gevent worker or a gevent.pywsgi request."""
    if environ.get("gunicorn.socket") is not None:
        return environ["gunicorn.socket"]
    wsgi_input = environ["wsgi.input"]
    rfile = getattr(wsgi_input, "rfile", wsgi_input)
    raw = getattr(rfile, "raw", None)
    sock = getattr(raw, "_sock", None)
    if sock is None:
        raise HandshakeError("WebSocket upgrade needs gevent.pywsgi or gunicorn's gevent worker "
                             "(no socket in the WSGI environ)")
    return sock


class WebSocket:
    """One accepted WebSocket; `receive` from one greenlet, `send_frames` from any."""

    def __init__(self, sock, *, max_message_bytes=MAX_MESSAGE_BYTES):
        self.sock = sock
        self.max_message_bytes = max_message_bytes
        self._pending_bytes = 0  # size of the fragmented message wsproto is assembling
        self._conn = Connection(ConnectionType.SERVER)
        self._send_lock = Semaphore()
        self._pending_text = []
        self._rx = bytearray()  # received bytes not yet split into frames
        self._in_message = False  # wsproto is assembling a fragmented message
        self._wsproto_only = False  # an unusual frame was seen: wsproto parses everything from then on
        self._wsproto_fed = False  # wsproto may have events to give
        self.closed = False
        self.close_code = None
        self.pings_sent = 0
        self.last_pong = 0
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(sock, "settimeout"):
            sock.settimeout(None)  # the HTTP idle timeout no longer applies: pings watch the client

    @classmethod
    def accept(cls, environ, *, max_message_bytes=MAX_MESSAGE_BYTES):
        """Answer the upgrade request in `environ` with 101 and return the connection."""
        check_upgrade(environ)
        key = environ["HTTP_SEC_WEBSOCKET_KEY"]
        sock = socket_from_environ(environ)
        ws = cls(sock, max_message_bytes=max_message_bytes)
        ws._sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
        )
        return ws

    # -- sending -------------------------------------------------------------

    def _sendall(self, data):
        with self._send_lock:
            try:
                # One send() usually takes it all; gevent's sendall would first ask the
                # kernel for SO_SNDBUF (a syscall per write) to size its chunks.
                sent = self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from None

    def send_frames(self, payloads):
        """Send JSON payloads (bytes) as text frames, in one write (one copy of each payload)."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        parts = []
        for payload in payloads:
            parts.append(frame_header(OP_TEXT, len(payload)))
            parts.append(payload)
        self._sendall(b"".join(parts))

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
            try:
                message = self._next_message()
                if message is not None:
                    return message
                if self.closed or self._conn.state is ConnectionState.CLOSED:
                    raise ConnectionClosed(f"closed ({self.close_code})")
                with gevent.Timeout(timeout, False):
                    data = self.sock.recv(RECV_BYTES)
                    if not data:
                        self.closed = True
                        raise ConnectionClosed("peer closed the connection")
                    if self._wsproto_only:
                        self._feed_wsproto(data)
                    else:
                        self._rx += data
                    continue
                return None
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from None
            except RemoteProtocolError as exc:
                self.close(1002, "protocol error")
                raise ConnectionClosed(f"protocol error: {exc}") from None
            except MessageTooBig as exc:
                self.close(1009, "message too big")
                raise ConnectionClosed(str(exc)) from None

    def _feed_wsproto(self, data):
        self._conn.receive_data(data)
        self._wsproto_fed = True

    def _next_message(self):
        """A whole text message from what was received, or None; handles the other frames."""
        while True:
            if self._wsproto_fed or self._wsproto_only:
                for event in self._conn.events():
                    message = self._handle(event)
                    if message is not None:
                        return message  # (wsproto may have more: it stays "fed")
                self._wsproto_fed = False
            rx = self._rx
            if not rx:
                return None
            extent = client_frame_extent(rx)
            if extent is None:
                claimed = declared_length(rx)
                if claimed is not None and claimed > self.max_message_bytes:
                    raise MessageTooBig(f"a frame of {claimed} bytes (the limit is {self.max_message_bytes})")
                return None
            if extent[1] > self.max_message_bytes + 14:
                raise MessageTooBig(f"a frame of {extent[1]} bytes (the limit is {self.max_message_bytes})")
            head, size = extent
            if not size:  # not well-formed: wsproto gets it all and answers as it does
                self._wsproto_only = True
                self._rx = bytearray()
                self._feed_wsproto(bytes(rx))
                continue
            frame_bytes = bytes(rx[:size])
            del rx[:size]
            b0 = frame_bytes[0]
            if b0 == FIN_TEXT and not self._in_message:
                payload = XorMaskerSimple(frame_bytes[head - 4:head]).process(frame_bytes[head:])
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError:
                    pass  # wsproto closes with 1007, as always
            else:
                opcode = b0 & 0x0F
                if opcode in (0x1, 0x2):
                    self._in_message = not b0 & 0x80
                elif opcode == 0x0 and b0 & 0x80:
                    self._in_message = False
            self._feed_wsproto(frame_bytes)

    def _handle(self, event):
        if isinstance(event, TextMessage):
            self._pending_text.append(event.data)
            self._pending_bytes += len(event.data)
            if self._pending_bytes > self.max_message_bytes:
                raise MessageTooBig(f"a message of more than {self.max_message_bytes} bytes")
            if event.message_finished:
                text, self._pending_text, self._pending_bytes = "".join(self._pending_text), [], 0
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

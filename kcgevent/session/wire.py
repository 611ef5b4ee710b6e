"""The Jupyter wire protocol, and the JSON envelopes of the client channel.

Kernel side (ZeroMQ): ``[identities..., b"<IDS|MSG>", signature, header,
parent_header, metadata, content, buffers...]``, signed with HMAC-SHA256 over
the four JSON frames (see jupyter_client's session.py).

Client side (WebSocket): one JSON object per text frame. Kernel messages are
relayed *without* re-encoding their JSON frames: the envelope is spliced
together from the raw frame bytes, so relaying costs one small header parse
plus the signature check.
"""
import base64
import hashlib
import hmac
import json
import json.scanner
import uuid
from datetime import datetime, timezone

DELIMITER = b"<IDS|MSG>"
CLIENT_CHANNELS = ("shell", "control", "stdin")
MAX_CLIENT_DEPTH = 100  # deeper client frames are refused: encoding them again for the kernel would recurse
_CHANNEL_BYTES = {name: name.encode() for name in ("shell", "control", "stdin", "iopub")}
# One encoder for every frame: json.dumps with non-default options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":")).encode
# The C scanner behind json.loads, without json.loads' Python layers (type checks, encoding sniffing).
_scan = json.scanner.make_scanner(json.JSONDecoder())


class WireError(ValueError):
    """A message that cannot be parsed, or whose signature does not match."""


def new_msg_id():
    return uuid.uuid4().hex


def utc_now_iso():
    """RFC 3339 UTC with millisecond precision, as kernels expect in headers."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339(ts):
    """A POSIX timestamp as Kallichore writes times: UTC, microseconds, `Z`."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(obj):
    try:
        return _encode(obj).encode()
    except UnicodeEncodeError:  # a lone surrogate (a client's "\ud800", an OS path): escaped, still valid JSON
        return _encode_ascii(obj).encode()


def loads(raw):
    """json.loads for one JSON document (bytes or str), faster for the common case.

    The fast path takes UTF-8 with no surrounding whitespace; anything else
    (or anything invalid) goes to json.loads, so results and errors are its own.
    """
    try:
        text = raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw
        value, end = _scan(text, 0)
        if end == len(text):
            return value
    except (StopIteration, ValueError):
        pass
    return json.loads(raw)


class Signer:
    """HMAC-SHA256 signing with one kernel's key (an empty key disables signing)."""

    def __init__(self, key):
        key = key.encode() if isinstance(key, str) else key
        base = hmac.new(key, digestmod=hashlib.sha256) if key else None
        # Copy OpenSSL's HMAC object itself when there is one: hmac.HMAC's copy/update are Python wrappers.
        self._hmac = getattr(base, "_hmac", None) or base

    def sign(self, frames):
        if self._hmac is None:
            return b""
        h = self._hmac.copy()
        for frame in frames:
            h.update(frame)
        return h.hexdigest().encode()

    def verify(self, signature, frames):
        """Accept only a matching signature; unsigned kernels need an empty key."""
        if self._hmac is None:
            return True
        return hmac.compare_digest(signature, self.sign(frames))


class KernelMessage:
    """A message received from the kernel, parsed just enough to route it.

    `header` is decoded (we need msg_type); `parent`, `metadata` and `content`
    stay raw bytes until someone asks for them.
    """

    __slots__ = ("channel", "header", "msg_type", "parent_raw", "metadata_raw", "content_raw", "buffers",
                 "_content", "_parent")

    def __init__(self, channel, header, parent_raw, metadata_raw, content_raw, buffers):
        self.channel = channel
        self.header = header
        self.msg_type = header.get("msg_type")  # an attribute, not a property: read several times per message
        self.parent_raw = parent_raw
        self.metadata_raw = metadata_raw
        self.content_raw = content_raw
        self.buffers = buffers
        self._content = None
        self._parent = None

    @property
    def content(self):
        if self._content is None:
            self._content = loads(self.content_raw)
        return self._content

    @property
    def parent(self):
        if self._parent is None:
            self._parent = loads(self.parent_raw) if len(self.parent_raw) >= 5 else {}
        return self._parent

    @property
    def parent_msg_id(self):
        return self.parent.get("msg_id")

    @property
    def parent_msg_type(self):
        return self.parent.get("msg_type")

    def envelope(self, header_raw):
        """The client frame: ``{"kind":"jupyter", ...}`` built from raw JSON bytes."""
        parent = self.parent_raw if len(self.parent_raw) >= 5 else b"null"
        buffers = b"[" + b",".join(b'"' + base64.b64encode(b) + b'"' for b in self.buffers) + b"]"
        return b"".join((
            b'{"kind":"jupyter","header":', header_raw,
            b',"parent_header":', parent,
            b',"channel":"', _CHANNEL_BYTES.get(self.channel) or self.channel.encode(),
            b'","content":', self.content_raw,
            b',"metadata":', self.metadata_raw,
            b',"buffers":', buffers, b"}",
        ))


def parse_kernel_frames(channel, frames, signer):
    """Split ZeroMQ frames into (KernelMessage, raw header bytes); raise WireError."""
    try:
        i = frames.index(DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    if len(frames) < i + 6:
        raise WireError("too few frames")
    signature, header_raw, parent_raw, metadata_raw, content_raw = frames[i + 1:i + 6]
    if not signer.verify(signature, (header_raw, parent_raw, metadata_raw, content_raw)):
        raise WireError("invalid HMAC signature")
    try:
        header = loads(header_raw)
    except ValueError as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or "msg_type" not in header or "msg_id" not in header:
        raise WireError("header lacks msg_id or msg_type")
    return KernelMessage(channel, header, parent_raw, metadata_raw, content_raw, frames[i + 6:]), header_raw


def serialize(signer, header, parent, metadata, content, buffers=(), identities=()):
    """Frames to send to a kernel, signed."""
    body = [dumps(header), dumps(parent) if parent else b"{}", dumps(metadata) if metadata else b"{}",
            dumps(content) if content else b"{}"]  # (empty ones are common: no encoder call for them)
    return [*identities, DELIMITER, signer.sign(body), *body, *buffers]


def make_header(msg_id, msg_type, session, username, version):
    return {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": utc_now_iso(),
        "version": version,
    }


class ClientMessage:
    """A Jupyter message from the WebSocket client, validated.

    Clients send reduced headers (msg_id and msg_type are all we require);
    the session rebuilds a full header before signing.
    """

    __slots__ = ("header", "parent_header", "channel", "content", "metadata", "buffers")

    def __init__(self, header, parent_header, channel, content, metadata, buffers):
        self.header = header
        self.parent_header = parent_header
        self.channel = channel
        self.content = content
        self.metadata = metadata
        self.buffers = buffers

    @property
    def msg_id(self):
        return self.header["msg_id"]

    @property
    def msg_type(self):
        return self.header["msg_type"]

    def as_json(self):
        """The shape used in `execution_queue` (client->server shape, no kind)."""
        return {
            "header": self.header,
            "parent_header": self.parent_header,
            "channel": self.channel,
            "content": self.content,
            "metadata": self.metadata,
            "buffers": [base64.b64encode(b).decode() for b in self.buffers],
        }


def parse_client_frame(text):
    """Validate one client text frame; raise WireError with a message for the client."""
    try:
        msg = loads(text)
    except ValueError as exc:
        raise WireError(f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        msg = too_deep = None  # json gave up: deeper than any limit
    else:
        # Nesting needs an opening bracket per level: a frame with few of them (every usual one)
        # cannot be too deep, and skips the walk over its values.
        brackets = text.count("{") + text.count("[") if isinstance(text, str) else MAX_CLIENT_DEPTH + 1
        too_deep = brackets > MAX_CLIENT_DEPTH and json_depth_exceeds(msg, MAX_CLIENT_DEPTH)
    if too_deep is not False:
        raise WireError(f"frame is nested too deeply (at most {MAX_CLIENT_DEPTH} levels)")
    if not isinstance(msg, dict):
        raise WireError("frame must be a JSON object")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str) \
            or not isinstance(header.get("msg_type"), str):
        raise WireError("header must be an object with string msg_id and msg_type")
    parent = msg.get("parent_header")
    if parent is not None and not isinstance(parent, dict):
        raise WireError("parent_header must be an object or null")
    channel = msg.get("channel")
    if channel not in CLIENT_CHANNELS:
        raise WireError(f"channel must be one of {', '.join(CLIENT_CHANNELS)} (got {channel!r})")
    content = msg.get("content", {})
    metadata = msg.get("metadata", {})
    if not isinstance(content, dict) or not isinstance(metadata, dict):
        raise WireError("content and metadata must be objects")
    raw_buffers = msg.get("buffers") or []
    if not isinstance(raw_buffers, list):
        raise WireError("buffers must be a list of base64 strings")
    try:
        buffers = [base64.b64decode(b, validate=True) for b in raw_buffers]
    except (TypeError, ValueError):
        raise WireError("buffers must be a list of base64 strings") from None
    return ClientMessage(header, parent or None, channel, content, metadata, buffers)


def json_depth_exceeds(value, limit):
    """True if `value` nests lists/objects more than `limit` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


def kernel_event(name, payload):
    """A supervisor event frame: ``{"kind":"kernel","<name>":payload}``."""
    return dumps({"kind": "kernel", name: payload})

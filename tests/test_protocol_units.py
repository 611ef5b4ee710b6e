"""The pure protocol code on its own, without servers or network sockets: WebSocket framing and the
opening handshake, the Jupyter wire format, the execution queue, and the kernel events (each one
checked against schemas/channel-server-message.json).
"""
import base64
import json
import os
import struct
from pathlib import Path

import pytest

from kcgevent.session import events, wire
from kcgevent.session.execution_queue import ExecutionQueue
from kcgevent.websocket import (ConnectionClosed, HandshakeError, WebSocket, accept_key, check_upgrade,
                                client_frame_extent, declared_length, frame, frame_header)

ROOT = Path(__file__).resolve().parent.parent


# -- WebSocket framing --------------------------------------------------------------------------

def client_frame(payload, opcode=0x1, fin=True, mask=None, length_form=None):
    """A masked client frame as RFC 6455 section 5.2 lays it out."""
    mask = mask or os.urandom(4)
    n = len(payload)
    head = bytes((0x80 * fin | opcode,))
    if (length_form or ("7" if n < 126 else "16" if n < 65536 else "64")) == "7":
        head += bytes((0x80 | n,))
    elif (length_form or ("16" if n < 65536 else "64")) == "16":
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class MemorySocket:
    """What WebSocket needs of a socket, in memory: bytes to receive, and a record of what was sent."""

    family = None

    def __init__(self, incoming=b""):
        self.incoming = bytearray(incoming)
        self.sent = bytearray()
        self.closed = False

    def recv(self, n):
        data, self.incoming[:n] = bytes(self.incoming[:n]), b""
        return data

    def send(self, data):
        self.sent += data
        return len(data)

    sendall = send

    def shutdown(self, how):
        pass

    def close(self):
        self.closed = True

    def sent_frames(self):
        """(opcode, payload) of every unmasked server frame sent."""
        out, buf = [], bytes(self.sent)
        while buf:
            n, head = buf[1] & 0x7F, 2
            if n == 126:
                n, head = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127:
                n, head = struct.unpack("!Q", buf[2:10])[0], 10
            out.append((buf[0] & 0x0F, buf[head:head + n]))
            buf = buf[head + n:]
        return out


def test_accept_key_is_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("n, expected", [(0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                                         (65535, b"\x81\x7e\xff\xff"),
                                         (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")])
def test_server_frame_headers_use_the_minimal_length_form(n, expected):
    assert frame_header(0x1, n) == expected
    assert frame(0x9, b"ab") == b"\x89\x02ab"


@pytest.mark.parametrize("payload", [b"", b"x" * 125, b"x" * 126, b"x" * 70000])
def test_client_frame_extent_of_whole_and_partial_frames(payload):
    data = client_frame(payload)
    head = len(data) - len(payload)
    assert client_frame_extent(data) == (head, len(data))
    assert client_frame_extent(data + b"next") == (head, len(data))
    assert client_frame_extent(data[:-1] if payload else data[:1]) is None
    assert declared_length(data[:head - 4]) == len(payload)


@pytest.mark.parametrize("data", [
    bytes((0x81 | 0x40, 0x80)) + b"mask",  # reserved bit
    bytes((0x83, 0x80)) + b"mask",  # reserved opcode
    bytes((0x81, 0x00)),  # not masked
    bytes((0x09, 0x80)) + b"mask",  # fragmented control frame
    bytes((0x89, 0x80 | 126)) + struct.pack("!H", 200) + b"mask" + b"x" * 200,  # long control frame
    bytes((0x81, 0x80 | 126)) + struct.pack("!H", 5) + b"mask" + b"x" * 5,  # non-minimal length
])
def test_frames_wsproto_must_judge(data):
    assert client_frame_extent(data) == (0, 0)


def test_receive_text_fragments_ping_and_close():
    sock = MemorySocket(client_frame(b"hello") + client_frame("caf\u00e9".encode(), fin=False)
                        + client_frame(b"!", opcode=0x0) + client_frame(b"p1", opcode=0x9)
                        + client_frame(struct.pack("!H", 1000), opcode=0x8))
    ws = WebSocket(sock, max_message_bytes=1000)
    assert ws.receive() == "hello"
    assert ws.receive() == "caf\u00e9!"
    with pytest.raises(ConnectionClosed):
        ws.receive()
    assert ws.close_code == 1000
    assert sock.sent_frames() == [(0xA, b"p1"), (0x8, struct.pack("!H", 1000))]


def test_a_header_claiming_2_62_bytes_closes_1009_at_once():
    sock = MemorySocket(bytes((0x81, 0x80 | 127)) + (2**62).to_bytes(8, "big") + b"mask" + b"x" * 100)
    ws = WebSocket(sock, max_message_bytes=1 << 20)
    with pytest.raises(ConnectionClosed):
        ws.receive()
    assert sock.sent_frames()[-1] == (0x8, struct.pack("!H", 1009) + b"message too big")
    assert sock.closed


def test_a_fragmented_message_over_the_limit_closes_1009():
    chunks = [client_frame(b"x" * 400, fin=False)] + [client_frame(b"x" * 400, opcode=0x0, fin=False)] * 3
    sock = MemorySocket(b"".join(chunks))
    ws = WebSocket(sock, max_message_bytes=1000)
    with pytest.raises(ConnectionClosed):
        ws.receive()
    assert sock.sent_frames()[-1][1][:2] == struct.pack("!H", 1009)


def test_a_protocol_error_closes_1002():
    sock = MemorySocket(bytes((0x81, 0x05)) + b"hello")  # not masked
    ws = WebSocket(sock)
    with pytest.raises(ConnectionClosed):
        ws.receive()
    assert sock.sent_frames()[-1][1][:2] == struct.pack("!H", 1002)


def test_invalid_utf8_closes_1007():
    ws = WebSocket(sock := MemorySocket(client_frame(b"\xff\xfe")))
    with pytest.raises(ConnectionClosed):
        ws.receive()
    assert sock.sent_frames()[-1][1][:2] == struct.pack("!H", 1007)


def test_send_frames_batches_text_frames():
    sock = MemorySocket()
    ws = WebSocket(sock)
    ws.send_frames([b'{"a":1}', b"x" * 300])
    assert sock.sent_frames() == [(0x1, b'{"a":1}'), (0x1, b"x" * 300)]


UPGRADE = {"REQUEST_METHOD": "GET", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "keep-alive, Upgrade",
           "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_a_valid_opening_handshake():
    check_upgrade(UPGRADE)


@pytest.mark.parametrize("change, problem", [
    ({"REQUEST_METHOD": "POST"}, "GET"),
    ({"HTTP_UPGRADE": "h2c"}, "Upgrade: websocket"),
    ({"HTTP_CONNECTION": "keep-alive"}, "Connection: Upgrade"),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "Sec-WebSocket-Version"),
    ({"HTTP_SEC_WEBSOCKET_KEY": ""}, "Sec-WebSocket-Key"),
])
def test_opening_handshake_checks(change, problem):
    with pytest.raises(HandshakeError) as err:
        check_upgrade({**UPGRADE, **change})
    assert problem in str(err.value)


# -- the Jupyter wire format --------------------------------------------------------------------

def test_sign_serialize_and_parse_round_trip():
    signer = wire.Signer("secret")
    header = wire.make_header("id1", "execute_request", "sess", "me", "5.3")
    frames = wire.serialize(signer, header, {"msg_id": "p"}, {"m": 1}, {"code": "1+1"}, [b"\x00buf"],
                            identities=[b"ident"])
    assert frames[0] == b"ident" and frames[1] == wire.DELIMITER
    msg, header_raw = wire.parse_kernel_frames("shell", frames, signer)
    assert json.loads(header_raw) == header
    assert msg.msg_type == "execute_request" and msg.parent_msg_id == "p" and msg.content == {"code": "1+1"}
    envelope = json.loads(msg.envelope(header_raw))
    assert envelope == {"kind": "jupyter", "header": header, "parent_header": {"msg_id": "p"}, "channel": "shell",
                        "content": {"code": "1+1"}, "metadata": {"m": 1},
                        "buffers": [base64.b64encode(b"\x00buf").decode()]}


def test_a_wrong_signature_or_shape_is_a_wire_error():
    frames = wire.serialize(wire.Signer("a"), wire.make_header("i", "status", "s", "u", "5.3"), {}, {}, {})
    with pytest.raises(wire.WireError, match="signature"):
        wire.parse_kernel_frames("iopub", frames, wire.Signer("b"))
    with pytest.raises(wire.WireError, match="delimiter"):
        wire.parse_kernel_frames("iopub", frames[1:], wire.Signer("a"))
    with pytest.raises(wire.WireError, match="too few"):
        wire.parse_kernel_frames("iopub", frames[:4], wire.Signer("a"))
    assert wire.Signer("").verify(b"", [b"anything"])  # an empty key: unsigned kernels


def test_empty_parent_is_null_in_the_envelope():
    signer = wire.Signer("k")
    frames = wire.serialize(signer, wire.make_header("i", "status", "s", "u", "5.3"), {}, {}, {"x": 1})
    msg, raw = wire.parse_kernel_frames("iopub", frames, signer)
    assert json.loads(msg.envelope(raw))["parent_header"] is None


def good_client_frame(**changes):
    frame_ = {"header": {"msg_id": "m1", "msg_type": "execute_request"}, "parent_header": None,
              "channel": "shell", "content": {"code": "1"}, "metadata": {}, "buffers": []}
    frame_.update(changes)
    return json.dumps(frame_)


def test_client_frames_parse():
    msg = wire.parse_client_frame(good_client_frame(buffers=[base64.b64encode(b"b").decode()], parent_header={}))
    assert (msg.msg_id, msg.msg_type, msg.channel, msg.buffers, msg.parent_header) == \
        ("m1", "execute_request", "shell", [b"b"], None)
    assert msg.as_json()["buffers"] == ["Yg=="]


@pytest.mark.parametrize("text, problem", [
    ("not json", "not valid JSON"),
    ("[1]", "JSON object"),
    (good_client_frame(header={"msg_id": 1, "msg_type": "x"}), "header"),
    (good_client_frame(channel="iopub"), "channel"),
    (good_client_frame(content=[]), "content"),
    (good_client_frame(buffers=["%%%"]), "base64"),
    (good_client_frame(parent_header=[]), "parent_header"),
    ('{"header":' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    (good_client_frame(metadata={"a": json.loads("[" * 150 + "]" * 150)}), "nested too deeply"),
])
def test_bad_client_frames_say_what_is_wrong(text, problem):
    with pytest.raises(wire.WireError, match=problem):
        wire.parse_client_frame(text)


def test_lone_surrogates_are_escaped_not_fatal():
    msg = wire.parse_client_frame(good_client_frame(content={"code": "\ud800 and \U0001F600"}))
    frames = wire.serialize(wire.Signer("k"), {"msg_id": "a", "msg_type": "execute_request"}, {}, {}, msg.content)
    assert json.loads(frames[-1]) == {"code": "\ud800 and \U0001F600"}
    assert json.loads(events.working_dir_changed("/tmp/caf\udce9")) == {"kind": "kernel",
                                                                          "workingDirChanged": "/tmp/caf\udce9"}


def test_json_depth():
    assert not wire.json_depth_exceeds({"a": [1, {"b": []}]}, 4)  # object, list, object, list
    assert wire.json_depth_exceeds({"a": [1, {"b": [[]]}]}, 4)
    assert not wire.json_depth_exceeds("scalar", 0)


# -- the execution queue ------------------------------------------------------------------------

def client_msg(msg_id):
    return wire.parse_client_frame(good_client_frame(header={"msg_id": msg_id, "msg_type": "execute_request"}))


def test_execution_queue_runs_one_at_a_time_in_order():
    queue = ExecutionQueue()
    a, b, c = client_msg("a"), client_msg("b"), client_msg("c")
    assert queue.submit(a) is True
    assert queue.submit(b) is False and queue.submit(c) is False
    assert queue.to_json()["length"] == 2 and queue.to_json()["active"]["header"]["msg_id"] == "a"
    assert queue.finished("other") is None  # another request's idle does not release code
    assert queue.finished(None) is None
    assert queue.finished("a") is b
    assert queue.finished("a") is None  # a second signal for a (reply after idle) changes nothing
    assert queue.finished("b") is c
    assert queue.finished("c") is None
    assert queue.to_json() == {"length": 0, "pending": []}


def test_execution_queue_clearing():
    queue = ExecutionQueue()
    for name in "abc":
        queue.submit(client_msg(name))
    queue.clear_pending()
    assert queue.active.msg_id == "a" and queue.to_json()["length"] == 0
    queue.clear()
    assert queue.active is None and queue.submit(client_msg("d")) is True


# -- kernel events ------------------------------------------------------------------------------

INFO = {"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, "iopub_port": 5,
        "signature_scheme": "hmac-sha256", "key": "k", "transport": "ipc", "ip": "/tmp/x/k-1"}
EVERY_EVENT = [
    events.status("idle", "kernel_info_reply"), events.status("starting", None),
    events.output("stdout", "a\nb\n"), events.exited(-1), events.execution_queued("m1"),
    events.working_dir_changed("/tmp"),
    events.resource_usage({"cpu_percent": 3, "memory_bytes": 10, "thread_count": 1, "sampling_period_ms": 1000,
                           "timestamp": 1700000000000}),
    events.client_disconnected("Another client is connecting to this session."),
    events.handshake_completed("s1", INFO), events.messages_dropped(3, 7),
    events.error("invalid_message", "frame is not valid JSON"),
    events.execution_requested("m2", "1+1", "2026-01-01T00:00:00.000Z",
                               {"source": "agent", "workspace_id": "w1", "tool": "execute_code"}),
    events.output_gap("The supervisor restarted"),
]


def server_frame_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "schemas" / "channel-server-message.json").read_text(encoding="utf-8"))
    return schema, jsonschema.Draft202012Validator(schema)


def event_name(frame_bytes):
    return next(k for k in json.loads(frame_bytes) if k != "kind")


def schema_event_names(schema):
    return {ref["$ref"].rsplit("/", 1)[-1] for ref in schema["$defs"]["kernel"]["oneOf"]}


@pytest.mark.parametrize("frame_bytes", EVERY_EVENT, ids=event_name)
def test_every_event_matches_the_schema(frame_bytes):
    schema, validator = server_frame_validator()
    if event_name(frame_bytes) not in schema_event_names(schema):
        pytest.skip(f"{event_name(frame_bytes)} is not in this branch's schema (another issue adds it)")
    validator.validate(json.loads(frame_bytes))


def test_events_cover_every_kernel_event_of_the_schema():
    schema, _ = server_frame_validator()
    in_schema = schema_event_names(schema)
    assert in_schema <= set(events.NAMES), in_schema - set(events.NAMES)
    assert {event_name(f) for f in EVERY_EVENT} == set(events.NAMES)
    assert json.loads(events.messages_dropped(3, 7))["messagesDropped"] == {"count": 5, "first_seq": 3,
                                                                            "last_seq": 7}

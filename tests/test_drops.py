"""Drops, handovers and reconnects never repeat or lose output (issue "Durable II", section 1).

A real server and a real ipykernel; clients are websocket-client connections that
drop the way a network or a crashing window does: the client shuts down its write
side (TCP FIN / Unix SHUT_WR, no WebSocket Close frame) and keeps reading whatever
the server still sends until the server closes. Then the next client connects. The
stream text of all connections, concatenated, must be every line exactly once, in
order. Random drop points are seeded; the seed is printed on failure (set
KCG_DROP_SEED to replay one).
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import websocket  # noqa: E402
from conftest import HERE, PYTHON, get_session, new_id, start_session  # noqa: E402

from kcgevent.client import execute_request, python_kernel_session  # noqa: E402


def paced_cell(lines):
    """Positron-like output: one flushed print per line, a 20 ms pause every 50 lines."""
    return ("import time\n"
            f"for i in range({lines}):\n"
            "    print(i, flush=True)\n"
            "    if i % 50 == 49:\n"
            "        time.sleep(0.02)\n")


def expected_text(lines):
    return "".join(f"{i}\n" for i in range(lines))


@pytest.fixture
def socket_dir():
    """A short private directory for the socket transport's sockets (sun_path is short)."""
    path = tempfile.mkdtemp(prefix="kcd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server_on(transport, socket_dir, start_server):
    if transport == "tcp":
        return start_server("--transport", "tcp")
    return start_server("--transport", "socket", "--socket-dir", socket_dir)


@pytest.fixture(params=["tcp", "socket"])
def transport_server(request, socket_dir, start_server):
    return server_on(request.param, socket_dir, start_server)


def python_session(server):
    session_id = new_id("py")
    start_session(server.client, python_kernel_session(session_id, PYTHON, working_directory=HERE))
    return session_id


class Output:
    """One cell's output as a user would see it across connections."""

    def __init__(self, request, with_after):
        self.request = request
        self.msg_id = request["header"]["msg_id"]
        self.with_after = with_after
        self.texts = []  # stream texts, in arrival order over all connections
        self.per_connection = []  # (connection number, number of texts) for diagnostics
        self.idle = False
        self.last_seq = 0
        self.seq_errors = []

    def take(self, frame):
        if "seq" in frame:
            if frame["seq"] != self.last_seq + 1:
                self.seq_errors.append((self.last_seq, frame["seq"]))
            self.last_seq = frame["seq"]
        if frame.get("kind") != "jupyter" or (frame.get("parent_header") or {}).get("msg_id") != self.msg_id:
            return
        msg_type = frame["header"]["msg_type"]
        if msg_type == "stream":
            self.texts.append(frame["content"]["text"])
        elif msg_type == "status" and frame["content"].get("execution_state") == "idle":
            self.idle = True

    @property
    def text(self):
        return "".join(self.texts)

    @property
    def lines(self):
        return self.text.count("\n")

    def check(self, lines, seed=None):
        got, want = self.text, expected_text(lines)
        if got == want and not self.seq_errors:
            return
        numbers = [int(x) for x in got.split()]
        repeated = len(numbers) - len(set(numbers))
        missing = sorted(set(range(lines)) - set(numbers))
        first_bad = next((i for i, n in enumerate(numbers) if n != i), None)
        pytest.fail(f"seed={seed}: {len(numbers)} lines, {repeated} repeated, {len(missing)} missing "
                    f"(first missing {missing[:5]}), first out of place at position {first_bad} "
                    f"(around {numbers[max(0, (first_bad or 0) - 3):(first_bad or 0) + 3]}); "
                    f"texts per connection {self.per_connection}; seq errors {self.seq_errors[:5]}")


def connect(server, session_id, output):
    return server.client.open_channel(session_id, after=output.last_seq if output.with_after else None)


def next_frame(ws, timeout=30):
    """The next data frame (parsed), or None once the server ended the connection."""
    ws.settimeout(timeout)
    while True:
        try:
            opcode, data = ws.recv_data()
        except BrokenPipeError:
            continue  # websocket-client answered a ping after our FIN; the server does not need it
        except (websocket.WebSocketConnectionClosedException, ConnectionResetError):
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return None
        return json.loads(data)


def drop(ws, output, pause=0.0, timeout=30):
    """The client leaves: FIN, no Close frame; it reads what the server still sends until it closes.

    `pause`: the client stops reading that long first, as a connection that drops at a random
    moment does (frames the server wrote meanwhile are in flight or unread when the FIN goes)."""
    gevent.sleep(pause)
    ws.sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"the server did not close a dropped connection within {timeout} s"
        frame = next_frame(ws, max(0.1, deadline - time.monotonic()))
        if frame is None:
            ws.close()
            return
        output.take(frame)


def read_until(ws, output, stop, timeout=60):
    """Read frames into `output` until stop() is true (checked after each frame)."""
    deadline = time.monotonic() + timeout
    while not stop():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {output.lines} lines within {timeout} s"
        frame = next_frame(ws, remaining)
        assert frame is not None, "the server closed a connection nobody dropped"
        output.take(frame)


def run_with_drops(server, session_id, lines, drops, with_after, seed):
    """Run the paced cell; drop the connection at `drops` random points; return the Output."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(50, lines - 50), drops))
    ws = None
    output = None
    try:
        request = execute_request(paced_cell(lines))
        output = Output(request, with_after)
        ws = connect(server, session_id, output)
        ws.send(json.dumps(request))
        for number, point in enumerate(points):
            before = len(output.texts)
            read_until(ws, output, lambda: output.lines >= point or output.idle)
            drop(ws, output, pause=rng.uniform(0, 0.05))
            output.per_connection.append((number, len(output.texts) - before))
            ws = connect(server, session_id, output)
        before = len(output.texts)
        read_until(ws, output, lambda: output.idle)
        output.per_connection.append((len(points), len(output.texts) - before))
        return output
    finally:
        if ws is not None:
            ws.close()


def seed_for_test():
    return int(os.environ.get("KCG_DROP_SEED") or random.randrange(1 << 30))


def test_twenty_drops_every_line_exactly_once(transport_server):
    server = transport_server
    session_id = python_session(server)
    seed = seed_for_test()
    output = run_with_drops(server, session_id, 10_000, 20, with_after=False, seed=seed)
    output.check(10_000, seed)


def test_twenty_drops_with_after_every_line_exactly_once(server):
    session_id = python_session(server)
    seed = seed_for_test()
    output = run_with_drops(server, session_id, 10_000, 20, with_after=True, seed=seed)
    output.check(10_000, seed)


@pytest.mark.parametrize("transport,with_after", [("tcp", False), ("socket", False), ("tcp", True)],
                         ids=["tcp-legacy", "socket-legacy", "tcp-after"])
def test_single_drop_and_handover_mid_output(socket_dir, start_server, transport, with_after):
    server = server_on(transport, socket_dir, start_server)
    session_id = python_session(server)
    seed = seed_for_test()
    # one drop
    output = run_with_drops(server, session_id, 2000, 1, with_after=with_after, seed=seed)
    output.check(2000, seed)

    # a handover: B connects while A is attached and reading (A reads on until the server closes it)
    lines = 2000
    request = execute_request(paced_cell(lines))
    output = Output(request, with_after)
    a = connect(server, session_id, output)
    a.send(json.dumps(request))
    point = random.Random(seed).randrange(300, 1700)
    read_until(a, output, lambda: output.lines >= point)
    opening = gevent.spawn(connect, server, session_id, output)  # ?after= the last seq A has now
    frames_a = []
    while True:
        frame = next_frame(a, 30)
        if frame is None:
            break
        frames_a.append(frame)
    b = opening.get(timeout=30)
    try:
        assert frames_a and frames_a[-1].get("clientDisconnected"), "A was not told it was replaced"
        assert get_session(server, session_id)["connected"] is True
        if with_after:
            # B resumes after the seq A had when B connected: what A got meanwhile, B gets again
            # (a resuming client decides by seq what it has); it must be the very same frames.
            extra = [f for f in frames_a if "seq" in f]
            again = [next_frame(b, 30) for _ in extra]
            assert again == extra, "B did not resume with the frames A got after the seq B asked from"
            for frame in again:
                output.take(frame)
        else:
            for frame in frames_a:
                output.take(frame)
        read_until(b, output, lambda: output.idle)
        output.check(lines, seed)
    finally:
        a.close()
        b.close()


def test_eighty_rapid_reconnects_racing_the_writer(transport_server):
    """Each client leaves (FIN) after a few frames and the next connects at once, while the old one
    is still being settled: no line repeated or lost, `connected` true whenever a client is on."""
    server = transport_server
    session_id = python_session(server)
    seed = seed_for_test()
    rng = random.Random(seed)
    lines = 6000
    request = execute_request(paced_cell(lines))
    outputs = []  # one Output per connection, in connection order
    drains = []
    not_connected = []
    ws = None
    try:
        for number in range(81):
            output = Output(request, with_after=False)
            outputs.append(output)
            ws = server.client.open_channel(session_id)
            if not get_session(server, session_id)["connected"]:
                not_connected.append(number)
            if number == 0:
                ws.send(json.dumps(request))
            if number == 80:
                break
            wanted = rng.randrange(1, 40)
            got = 0
            while got < wanted and not any(o.idle for o in outputs):
                frame = next_frame(ws, 0.5 if number else 30)
                if frame is None:
                    break
                output.take(frame)
                got += 1
            drains.append(gevent.spawn(drop, ws, output))
        read_until(ws, outputs[-1], lambda: any(o.idle for o in outputs))
        gevent.joinall(drains, timeout=60, raise_error=True)
    finally:
        if ws is not None:
            ws.close()
    whole = Output(request, with_after=False)
    for number, output in enumerate(outputs):
        whole.texts += output.texts
        whole.per_connection.append((number, len(output.texts)))
    whole.check(lines, seed)
    busy = sum(1 for output in outputs if output.texts)
    assert busy >= 40, f"only {busy} of 81 connections got output: the reconnects did not race the writer"
    assert not not_connected, f"seed={seed}: `connected` was false with a client attached: {not_connected}"


def test_execute_requests_sent_right_before_a_takeover_all_reach_the_kernel(server):
    """A client sends a burst of execute requests and is replaced at once: every request reaches the
    kernel (its reply comes back to one of the two clients), and the server log stays clean."""
    from conftest import fake_kernel_session
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    for round_ in range(5):
        a = server.client.open_channel(session_id)
        requests = [execute_request(f"print r{round_}-{i}") for i in range(200)]
        for request in requests:
            a.send(json.dumps(request))
        b = server.client.open_channel(session_id)  # takeover right behind the burst
        wanted = {r["header"]["msg_id"] for r in requests}
        seen = set()

        def take(frame):
            if frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "execute_reply":
                seen.add(frame["parent_header"]["msg_id"])

        while True:
            frame = next_frame(a, 30)
            if frame is None:
                break
            take(frame)
        deadline = time.monotonic() + 60
        while not wanted <= seen:
            assert time.monotonic() < deadline, f"round {round_}: {len(wanted - seen)} of 200 never answered"
            frame = next_frame(b, max(0.1, deadline - time.monotonic()))
            assert frame is not None, "B's connection closed"
            take(frame)
        a.close()
        b.close()
    with open(server.log_file) as f:
        text = f.read()
    for bad in ("Invalid HTTP", "BrokenPipe", "Traceback"):
        assert bad not in text, f"{bad!r} in the server log:\n{text[-3000:]}"


def test_frames_sent_right_behind_the_upgrade_request_are_delivered(server):
    """A client that pipelines a frame behind its upgrade request (before the 101 comes back)."""
    from conftest import fake_kernel_session
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    request = execute_request("print pipelined")
    frame = websocket.ABNF.create_frame(json.dumps(request), websocket.ABNF.OPCODE_TEXT).format()
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    port = server.info["port"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall((f"GET /sessions/{session_id}/channels HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode() + frame)
        received = b""
        deadline = time.monotonic() + 20
        while b"pipelined" not in received:
            assert time.monotonic() < deadline, f"no answer to the pipelined frame: {received[-300:]!r}"
            chunk = sock.recv(65536)
            assert chunk, f"connection closed: {received[-300:]!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 101")
    finally:
        sock.close()

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


@pytest.fixture(params=["tcp", "socket"])
def transport_server(request, socket_dir, start_server):
    if request.param == "tcp":
        return start_server("--transport", "tcp")
    return start_server("--transport", "socket", "--socket-dir", socket_dir)


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


@pytest.mark.parametrize("with_after", [False, True], ids=["legacy", "after"])
def test_single_drop_and_handover_mid_output(transport_server, with_after):
    server = transport_server
    session_id = python_session(server)
    seed = seed_for_test()
    # one drop
    output = run_with_drops(server, session_id, 3000, 1, with_after=with_after, seed=seed)
    output.check(3000, seed)

    # a handover: B connects while A is attached and reading (A reads on until the server closes it)
    lines = 3000
    request = execute_request(paced_cell(lines))
    output = Output(request, with_after)
    a = connect(server, session_id, output)
    a.send(json.dumps(request))
    point = random.Random(seed).randrange(500, 2500)
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

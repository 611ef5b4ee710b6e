"""Tests for tests/kernels/fake_kernel.py, driven by a small synchronous client.

The fake kernel is the ground truth other tests and benchmarks rely on, so
these check it directly, without the supervisor in between. Every kernel
process is killed by pid in a fixture finalizer and every wait is bounded.

The suite runs under gevent monkey patching (tests/conftest.py), which breaks
jupyter_client's asyncio-based BlockingKernelClient, so the client here is
plain blocking pyzmq (every receive behind a poll timeout) with
jupyter_client.session.Session only for serializing and signing messages.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

FAKE_KERNEL = Path(__file__).parent / "kernels" / "fake_kernel.py"
KEY = b"test-key"
TIMEOUT = 5.0


class SyncKernelClient:
    """A blocking kernel client: shell/control/stdin DEALERs, an iopub SUB.

    Exposes the subset of BlockingKernelClient the tests use. Every get_*_msg
    polls with a timeout and raises TimeoutError when nothing arrives; shell
    and stdin share one identity so the kernel's input_request reaches us.
    """

    CHANNELS = ("shell", "iopub", "stdin", "control")

    def __init__(self, session: Session, ip: str, shell_port: int, iopub_port: int,
                 stdin_port: int, control_port: int, hb_port: int, transport: str = "tcp"):
        self.session = session
        self.ip = ip
        self.shell_port, self.iopub_port, self.stdin_port = shell_port, iopub_port, stdin_port
        self.control_port, self.hb_port = control_port, hb_port
        self.context = zmq.Context()
        identity = uuid.uuid4().hex.encode()
        self.sockets = {}
        for name in self.CHANNELS:
            sock = self.context.socket(zmq.SUB if name == "iopub" else zmq.DEALER)
            sock.linger = 0
            if name == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            elif name in ("shell", "stdin"):
                sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"{transport}://{ip}:{getattr(self, name + '_port')}")
            self.sockets[name] = sock

    @classmethod
    def from_connection_file(cls, fname) -> "SyncKernelClient":
        with open(fname) as f:
            info = json.load(f)
        session = Session(key=info["key"].encode(),
                          signature_scheme=info.get("signature_scheme", "hmac-sha256"))
        return cls(session, info["ip"], info["shell_port"], info["iopub_port"],
                   info["stdin_port"], info["control_port"], info["hb_port"],
                   info.get("transport", "tcp"))

    # -- sending --------------------------------------------------------------

    def send(self, channel: str, msg: dict) -> str:
        """Send a message built with self.session.msg on channel; returns its msg_id."""
        self.session.send(self.sockets[channel], msg)
        return msg["header"]["msg_id"]

    def _request(self, channel: str, msg_type: str, content: dict) -> str:
        return self.send(channel, self.session.msg(msg_type, content))

    def execute(self, code: str, silent: bool = False, store_history: bool = True,
                allow_stdin: bool = True, stop_on_error: bool = True) -> str:
        return self._request("shell", "execute_request", {
            "code": code, "silent": silent, "store_history": store_history,
            "user_expressions": {}, "allow_stdin": allow_stdin,
            "stop_on_error": stop_on_error,
        })

    def kernel_info(self) -> str:
        return self._request("shell", "kernel_info_request", {})

    def input(self, value: str) -> str:
        return self._request("stdin", "input_reply", {"value": value})

    def shutdown(self, restart: bool = False) -> str:
        return self._request("control", "shutdown_request", {"restart": restart})

    # -- receiving ------------------------------------------------------------

    def get_msg(self, channel: str, timeout: float = TIMEOUT) -> dict:
        sock = self.sockets[channel]
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"no {channel} message within {timeout} s")
        _, msg = self.session.recv(sock, mode=zmq.NOBLOCK)
        if msg is None:  # poll said readable, so this should not happen
            raise TimeoutError(f"{channel} message vanished")
        return msg

    def get_shell_msg(self, timeout: float = TIMEOUT) -> dict:
        return self.get_msg("shell", timeout)

    def get_iopub_msg(self, timeout: float = TIMEOUT) -> dict:
        return self.get_msg("iopub", timeout)

    def get_stdin_msg(self, timeout: float = TIMEOUT) -> dict:
        return self.get_msg("stdin", timeout)

    def get_control_msg(self, timeout: float = TIMEOUT) -> dict:
        return self.get_msg("control", timeout)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.context.term()


def start_kernel(connection_file, *flags) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(FAKE_KERNEL), *flags, str(connection_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read the kernel's stdout until marker, without ever blocking past timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no {marker!r} in {data!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise EOFError(f"kernel exited ({proc.poll()}) before {marker!r}: {data!r}")
        data += chunk
    return data


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(TIMEOUT)
    proc.stdout.close()
    proc.stderr.close()


@pytest.fixture
def procs():
    """Collects started kernels and kills each by pid, whatever the test did."""
    started = []
    yield started
    for proc in started:
        kill(proc)


@pytest.fixture
def launch(tmp_path, procs):
    """Start a fake kernel with flags; returns (proc, connected client)."""
    clients = []

    def _launch(*flags):
        fname, _ = write_connection_file(
            fname=str(tmp_path / f"kernel-{len(procs)}.json"), ip="127.0.0.1", key=KEY)
        proc = start_kernel(fname, *flags)
        procs.append(proc)
        read_until(proc, b"fake kernel ready")
        client = SyncKernelClient.from_connection_file(fname)
        clients.append(client)
        return proc, client

    yield _launch
    for client in clients:
        client.close()


def wait_iopub_subscribed(client) -> None:
    """PUB drops everything until the SUB is connected: poke until a status arrives."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        client.kernel_info()
        client.get_shell_msg(timeout=TIMEOUT)
        try:
            client.get_iopub_msg(timeout=0.2)
        except TimeoutError:
            continue
        drain_iopub(client)
        return
    raise TimeoutError("iopub never delivered a message")


def drain_iopub(client) -> None:
    while True:
        try:
            client.get_iopub_msg(timeout=0.1)
        except TimeoutError:
            return


def iopub_until_idle(client, msg_id: str) -> list:
    """All iopub messages for one request, up to and including its idle status."""
    out = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        msg = client.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        out.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return out
    raise TimeoutError(f"no idle status for {msg_id} within {TIMEOUT} s")


def stream_texts(msgs) -> list:
    return [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"]


def reply_to(client, msg_id: str, channel: str = "shell") -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        msg = client.get_msg(channel, timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise TimeoutError(f"no {channel} reply to {msg_id} within {TIMEOUT} s")


def start_sleep(client, seconds: int = 30) -> str:
    """Execute a sleep and return once the kernel is inside it (execute_input seen)."""
    wait_iopub_subscribed(client)  # else execute_input may be published before SUB joins
    msg_id = client.execute(f"sleep {seconds}")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        msg = client.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
            time.sleep(0.05)
            return msg_id
    raise TimeoutError(f"sleep {seconds} never started within {TIMEOUT} s")


def hb_ping(port: int, timeout: float = 1.0) -> bool:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(b"ping")
        return bool(sock.poll(timeout * 1000)) and sock.recv() == b"ping"
    finally:
        sock.close()


# --------------------------------------------------------------------------


def test_kernel_info(launch):
    _, client = launch()
    reply = reply_to(client, client.kernel_info())
    content = reply["content"]
    assert reply["msg_type"] == "kernel_info_reply"
    assert content["status"] == "ok"
    assert content["protocol_version"] == "5.3"
    assert content["implementation"] == "fake"
    assert content["language_info"]["name"] == "fake"
    assert content["banner"] == "fake kernel"


def test_kernel_info_on_control(launch):
    _, client = launch()
    msg = client.session.msg("kernel_info_request", {})
    client.send("control", msg)
    reply = reply_to(client, msg["header"]["msg_id"], "control")
    assert reply["content"]["implementation"] == "fake"


def test_execute_print_and_flood(launch):
    _, client = launch()
    wait_iopub_subscribed(client)
    msg_id = client.execute("print hello\nflood 100")
    reply = reply_to(client, msg_id)
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["execution_count"] == 1
    msgs = iopub_until_idle(client, msg_id)
    assert [m["msg_type"] for m in msgs[:2]] == ["status", "execute_input"]
    assert stream_texts(msgs) == ["hello\n"] + [f"{i}\n" for i in range(100)]


def test_error_and_echo(launch):
    _, client = launch()
    reply = reply_to(client, client.execute("error"))
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "FakeError"
    wait_iopub_subscribed(client)
    msg_id = client.execute("1 + 1")
    assert reply_to(client, msg_id)["content"]["execution_count"] == 2
    assert stream_texts(iopub_until_idle(client, msg_id)) == ["1 + 1\n"]


def test_lose_idle_and_kernel_infos(launch):
    """`lose_idle N`: the request's iopub idle and those of the next N-1 requests are not published
    (their busy and replies are); `kernel_infos` counts the kernel_info requests served."""
    _, client = launch()
    wait_iopub_subscribed(client)  # (its kernel_info requests count)
    msg_id = client.execute("kernel_infos")
    assert reply_to(client, msg_id)["content"]["status"] == "ok"
    served = int(stream_texts(iopub_until_idle(client, msg_id))[0].split()[1])
    assert served >= 1
    lost = client.execute("print a\nlose_idle 2")
    assert reply_to(client, lost)["content"]["status"] == "ok"
    probe = client.kernel_info()
    assert reply_to(client, probe)["msg_type"] == "kernel_info_reply"
    last = client.execute("kernel_infos")
    assert reply_to(client, last)["content"]["status"] == "ok"
    states = {lost: [], probe: [], last: []}
    texts = []
    deadline = time.monotonic() + TIMEOUT
    while states[last][-1:] != ["idle"] and time.monotonic() < deadline:
        msg = client.get_iopub_msg(timeout=TIMEOUT)
        parent = msg["parent_header"].get("msg_id")
        if msg["msg_type"] == "status" and parent in states:
            states[parent].append(msg["content"]["execution_state"])
        elif msg["msg_type"] == "stream" and parent == last:
            texts.append(msg["content"]["text"])
    assert states == {lost: ["busy"], probe: ["busy"], last: ["busy", "idle"]}
    assert texts == [f"kernel_info_requests {served + 1}\n"]


def test_interrupt_request_during_sleep(launch):
    _, client = launch()
    msg_id = start_sleep(client)
    assert hb_ping(client.hb_port), "heartbeat must answer during sleep"
    interrupt = client.session.msg("interrupt_request", {})
    client.send("control", interrupt)
    assert reply_to(client, interrupt["header"]["msg_id"], "control")["content"]["status"] == "ok"
    reply = reply_to(client, msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"


def test_sigint_during_sleep_and_when_idle(launch):
    proc, client = launch()
    msg_id = start_sleep(client)
    proc.send_signal(signal.SIGINT)
    assert reply_to(client, msg_id)["content"]["ename"] == "KeyboardInterrupt"
    proc.send_signal(signal.SIGINT)  # idle: ignored
    time.sleep(0.1)
    assert proc.poll() is None
    assert reply_to(client, client.execute("print still here"))["content"]["status"] == "ok"


def test_input_round_trip(launch):
    _, client = launch()
    wait_iopub_subscribed(client)
    msg_id = client.execute("input name?", allow_stdin=True)
    request = client.get_stdin_msg(timeout=TIMEOUT)
    assert request["msg_type"] == "input_request"
    assert request["content"] == {"prompt": "name?", "password": False}
    client.input("bob")
    assert reply_to(client, msg_id)["content"]["status"] == "ok"
    assert stream_texts(iopub_until_idle(client, msg_id)) == ["got: bob\n"]


def test_process_output_and_exit_command(launch):
    proc, client = launch()
    client.execute("stdout to-out\nstderr to-err\nexit 7")
    assert proc.wait(TIMEOUT) == 7
    assert b"to-out" in proc.stdout.read()
    assert b"to-err" in proc.stderr.read()


def test_shutdown_exits_zero(launch):
    proc, client = launch()
    msg_id = client.shutdown()
    reply = reply_to(client, msg_id, "control")
    assert reply["content"] == {"status": "ok", "restart": False}
    assert proc.wait(TIMEOUT) == 0


def test_hang_beats_but_never_replies(launch):
    _, client = launch("--hang")
    assert hb_ping(client.hb_port)
    client.kernel_info()
    with pytest.raises(Exception):
        client.get_shell_msg(timeout=0.5)


def test_exit_at_start(tmp_path, procs):
    fname, _ = write_connection_file(fname=str(tmp_path / "k.json"), ip="127.0.0.1", key=KEY)
    proc = start_kernel(fname, "--exit-at-start", "3")
    procs.append(proc)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 3
    assert b"fake kernel starting" in out
    assert b"fatal: exiting with 3" in err


def test_bad_hmac_replies_fail_verification(launch):
    _, client = launch("--bad-hmac")
    session = Session(key=KEY)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://127.0.0.1:{client.shell_port}")
        session.send(sock, "kernel_info_request", {})
        assert sock.poll(TIMEOUT * 1000), "a correctly signed request must be answered"
        _, frames = session.feed_identities(sock.recv_multipart())
        with pytest.raises(ValueError, match="Invalid Signature"):
            session.deserialize(frames)
        assert frames[0] and frames[0] != session.sign(frames[1:5])
        lenient = Session(key=b"")  # no key: no check, so the payload itself is fine
        assert lenient.deserialize(frames)["msg_type"] == "kernel_info_reply"
    finally:
        sock.close()


def test_jep66_handshake(tmp_path, procs):
    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    client = None
    try:
        reg_port = rep.bind_to_random_port("tcp://127.0.0.1")
        reg_file = tmp_path / "registration.json"
        reg_file.write_text(json.dumps({
            "transport": "tcp", "signature_scheme": "hmac-sha256", "ip": "127.0.0.1",
            "key": KEY.decode(), "registration_port": reg_port,
        }))
        procs.append(start_kernel(reg_file))
        assert rep.poll(TIMEOUT * 1000), "no handshake_request"
        session = Session(key=KEY)
        _, frames = session.feed_identities(rep.recv_multipart())
        request = session.deserialize(frames)  # raises on a bad signature
        assert request["msg_type"] == "handshake_request"
        ports = request["content"]
        names = {"shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"}
        assert set(ports) == names
        assert all(isinstance(p, int) and p > 0 for p in ports.values())
        session.send(rep, "handshake_reply", {"status": "ok"}, parent=request)
        read_until(procs[-1], b"fake kernel ready")

        client = SyncKernelClient(Session(key=KEY), "127.0.0.1", **ports)
        assert reply_to(client, client.kernel_info())["content"]["implementation"] == "fake"
    finally:
        if client is not None:
            client.close()
        rep.close()

"""Tests for tests/kernels/fake_kernel.py, driven with jupyter_client.

The fake kernel is the ground truth other tests and benchmarks rely on, so
these check it directly, without the supervisor in between. Every kernel
process is killed by pid in a fixture finalizer and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

FAKE_KERNEL = Path(__file__).parent / "kernels" / "fake_kernel.py"
KEY = b"test-key"
TIMEOUT = 5.0


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
        client = BlockingKernelClient(connection_file=fname)
        client.load_connection_file()
        client.start_channels()
        clients.append(client)
        return proc, client

    yield _launch
    for client in clients:
        client.stop_channels()


def wait_iopub_subscribed(client) -> None:
    """PUB drops everything until the SUB is connected: poke until a status arrives."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        client.kernel_info()
        client.get_shell_msg(timeout=TIMEOUT)
        try:
            client.get_iopub_msg(timeout=0.2)
        except Exception:
            continue
        drain_iopub(client)
        return
    raise TimeoutError("iopub never delivered a message")


def drain_iopub(client) -> None:
    while True:
        try:
            client.get_iopub_msg(timeout=0.1)
        except Exception:
            return


def iopub_until_idle(client, msg_id: str) -> list:
    """All iopub messages for one request, up to and including its idle status."""
    out = []
    while True:
        msg = client.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        out.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return out


def stream_texts(msgs) -> list:
    return [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"]


def reply_to(client, msg_id: str, channel: str = "shell") -> dict:
    get = getattr(client, f"get_{channel}_msg")
    while True:
        msg = get(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def start_sleep(client, seconds: int = 30) -> str:
    """Execute a sleep and return once the kernel is inside it (execute_input seen)."""
    msg_id = client.execute(f"sleep {seconds}")
    while True:
        msg = client.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
            time.sleep(0.05)
            return msg_id


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
    client.control_channel.send(msg)
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


def test_interrupt_request_during_sleep(launch):
    _, client = launch()
    msg_id = start_sleep(client)
    assert hb_ping(client.hb_port), "heartbeat must answer during sleep"
    interrupt = client.session.msg("interrupt_request", {})
    client.control_channel.send(interrupt)
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

        client = BlockingKernelClient(session=Session(key=KEY), ip="127.0.0.1", **ports)
        client.start_channels()
        assert reply_to(client, client.kernel_info())["content"]["implementation"] == "fake"
    finally:
        if client is not None:
            client.stop_channels()
        rep.close()

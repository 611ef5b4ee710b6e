"""Durability: nothing is lost or repeated when clients come and go, and the server
notices (and survives) misbehaving clients, kernels and its own death.

Real servers (`python -m kcgevent`) and, except where noted, the fake kernel
(tests/kernels/fake_kernel.py). Every wait is bounded.
"""
from gevent import monkey

monkey.patch_all()

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import websocket  # noqa: E402
from conftest import (  # noqa: E402
    FAKE_KERNEL,
    HERE,
    PYTHON,
    fake_kernel_session,
    is_idle_for,
    kernel_events,
    new_id,
    replies_to,
    start_session,
    stream_text,
    wait_for,
    wait_gone,
)

from kcgevent.client import python_kernel_session  # noqa: E402

FLOOD = 10_000
EXPECTED = [f"{i}\n" for i in range(FLOOD)]


# ---------------------------------------------------------------------------------------------
# helpers


def texts_of(frames, request):
    """The stream texts answering `request`, one per frame, in arrival order."""
    return [f["content"]["text"] for f in replies_to(frames, request, "stream")]


def until_done(channel, request, timeout=20):
    """Frames up to both the idle status and the execute_reply for `request` (their order varies:
    they come from different kernel sockets)."""
    deadline = time.monotonic() + timeout
    frames = channel.until_idle(request, timeout)
    if not replies_to(frames, request, "execute_reply"):
        frames += channel.until(lambda f: bool(replies_to([f], request, "execute_reply")),
                                max(0.1, deadline - time.monotonic()))
    return frames


def is_stream_for(frame, request):
    return bool(replies_to([frame], request, "stream"))


def read_texts(channel, request, count, timeout=30):
    """Read until `count` stream texts for `request` arrived; returns (frames, texts)."""
    deadline = time.monotonic() + timeout
    frames, texts = [], []
    while len(texts) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(texts)} of {count} stream texts within {timeout} s"
        frame = channel.recv(remaining)
        frames.append(frame)
        if is_stream_for(frame, request):
            texts.append(frame["content"]["text"])
    return frames, texts


def read_until_closed(ws, timeout=15, polite=False):
    """Parsed data frames until the server ends the connection: (frames, "close" | "eof").

    `polite`: yield to other greenlets after each frame (a reader with buffered data
    otherwise never blocks, so nothing else in this process would run meanwhile).
    """
    deadline = time.monotonic() + timeout
    frames = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connection still open after {timeout} s; last frames "
                               f"{[sorted(f)[:3] for f in frames[-5:]]}")
        ws.settimeout(remaining)
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            return frames, "eof"
        except (ConnectionResetError, BrokenPipeError):
            return frames, "eof"
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return frames, "close"
        frames.append(json.loads(data))
        if polite:
            gevent.sleep(0)


def collect_for(channel, seconds):
    """Every frame that arrives within `seconds`."""
    deadline = time.monotonic() + seconds
    got = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return got
        try:
            got.append(channel.recv(remaining))
        except websocket.WebSocketTimeoutException:
            return got


def abrupt_close(ws):
    """Drop the TCP connection without a WebSocket close handshake."""
    try:
        ws.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    ws.sock.close()


def session_info(server, session_id):
    return server.client.call("GET", f"/sessions/{session_id}")


def wait_status(server, session_id, status, timeout=15):
    last = {}

    def check():
        last["status"] = session_info(server, session_id)["status"]
        return last["status"] == status
    try:
        wait_for(check, timeout, what=f"status {status}")
    except TimeoutError:
        raise AssertionError(f"session {session_id} is {last.get('status')!r}, not {status!r}, "
                             f"after {timeout} s") from None


def kernel_pid(server, session_id):
    pid = session_info(server, session_id).get("process_id")
    assert pid, f"session {session_id} reports no process_id"
    return pid


def start_fake(server, *flags, **overrides):
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id, *flags, **overrides))
    return session_id


def start_watching(server, body, match=FAKE_KERNEL):
    """PUT + POST start while recording the pids of kernels spawned meanwhile: (status, body, pids)."""
    server.client.call("PUT", "/sessions", body)
    pending = gevent.spawn(server.client.request, "POST", f"/sessions/{body['session_id']}/start")
    pids = set()
    deadline = time.monotonic() + 30
    while not pending.ready():
        assert time.monotonic() < deadline, "start did not answer within 30 s"
        for proc in server.descendants():
            try:
                if any(match in part for part in proc.cmdline()):
                    pids.add(proc.pid)
            except psutil.Error:
                pass
        gevent.sleep(0.05)
    status, answer = pending.get()
    return status, answer, pids


def log_tail(server, n=40):
    try:
        with open(server.log_file) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def kernel_frame(frame, name):
    return frame.get("kind") == "kernel" and name in frame


# ---------------------------------------------------------------------------------------------
# exactly once, in order


def check_seqs(frames, first):
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(first, first + len(seqs))), f"seqs not consecutive from {first}: {seqs[:10]}..."


def test_abrupt_disconnect_mid_flood_resumes_exactly_after_seq(fake_session, open_channel):
    server, session_id = fake_session
    a = open_channel(server, session_id, after=0)
    request = a.execute(f"flood {FLOOD}")
    frames_a, texts_a = read_texts(a, request, 2000)
    assert all("seq" in f for f in frames_a), "frames of a client that sent ?after= must carry seq"
    check_seqs(frames_a, 1)
    last_seq = frames_a[-1]["seq"]
    abrupt_close(a.ws)

    b = open_channel(server, session_id, after=last_seq)
    frames_b = until_done(b, request, timeout=60)
    check_seqs(frames_b, last_seq + 1)
    texts = texts_a + texts_of(frames_b, request)
    assert len(texts) == FLOOD
    assert texts == EXPECTED
    assert replies_to(frames_b, request, "execute_reply")[0]["content"]["status"] == "ok"


def test_handover_with_after_mid_flood_exactly_once(fake_session, open_channel):
    server, session_id = fake_session
    a = open_channel(server, session_id, after=0)
    request = a.execute(f"flood {FLOOD}")
    frames_a, texts_a = read_texts(a, request, 2000)
    last_seq = frames_a[-1]["seq"]

    # B connects while A is still attached (and still reading, as a live client would).
    opening = gevent.spawn(open_channel, server, session_id, after=last_seq)
    rest_a, how = read_until_closed(a.ws, timeout=20, polite=True)
    b = opening.get(timeout=10)
    assert rest_a and kernel_frame(rest_a[-1], "clientDisconnected"), \
        f"A's last frame is not clientDisconnected: {rest_a[-1:]}"
    assert how == "close", "A should get a Close frame after clientDisconnected"
    # Whatever A got after `last_seq` is a duplicate B must also get, in the same order.
    extra = [f for f in rest_a if "seq" in f]
    if extra:
        check_seqs(extra, last_seq + 1)

    frames_b = b.until_idle(request, timeout=60)
    check_seqs(frames_b, last_seq + 1)
    texts = texts_a + texts_of(frames_b, request)
    assert len(texts) == FLOOD
    assert texts == EXPECTED
    n = min(len(extra), len(frames_b))
    assert frames_b[:n] == extra[:n]
    assert session_info(server, session_id)["connected"] is True, "the replaced client's exit clobbered connected"


def legacy_handover_once(server, open_channel):
    """One legacy handover (no `after`) during a flood; returns how many texts B got."""
    session_id = start_fake(server)
    a = open_channel(server, session_id)
    request = a.execute(f"flood {FLOOD}")
    frames_a, texts_a = read_texts(a, request, 2000)
    assert not any("seq" in f for f in frames_a), "seq is only for clients that sent ?after="

    opening = gevent.spawn(open_channel, server, session_id)
    rest_a, how = read_until_closed(a.ws, timeout=20, polite=True)
    b = opening.get(timeout=10)
    assert rest_a and kernel_frame(rest_a[-1], "clientDisconnected"), \
        f"A's last frame is not clientDisconnected: {rest_a[-1:]}"
    assert how == "close"
    texts_a += texts_of(rest_a, request)
    if any(is_idle_for(f, request) for f in rest_a):
        frames_b = collect_for(b, 0.5)  # A got the whole cell: B must get none of it again
    else:
        # The shell reply can overtake the last of the iopub flood: A may have had it already.
        frames_b = b.until_idle(request, timeout=60,
                                reply_seen=bool(replies_to(frames_a + rest_a, request, "execute_reply")))
    assert len(replies_to(frames_a + rest_a + frames_b, request, "execute_reply")) == 1
    texts = texts_a + texts_of(frames_b, request)
    assert len(texts) == FLOOD, f"A got {len(texts_a)}, B got {len(texts) - len(texts_a)}"
    assert texts == EXPECTED
    assert session_info(server, session_id)["connected"] is True
    return len(texts) - len(texts_a)


def test_legacy_handover_mid_flood_exactly_once(server, open_channel):
    # Frames the server already wrote to A's TCP connection still reach A (before its Close),
    # and loopback buffers hold megabytes: now and then A has everything before B is attached.
    # Such a run checks no handover; try again (each run must be exactly-once regardless).
    shares = [legacy_handover_once(server, open_channel)]
    while shares[-1] == 0 and len(shares) < 3:
        shares.append(legacy_handover_once(server, open_channel))
    assert shares[-1] > 0, f"the handover never happened mid-flood in {len(shares)} runs"


def test_output_while_no_client_arrives_on_connect(fake_session, open_channel):
    server, session_id = fake_session
    a = open_channel(server, session_id)
    request = a.execute("sleep 1\nflood 2000")
    a.close()
    wait_status(server, session_id, "busy", timeout=5)
    assert session_info(server, session_id)["connected"] is False
    wait_status(server, session_id, "idle", timeout=20)

    b = open_channel(server, session_id)
    frames = until_done(b, request)
    assert texts_of(frames, request) == [f"{i}\n" for i in range(2000)]
    assert replies_to(frames, request, "execute_reply")


def test_bounded_buffer_reports_dropped_messages(start_server, open_channel):
    server = start_server("--transport", "tcp", "--buffer-limit", "500")
    session_id = start_fake(server)
    a = open_channel(server, session_id)
    request = a.execute("sleep 1\nflood 2000")
    a.close()
    wait_status(server, session_id, "busy", timeout=5)
    wait_status(server, session_id, "idle", timeout=20)

    b = open_channel(server, session_id)
    first = b.recv(10)
    assert kernel_frame(first, "messagesDropped"), f"expected messagesDropped first, got {first}"
    dropped = first["messagesDropped"]
    assert set(dropped) >= {"count", "first_seq", "last_seq"}
    assert dropped["count"] == dropped["last_seq"] - dropped["first_seq"] + 1
    assert dropped["count"] >= 1500, dropped  # 2000+ frames were produced, 500 kept
    # (only the idle: the execute_reply comes on another socket and, when it overtook the flood, it is
    # among the oldest frames the bound dropped)
    frames = b.until(lambda f: is_idle_for(f, request), timeout=20)
    assert len(frames) <= 500
    texts = texts_of(frames, request)
    assert texts[-1] == "1999\n"
    assert 400 <= len(texts) <= 500, len(texts)
    start = int(texts[0])
    assert texts == [f"{i}\n" for i in range(start, 2000)], "the kept messages are not the newest, in order"

    # A client resuming from the very beginning is told exactly which seqs are gone.
    c = open_channel(server, session_id, after=0)
    first_c = c.recv(10)
    assert kernel_frame(first_c, "messagesDropped"), first_c
    assert first_c["messagesDropped"]["first_seq"] == 1
    assert first_c["messagesDropped"]["last_seq"] == dropped["last_seq"]
    frames_c = c.until(lambda f: is_idle_for(f, request), timeout=20)
    check_seqs(frames_c, dropped["last_seq"] + 1)
    assert texts_of(frames_c, request) == texts


# ---------------------------------------------------------------------------------------------
# clients that stop answering


def raw_upgrade(server, session_id, timeout=5):
    """A WebSocket opened by hand that will never read again (so never answers a ping)."""
    sock = socket.create_connection(("127.0.0.1", server.info["port"]), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /sessions/{session_id}/channels HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{server.info['port']}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in head:
        assert time.monotonic() < deadline, f"no upgrade answer: {head!r}"
        chunk = sock.recv(1)  # byte by byte: leave the WebSocket frames unread
        assert chunk, f"connection closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_pings_drop_a_silent_client_and_keep_a_live_one(start_server, open_channel):
    server = start_server("--transport", "tcp", "--ping-interval", "0.5")
    silent_id, live_id = start_fake(server), start_fake(server)
    # A well-behaved websocket-client client on another session: it answers pings while in recv.
    live = open_channel(server, live_id)
    listening = gevent.spawn(collect_for, live, 3.5)
    sock = raw_upgrade(server, silent_id)
    try:
        wait_for(lambda: session_info(server, silent_id)["connected"], 5, what="connected true")
        started = time.monotonic()
        wait_for(lambda: not session_info(server, silent_id)["connected"], 6,
                 what="a client that ignores pings to be dropped")
        assert time.monotonic() - started < 5.5
        # The server closed the TCP connection: after the unread frames comes EOF.
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    finally:
        sock.close()
    listening.get(timeout=10)
    assert session_info(server, live_id)["connected"] is True, "a client that answers pings was dropped"
    request = live.execute("print alive")
    assert stream_text(replies_to(live.until_idle(request, timeout=5), request)) == "alive\n"

    # The dropped client's session is unharmed and takes a new client.
    assert session_info(server, silent_id)["status"] == "idle"
    ok = open_channel(server, silent_id)
    request = ok.execute("print still here")
    assert stream_text(replies_to(ok.until_idle(request), request)) == "still here\n"


# ---------------------------------------------------------------------------------------------
# kernels that stop answering


def test_heartbeat_loss_and_recovery(start_server, open_channel):
    server = start_server("--transport", "tcp", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")
    session_id = start_fake(server)
    channel = open_channel(server, session_id)
    pid = kernel_pid(server, session_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        frames = channel.until(lambda f: kernel_frame(f, "status") and f["status"]["status"] == "offline",
                               timeout=6)
        assert frames[-1]["status"]["reason"] == "lost heartbeat"
        assert session_info(server, session_id)["status"] == "offline"
    finally:
        os.kill(pid, signal.SIGCONT)
    frames = channel.until(lambda f: kernel_frame(f, "status") and f["status"]["status"] != "offline", timeout=6)
    assert frames[-1]["status"] == {"status": "idle", "reason": "heartbeat detected after offline"}
    assert session_info(server, session_id)["status"] == "idle"
    request = channel.execute("print back")
    assert stream_text(replies_to(channel.until_idle(request, timeout=5), request)) == "back\n"


# ---------------------------------------------------------------------------------------------
# JEP 66


def test_jep66_handshake(server, open_channel):
    session_id = new_id("jep")
    reply = start_session(server.client, fake_kernel_session(session_id, protocol_version="5.5"))
    assert reply["implementation"] == "fake"
    channel = open_channel(server, session_id)
    frames = channel.until(lambda f: kernel_frame(f, "handshakeCompleted"), timeout=5)
    sid, info = frames[-1]["handshakeCompleted"]
    assert sid == session_id
    ports = [info[k] for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
    assert all(isinstance(p, int) and p > 0 for p in ports), info
    assert len(set(ports)) == 5
    served = server.client.call("GET", f"/sessions/{session_id}/connection_info")
    assert {k: served[k] for k in info if k.endswith("_port")} == {k: v for k, v in info.items()
                                                                   if k.endswith("_port")}
    request = channel.execute("print via handshake")
    assert stream_text(replies_to(channel.until_idle(request), request)) == "via handshake\n"


def test_jep66_handshake_never_sent(server):
    body = fake_kernel_session(new_id("jep"), "--handshake-never", protocol_version="5.5", connection_timeout=2)
    status, answer, pids = start_watching(server, body)
    assert status == 500, answer
    assert answer["error"]["code"] == "KS-17", answer
    assert "handshake" in answer["error"]["message"].lower()
    assert pids, "never saw the kernel process"
    wait_gone(pids, timeout=5)


def test_jep66_kernel_exits_before_handshake(server):
    body = fake_kernel_session(new_id("jep"), "--handshake-exit", "4", protocol_version="5.5")
    status, answer, pids = start_watching(server, body)
    assert status == 500, answer
    assert answer.get("exit_code") == 4, answer
    assert answer["error"]["code"] == "KS-14", answer
    wait_gone(pids, timeout=5)
    assert not server.descendants()


# ---------------------------------------------------------------------------------------------
# resource usage and working directory


def test_resource_usage_events(start_server, open_channel):
    server = start_server("--transport", "tcp", "--resource-sample-interval", "200")
    session_id = start_fake(server)
    channel = open_channel(server, session_id)
    request = channel.execute("burn 3")
    frames = channel.until_idle(request, timeout=15)
    frames += collect_for(channel, 0.5)
    samples = kernel_events(frames, "resourceUsage")
    assert len(samples) >= 5, f"only {len(samples)} samples in ~3.5 s at 200 ms"
    # A busy loop shows (how much of a core it gets depends on the machine's load: test_resources.py
    # checks the figure itself against the OS's own accounting)
    assert max(s["cpu_percent"] for s in samples) > 20, [s["cpu_percent"] for s in samples]
    now_ms = time.time() * 1000
    for sample in samples:
        assert sample["memory_bytes"] > 0
        assert sample["thread_count"] >= 1
        assert sample["sampling_period_ms"] == 200
        assert abs(sample["timestamp"] - now_ms) < 30_000, sample
    usage = session_info(server, session_id).get("resource_usage")
    assert usage and usage["memory_bytes"] > 0 and usage["sampling_period_ms"] == 200, usage

    server.client.call("POST", "/server_configuration", {"resource_sample_interval_ms": 0})
    collect_for(channel, 0.5)  # one sample may already be on its way
    later = collect_for(channel, 1.5)
    assert not kernel_events(later, "resourceUsage"), "sampling did not stop"


def test_working_dir_changed(start_server, open_channel):
    server = start_server("--transport", "tcp")
    session_id = start_fake(server, working_directory=HERE)
    channel = open_channel(server, session_id)
    request = channel.execute("cd /tmp")
    frames = channel.until_idle(request)
    assert kernel_events(frames, "workingDirChanged") == [os.path.realpath("/tmp")]
    assert session_info(server, session_id)["working_directory"] == os.path.realpath("/tmp")


# ---------------------------------------------------------------------------------------------
# idle shutdown


def test_idle_shutdown_without_client(start_server):
    server = start_server("--transport", "tcp", "--idle-shutdown-seconds", "2")
    session_id = start_fake(server)
    pid = kernel_pid(server, session_id)
    server.descendants()
    try:
        code = server.process.wait(12)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the idle server did not exit within 12 s; log:\n{log_tail(server)}")
    assert code == 0
    wait_gone([pid], timeout=5)


def test_idle_shutdown_waits_for_connected_client(start_server, open_channel):
    server = start_server("--transport", "tcp", "--idle-shutdown-seconds", "2")
    session_id = start_fake(server)
    channel = open_channel(server, session_id)
    collect_for(channel, 4.0)
    assert server.process.poll() is None, "the server exited while a client was connected"
    channel.close()
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after its client left; log:\n{log_tail(server)}")
    assert code == 0


def test_idle_shutdown_waits_for_heartbeat_client_process(start_server):
    server = start_server("--transport", "tcp", "--idle-shutdown-seconds", "2")
    start_fake(server)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        server.client.call("POST", "/client_heartbeat", {"process_id": sleeper.pid})
        time.sleep(3.5)
        assert server.process.poll() is None, "the server exited while the heartbeat client process lives"
    finally:
        sleeper.kill()
        sleeper.wait(5)
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after the client process died; log:\n{log_tail(server)}")
    assert code == 0


# ---------------------------------------------------------------------------------------------
# server shutdown and death


def test_sigterm_shuts_down_cleanly(start_server, open_channel):
    server = start_server("--transport", "tcp")
    sessions = [start_fake(server), start_fake(server)]
    pids = [kernel_pid(server, s) for s in sessions]
    channel = open_channel(server, sessions[0])
    server.descendants()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within 10 s of SIGTERM; log:\n{log_tail(server)}")
    assert code == 0
    wait_gone(pids, timeout=2)
    assert not server.alive_spawned()
    _, how = read_until_closed(channel.ws, timeout=5)
    assert how in ("close", "eof")


def test_sigterm_kills_kernel_that_ignores_shutdown(start_server):
    server = start_server("--transport", "tcp", "--shutdown-timeout", "1")
    session_id = start_fake(server, "--ignore-shutdown")
    pid = kernel_pid(server, session_id)
    server.descendants()
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within 10 s of SIGTERM; log:\n{log_tail(server)}")
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed >= 0.9, f"the kernel was not given its --shutdown-timeout ({elapsed:.2f} s)"
    wait_gone([pid], timeout=2)


def test_sigkill_of_server_takes_kernels_down(start_server):
    server = start_server("--transport", "tcp")
    py_id = new_id("py")
    start_session(server.client, python_kernel_session(py_id, PYTHON, working_directory=HERE))
    fake_id = start_fake(server)
    pids = [kernel_pid(server, py_id), kernel_pid(server, fake_id)]
    guardians = server.descendants()
    pids += [p.pid for p in guardians]  # the kernels' guardians too
    kernel_dirs = {os.path.dirname(p.cmdline()[p.cmdline().index("--dir") + 1]) for p in guardians
                   if "--dir" in p.cmdline()}
    assert len(kernel_dirs) == 1 and os.path.isdir(next(iter(kernel_dirs)))
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(5)
    wait_gone(pids, timeout=10)
    # Nothing is left on disk either: the guardians removed the sessions' files and the private dir.
    kernel_dir = next(iter(kernel_dirs))
    wait_for(lambda: not os.path.exists(kernel_dir), 5, f"{kernel_dir} to be removed")

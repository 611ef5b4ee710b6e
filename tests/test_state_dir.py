"""Sessions that survive the supervisor (--state-dir), and kernels that do not outlive it for long.

Each test plays the part of a service manager (systemd with Restart=on-failure): it runs one command
line, SIGKILLs the server, and runs the same command line again. Every process is recorded and killed
by pid at teardown, whatever happened.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
import websocket  # noqa: E402
from conftest import (HERE, PYTHON, Channel, fake_kernel_session, new_id, pid_gone,  # noqa: E402
                      remove_sockets_of_a_killed_server, wait_for, wait_gone)

from kcgevent.client import Client, python_kernel_session  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the state dir needs POSIX locks")


class ServiceManager:
    """Runs the same server command line again and again, like systemd's Restart=on-failure."""

    def __init__(self, tmp_path, *args, token="secret-token-1"):
        self.dir = tmp_path
        self.state_dir = str(tmp_path / "state")
        self.connection_file = str(tmp_path / "server.json")
        self.token_file = str(tmp_path / "token")
        with open(self.token_file, "w") as f:
            f.write(token)
        self.cmd = [PYTHON, "-m", "kcgevent", "--connection-file", self.connection_file, "--token", self.token_file,
                    "--state-dir", self.state_dir, *args]
        self.process = None
        self.pids = set()  # every process seen, killed at teardown
        self.runs = 0

    def start(self, timeout=30):
        if os.path.exists(self.connection_file):
            os.unlink(self.connection_file)
        self.runs += 1
        self.log = open(self.dir / f"server-{self.runs}.log", "w+")
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.pids.add(self.process.pid)
        wait_for(lambda: os.path.exists(self.connection_file) or self.process.poll() is not None, timeout,
                 "the connection file")
        assert self.process.poll() is None, f"the server exited: {self.output()}"
        with open(self.connection_file) as f:
            self.info = json.load(f)
        self.client = Client(self.info)
        return self

    def output(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def record_descendants(self):
        try:
            kids = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        self.pids.update(k.pid for k in kids)
        return kids

    def sigkill(self):
        self.record_descendants()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self):
        """SIGTERM (a clean stop): the server must exit 0 within 20 s."""
        self.record_descendants()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)

    def cleanup(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        if self.process is not None:
            remove_sockets_of_a_killed_server(getattr(self, "info", None), self.process)
        left = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
                    proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        return left


@pytest.fixture
def manager(tmp_path):
    made = []

    def make(*args, **kwargs):
        made.append(ServiceManager(tmp_path, *args, **kwargs))
        return made[-1]

    yield make
    leftovers = [m.cleanup() for m in made]
    assert not any(leftovers), f"processes left behind: {leftovers}"


def sessions_of(server):
    return {s["session_id"]: s for s in server.client.call("GET", "/sessions")["sessions"]}


def start(server, body):
    server.client.call("PUT", "/sessions", body)
    server.client.call("POST", f"/sessions/{body['session_id']}/start")
    return server.client.call("GET", f"/sessions/{body['session_id']}")["process_id"]


def open_ws(server, session_id, after=None):
    return Channel(server.client.open_channel(session_id, after=after))


def tree_of(pid):
    """The kernel, its guardian and everything below the guardian."""
    proc = psutil.Process(pid)
    guardian = proc.parent()
    assert any("guardian.py" in part for part in guardian.cmdline()), guardian.cmdline()
    return [guardian.pid] + [p.pid for p in guardian.children(recursive=True)]


def stream_lines(frames, request):
    text = "".join(f["content"]["text"] for f in frames if f.get("kind") == "jupyter"
                   and f["header"]["msg_type"] == "stream"
                   and (f["parent_header"] or {}).get("msg_id") == request["header"]["msg_id"])
    return [int(line) for line in text.split()]


def is_idle_for(frame, request):
    return (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "status"
            and frame["content"].get("execution_state") == "idle"
            and (frame["parent_header"] or {}).get("msg_id") == request["header"]["msg_id"])


def run_code(server, session_id, code):
    """Execute `code` on a fresh channel; the stream text it printed."""
    channel = open_ws(server, session_id)
    try:
        request = channel.execute(code)
        frames = channel.until(lambda f: is_idle_for(f, request), timeout=30)
        return "".join(f["content"]["text"] for f in frames if f.get("kind") == "jupyter"
                       and f["header"]["msg_type"] == "stream"
                       and (f["parent_header"] or {}).get("msg_id") == request["header"]["msg_id"])
    finally:
        channel.close()


PRINTER = "import time\nfor i in range(1000):\n    print(i, flush=True)\n    time.sleep(0.01)\n"


@pytest.mark.parametrize("transport", ["socket", "tcp"])
def test_sessions_survive_sigkill_and_end_after_the_grace_period(manager, transport):
    server = manager("--restart-grace", "8", "--transport", transport).start()
    printer, idle, unstarted = new_id("print"), new_id("idle"), new_id("never")
    printer_pid = start(server, python_kernel_session(printer, PYTHON, working_directory=HERE))
    idle_pid = start(server, python_kernel_session(idle, PYTHON, working_directory=HERE))
    server.client.call("PUT", "/sessions", python_kernel_session(unstarted, PYTHON, working_directory=HERE))
    assert run_code(server, idle, "x = 42\nimport subprocess\nsleeper = subprocess.Popen(['sleep', '600'])\n"
                    "print(sleeper.pid)").strip().isdigit()
    trees = tree_of(printer_pid) + tree_of(idle_pid)
    sleeper = [p for p in trees if psutil.Process(p).name() == "sleep"]
    assert len(sleeper) == 1

    channel = open_ws(server, printer, after=0)
    request = channel.execute(PRINTER)
    frames = channel.until(lambda f: len(stream_lines(channel.frames, request)) >= 100, timeout=30)
    before = {sid: (s["status"], s.get("process_id")) for sid, s in sessions_of(server).items()}
    assert before[printer][0] == "busy" and before[idle][0] == "idle" and before[unstarted][0] == "uninitialized"
    address, token, server_id = (server.info.get("port") or server.info["socket_path"], server.info["bearer_token"],
                                 server.client.call("GET", "/status")["server_id"])
    manager_pids = set(trees) | {printer_pid, idle_pid}
    server.pids |= manager_pids

    server.sigkill()
    killed_at = time.monotonic()
    last_seq = max(f["seq"] for f in channel.frames)
    seen = stream_lines(channel.frames, request)
    channel.ws.close()
    server.start()
    restart_took = time.monotonic() - killed_at
    assert restart_took < 5

    # Same address, token and server_id; the connection file was written again.
    assert (server.info.get("port") or server.info["socket_path"], server.info["bearer_token"]) == (address, token)
    assert server.client.call("GET", "/status")["server_id"] == server_id
    after = {sid: (s["status"], s.get("process_id")) for sid, s in sessions_of(server).items()}
    assert after == before  # same ids, same states (the printer is still busy), same processes
    assert all(not pid_gone(pid) for pid in manager_pids), "a kernel process did not survive"

    # The ?after=N client gets every line once, and one outputGap where no supervisor listened.
    channel = open_ws(server, printer, after=last_seq)
    frames = channel.until(lambda f: is_idle_for(f, request), timeout=40)
    assert [f["seq"] for f in frames] == list(range(last_seq + 1, last_seq + 1 + len(frames)))
    gaps = [i for i, f in enumerate(frames) if f.get("kind") == "kernel" and "outputGap" in f]
    assert len(gaps) == 1, [f for f in frames if f.get("kind") == "kernel"]
    before_gap = seen + stream_lines(frames[:gaps[0]], request)
    after_gap = stream_lines(frames[gaps[0]:], request)
    assert before_gap == list(range(len(before_gap))), "lines repeated or lost before the gap"
    assert after_gap and after_gap == list(range(after_gap[0], 1000)), "lines repeated or lost after the gap"
    assert after_gap[0] > before_gap[-1]
    channel.close()
    assert sessions_of(server)[printer]["status"] == "idle"

    # The idle kernel kept its memory.
    assert run_code(server, idle, "print(x)").strip() == "42"

    # Killed again and not restarted: after the grace period nothing of the kernels is left.
    server.sigkill()
    wait_gone(sorted(manager_pids), timeout=8 + 2 + 20)


def test_a_client_reconnecting_with_backoff_gets_back_in(manager):
    server = manager("--restart-grace", "30").start()
    session_id = new_id("fake")
    start(server, fake_kernel_session(session_id))
    server.sigkill()
    restarted = {}

    def restart_later():
        time.sleep(1.5)
        restarted["at"] = time.monotonic()
        server.start()

    import gevent
    pending = gevent.spawn(restart_later)
    delay, attempts, ws = 1.0, 0, None
    deadline = time.monotonic() + 60
    client = Client(dict(server.info))
    while ws is None:
        assert time.monotonic() < deadline, "never got back in"
        attempts += 1
        try:
            ws = client.open_channel(session_id, timeout=5)
        except (OSError, websocket.WebSocketException):
            gevent.sleep(delay)
            delay *= 2
    pending.join()
    assert attempts >= 2
    channel = Channel(ws)
    request = channel.execute("print back")
    channel.until(lambda f: is_idle_for(f, request), timeout=20)
    channel.close()
    assert server.stop() == 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "POST /shutdown", "idle shutdown"])
def test_a_clean_stop_ends_kernels_and_clears_the_sessions(manager, how):
    server = manager("--idle-shutdown-seconds", "5" if how == "idle shutdown" else "3600").start()
    session_id = new_id("fake")
    pid = start(server, fake_kernel_session(session_id))
    assert run_code(server, session_id, "print kept") == "kept\n"
    tree = tree_of(pid)
    server.record_descendants()
    if how == "POST /shutdown":
        assert server.client.call("POST", "/shutdown") is None
    elif how.startswith("SIG"):
        server.process.send_signal(getattr(signal, how))
    assert server.process.wait(30) == 0
    wait_gone(tree, timeout=10)
    state = server.state_dir
    assert os.listdir(os.path.join(state, "sessions")) == [] and os.listdir(os.path.join(state, "kernels")) == []
    server.start()
    assert sessions_of(server) == {}
    assert server.stop() == 0


def test_state_dir_files_are_private(manager):
    server = manager().start()
    session_id = new_id("fake")
    start(server, fake_kernel_session(session_id))
    run_code(server, session_id, "print hello")
    for root, dirs, files in os.walk(server.state_dir):
        for name in dirs + files:
            mode = os.lstat(os.path.join(root, name)).st_mode
            assert not mode & 0o077, f"{os.path.join(root, name)} is {stat.filemode(mode)}"
    assert not os.stat(server.state_dir).st_mode & 0o077
    assert server.stop() == 0


def test_a_second_server_on_the_same_state_dir_exits_at_once(manager, tmp_path):
    first = manager().start()
    session_id = new_id("fake")
    start(first, fake_kernel_session(session_id))
    time.sleep(1)  # the kernel's guardian looks at the lock meanwhile: that must not release it
    second = subprocess.run([PYTHON, "-m", "kcgevent", "--transport", "tcp"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "KCGEVENT_STATE_DIR": first.state_dir})
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is using the state dir" in lines[0], second.stderr
    assert first.client.call("GET", "/status")["sessions"] == 1
    assert first.stop() == 0


def test_a_damaged_state_dir_is_reported_per_session(manager):
    server = manager("--restart-grace", "30").start()
    kept, truncated, torn, died = (new_id(p) for p in ("kept", "trunc", "torn", "died"))
    pids = {sid: start(server, fake_kernel_session(sid)) for sid in (kept, truncated, torn, died)}
    for sid in pids:
        run_code(server, sid, "print before")
    trees = {sid: tree_of(pid) for sid, pid in pids.items()}
    server.pids.update(p for tree in trees.values() for p in tree)
    time.sleep(1.5)  # a checkpoint of every record
    server.sigkill()

    sessions_dir = os.path.join(server.state_dir, "sessions")

    def session_dir(sid):
        for name in os.listdir(sessions_dir):
            with open(os.path.join(sessions_dir, name, "id")) as f:
                if f.read() == sid:
                    return os.path.join(sessions_dir, name)

    log_dir = os.path.join(session_dir(truncated), "log")
    (segment,) = os.listdir(log_dir)
    size = os.path.getsize(os.path.join(log_dir, segment))
    with open(os.path.join(log_dir, segment), "r+b") as f:
        f.truncate(size - 7)
    record = os.path.join(session_dir(torn), "session.json")
    with open(record, "r+b") as f:
        f.truncate(os.path.getsize(record) // 2)
    os.kill(pids[died], signal.SIGKILL)
    wait_gone([pids[died]])

    server.start()
    listed = sessions_of(server)
    assert set(listed) == set(pids)
    assert listed[kept]["status"] == "idle" and listed[kept]["process_id"] == pids[kept]
    assert run_code(server, kept, "print after") == "after\n"
    assert listed[truncated]["status"] == "idle"
    assert run_code(server, truncated, "print after") == "after\n"
    assert listed[died]["status"] == "exited"
    assert listed[torn]["status"] == "exited"
    wait_gone(trees[torn] + trees[died], timeout=15)  # the kernel of a lost record is ended
    told = open_ws(server, torn, after=0)
    told.until(lambda f: f.get("kind") == "kernel" and "status" in f and f["status"]["status"] == "exited"
               and "record is damaged" in f["status"]["reason"], timeout=10)
    told.close()
    log_text = server.output()
    assert "session %s: its record is damaged" % torn in log_text
    assert "session %s: log segment" % truncated in log_text
    for sid in (torn, died):
        assert server.client.request("DELETE", f"/sessions/{sid}")[0] == 200
    assert server.stop() == 0
    wait_gone(trees[kept] + trees[truncated], timeout=10)
    # The first server's session sockets (it died with them) went with the second's clean stop.
    socket_path = server.info["socket_path"]
    assert not os.path.exists(socket_path)
    assert not os.path.exists(socket_path[:-len(".sock")] + ".d"), os.listdir(socket_path[:-len(".sock")] + ".d")


@pytest.mark.parametrize("state_dir", [False, True])
def test_sigkill_of_the_server_ends_what_kernels_started(start_server, manager, state_dir):
    if state_dir:
        server = manager("--restart-grace", "1").start()
        server.descendants = server.record_descendants
    else:
        server = start_server("--transport", "tcp")
    session_id = new_id("py")
    pid = start(server, python_kernel_session(session_id, PYTHON, working_directory=HERE))
    sleeper = int(run_code(server, session_id, "import subprocess\n"
                           "p = subprocess.Popen(['sleep', '600'], start_new_session=True)\nprint(p.pid)"))
    tree = tree_of(pid)
    assert sleeper in tree
    server.descendants()
    os.kill(server.pid if not state_dir else server.process.pid, signal.SIGKILL)
    server.process.wait(5)
    wait_gone(tree, timeout=15)


def test_what_a_kernel_prints_while_no_server_runs_is_kept(manager):
    server = manager("--restart-grace", "30").start()
    session_id = new_id("fake")
    pid = start(server, fake_kernel_session(session_id, interrupt_mode="signal"))
    server.pids.update(tree_of(pid))
    channel = open_ws(server, session_id, after=0)
    request = channel.execute("sleep 1.5\nstdout printed-while-down\nstderr complained-while-down\nprint done")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                  and f["content"].get("execution_state") == "busy", timeout=10)
    last_seq = max(f["seq"] for f in channel.frames)
    server.sigkill()
    channel.ws.close()
    time.sleep(3)  # the kernel writes to its stdout and stderr with no server: no EPIPE, nothing lost
    server.start()
    assert sessions_of(server)[session_id]["process_id"] == pid
    channel = open_ws(server, session_id, after=last_seq)
    outputs = channel.until(lambda f: f.get("kind") == "kernel" and "output" in f
                            and "complained-while-down" in f["output"][1], timeout=10)
    printed = [f["output"] for f in outputs if f.get("kind") == "kernel" and "output" in f]
    assert ["stdout", "printed-while-down\n"] in printed and ["stderr", "complained-while-down\n"] in printed
    # The kernel is alive and answers; a restored kernel can be interrupted, killed and is seen to exit.
    request = channel.execute("sleep 30")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                  and f["content"].get("execution_state") == "busy"
                  and f["parent_header"]["msg_id"] == request["header"]["msg_id"], timeout=10)
    server.client.call("POST", f"/sessions/{session_id}/interrupt")
    reply = channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "execute_reply",
                          timeout=10)[-1]
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # A restart of a restored kernel: the old one goes, a new one comes under a new guardian.
    server.client.call("POST", f"/sessions/{session_id}/restart")
    wait_gone([pid])
    new_pid = sessions_of(server)[session_id]["process_id"]
    assert new_pid != pid
    server.pids.update(tree_of(new_pid))
    channel.close()
    assert run_code(server, session_id, "print restarted") == "restarted\n"
    channel = open_ws(server, session_id)
    server.client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: sessions_of(server)[session_id]["status"] == "exited", 10, "the exit of the kernel")
    channel.until(lambda f: f.get("kind") == "kernel" and "exited" in f, timeout=10)
    wait_gone([new_pid])
    channel.close()
    assert server.stop() == 0


def test_memory_stays_bounded_while_a_client_is_away(manager):
    """With a state dir the frames a client has not read live in files: each time 40 MB of output waits
    for an absent client, the server's RSS does not grow with it (measured from the second round on,
    once the allocator has its working set), and all of it arrives, in order, when the client is back.
    (The fake kernel: ipykernel's iopub drops messages when its send queue is full, which a loaded
    machine can make happen.)"""
    server = manager("--buffer-bytes", str(1 << 30)).start()
    session_id = new_id("fake")
    start(server, fake_kernel_session(session_id))
    last_seq, rss = 0, [psutil.Process(server.process.pid).memory_info().rss]
    for _ in range(3):
        channel = open_ws(server, session_id, after=last_seq)
        # The output starts a second after the busy: the client's close (which reads and drops what is
        # in flight) is over by then, so every line is still in the log for its `?after=N` return.
        # 10 bursts of 4 MB: the server keeps up (what ZeroMQ queues for it meanwhile is not the log)
        request = channel.execute("sleep 1\n" + "flood 400 10000\nsleep 0.1\n" * 10)
        channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                      and f["content"].get("execution_state") == "busy"
                      and (f["parent_header"] or {}).get("msg_id") == request["header"]["msg_id"], timeout=20)
        last_seq = max(f["seq"] for f in channel.frames)
        channel.ws.close()  # away while it runs
        wait_for(lambda: sessions_of(server)[session_id]["status"] == "idle", 120, "the output to be produced")
        rss.append(psutil.Process(server.process.pid).memory_info().rss)
        channel = open_ws(server, session_id, after=last_seq)
        frames = channel.until(lambda f: is_idle_for(f, request), timeout=120)
        assert [f["seq"] for f in frames] == list(range(last_seq + 1, last_seq + 1 + len(frames)))
        assert stream_lines(frames, request) == list(range(400)) * 10
        last_seq = frames[-1]["seq"]
        channel.close()
    assert max(rss) - rss[0] < 20 * (1 << 20), f"RSS grew by {(max(rss) - rss[0]) >> 20} MiB with 40 MB kept on disk"
    assert server.stop() == 0


def test_what_a_kernel_publishes_while_no_server_runs_is_kept_by_its_guardian(manager):
    """iopub is PUB/SUB: only a listener gets messages. The guardian listens while no server does
    (twice: the second time the server it lost was not its parent)."""
    server = manager("--restart-grace", "30").start()
    session_id = new_id("fake")
    pid = start(server, fake_kernel_session(session_id))
    server.pids.update(tree_of(pid))
    channel = open_ws(server, session_id, after=0)
    for crash in range(2):
        request = channel.execute(f"sleep 1\nprint published-while-down-{crash}\nflood 2000\nprint after-the-flood")
        channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                      and f["content"].get("execution_state") == "busy"
                      and (f["parent_header"] or {}).get("msg_id") == request["header"]["msg_id"], timeout=10)
        last_seq = max(f["seq"] for f in channel.frames)
        server.sigkill()
        channel.ws.close()
        time.sleep(3)  # the cell runs to its end with no server
        server.start()
        channel = open_ws(server, session_id, after=last_seq)
        frames = channel.until(lambda f: is_idle_for(f, request), timeout=20)
        texts = [f["content"]["text"] for f in frames if f.get("kind") == "jupyter"
                 and f["header"]["msg_type"] == "stream"]
        assert texts == [f"published-while-down-{crash}\n", *[f"{i}\n" for i in range(2000)], "after-the-flood\n"]
        assert [f["seq"] for f in frames] == list(range(last_seq + 1, last_seq + 1 + len(frames)))
        gaps = [f for f in frames if f.get("kind") == "kernel" and "outputGap" in f]
        assert len(gaps) == 1
        assert sessions_of(server)[session_id]["status"] == "idle"
        # Nothing twice afterwards either: the live stream after the handover.
        request = channel.execute("print live")
        frames = channel.until(lambda f: is_idle_for(f, request), timeout=20)
        assert [f["content"]["text"] for f in frames if f.get("kind") == "jupyter"
                and f["header"]["msg_type"] == "stream"] == ["live\n"]
    channel.close()
    assert server.stop() == 0

"""The launcher seam on its own: LocalLauncher and its guardian, driven in-process (no server)."""
from gevent import monkey

monkey.patch_all()

import fcntl  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
from conftest import PYTHON, pid_gone, wait_for, wait_gone  # noqa: E402

from kcgevent.session.launcher import LaunchError, LaunchRequest, LocalLauncher, restore_launcher  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the guardian is POSIX-only")

# Prints its pid and a grandchild's (which leaves its process group), says when interrupted, exits 3 on "q".
KERNEL = """
import signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"], start_new_session=True)
def interrupted(*_):
    print("interrupted", flush=True)
signal.signal(signal.SIGINT, interrupted)
print("child", child.pid, flush=True)
print("to stderr", file=sys.stderr, flush=True)
while True:
    time.sleep(0.05)
"""


class Recorder:
    def __init__(self):
        self.lines = []
        self.exits = []

    def output(self, stream, line):
        self.lines.append((stream, line))

    def exit(self, code):
        self.exits.append(code)

    def child(self):
        found = [int(line.split()[1]) for _, line in self.lines if line.startswith("child ")]
        return found[0] if found else None


def launch(tmp_path, code=KERNEL, **options):
    rec = Recorder()
    launcher = LocalLauncher(rec.output, rec.exit, str(tmp_path / "kernel"), **options)
    launcher.start(LaunchRequest([PYTHON, "-c", code], dict(os.environ), "", str(tmp_path / "conn.json")))
    return launcher, rec


def gwait(predicate, timeout, what):
    """wait_for, yielding to the hub (the launcher's greenlets must run)."""
    return wait_for(predicate, timeout, what, interval=0.02)


@pytest.mark.parametrize("durable", [False, True])
def test_start_output_interrupt_and_kill_of_the_whole_tree(tmp_path, durable):
    launcher, rec = launch(tmp_path, durable=durable)
    child = gwait(rec.child, 15, "the kernel's first line")
    assert launcher.poll() is None and not pid_gone(launcher.pid)
    gwait(lambda: ("stderr", "to stderr\n") in rec.lines, 10, "stderr")
    launcher.interrupt()
    gwait(lambda: ("stdout", "interrupted\n") in rec.lines, 10, "the interrupt")
    kernel = launcher.pid
    assert launcher.kill() is True
    assert launcher.poll() == -1 and rec.exits == [-1]
    wait_gone([kernel, child])
    assert launcher.pid is None
    if durable:
        assert os.path.exists(tmp_path / "kernel" / "stdout")
    launcher.cleanup()
    assert not os.path.exists(tmp_path / "kernel" / "status.json")


def test_exit_code_comes_after_all_output(tmp_path):
    launcher, rec = launch(tmp_path, "import sys\nfor i in range(3): print(i)\nsys.exit(3)", durable=True)
    assert launcher.wait(15) == 3
    assert [line for _, line in rec.lines] == ["0\n", "1\n", "2\n"] and rec.exits == [3]


def test_a_kernel_that_cannot_be_executed_is_a_launch_error(tmp_path):
    rec = Recorder()
    launcher = LocalLauncher(rec.output, rec.exit, str(tmp_path / "kernel"))
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(LaunchError) as err:
        launcher.start(LaunchRequest([str(script)], dict(os.environ), "", ""))
    assert err.value.errno == 13 and "Permission denied (os error 13)" in err.value.message
    gevent.sleep(0.5)
    assert rec.exits == []


def test_a_restored_launcher_reaches_the_same_kernel(tmp_path):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # we play the server holding the state dir
    try:
        first, rec = launch(tmp_path, durable=True, lock=str(lock), grace=30)
        child = gwait(rec.child, 15, "the kernel's first line")
        state = first.to_state()
        again = Recorder()
        restored = restore_launcher(state, again.output, again.exit, lock=str(lock), grace=30)
        assert restored.pid == first.pid and restored.poll() is None
        restored.interrupt()
        gwait(lambda: ("stdout", "interrupted\n") in again.lines, 10, "output through the restored launcher")
        assert ("stdout", f"child {child}\n") not in again.lines  # it resumed at the saved offsets
        kernel = restored.pid
        assert restored.kill() is True and again.exits == [-1]
        wait_gone([kernel, child])
        first.wait(10)
    finally:
        os.close(fd)


def test_without_a_server_the_guardian_ends_the_tree_after_the_grace(tmp_path):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    launcher, rec = launch(tmp_path, durable=True, lock=str(lock), grace=1)
    child = gwait(rec.child, 15, "the kernel's first line")
    kernel = launcher.pid
    gevent.sleep(2)  # longer than the grace, but a server (we) holds the lock
    assert launcher.poll() is None
    os.close(fd)  # the server is gone
    started = time.monotonic()
    assert launcher.wait(15) is not None
    assert time.monotonic() - started >= 0.8
    wait_gone([kernel, child])


def test_the_guardian_ends_the_tree_when_its_parent_dies(tmp_path):
    """Without a state dir the guardian's parent is the server: the sleep 600 goes with it."""
    code = ("import os, signal, sys, time\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
            "from gevent import monkey; monkey.patch_all()\n"
            "from kcgevent.session.launcher import LaunchRequest, LocalLauncher\n"
            "launcher = LocalLauncher(lambda s, l: print(l, end='', flush=True), print, sys.argv[1])\n"
            "launcher.start(LaunchRequest([sys.executable, '-c', sys.argv[2]], dict(os.environ), '', ''))\n"
            "time.sleep(600)\n")
    import subprocess
    server = subprocess.Popen([PYTHON, "-c", code, str(tmp_path / "kernel"), KERNEL], stdout=subprocess.PIPE,
                              text=True)
    try:
        lines = [server.stdout.readline() for _ in range(2)]
        (child,) = [int(line.split()[1]) for line in lines if line.startswith("child ")]
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        wait_gone([child], timeout=10)
    finally:
        server.kill()
        server.wait(5)
        server.stdout.close()


FORKS = []  # every Python-level fork of this process (os.fork, or a Popen with a preexec_fn) appends here
os.register_at_fork(before=lambda: FORKS.append(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_spawn is used on Linux")
def test_a_kernel_start_does_not_fork_the_server_in_python(tmp_path):
    """The guardian is started with posix_spawn (a Python-level fork holds the hub, and every other
    session with it, for milliseconds): no fork hook runs. The guardian still starts the kernel in the
    session's working directory and keeps none of the server's inheritable descriptors."""
    workdir = tmp_path / "the work dir"
    workdir.mkdir()
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)  # what a careless C library might leave us
    rec = Recorder()
    launcher = LocalLauncher(rec.output, rec.exit, str(tmp_path / "kernel"))
    forks = len(FORKS)
    try:
        launcher.start(LaunchRequest([PYTHON, "-c", "import os, time; print(os.getcwd(), flush=True); "
                                      "time.sleep(600)"], dict(os.environ), str(workdir), ""))
        assert len(FORKS) == forks
        gwait(lambda: rec.lines, 15, "the kernel's first line")
        assert rec.lines == [("stdout", f"{workdir}\n")]
        guardian = launcher._guardian_pid
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{guardian}/fd")) == [0, 1, 2]
        assert os.getpgid(guardian) == os.getsid(guardian) == guardian  # it leads a session of its own
        kernel = launcher.pid
        assert launcher.kill() is True
        wait_gone([kernel, guardian])
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
        launcher.kill()
        launcher.cleanup()


def test_a_kernel_start_in_a_missing_directory_is_a_launch_error(tmp_path):
    """The guardian enters the working directory itself: one that went away between the check and the
    start is reported as the OS error, as a spawn in it would have been."""
    import kcgevent.session.process as process
    workdir = tmp_path / "gone"
    workdir.mkdir()
    plan_startup = process.plan_startup

    def plan_then_remove(*args, **kwargs):
        plan = plan_startup(*args, **kwargs)
        workdir.rmdir()
        return plan
    rec = Recorder()
    launcher = LocalLauncher(rec.output, rec.exit, str(tmp_path / "kernel"))
    process.plan_startup = plan_then_remove
    try:
        with pytest.raises(LaunchError) as err:
            launcher.start(LaunchRequest([PYTHON, "-c", "print('ran')"], dict(os.environ), str(workdir), ""))
    finally:
        process.plan_startup = plan_startup
    assert err.value.errno == 2 and err.value.message.endswith("No such file or directory (os error 2)")
    assert rec.lines == [] and rec.exits == []


def test_a_guardian_whose_server_is_already_gone_starts_no_kernel(tmp_path):
    """Between the server's spawn and the guardian's own PR_SET_PDEATHSIG the server may die: the
    guardian sees a parent other than --parent and ends without starting the kernel."""
    import subprocess
    from kcgevent.session.launcher import GUARDIAN
    marker = tmp_path / "kernel-ran"
    (tmp_path / "argv").write_bytes(b"\0".join(os.fsencode(arg) for arg in [
        PYTHON, "-c", f"open({str(marker)!r}, 'w').close()"]))
    gone = subprocess.Popen([PYTHON, "-c", "pass"])
    gone.wait(10)
    guardian = subprocess.Popen([PYTHON, "-I", "-S", GUARDIAN, "--dir", str(tmp_path), "--parent", str(gone.pid)])
    try:
        assert guardian.wait(10) == 1
        assert not marker.exists() and not (tmp_path / "status.json").exists()
    finally:
        guardian.kill()
        guardian.wait(5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_guardian_asks_for_the_parent_death_signal_itself(tmp_path):
    """Started with posix_spawn, nothing sets PR_SET_PDEATHSIG for the guardian but the guardian. The
    signal is observable alone when the *thread* that started it ends while the process lives on (then
    getppid() does not change): the guardian must end its kernel's tree and itself."""
    import json
    from kcgevent.session.launcher import GUARDIAN
    (tmp_path / "argv").write_bytes(b"\0".join(os.fsencode(arg) for arg in ["sleep", "600"]))
    status_file = tmp_path / "status.json"
    started, ended = [], []
    native_sleep = monkey.get_original("time", "sleep")
    posix_spawn = monkey.get_original("os", "posix_spawn")  # (gevent's would watch the child from this thread)

    def spawn_and_end():  # a native thread: it ends once the guardian has said it runs
        try:
            started.append(posix_spawn(PYTHON, [PYTHON, "-I", "-S", GUARDIAN, "--dir", str(tmp_path),
                                                   "--parent", str(os.getpid())], dict(os.environ), setsid=True))
            deadline = time.monotonic() + 10
            while not status_file.exists() and time.monotonic() < deadline:
                native_sleep(0.01)
        finally:
            ended.append(True)
    monkey.get_original("_thread", "start_new_thread")(spawn_and_end, ())
    try:
        wait_for(lambda: ended, 15, "the thread to end")
        status = json.loads(status_file.read_text())
        wait_gone([started[0], status["kernel_pid"]])
    finally:
        for pid in started:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def test_delivered_output_gives_its_disk_space_back(tmp_path):
    code = "import sys\nfor i in range(3000):\n    sys.stdout.write(str(i).rjust(999) + '\\n')\nsys.stdout.flush()\n"
    launcher, rec = launch(tmp_path, code, durable=True)
    assert launcher.wait(30) == 0
    lines = [line for _, line in rec.lines]
    assert [int(line) for line in lines] == list(range(3000))
    path = tmp_path / "kernel" / "stdout"
    assert os.path.getsize(path) == 3000 * 1000  # the kernel's offsets are untouched
    assert os.stat(path).st_blocks * 512 < 1 << 20, "delivered output still takes its disk space"


def test_guardian_status_file_is_json_whatever_the_error_text():
    """The guardian writes status.json without the json module (its import is most of its start)."""
    import json
    from kcgevent.session.guardian import to_json
    for status in ({"guardian_pid": 12, "kernel_pid": 13, "exit_code": None},
                   {"guardian_pid": 12, "kernel_pid": 13, "exit_code": -1},
                   {"guardian_pid": 12, "spawn_error": [2, 'a "quoted" \\ path\n\t\x00\x7f é € 😀 \ud800 end']}):
        text = to_json(status)
        assert text.isascii() and json.loads(text) == status


@pytest.mark.parametrize("code, expected", [("import sys; sys.exit(7)", 7), ("import time; time.sleep(600)", -15)])
def test_guardian_without_sigtimedwait(tmp_path, code, expected):
    """macOS has no sigtimedwait: the guardian falls back to handlers and sleeps, and still mirrors the
    kernel's exit (here a SIGTERM to the guardian ends a sleeping kernel)."""
    import json
    import subprocess
    from kcgevent.session.launcher import GUARDIAN
    (tmp_path / "argv").write_bytes(b"\0".join(os.fsencode(arg) for arg in [PYTHON, "-c", code]))
    runner = ("import runpy, _signal, sys; del _signal.sigtimedwait; sys.argv = [sys.argv[0]] + sys.argv[1:]; "
              f"runpy.run_path({GUARDIAN!r}, run_name='__main__')")
    guardian = subprocess.Popen([PYTHON, "-I", "-S", "-c", runner, "--dir", str(tmp_path)])
    try:
        status = gwait(lambda: json.loads((tmp_path / "status.json").read_text() or "{}")
                       if (tmp_path / "status.json").exists() else None, 10, "the guardian's report")
        if expected < 0:
            guardian.send_signal(signal.SIGTERM)
        assert guardian.wait(10) == expected
        wait_gone([status["kernel_pid"]])
    finally:
        guardian.kill()
        guardian.wait(5)


def test_capture_merge_relays_the_capture_then_the_live_stream_without_the_overlap(tmp_path):
    """Pure bookkeeping of iopub_capture.py: a capture file of 5 messages, a live stream starting with
    the last 2 of them: 8 messages relayed once each, in order."""
    import struct

    from kcgevent.session import wire
    from kcgevent.session.iopub_capture import CaptureClaim, CaptureMerge, read_capture

    signer = wire.Signer("key")

    def message(n):
        header = {"msg_id": f"m{n}", "msg_type": "stream", "session": "s", "username": "u", "date": "",
                  "version": "5.3"}
        return wire.serialize(signer, header, {}, {}, {"name": "stdout", "text": f"{n}\n"}, identities=[b"stream"])

    with open(tmp_path / "capture.done", "wb") as f:
        for n in range(5):
            frames = message(n)
            f.write(struct.pack(">I", len(frames)))
            for frame in frames:
                f.write(struct.pack(">I", len(frame)) + frame)
        f.write(b"\x00\x00\x00\x07\x00\x00")  # a torn record at the end is ignored
    assert len(read_capture(tmp_path / "capture.done")) == 5
    relayed = []
    merge = CaptureMerge(CaptureClaim(str(tmp_path)), lambda msg, raw: relayed.append(msg.header["msg_id"]), signer,
                         "s")
    for n in (3, 4, 5):
        merge(*wire.parse_kernel_frames("iopub", message(n), signer))
    gwait(lambda: merge.state == "live", 5, "the merge")
    for n in (6, 7):
        merge(*wire.parse_kernel_frames("iopub", message(n), signer))
    assert relayed == [f"m{n}" for n in range(8)]
    assert os.path.exists(tmp_path / "capture.stop") and not os.path.exists(tmp_path / "capture.done")


def test_capture_merge_leaves_out_the_answers_to_our_own_kernel_info(tmp_path):
    """The guardian keeps iopub until the restarted supervisor's subscription is live, so its capture
    holds the busy (and maybe not the idle) of the kernel_info the supervisor sent on reconnecting:
    those are not relayed (relayed, a lone busy left the session "busy" for good)."""
    import struct

    from kcgevent.session import wire
    from kcgevent.session.iopub_capture import CaptureClaim, CaptureMerge

    signer = wire.Signer("key")
    ours = {b"ki-ours"}

    def status(n, parent_id, parent_type):
        header = {"msg_id": f"m{n}", "msg_type": "status", "session": "s", "username": "u", "date": "",
                  "version": "5.3"}
        parent = {"msg_id": parent_id, "msg_type": parent_type}
        return wire.serialize(signer, header, parent, {}, {"execution_state": "busy"}, identities=[b"status"])

    captured = [status(0, "exec-1", "execute_request"), status(1, "ki-ours", "kernel_info_request"),
                status(2, "ki-theirs", "kernel_info_request")]
    with open(tmp_path / "capture.done", "wb") as f:
        for frames in captured:
            f.write(struct.pack(">I", len(frames)))
            for frame in frames:
                f.write(struct.pack(">I", len(frame)) + frame)

    def is_internal(msg):
        return b"kernel_info_request" in msg.parent_raw and any(i in msg.parent_raw for i in ours)

    relayed = []
    merge = CaptureMerge(CaptureClaim(str(tmp_path)), lambda msg, raw: relayed.append(msg.header["msg_id"]), signer,
                         "s", is_internal)
    merge.iopub_live()
    gwait(lambda: merge.state == "live", 5, "the merge")
    assert relayed == ["m0", "m2"]  # another client's kernel_info is relayed as usual

"""Shared fixtures: real kcgevent servers in child processes, and the sessions they run.

Every server is started with `python -m kcgevent`, found through its
connection file, and torn down by pid: all its descendants (kernels run in
their own process groups) are recorded, the server is asked to shut down,
and anything still alive afterwards is killed *and reported as a failure*.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
import websocket  # noqa: E402

from kcgevent.client import Client, execute_request, python_kernel_session  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_KERNEL = os.path.join(HERE, "kernels", "fake_kernel.py")
PYTHON = sys.executable


class ServerProcess:
    """A running server: `.client`, `.info`, `.process`, and a record of every pid it spawned."""

    def __init__(self, tmp_path, args, token="none", env=None):
        self.dir = tmp_path
        self.connection_file = str(tmp_path / f"conn-{uuid.uuid4().hex[:6]}.json")
        self.log_file = str(tmp_path / "server.log")
        cmd = [PYTHON, "-m", "kcgevent", "--connection-file", self.connection_file, "--log-file", self.log_file]
        if token is not None:
            cmd += ["--token", token]
        cmd += list(args)
        # Files, not pipes: a pipe nobody reads fills up (64 KiB) and then blocks the server's logging.
        tag = uuid.uuid4().hex[:6]
        self.stdout_path, self.stderr_path = tmp_path / f"stdout-{tag}.log", tmp_path / f"stderr-{tag}.log"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        self.seen_pids = set()
        deadline = time.monotonic() + 20
        while not os.path.exists(self.connection_file):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.stderr_path.read_text()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("server did not write its connection file within 20 s")
            time.sleep(0.02)
        with open(self.connection_file) as f:
            self.info = json.load(f)
        self.client = Client(self.info)

    @property
    def pid(self):
        return self.process.pid

    def descendants(self):
        """Every process the server spawned that is alive now (also remembered for cleanup)."""
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        self.seen_pids.update(k.pid for k in kids)
        return kids

    def alive_spawned(self):
        alive = []
        for pid in sorted(self.seen_pids):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self, timeout=20):
        """Shut the server down gracefully (SIGTERM), then make sure nothing is left."""
        self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        leftovers = self.alive_spawned()
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        self.remove_sockets_of_a_killed_server()
        return leftovers

    def remove_sockets_of_a_killed_server(self):
        remove_sockets_of_a_killed_server(self.info, self.process)

    def tracebacks(self):
        """The tracebacks the server logged or printed: each is a bug, even when no request failed
        (e.g. a greenlet of its shutdown dying: the process still exits 0)."""
        found = []
        for path in (self.log_file, self.stderr_path):
            try:
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            for part in text.split("Traceback (most recent call last):")[1:]:
                lines = part.strip("\n").splitlines()
                end = next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), len(lines))
                where = [line.strip() for line in lines[:end] if line.strip().startswith("File ")][-1:]
                found.append(f"{os.path.basename(path)}: {' '.join(where)} -> {' '.join(lines[end:end + 1])}")
        return found


def remove_sockets_of_a_killed_server(info, process):
    """A server killed by a signal (the tests that SIGKILL it) cannot remove its Unix sockets
    (`kc-<pid>.sock` and the sessions' `kc-<pid>.d/`); one that ended normally has removed them."""
    path = (info or {}).get("socket_path")
    if not path or process.returncode is None or process.returncode >= 0:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    # (kc-<N>.sock and kc-<N>.d/: N is the pid of the server that first took the names; a server
    # restarted from a state dir keeps them)
    name = os.path.basename(path)
    stem = name[:-len(".sock")] if name.startswith("kc-") and name.endswith(".sock") else f"kc-{process.pid}"
    shutil.rmtree(os.path.join(os.path.dirname(path), stem + ".d"), ignore_errors=True)


@pytest.fixture
def start_server(tmp_path):
    """Start servers with extra CLI args; all are stopped (and checked for leftovers) at teardown."""
    servers = []

    def start(*args, token="none", env=None):
        server = ServerProcess(tmp_path, args, token=token, env=env)
        servers.append(server)
        server.client.wait_ready()
        return server

    yield start
    leaked, tracebacks = [], []
    for server in servers:
        leaked += server.stop()
        tracebacks += server.tracebacks()
    assert not leaked, f"processes left behind: {[p.pid for p in leaked]}"
    assert not tracebacks, "the server logged tracebacks:\n" + "\n".join(tracebacks)


@pytest.fixture
def server(start_server):
    """A TCP server without auth."""
    return start_server("--transport", "tcp")


def wait_for(predicate, timeout, what="condition", interval=0.05):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def launched_by(proc, server_pid):
    """True if `proc` is a kernel the server launched itself: its parent is the kernel guardian the
    server spawned (POSIX), or the server (no guardian). Not true of a kernel behind a shell."""
    parent = proc.parent()
    if parent is not None and parent.pid != server_pid and any("guardian.py" in p for p in parent.cmdline()):
        parent = parent.parent()
    return parent is not None and parent.pid == server_pid


def pid_gone(pid):
    """True once `pid` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout=10):
    """Wait until every pid in `pids` has exited; fail after `timeout` s."""
    wait_for(lambda: not [pid for pid in pids if not pid_gone(pid)], timeout,
             what=f"processes {list(pids)} to exit")


def get_session(server, session_id):
    return server.client.call("GET", f"/sessions/{session_id}")


def fake_kernel_session(session_id, *flags, **overrides):
    body = python_kernel_session(session_id, PYTHON, **overrides)
    body["argv"] = [PYTHON, FAKE_KERNEL, *flags, "{connection_file}"]
    body["language"] = "fake"
    return body


def new_id(prefix="s"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start_session(client, body):
    client.call("PUT", "/sessions", body)
    return client.call("POST", f"/sessions/{body['session_id']}/start")


@pytest.fixture
def fake_session(server):
    """A started fake-kernel session on `server`: (server, session_id)."""
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    return server, session_id


@pytest.fixture
def python_session(server):
    """A started ipykernel session on `server`: (server, session_id)."""
    session_id = new_id("py")
    start_session(server.client, python_kernel_session(session_id, PYTHON, working_directory=str(HERE)))
    return server, session_id


class Channel:
    """A websocket-client connection with helpers to read frames with a deadline."""

    def __init__(self, ws):
        self.ws = ws
        self.frames = []

    def send(self, message):
        self.ws.send(json.dumps(message))
        return message

    def execute(self, code, msg_id=None):
        return self.send(execute_request(code, msg_id))

    def recv(self, timeout=10):
        self.ws.settimeout(timeout)
        frame = json.loads(self.ws.recv())
        self.frames.append(frame)
        return frame

    def until(self, predicate, timeout=15):
        """Frames up to and including the first one for which predicate(frame) is true."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame within {timeout} s; got {[summary(f) for f in got][-20:]}")
            try:
                frame = self.recv(remaining)
            except websocket.WebSocketTimeoutException:
                raise TimeoutError(
                    f"no matching frame within {timeout} s; got {[summary(f) for f in got][-20:]}") from None
            got.append(frame)
            if predicate(frame):
                return got

    def until_idle(self, request, timeout=15, reply_seen=False):
        """Frames up to the kernel's idle status for `request` (and, for code, its execute_reply).

        iopub and shell are separate sockets: the idle may overtake the reply, and the reply may
        overtake the last output (so a client replaced mid-cell may have had it: `reply_seen`).
        """
        wants_reply = request["header"]["msg_type"] == "execute_request"
        seen = {"idle": False,  # the idle ends the wait, so only a reply can have come before
                "reply": reply_seen or not wants_reply or bool(replies_to(self.frames, request, "execute_reply"))}

        def done(frame):
            seen["idle"] |= is_idle_for(frame, request)
            seen["reply"] |= bool(replies_to([frame], request, "execute_reply"))
            return seen["idle"] and seen["reply"]

        return self.until(done, timeout)

    def close(self):
        self.ws.close()


def summary(frame):
    if frame.get("kind") == "jupyter":
        return f"jupyter:{frame['channel']}:{frame['header']['msg_type']}"
    return f"kernel:{','.join(k for k in frame if k not in ('kind', 'seq'))}"


def is_idle_for(frame, request):
    return (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "status"
            and frame["content"].get("execution_state") == "idle"
            and (frame.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"])


def replies_to(frames, request, msg_type=None):
    return [f for f in frames if f.get("kind") == "jupyter"
            and (f.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"]
            and (msg_type is None or f["header"]["msg_type"] == msg_type)]


def stream_text(frames):
    return "".join(f["content"].get("text", "") for f in frames
                   if f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream")


def kernel_events(frames, name):
    return [f[name] for f in frames if f.get("kind") == "kernel" and name in f]


@pytest.fixture
def open_channel():
    """Open channels; all are closed at teardown."""
    channels = []

    def open_(server, session_id, after=None):
        channel = Channel(server.client.open_channel(session_id, after=after))
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        try:
            channel.close()
        except Exception:
            pass


def raw_request(server, method, path, body=None, *, raw_body=None, headers=None, token=True, timeout=30):
    """(status, headers, decoded body) of one request; the body is decoded as JSON when possible."""
    return server.client.exchange(method, path, body, raw_body=raw_body, headers=headers, token=token,
                                  timeout=timeout)

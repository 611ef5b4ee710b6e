"""The servers under test (kcgevent and Posit's Rust kcserver, same flags) and a channel client for both.

Both are started with `--connection-file F --transport tcp|socket --token none --log-file L` (plus
`--socket-dir D` for the socket transport) and found through their connection file; kcgevent's own
`Client` speaks to either: over the socket transport it asks `GET /sessions/{id}/channels` for the
session's own Unix socket and upgrades on it at `/api/channels/{id}`, as Positron does.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

from .procs import REAPER, SCRATCH_DIRS, BenchError, helper_children, now, remaining

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kcgevent.client import ApiResponseError, Client, execute_request, python_kernel_session  # noqa: E402

PYTHON = sys.executable
FAKE_KERNEL = os.path.join(ROOT, "tests", "kernels", "fake_kernel.py")
STREAM_TEXT = re.compile(rb'"text":\s*"(\d+)\\n"')
SERVERS = ("kcgevent", "kcserver")


def find_kcserver(option=None):
    """--kcserver, else $KCSERVER, else `kcserver` on PATH, else /work/kc-rust/bin/kcserver; None if none."""
    for candidate in (option, os.environ.get("KCSERVER"), shutil.which("kcserver"), "/work/kc-rust/bin/kcserver"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def fake_session_body(session_id):
    body = python_kernel_session(session_id, PYTHON)
    body["argv"] = [PYTHON, FAKE_KERNEL, "{connection_file}"]
    body["language"] = "fake"
    return body


def ipykernel_session_body(session_id):
    return python_kernel_session(session_id, PYTHON, working_directory=ROOT)


def new_id(prefix):
    """A session id that is unique in its first 8 characters: kcserver names a session's Unix socket after
    them only (`kc-<pid>.<first 8>.sock`), so "bench-1", "bench-2" ... would share (and break) one socket."""
    return f"{uuid.uuid4().hex[:8]}-{prefix}"


class Server:
    """One running server: kind "kcgevent" (python -m kcgevent) or "kcserver" (the Rust binary)."""

    def __init__(self, kind, transport, workdir, extra_args=(), kcserver=None, root=None):
        self.kind = kind
        self.root = root or ROOT  # the kcgevent checkout to run (another one: an A/B comparison)
        self.transport = transport
        tag = f"{kind}-{transport}-{uuid.uuid4().hex[:6]}"
        self.connection_file = os.path.join(workdir, f"server-{tag}.json")
        self.log_file = os.path.join(workdir, f"server-{tag}.log")
        program = [PYTHON, "-m", "kcgevent"] if kind == "kcgevent" else [kcserver]
        cmd = program + ["--connection-file", self.connection_file, "--transport", transport,
                         "--token", "none", "--log-file", self.log_file]
        # Our own temp dir: kcserver writes each kernel's connection file there and leaves it behind.
        self.tmpdir = tempfile.mkdtemp(prefix=f"tmp-{tag}-", dir=workdir)
        if transport == "socket":
            sock_dir = tempfile.mkdtemp(prefix="kcb", dir="/tmp")  # short: socket paths have a 104-byte limit
            os.chmod(sock_dir, 0o700)
            SCRATCH_DIRS.append(sock_dir)
            cmd += ["--socket-dir", sock_dir]
        self.cmd = cmd + list(extra_args)
        self.out = open(os.path.join(workdir, f"server-{tag}.out"), "wb")
        self.kernel_pids = {}  # session id -> kernel pid
        self.launch()

    def __repr__(self):
        return f"{self.kind}[{self.transport}]"

    def launch(self):
        """Run the server's command line (again) and wait until it serves."""
        env = {**os.environ, "PYTHONPATH": self.root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TMPDIR": self.tmpdir}
        self.process = REAPER.track(subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, cwd=self.root, env=env))
        deadline = time.monotonic() + 20
        self.info = None
        while self.info is None:
            if self.process.poll() is not None:
                raise BenchError(f"{self} exited with {self.process.returncode}; see {self.out.name}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self} wrote no connection file within 20 s; see {self.out.name}")
            try:
                with open(self.connection_file) as f:
                    self.info = json.load(f)
            except (OSError, ValueError):  # not there yet, or half written
                time.sleep(0.02)
        self.client = Client(self.info, timeout=60)
        self.client.wait_ready(15)

    @property
    def pid(self):
        return self.process.pid

    def helper_pids(self):
        """Non-kernel children (kcgevent's per-kernel guardians)."""
        return helper_children(self.pid, self.kernel_pids.values())

    def create_session(self, body, timeout=60):
        """PUT /sessions + POST start (returns when the server says the kernel is ready); the session id."""
        sid = body["session_id"]
        self.client.call("PUT", "/sessions", body)
        self.client.call("POST", f"/sessions/{sid}/start", timeout=timeout)
        REAPER.snapshot()
        self.kernel_pids[sid] = self.client.call("GET", f"/sessions/{sid}").get("process_id")
        return sid

    def start_session(self, body):
        return Channel(self, self.create_session(body))

    def remove_session(self, sid, timeout=30):
        """Kill the kernel, wait until it is gone and the session says exited, delete the session.

        (kcserver, killed right after a start, may report the session as not exited for good even though
        its kernel is gone: then the DELETE is skipped; the session goes with its server.)"""
        try:
            self.client.call("POST", f"/sessions/{sid}/kill")
        except ApiResponseError:
            pass  # already exited
        pid = self.kernel_pids.pop(sid, None)
        deadline = time.monotonic() + timeout
        while pid and running(pid):
            if time.monotonic() > deadline:
                raise BenchError(f"{self}: the kernel of session {sid} (pid {pid}) still runs {timeout} s after kill")
            time.sleep(0.05)
        settle = time.monotonic() + 2
        while self.client.call("GET", f"/sessions/{sid}")["status"] != "exited":
            if time.monotonic() > settle:
                return
            time.sleep(0.05)
        self.client.call("DELETE", f"/sessions/{sid}")

    def stop(self):
        """End the server and everything below it; drop its temp dir."""
        REAPER.stop(self.process)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Channel:
    """One session's channel (a WebSocket on either transport), timed the way a client sees it."""

    validate_utf8 = False

    def __init__(self, server, session_id):
        self.server = server
        self.session_id = session_id
        self.kernel_pid = server.kernel_pids.get(session_id)
        self.ws = None

    def open(self, timeout=30):
        self.close()
        self.ws = self.server.client.open_channel(self.session_id, timeout=timeout)
        if not self.validate_utf8:
            # websocket-client checks text frames with a pure-Python UTF-8 DFA unless
            # wsaccel is installed (~0.4 us/byte: ~150 us for a typical frame), which
            # would make this client, not the server, the bottleneck. Real clients
            # (Positron: Node's ws) validate natively; json.loads still decodes.
            self.ws.frame_buffer.skip_utf8_validation = True
            self.ws.cont_frame.skip_utf8_validation = True
        return self.ws

    def close(self):
        if self.ws is not None:
            try:
                self.ws.close(timeout=2)
            except Exception:
                pass
            self.ws = None

    def roundtrip(self, code, timeout=30):
        """Seconds from sending execute_request(code) to having its reply and its idle status."""
        ws = self.ws
        request = execute_request(code)
        msg_id = request["header"]["msg_id"]
        deadline = time.monotonic() + timeout
        t0 = now()
        ws.send(json.dumps(request))
        got_reply = got_idle = False
        while not (got_reply and got_idle):
            ws.settimeout(remaining(deadline))
            frame = json.loads(ws.recv())
            if frame.get("kind") != "jupyter":
                if "error" in frame:
                    raise BenchError(f"server error frame: {frame}")
                continue
            if (frame.get("parent_header") or {}).get("msg_id") != msg_id:
                continue
            msg_type = frame["header"]["msg_type"]
            if msg_type == "execute_reply":
                got_reply = True
            elif msg_type == "status" and frame["content"].get("execution_state") == "idle":
                got_idle = True
        return now() - t0

    def flood_json(self, n, timeout=120):
        """websocket-client recv + json.loads per frame; returns (seconds to last stream msg, problems)."""
        ws = self.ws
        request = execute_request(f"flood {n}")
        msg_id = request["header"]["msg_id"]
        deadline = time.monotonic() + timeout
        ws.settimeout(min(30.0, timeout))
        got_reply = got_idle = False
        tally = FloodTally()
        ws.send(json.dumps(request))
        while not (got_reply and got_idle):
            if time.monotonic() > deadline:
                raise TimeoutError(f"flood: {tally.expected}/{n} stream messages within {timeout} s")
            frame = json.loads(ws.recv())
            if frame.get("kind") != "jupyter" or (frame.get("parent_header") or {}).get("msg_id") != msg_id:
                continue
            msg_type = frame["header"]["msg_type"]
            if msg_type == "stream":
                tally.saw(frame["content"]["text"])
            elif msg_type == "execute_reply":
                got_reply = True
            elif msg_type == "status" and frame["content"].get("execution_state") == "idle":
                got_idle = True
        return tally.result(n)

    def flood_raw(self, n, timeout=120):
        """Reads WebSocket frames straight off the socket; only a regex per frame."""
        ws = self.ws
        reader = RawFrames(ws)
        request = execute_request(f"flood {n}")
        msg_id = request["header"]["msg_id"].encode()
        deadline = time.monotonic() + timeout
        tally = FloodTally()
        ws.send(json.dumps(request))
        while True:
            payload = reader.next(deadline)
            if msg_id not in payload or not payload.startswith(b'{"kind":"jupyter"'):
                continue
            m = STREAM_TEXT.search(payload)
            if m is not None:
                tally.saw(m.group(1).decode() + "\n")
            elif is_idle(payload):
                break
        # this connection's buffered bytes now belong to `reader`: don't reuse it
        self.close()
        return tally.result(n)


def is_idle(payload):
    return b'"execution_state": "idle"' in payload or b'"execution_state":"idle"' in payload


def is_execute_reply(payload):
    return b'"msg_type": "execute_reply"' in payload or b'"msg_type":"execute_reply"' in payload


class RawFrames:
    """Unmasked server frames read directly from a websocket-client connection's socket."""

    def __init__(self, ws):
        self.ws = ws
        self.sock = ws.sock
        self.buf = b""
        self.pos = 0

    def next(self, deadline):
        while True:
            buf, pos = self.buf, self.pos
            if len(buf) - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                if b1 & 0x80:
                    raise BenchError("server sent a masked frame")
                length, head = b1 & 0x7F, 2
                if length == 126:
                    head = 4
                    length = int.from_bytes(buf[pos + 2:pos + 4], "big") if len(buf) - pos >= 4 else None
                elif length == 127:
                    head = 10
                    length = int.from_bytes(buf[pos + 2:pos + 10], "big") if len(buf) - pos >= 10 else None
                if length is not None and len(buf) - pos >= head + length:
                    payload = buf[pos + head:pos + head + length]
                    self.pos = pos + head + length
                    opcode = b0 & 0x0F
                    if opcode == 0x1:
                        return payload
                    if opcode == 0x9:
                        self.ws.pong(payload)
                    elif opcode == 0x8:
                        raise BenchError("server closed the connection")
                    continue
            self.sock.settimeout(min(remaining(deadline), 30.0))
            data = self.sock.recv(1 << 20)
            if not data:
                raise BenchError("server closed the connection")
            self.buf = buf[pos:] + data
            self.pos = 0


class FloodTally:
    """What a flood reader saw of the stream texts "0\\n".."N-1\\n": whether they came once each and in
    order (the first problems), when the first came, the last, and the longest silence between two.
    Made just before the execute is sent: that is the start of the clock."""

    def __init__(self):
        self.t0 = now()
        self.expected = 0
        self.problems = []
        self.first = self.last = None
        self.max_gap = 0.0

    def saw(self, text):
        """A stream message with `text` arrived."""
        t = now()
        if text != f"{self.expected}\n" and len(self.problems) < 5:
            self.problems.append(f"expected {self.expected!r}, got {text!r}")
        self.expected = int(text) + 1 if text[:-1].isdigit() else self.expected + 1
        if self.last is None:
            self.first = t
        elif t - self.last > self.max_gap:
            self.max_gap = t - self.last
        self.last = t

    def result(self, n):
        """(seconds from send to last stream message, problems, extra numbers)."""
        if self.last is None:
            raise BenchError("flood: no stream message arrived")
        problems = list(self.problems)
        if self.expected != n and len(problems) < 5:
            problems.append(f"last text was {self.expected - 1}, expected {n - 1}")
        return self.last - self.t0, problems, {"first_ms": 1000 * (self.first - self.t0),
                                               "max_gap_ms": 1000 * self.max_gap}

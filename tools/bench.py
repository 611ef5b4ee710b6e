#!/usr/bin/env python
"""Benchmark kcgevent's relay against talking ZeroMQ to the kernel directly.

    python tools/bench.py [--quick] [--transport tcp|socket|both] [--json out.json]

Starts its own `python -m kcgevent` server(s) and kernels, and measures:

1. round trip, ipykernel: N sequential execute_request("1"), each waiting for
   the execute_reply *and* the iopub idle status with our parent, through the
   kcgevent WebSocket vs. a plain synchronous pyzmq client (jupyter_client's
   Session for signing) talking to an ipykernel started the same way;
2. round trip, fake kernel (tests/kernels/fake_kernel.py), same loop;
3. flood: `flood 20000` on the fake kernel; the client checks it gets the
   stream texts "0\\n".."19999\\n" exactly once, in order, and reports
   messages/s from the execute send to the last stream message. Two
   WebSocket clients: "ws+json" (websocket-client recv + json.loads of every
   frame, what a real client does) and "raw" (reads the socket itself and
   only finds the text with a regex; close to the rate the server delivers).
   The same flood read directly over ZeroMQ is the reference.
4. with --transport socket/both: (2) and (3) over the Unix socket transport.
5. with --durable (instead of the above): the cost of a state dir. Two TCP
   servers, one with --state-dir; floods (raw client) alternate between them;
   reported: messages/s and server CPU per message with and without, and the
   time from restarting a SIGKILLed state-dir server (same command line) to
   its sessions being served: connection file written, GET /sessions listing
   them all, and the first execute round trip on a restored session.

Round trips are measured in interleaved blocks (kcgevent, direct, kcgevent,
...) after a warm-up, so drift on the machine hits both sides alike. CPU
seconds used by the client, the server and the kernel during each
measurement are reported too (psutil), which tells who the bottleneck is.

The direct client verifies each message's HMAC and json-decodes header,
parent and content (the work the WebSocket client's json.loads + the
server's check do between them); --full-deserialize makes it use
Session.deserialize instead (slower: it also parses dates).

Every wait is bounded; every process started (servers, kernels, anything
they spawned) is recorded by pid and killed at exit, also on Ctrl-C, SIGTERM
or failure.
"""
import argparse
import hmac
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import zmq
from jupyter_client.session import Session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kcgevent.client import Client, execute_request, python_kernel_session  # noqa: E402
from kcgevent.session.session import free_ports  # noqa: E402

PYTHON = sys.executable
FAKE_KERNEL = os.path.join(ROOT, "tests", "kernels", "fake_kernel.py")
STREAM_TEXT = re.compile(rb'"text":\s*"(\d+)\\n"')


class BenchError(Exception):
    pass


def now():
    return time.perf_counter()


def remaining(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


# ---------------------------------------------------------------------------
# Processes: everything we start, and everything it spawns, dies at the end.


class Reaper:
    """Remembers every process we started or saw spawned (pid + create time) and kills them."""

    def __init__(self):
        self.popens = []  # (Popen, graceful_signal)
        self.known = {}  # pid -> create_time

    def track(self, popen, graceful=signal.SIGTERM):
        self.popens.append((popen, graceful))
        self.remember(popen.pid)
        return popen

    def remember(self, pid):
        try:
            proc = psutil.Process(pid)
            self.known[pid] = proc.create_time()
            for child in proc.children(recursive=True):
                try:
                    self.known[child.pid] = child.create_time()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def snapshot(self):
        for popen, _ in self.popens:
            if popen.poll() is None:
                self.remember(popen.pid)

    def _alive(self):
        alive = []
        for pid, created in self.known.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        return alive

    def cleanup(self, timeout=15):
        """Graceful signal to what we started, wait, then SIGKILL anything left. Returns leftovers."""
        self.snapshot()
        for popen, sig in self.popens:
            if popen.poll() is None:
                try:
                    popen.send_signal(sig)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for popen, _ in self.popens:
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                try:
                    popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # Kernels live in their own process groups: give them a moment to follow their server.
        _, alive = psutil.wait_procs(self._alive(), timeout=3)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        return [p.pid for p in self._alive()]


REAPER = Reaper()
SCRATCH_DIRS = []  # removed at exit (the Unix socket directories)



def cpu_seconds(pid):
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


class CpuMeter:
    """CPU seconds used by this process and by the given pids between start() and stop()."""

    def __init__(self, **pids):
        self.pids = pids

    def __enter__(self):
        self.wall = now()
        self.me = time.process_time()
        self.base = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc):
        self.wall = now() - self.wall
        self.used = {"client": time.process_time() - self.me}
        for name, pid in self.pids.items():
            self.used[name] = cpu_seconds(pid) - self.base[name]
        return False

    def as_dict(self):
        return {"wall_s": round(self.wall, 4), **{f"cpu_{k}_s": round(v, 4) for k, v in self.used.items()}}


# ---------------------------------------------------------------------------
# The kcgevent side


class KcServer:
    def __init__(self, transport, workdir, extra_args=()):
        self.transport = transport
        tag = f"{transport}-{uuid.uuid4().hex[:6]}"
        self.connection_file = os.path.join(workdir, f"server-{tag}.json")
        self.log_file = os.path.join(workdir, f"server-{tag}.log")
        cmd = [PYTHON, "-m", "kcgevent", "--connection-file", self.connection_file, "--transport", transport,
               "--token", "none", "--log-file", self.log_file]
        if transport == "socket":
            sock_dir = tempfile.mkdtemp(prefix="kcb", dir="/tmp")
            os.chmod(sock_dir, 0o700)
            SCRATCH_DIRS.append(sock_dir)
            cmd += ["--socket-dir", sock_dir]
        self.cmd = cmd + list(extra_args)
        self.out = open(os.path.join(workdir, f"server-{tag}.out"), "wb")
        self.launch()

    def launch(self):
        """Run the server's command line (again) and wait until it serves."""
        transport = self.transport
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = REAPER.track(subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                                     cwd=ROOT, env=env))
        deadline = time.monotonic() + 20
        while not os.path.exists(self.connection_file):
            if self.process.poll() is not None:
                raise BenchError(f"kcgevent ({transport}) exited with {self.process.returncode}; "
                                 f"see {self.out.name}")
            if time.monotonic() > deadline:
                raise BenchError(f"kcgevent ({transport}) wrote no connection file within 20 s")
            time.sleep(0.02)
        time.sleep(0.05)  # let the writer finish the file
        with open(self.connection_file) as f:
            self.info = json.load(f)
        self.client = Client(self.info, timeout=30)
        self.client.wait_ready(15)

    @property
    def pid(self):
        return self.process.pid

    def start_session(self, body):
        self.client.call("PUT", "/sessions", body)
        self.client.call("POST", f"/sessions/{body['session_id']}/start", timeout=60)
        REAPER.snapshot()
        return KcSession(self, body["session_id"])

    def kernel_pid(self, session_id):
        return self.client.call("GET", f"/sessions/{session_id}").get("process_id")


def fake_session_body(session_id):
    body = python_kernel_session(session_id, PYTHON)
    body["argv"] = [PYTHON, FAKE_KERNEL, "{connection_file}"]
    body["language"] = "fake"
    return body


class KcSession:
    validate_utf8 = False

    def __init__(self, server, session_id):
        self.server = server
        self.session_id = session_id
        self.kernel_pid = server.kernel_pid(session_id)
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
        expected = 0
        problems = []
        got_reply = got_idle = False
        t_last = None
        stats = ArrivalStats()
        t0 = now()
        ws.send(json.dumps(request))
        while not (got_reply and got_idle):
            if time.monotonic() > deadline:
                raise TimeoutError(f"flood: {expected}/{n} stream messages within {timeout} s")
            frame = json.loads(ws.recv())
            if frame.get("kind") != "jupyter" or (frame.get("parent_header") or {}).get("msg_id") != msg_id:
                continue
            msg_type = frame["header"]["msg_type"]
            if msg_type == "stream":
                text = frame["content"]["text"]
                if text != f"{expected}\n" and len(problems) < 5:
                    problems.append(f"expected {expected!r}, got {text!r}")
                expected = int(text) + 1 if text[:-1].isdigit() else expected + 1
                t_last = stats.arrived(now())
            elif msg_type == "execute_reply":
                got_reply = True
            elif msg_type == "status" and frame["content"].get("execution_state") == "idle":
                got_idle = True
        return finish_flood(n, expected, t0, t_last, problems, stats)

    def flood_raw(self, n, timeout=120):
        """Reads WebSocket frames straight off the socket; only a regex per frame."""
        ws = self.ws
        reader = RawFrames(ws)
        request = execute_request(f"flood {n}")
        msg_id = request["header"]["msg_id"].encode()
        deadline = time.monotonic() + timeout
        expected = 0
        problems = []
        t_last = None
        stats = ArrivalStats()
        t0 = now()
        ws.send(json.dumps(request))
        idle_marker = b'"execution_state": "idle"'
        idle_marker2 = b'"execution_state":"idle"'
        while True:
            payload = reader.next(deadline)
            if msg_id not in payload or not payload.startswith(b'{"kind":"jupyter"'):
                continue
            m = STREAM_TEXT.search(payload)
            if m is not None:
                value = int(m.group(1))
                if value != expected and len(problems) < 5:
                    problems.append(f"expected {expected}, got {value}")
                expected = value + 1
                t_last = stats.arrived(now())
            elif idle_marker in payload or idle_marker2 in payload:
                break
        # this connection's buffered bytes now belong to `reader`: don't reuse it
        self.close()
        return finish_flood(n, expected, t0, t_last, problems, stats)


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


class ArrivalStats:
    """When the first stream message came, and the longest silence between two of them."""

    __slots__ = ("first", "prev", "max_gap")

    def __init__(self):
        self.first = self.prev = None
        self.max_gap = 0.0

    def arrived(self, t):
        if self.prev is None:
            self.first = t
        elif t - self.prev > self.max_gap:
            self.max_gap = t - self.prev
        self.prev = t
        return t


def finish_flood(n, got_until, t0, t_last, problems, stats):
    """(seconds from send to last stream message, problems, extra numbers)."""
    if t_last is None:
        raise BenchError("flood: no stream message arrived")
    if got_until != n and len(problems) < 5:
        problems.append(f"last text was {got_until - 1}, expected {n - 1}")
    return t_last - t0, problems, {"first_ms": 1000 * (stats.first - t0), "max_gap_ms": 1000 * stats.max_gap}


# ---------------------------------------------------------------------------
# The direct side: plain synchronous pyzmq + jupyter_client Session


class DirectKernel:
    def __init__(self, kind, workdir, full_deserialize=False, timeout=60):
        self.kind = kind
        key = uuid.uuid4().hex
        ports = free_ports(5)
        info = {"shell_port": ports[0], "iopub_port": ports[1], "stdin_port": ports[2], "control_port": ports[3],
                "hb_port": ports[4], "ip": "127.0.0.1", "key": key, "transport": "tcp",
                "signature_scheme": "hmac-sha256", "kernel_name": ""}
        tag = f"direct-{kind}-{uuid.uuid4().hex[:6]}"
        self.connection_file = os.path.join(workdir, f"{tag}.json")
        with open(self.connection_file, "w") as f:
            json.dump(info, f)
        if kind == "ipykernel":
            argv = [PYTHON, "-m", "ipykernel_launcher", "-f", self.connection_file]
        else:
            argv = [PYTHON, FAKE_KERNEL, self.connection_file]
        self.out = open(os.path.join(workdir, f"{tag}.out"), "wb")
        # own session/process group, like kcgevent does for its kernels
        self.process = REAPER.track(subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True))
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="bench")
        self.full_deserialize = full_deserialize
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.linger = 0
        self.iopub.rcvhwm = 0  # as kcgevent does: never drop on our side
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)
        self._wait_ready(timeout)

    @property
    def pid(self):
        return self.process.pid

    def _wait_ready(self, timeout):
        """kernel_info until both its reply and an iopub status for it arrived (SUB is live)."""
        deadline = time.monotonic() + timeout
        ours = set()
        got_reply = got_iopub = False
        next_send = 0.0
        while not (got_reply and got_iopub):
            if self.process.poll() is not None:
                raise BenchError(f"direct {self.kind} exited with {self.process.returncode}; see {self.out.name}")
            t = time.monotonic()
            if t > deadline:
                raise BenchError(f"direct {self.kind} not ready within {timeout} s")
            if t >= next_send:
                ours.add(self.session.send(self.shell, "kernel_info_request", {})["header"]["msg_id"])
                next_send = t + 0.5
            for sock, _ in self.poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header, parent, _content = self.decode(frames)
                    if parent.get("msg_id") in ours:
                        if sock is self.shell:
                            got_reply = True
                        else:
                            got_iopub = True

    def decode(self, frames):
        """(header, parent, content) of a kernel message, signature checked."""
        _idents, msg_list = self.session.feed_identities(frames, copy=True)
        if self.full_deserialize:
            msg = self.session.deserialize(msg_list, content=True, copy=True)
            return msg["header"], msg["parent_header"], msg["content"]
        if self.session.auth is not None:
            check = self.session.sign(msg_list[1:5])
            if not hmac.compare_digest(msg_list[0], check):
                raise BenchError("invalid signature from the kernel")
        return json.loads(msg_list[1]), json.loads(msg_list[2]), json.loads(msg_list[4])

    def _execute(self, code):
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        return self.session.send(self.shell, "execute_request", content)["header"]["msg_id"]

    def _messages_for(self, msg_id, deadline, silence):
        """(msg_type, content) of each message answering `msg_id`, until its reply and idle have come."""
        got_reply = got_idle = False
        while not (got_reply and got_idle):
            ready = self.poller.poll(min(remaining(deadline), silence) * 1000)
            if not ready:
                raise TimeoutError(f"direct: nothing from the kernel for {silence} s")
            for sock, _ in ready:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header, parent, content = self.decode(frames)
                    if parent.get("msg_id") != msg_id:
                        continue
                    msg_type = header["msg_type"]
                    got_reply |= msg_type == "execute_reply"
                    got_idle |= msg_type == "status" and content.get("execution_state") == "idle"
                    yield msg_type, content

    def roundtrip(self, code, timeout=30):
        deadline = time.monotonic() + timeout
        t0 = now()
        for _ in self._messages_for(self._execute(code), deadline, timeout):
            pass
        return now() - t0

    def flood(self, n, timeout=120):
        deadline = time.monotonic() + timeout
        expected = 0
        problems = []
        t_last = None
        stats = ArrivalStats()
        t0 = now()
        for msg_type, content in self._messages_for(self._execute(f"flood {n}"), deadline, 30):
            if msg_type == "stream":
                text = content["text"]
                if text != f"{expected}\n" and len(problems) < 5:
                    problems.append(f"expected {expected!r}, got {text!r}")
                expected = int(text) + 1 if text[:-1].isdigit() else expected + 1
                t_last = stats.arrived(now())
        return finish_flood(n, expected, t0, t_last, problems, stats)

    def close(self):
        for sock in (self.shell, self.iopub):
            sock.close(0)
        self.ctx.term()


# ---------------------------------------------------------------------------
# Measurements


def summarize(samples):
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
            "p95_ms": ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], "min_ms": ms[0], "max_ms": ms[-1]}


def compare_roundtrips(kc, direct, server_pid, n, warmup, block, code="1"):
    """Interleaved blocks of round trips on both sides; returns the result dict."""
    for _ in range(warmup):
        kc.roundtrip(code)
        direct.roundtrip(code)
    kc_times, direct_times = [], []
    kc_cpu = {"client": 0.0, "server": 0.0, "kernel": 0.0}
    direct_cpu = {"client": 0.0, "kernel": 0.0}
    done = 0
    while done < n:
        size = min(block, n - done)
        with CpuMeter(server=server_pid, kernel=kc.kernel_pid) as m:
            for _ in range(size):
                kc_times.append(kc.roundtrip(code))
        for k in kc_cpu:
            kc_cpu[k] += m.used[k]
        with CpuMeter(kernel=direct.pid) as m:
            for _ in range(size):
                direct_times.append(direct.roundtrip(code))
        for k in direct_cpu:
            direct_cpu[k] += m.used[k]
        done += size
    kc_s, direct_s = summarize(kc_times), summarize(direct_times)
    return {
        "kcgevent": kc_s, "direct": direct_s,
        "added_mean_ms": kc_s["mean_ms"] - direct_s["mean_ms"],
        "added_median_ms": kc_s["median_ms"] - direct_s["median_ms"],
        "overhead_mean_pct": 100 * (kc_s["mean_ms"] / direct_s["mean_ms"] - 1),
        "overhead_median_pct": 100 * (kc_s["median_ms"] / direct_s["median_ms"] - 1),
        "cpu_us_per_rt": {"kcgevent": {k: 1e6 * v / n for k, v in kc_cpu.items()},
                          "direct": {k: 1e6 * v / n for k, v in direct_cpu.items()}},
    }


def flood_runs(label, fn, n, repeats, pids):
    runs = []
    for _ in range(repeats):
        with CpuMeter(**pids) as m:
            seconds, problems, extra = fn(n)
        runs.append({"seconds": seconds, "rate": n / seconds, "ok": not problems, "problems": problems,
                     **extra, **m.as_dict()})
    rates = [r["rate"] for r in runs]
    return {"label": label, "n": n, "median_rate": statistics.median(rates), "min_rate": min(rates),
            "max_rate": max(rates), "ok": all(r["ok"] for r in runs), "runs": runs}


def guarded(results, key, fn):
    """Run one measurement; a failure is recorded (and printed) instead of ending the benchmark."""
    try:
        results[key] = fn()
    except (Exception, TimeoutError) as exc:  # noqa: B014 - we want the message, then go on
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  !! {key}: {type(exc).__name__}: {exc}", flush=True)


def bench_transport(transport, opts, workdir, results, direct_fake, direct_py):
    print(f"[{transport}] starting kcgevent server", flush=True)
    server = KcServer(transport, workdir)
    res = results.setdefault(transport, {})
    res["server_pid"] = server.pid
    sid = f"bench-fake-{uuid.uuid4().hex[:6]}"
    print(f"[{transport}] starting fake-kernel session {sid}", flush=True)
    fake = server.start_session(fake_session_body(sid))
    fake.open()
    fake.roundtrip("sync")  # drains the session's startup frames

    if direct_fake is not None:
        print(f"[{transport}] round trip, fake kernel: {opts.n} x 2", flush=True)
        guarded(res, "rt_fake", lambda: compare_roundtrips(fake, direct_fake, server.pid, opts.n, opts.warmup,
                                                           opts.block))

    print(f"[{transport}] flood {opts.flood} x {opts.flood_repeats} (ws+json)", flush=True)
    pids = {"server": server.pid, "kernel": fake.kernel_pid}
    guarded(res, "flood_ws_json", lambda: flood_runs("ws+json", fake.flood_json, opts.flood, opts.flood_repeats,
                                                     pids))

    def raw():
        def one(n):
            fake.open()
            fake.roundtrip("sync")
            return fake.flood_raw(n)
        return flood_runs("raw", one, opts.flood, opts.flood_repeats, pids)

    print(f"[{transport}] flood {opts.flood} x {opts.flood_repeats} (raw frames)", flush=True)
    guarded(res, "flood_ws_raw", raw)
    fake.close()

    if direct_py is not None and transport == "tcp":
        sid = f"bench-py-{uuid.uuid4().hex[:6]}"
        print(f"[{transport}] starting ipykernel session {sid}", flush=True)

        def py_rt():
            py = server.start_session(python_kernel_session(sid, PYTHON, working_directory=ROOT))
            py.open()
            py.roundtrip("0")
            print(f"[{transport}] round trip, ipykernel: {opts.n} x 2", flush=True)
            try:
                return compare_roundtrips(py, direct_py, server.pid, opts.n, opts.warmup, opts.block)
            finally:
                py.close()
        guarded(res, "rt_ipykernel", py_rt)
    return server


# ---------------------------------------------------------------------------
# The cost of a state dir (--durable)

TARGET_STATE_DIR_COST_PCT = 20.0


def bench_durable(opts, workdir, results):
    """Floods with and without --state-dir (alternating), then a SIGKILL + restart of the durable one."""
    state_dir = os.path.join(workdir, "state")
    servers = {"plain": KcServer("tcp", workdir), "state_dir": KcServer("tcp", workdir, ["--state-dir", state_dir])}
    sessions = {}
    for name, server in servers.items():
        session = server.start_session(fake_session_body(f"bench-{name}-{uuid.uuid4().hex[:6]}"))
        session.open()
        session.roundtrip("sync")
        sessions[name] = session
    runs = {name: [] for name in servers}
    for _ in range(opts.flood_repeats):
        for name, session in sessions.items():
            def one(n, session=session):
                session.open()
                session.roundtrip("sync")
                return session.flood_raw(n)
            pids = {"server": servers[name].pid, "kernel": session.kernel_pid}
            runs[name].append(flood_runs(name, one, opts.flood, 1, pids)["runs"][0])
    for name, rs in runs.items():
        results[name] = {"median_rate": statistics.median(r["rate"] for r in rs),
                         "server_us_per_msg": statistics.median(1e6 * r["cpu_server_s"] / opts.flood for r in rs),
                         "ok": all(r["ok"] for r in rs), "runs": rs}
    # Round trips (each execute changes the status twice: busy, idle), interleaved in blocks.
    times = {name: [] for name in servers}
    cpu = {name: 0.0 for name in servers}
    for session in sessions.values():
        session.open()
        session.roundtrip("sync")
    for _ in range(max(1, opts.n // opts.block)):
        for name, session in sessions.items():
            before = cpu_seconds(servers[name].pid)
            times[name] += [session.roundtrip("sync") for _ in range(opts.block)]
            cpu[name] += cpu_seconds(servers[name].pid) - before
    for name in servers:
        results[name]["rt_median_ms"] = 1000 * statistics.median(times[name])
        results[name]["rt_server_us"] = 1e6 * cpu[name] / len(times[name])
    for session in sessions.values():
        session.close()

    # Restart: a few more sessions, SIGKILL, the same command line again.
    durable = servers["state_dir"]
    ids = [sessions["state_dir"].session_id]
    for i in range(3):
        ids.append(durable.start_session(fake_session_body(f"bench-more{i}-{uuid.uuid4().hex[:6]}")).session_id)
    # One of them holds a backlog: a flood no client has read (kept on disk, recovered at restart).
    backlog = KcSession(durable, ids[1])
    backlog.open()
    backlog.roundtrip("sync")
    backlog.ws.send(json.dumps(execute_request(f"flood {opts.backlog}")))
    backlog.close()
    deadline = time.monotonic() + 120
    time.sleep(1)  # (the session is still idle until the kernel takes the request)
    while durable.client.call("GET", f"/sessions/{ids[1]}")["status"] != "idle":
        if time.monotonic() > deadline:
            raise BenchError("the backlog flood did not finish within 120 s")
        time.sleep(0.1)
    REAPER.snapshot()
    time.sleep(1.2)  # one checkpoint of the records
    durable.process.kill()
    durable.process.wait(10)
    os.unlink(durable.connection_file)
    t0 = now()
    durable.launch()
    t_file = now() - t0  # (launch waits for the connection file and GET /status)
    listed = durable.client.call("GET", "/sessions")["sessions"]
    t_listed = now() - t0
    assert sorted(s["session_id"] for s in listed) == sorted(ids), listed
    session = KcSession(durable, ids[-1])
    session.open()
    session.roundtrip("sync")
    t_served = now() - t0
    session.close()
    results["restart"] = {"sessions": len(ids), "backlog": opts.backlog, "to_status_s": t_file,
                          "to_sessions_listed_s": t_listed,
                          "to_first_round_trip_s": t_served}


def report_durable(results, opts):
    plain, durable, restart = results.get("plain"), results.get("state_dir"), results.get("restart")
    lines = ["", f"The cost of a state dir (TCP, fake kernel, raw client, flood {opts.flood} x {opts.flood_repeats}, "
             "alternating):"]
    for label, r in (("without --state-dir", plain), ("with --state-dir", durable)):
        if r:
            lines.append(f"  {label:20s} {r['median_rate']:8.0f} msg/s  server CPU {r['server_us_per_msg']:.1f} us/msg"
                         f"  {'all in order' if r['ok'] else 'LOST/UNORDERED'};  round trip {r['rt_median_ms']:.3f} ms"
                         f" (median), server CPU {r['rt_server_us']:.0f} us/round trip")
    if plain and durable:
        rate_cost = 100 * (1 - durable["median_rate"] / plain["median_rate"])
        cpu_cost = 100 * (durable["server_us_per_msg"] / plain["server_us_per_msg"] - 1)
        results["cost_pct"] = {"throughput": rate_cost, "server_cpu_per_msg": cpu_cost}
        met = max(rate_cost, cpu_cost) <= TARGET_STATE_DIR_COST_PCT
        lines.append(f"  cost: throughput {rate_cost:+.1f}%, server CPU per message {cpu_cost:+.1f}%  "
                     f"({'MET' if met else 'NOT MET'}: <= {TARGET_STATE_DIR_COST_PCT:g}%)")
    if restart:
        lines.append(f"  restart after SIGKILL ({restart['sessions']} sessions, one with {restart['backlog']} unread "
                     "messages on disk): GET /status answers after "
                     f"{restart['to_status_s']:.2f} s, sessions listed after {restart['to_sessions_listed_s']:.2f} s, "
                     f"first round trip on a restored session after {restart['to_first_round_trip_s']:.2f} s")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------
# Output

TARGET_OVERHEAD_PCT = 10.0
TARGET_ADDED_MS = 0.5
TARGET_RATE = 10_000


def fmt_rt(r):
    return f"{r['mean_ms']:7.3f} {r['median_ms']:7.3f} {r['p95_ms']:7.3f}"


def report(results, opts):
    lines = []
    add = lines.append
    add("")
    add(f"kcgevent relay benchmark  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"N={opts.n}, flood={opts.flood} x {opts.flood_repeats})")
    load = results["config"]["loadavg_start"], os.getloadavg()
    results["config"]["loadavg_end"] = load[1]
    add(f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load[0])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in load[1])}")
    if max(load[0][0], load[1][0]) > 0.5 * (os.cpu_count() or 1):
        add("WARNING: the machine is busy with other work; latencies and rates are pessimistic and noisy.")
    add("")
    add("Round trips (execute_request -> execute_reply + idle), ms:      mean  median     p95")
    verdicts = []
    for transport in ("tcp", "socket"):
        res = results.get(transport)
        if not res:
            continue
        for key, label in (("rt_ipykernel", "ipykernel"), ("rt_fake", "fake kernel")):
            r = res.get(key)
            if r is None:
                continue
            if "error" in r:
                add(f"  [{transport}] {label:12s} ERROR {r['error']}")
                continue
            add(f"  [{transport:6s}] {label:12s} kcgevent                        {fmt_rt(r['kcgevent'])}")
            add(f"  [{transport:6s}] {label:12s} direct ZeroMQ                   {fmt_rt(r['direct'])}")
            add(f"  [{transport:6s}] {label:12s} added: mean {r['added_mean_ms']:+.3f} ms "
                f"({r['overhead_mean_pct']:+.1f}%), median {r['added_median_ms']:+.3f} ms "
                f"({r['overhead_median_pct']:+.1f}%)")
            cpu = r["cpu_us_per_rt"]
            add(f"  [{transport:6s}] {label:12s} CPU us/round trip: kcgevent client "
                f"{cpu['kcgevent']['client']:.0f}, server {cpu['kcgevent']['server']:.0f}, kernel "
                f"{cpu['kcgevent']['kernel']:.0f} | direct client {cpu['direct']['client']:.0f}, "
                f"kernel {cpu['direct']['kernel']:.0f}")
            # Verdicts use the medians: other load on the machine shows up as outliers in the means.
            if key == "rt_ipykernel":
                ok = r["overhead_median_pct"] <= TARGET_OVERHEAD_PCT
                verdicts.append((f"[{transport}] ipykernel overhead <= {TARGET_OVERHEAD_PCT:g}% (median)",
                                 ok, f"{r['overhead_median_pct']:+.1f}% (mean {r['overhead_mean_pct']:+.1f}%)"))
            else:
                ok = r["added_median_ms"] <= TARGET_ADDED_MS
                verdicts.append((f"[{transport}] fake kernel added <= {TARGET_ADDED_MS:g} ms (median)", ok,
                                 f"{r['added_median_ms']:+.3f} ms (mean {r['added_mean_ms']:+.3f})"))
    add("")
    add("Flood (stream messages/s from the execute send to the last message): median [min..max], all in order?,")
    add("  then for the first run: wall s, CPU s used by client/server/kernel, server CPU per message,")
    add("  and the busiest process (CPU/wall: ~100% means that process is the bottleneck)")
    direct = results.get("direct_flood")
    rows = []
    if direct is not None:
        rows.append(("direct ZeroMQ", direct))
    for transport in ("tcp", "socket"):
        res = results.get(transport) or {}
        for key, label in (("flood_ws_json", "ws+json"), ("flood_ws_raw", "raw frames")):
            if key in res:
                rows.append((f"[{transport}] {label}", res[key]))
    for label, r in rows:
        if "error" in r:
            add(f"  {label:22s} ERROR {r['error']}")
            continue
        first = r["runs"][0]
        used = {k: first.get(f"cpu_{k}_s") for k in ("client", "server", "kernel")}
        cpu = "/".join("-" if v is None else f"{v:.2f}" for v in used.values())
        per_msg = f"{1e6 * used['server'] / r['n']:.0f} us/msg" if used["server"] is not None else "-"
        busiest = max((k for k in used if used[k] is not None), key=lambda k: used[k])
        add(f"  {label:22s} {r['median_rate']:7.0f}/s [{r['min_rate']:.0f}..{r['max_rate']:.0f}]  "
            f"{'yes' if r['ok'] else 'NO '}  wall {first['wall_s']:.2f}s cpu {cpu} server {per_msg}  "
            f"busiest {busiest} {100 * used[busiest] / first['wall_s']:.0f}%")
        add(f"  {'':22s} first stream msg after {max(x['first_ms'] for x in r['runs']):.1f} ms (worst run), "
            f"longest silence between two: {max(x['max_gap_ms'] for x in r['runs']):.0f} ms")
        problems = [p for run in r["runs"] for p in run["problems"]]
        if problems:
            add(f"  {'':22s} problems: {problems[:5]}")
        if label.startswith("["):
            met = r["ok"] and r["median_rate"] >= TARGET_RATE
            verdicts.append((f"{label} flood >= {TARGET_RATE}/s, none lost", met,
                             f"{r['median_rate']:.0f}/s, {'in order' if r['ok'] else 'LOST/UNORDERED'}"))
    add("")
    add("Targets:")
    for name, ok, value in verdicts:
        add(f"  {'MET    ' if ok else 'NOT MET'}  {name}: {value}")
    print("\n".join(lines), flush=True)
    results["verdicts"] = [{"target": n, "met": ok, "value": v} for n, ok, v in verdicts]


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=50 round trips, one flood per client")
    p.add_argument("--transport", choices=("tcp", "socket", "both"), default="tcp")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("-n", type=int, help="round trips per side (default 300, --quick 50)")
    p.add_argument("--flood", type=int, default=20000, help="stream messages per flood (default 20000)")
    p.add_argument("--flood-repeats", type=int, help="floods per client (default 3, --quick 1)")
    p.add_argument("--warmup", type=int, default=20, help="untimed round trips per side first")
    p.add_argument("--block", type=int, default=25, help="round trips per interleaved block")
    p.add_argument("--no-ipykernel", action="store_true", help="skip the ipykernel comparison")
    p.add_argument("--full-deserialize", action="store_true",
                   help="direct client uses Session.deserialize (dates and all) instead of HMAC + json.loads")
    p.add_argument("--validate-utf8", action="store_true",
                   help="let websocket-client validate UTF-8 in Python (slow; off by default)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, connection files)")
    p.add_argument("--backlog", type=int, default=100_000,
                   help="with --durable: unread messages in one session's log at the restart (default 100000)")
    p.add_argument("--durable", action="store_true",
                   help="measure the cost of --state-dir and the restart time instead (see 5. above)")
    opts = p.parse_args(argv)
    opts.n = opts.n or (50 if opts.quick else 300)
    opts.flood_repeats = opts.flood_repeats or (1 if opts.quick else 3)
    return opts


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    opts = parse_args(argv)
    KcSession.validate_utf8 = opts.validate_utf8
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = tempfile.mkdtemp(prefix="kcg-bench-")
    transports = ("tcp", "socket") if opts.transport == "both" else (opts.transport,)
    results = {"config": {"n": opts.n, "flood": opts.flood, "flood_repeats": opts.flood_repeats,
                          "warmup": opts.warmup, "block": opts.block, "transports": transports,
                          "full_deserialize": opts.full_deserialize, "python": sys.version.split()[0],
                          "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    failed = interrupted = False
    direct = []
    try:
        if opts.durable:
            print(f"state dir: floods {opts.flood} x {opts.flood_repeats}, then a restart", flush=True)
            durable_results = results.setdefault("durable", {})
            guarded(durable_results, "run", lambda: bench_durable(opts, workdir, durable_results))
            report_durable(durable_results, opts)
            failed = "error" in durable_results.get("run", {}) if durable_results.get("run") else False
            return 1 if failed else 0
        print("starting direct fake kernel", flush=True)
        direct_fake = DirectKernel("fake", workdir, opts.full_deserialize)
        direct.append(direct_fake)
        print(f"direct flood {opts.flood} x {opts.flood_repeats}", flush=True)
        direct_fake.roundtrip("sync")
        guarded(results, "direct_flood", lambda: flood_runs("direct", direct_fake.flood, opts.flood,
                                                            opts.flood_repeats, {"kernel": direct_fake.pid}))
        direct_py = None
        if not opts.no_ipykernel and "tcp" in transports:
            print("starting direct ipykernel", flush=True)
            try:
                direct_py = DirectKernel("ipykernel", workdir, opts.full_deserialize)
                direct.append(direct_py)
                direct_py.roundtrip("0")
            except Exception as exc:
                direct_py = None
                results.setdefault("tcp", {})["rt_ipykernel"] = {"error": f"direct ipykernel: {exc}"}
                print(f"  !! direct ipykernel: {type(exc).__name__}: {exc}", flush=True)
        for transport in transports:
            try:
                bench_transport(transport, opts, workdir, results, direct_fake, direct_py)
            except Exception as exc:
                failed = True
                results.setdefault(transport, {})["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  !! [{transport}] {type(exc).__name__}: {exc}", flush=True)
        report(results, opts)
    except KeyboardInterrupt:
        failed = interrupted = True
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
    except Exception as exc:
        failed = True
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for d in direct:
            try:
                d.close()
            except Exception:
                pass
        leftovers = REAPER.cleanup()
        if leftovers:
            failed = True
            print(f"WARNING: could not kill pids {leftovers}", file=sys.stderr)
        results["leftover_pids"] = leftovers
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
            print(f"results written to {opts.json}")
        if (failed and not interrupted) or opts.keep:
            print(f"work directory (logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for path in SCRATCH_DIRS:
            shutil.rmtree(path, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

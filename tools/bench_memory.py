#!/usr/bin/env python
"""What a kcgevent server costs in memory and in kernel start time.

    python tools/bench_memory.py [--runs 3] [--kernels 0,1,2,4,8] [--starts 10] [--only idle,kernels,start]

- idle: RSS of a fresh `python -m kcgevent --transport tcp --token none` once it
  has served one GET /status (median over --runs servers);
- kernels: the server's RSS with 0, 1, 2, 4, 8 fake-kernel sessions started and
  each with its channel open: the first session's cost, the growth per further
  session, and the RSS of each kernel's guardian process (medians over --runs
  servers);
- start: median seconds of PUT /sessions + POST /sessions/{id}/start for an
  ipykernel, against spawning the same ipykernel argv with a connection file
  (tcp ports, and ipc sockets as kcgevent gives its kernels) and talking
  ZeroMQ to it until the first kernel_info_reply and an iopub status for it
  arrive (the readiness start waits for); the three alternate.

Every process started is killed at the end, also on failure. The machine
may be busy: run it more than once and compare medians.
"""
import argparse
import json
import os
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

from kcgevent.client import Client, python_kernel_session  # noqa: E402
from kcgevent.session.session import free_ports  # noqa: E402

PYTHON = sys.executable
FAKE_KERNEL = os.path.join(ROOT, "tests", "kernels", "fake_kernel.py")
MIB = 1 << 20
STARTED = []  # every Popen, killed (with its process group if it has one) at exit


def rss_mib(pid):
    return psutil.Process(pid).memory_info().rss / MIB


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """One `python -m kcgevent` on TCP, no token."""

    def __init__(self, workdir, extra=()):
        self.connection_file = os.path.join(workdir, f"server-{uuid.uuid4().hex[:6]}.json")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(
            [PYTHON, "-m", "kcgevent", "--transport", "tcp", "--token", "none",
             "--connection-file", self.connection_file, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        STARTED.append(self.process)

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                with open(self.connection_file) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None
        self.client = Client(wait_until(ready, 30, "the connection file"), timeout=60)
        self.client.wait_ready(15)
        self.channels = []

    @property
    def pid(self):
        return self.process.pid

    def start(self, body):
        self.client.call("PUT", "/sessions", body)
        self.client.call("POST", f"/sessions/{body['session_id']}/start", timeout=60)

    def remove(self, session_id):
        self.client.call("POST", f"/sessions/{session_id}/kill")
        wait_until(lambda: self.client.call("GET", f"/sessions/{session_id}")["status"] == "exited", 30,
                   "the kernel to exit")
        self.client.call("DELETE", f"/sessions/{session_id}")

    def guardians(self):
        return [p for p in psutil.Process(self.pid).children()
                if any(part.endswith("guardian.py") for part in p.cmdline())]

    def stop(self):
        for ws in self.channels:
            ws.close(timeout=2)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def fake_session_body(session_id):
    body = python_kernel_session(session_id, PYTHON)
    body["argv"] = [PYTHON, FAKE_KERNEL, "{connection_file}"]
    body["language"] = "fake"
    return body


def settled_rss(pid, pause=1.0):
    time.sleep(pause)
    return rss_mib(pid)


def measure_idle(workdir, runs):
    figures = []
    for _ in range(runs):
        server = Server(workdir)
        try:
            server.client.call("GET", "/status")
            figures.append(settled_rss(server.pid))
        finally:
            server.stop()
    return {"idle_rss_mib": round(statistics.median(figures), 2), "runs": [round(f, 2) for f in figures]}


def slope(xs, ys):
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure_kernels(workdir, runs, counts):
    """RSS by number of sessions. Reported: the first session's cost (it imports the session
    machinery, ZeroMQ's threads start), the growth per further session (least squares over the counts
    from 1 on), and (RSS with the most sessions - RSS with none) / their number."""
    curves, guardian_rss = [], []
    for _ in range(runs):
        server = Server(workdir)
        try:
            server.client.call("GET", "/status")
            curve = []
            started = 0
            for count in counts:
                while started < count:
                    sid = f"mem-{started}-{uuid.uuid4().hex[:6]}"
                    server.start(fake_session_body(sid))
                    server.channels.append(server.client.open_channel(sid))
                    started += 1
                curve.append(settled_rss(server.pid))
            curves.append(curve)
            guardian_rss.extend(rss_mib(p.pid) for p in server.guardians())
        finally:
            server.stop()
    further = [(c, r) for c, r in zip(counts, zip(*curves)) if c >= 1]
    per_further = [slope([c for c, _ in further], [rs[i] for _, rs in further]) for i in range(len(curves))]
    first = [curve[counts.index(1)] - curve[counts.index(0)] for curve in curves] if 0 in counts and 1 in counts \
        else []
    overall = [(curve[-1] - curve[0]) / (counts[-1] - counts[0]) for curve in curves]
    return {"rss_by_sessions_mib": {c: round(statistics.median(rs), 2) for c, rs in zip(counts, zip(*curves))},
            "first_session_mib": round(statistics.median(first), 2) if first else None,
            "per_further_session_mib": round(statistics.median(per_further), 3),
            "average_per_session_mib": round(statistics.median(overall), 3),
            "guardian_rss_mib": round(statistics.median(guardian_rss), 2) if guardian_rss else None,
            "curves": [[round(r, 2) for r in curve] for curve in curves]}


class DirectKernel:
    """An ipykernel we spawn and reach over ZeroMQ ourselves (tcp ports, or ipc sockets as kcgevent uses)."""

    def __init__(self, workdir, transport):
        key = uuid.uuid4().hex
        if transport == "ipc":
            ports = [1, 2, 3, 4, 5]
            ip = os.path.join(workdir, f"k{uuid.uuid4().hex[:6]}")
        else:
            ports, ip = free_ports(5), "127.0.0.1"
        info = {"shell_port": ports[0], "iopub_port": ports[1], "stdin_port": ports[2],
                "control_port": ports[3], "hb_port": ports[4], "ip": ip, "key": key,
                "transport": transport, "signature_scheme": "hmac-sha256", "kernel_name": ""}
        self.connection_file = os.path.join(workdir, f"direct-{uuid.uuid4().hex[:6]}.json")
        with open(self.connection_file, "w") as f:
            json.dump(info, f)
        self.info = info
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="bench")

    def url(self, name):
        if self.info["transport"] == "ipc":
            return f"ipc://{self.info['ip']}-{self.info[name]}"
        return f"tcp://127.0.0.1:{self.info[name]}"

    def start(self, timeout=60):
        """Spawn and wait for kernel_info_reply + an iopub message for it; returns seconds taken.

        Over ipc, connect once the kernel's iopub socket file exists (checked every 5 ms), as kcgevent
        does: connecting earlier costs ZeroMQ's 100 ms reconnect interval. Over tcp, connect at once."""
        t0 = time.perf_counter()
        self.process = subprocess.Popen([PYTHON, "-m", "ipykernel_launcher", "-f", self.connection_file],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        STARTED.append(self.process)
        deadline = time.monotonic() + timeout
        if self.info["transport"] == "ipc":
            wait_until(lambda: os.path.exists(self.url("iopub_port")[len("ipc://"):]), timeout, "the ipc socket")
        ctx = zmq.Context.instance()
        shell = ctx.socket(zmq.DEALER)
        iopub = ctx.socket(zmq.SUB)
        try:
            shell.linger = iopub.linger = 0
            shell.connect(self.url("shell_port"))
            iopub.setsockopt(zmq.SUBSCRIBE, b"")
            iopub.connect(self.url("iopub_port"))
            poller = zmq.Poller()
            poller.register(shell, zmq.POLLIN)
            poller.register(iopub, zmq.POLLIN)
            ours, got_reply, got_iopub, next_send = set(), False, False, 0.0
            while not (got_reply and got_iopub):
                now = time.monotonic()
                if now > deadline or self.process.poll() is not None:
                    raise RuntimeError("the direct ipykernel did not start")
                if now >= next_send:
                    ours.add(self.session.send(shell, "kernel_info_request", {})["header"]["msg_id"])
                    next_send = now + (0.05 if got_reply else 0.5)
                for sock, _ in poller.poll(10):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        _, parts = self.session.feed_identities(frames)
                        if json.loads(parts[2]).get("msg_id") in ours:
                            if sock is shell:
                                got_reply = True
                                next_send = min(next_send, time.monotonic() + 0.05)
                            else:
                                got_iopub = True
            return time.perf_counter() - t0
        finally:
            shell.close(0)
            iopub.close(0)

    def stop(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def measure_start(workdir, starts):
    """Alternating: kcgevent, direct over tcp, direct over ipc; each `starts` times."""
    server = Server(workdir)
    runs = {"kcgevent": [], "direct_tcp": [], "direct_ipc": []}
    try:
        for i in range(starts):
            sid = f"start-{i}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            server.start(python_kernel_session(sid, PYTHON, working_directory=ROOT))
            runs["kcgevent"].append(time.perf_counter() - t0)
            server.remove(sid)
            for transport in ("tcp", "ipc"):
                kernel = DirectKernel(workdir, transport)
                try:
                    runs[f"direct_{transport}"].append(kernel.start())
                finally:
                    kernel.stop()
    finally:
        server.stop()
    medians = {name: statistics.median(times) for name, times in runs.items()}
    best_direct = min(medians["direct_tcp"], medians["direct_ipc"])
    return {**{f"{name}_median_s": round(m, 3) for name, m in medians.items()},
            "ratio_to_best_direct": round(medians["kcgevent"] / best_direct, 3),
            "runs": {name: [round(t, 3) for t in times] for name, times in runs.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="servers per memory figure (median)")
    parser.add_argument("--kernels", default="0,1,2,4,8", help="session counts for the RSS curve")
    parser.add_argument("--starts", type=int, default=10, help="kernel starts per side (median)")
    parser.add_argument("--only", default="idle,kernels,start", help="which parts to run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results = {}
    with tempfile.TemporaryDirectory(prefix="kcg-mem-") as workdir:
        try:
            if "idle" in parts:
                results["idle"] = measure_idle(workdir, args.runs)
                print("idle:", json.dumps(results["idle"]), flush=True)
            if "kernels" in parts:
                counts = [int(c) for c in args.kernels.split(",")]
                results["kernels"] = measure_kernels(workdir, args.runs, counts)
                print("kernels:", json.dumps(results["kernels"]), flush=True)
            if "start" in parts:
                results["start"] = measure_start(workdir, args.starts)
                print("start:", json.dumps(results["start"]), flush=True)
        finally:
            for process in STARTED:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL) if os.getpgid(process.pid) == process.pid \
                            else process.kill()
                    except OSError:
                        pass
                    process.wait(10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: one kernel flooding its stdout must not hurt the others (issue "Nothing breaks it", 3).

    python tools/bench_noisy.py [--mb 10] [--line-bytes 2] [--server-src DIR]

Starts a `python -m kcgevent` server (from this checkout, or --server-src to compare another one),
one quiet fake-kernel session with a client, then a session whose kernel first writes --mb MB of
--line-bytes-byte lines to stdout and then starts. While that happens it measures, every 50 ms,
the latency of `GET /status` and of an execute round trip on the quiet session. Reports the noisy
kernel's start time and the max / p99 of both latencies. Every wait is bounded; every process is
killed at exit.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kcgevent.client import Client, execute_request  # noqa: E402

FAKE = os.path.join(ROOT, "tests", "kernels", "fake_kernel.py")


def body(session_id, argv):
    return {"session_id": session_id, "display_name": "b", "language": "fake", "username": "b",
            "input_prompt": "", "continuation_prompt": "", "argv": argv, "working_directory": "", "env": [],
            "interrupt_mode": "message", "connection_timeout": 600}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=10)
    p.add_argument("--line-bytes", type=int, default=2)
    p.add_argument("--server-src", default=ROOT, help="checkout whose kcgevent serves (default: this one)")
    opts = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-noisy-")
    conn_file = os.path.join(work, "conn.json")
    server = subprocess.Popen([sys.executable, "-m", "kcgevent", "--connection-file", conn_file, "--token", "none",
                               "--transport", "tcp", "--log-level", "warn"], cwd=work,
                              env={**os.environ, "PYTHONPATH": opts.server_src},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(conn_file):
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.05)
        time.sleep(0.1)
        client = Client(json.load(open(conn_file)), timeout=900)
        client.wait_ready()
        quiet = "quiet-" + uuid.uuid4().hex[:6]
        client.call("PUT", "/sessions", body(quiet, [sys.executable, FAKE, "{connection_file}"]))
        client.call("POST", f"/sessions/{quiet}/start")
        ws = client.open_channel(quiet, timeout=60)
        line = "a" * (opts.line_bytes - 1)
        noisy = "noisy-" + uuid.uuid4().hex[:6]
        total = int(opts.mb * 1_000_000)
        script = f"yes {line} | head -c {total}; exec {sys.executable} {FAKE} \"$0\""
        client.call("PUT", "/sessions", body(noisy, ["/bin/sh", "-c", script, "{connection_file}"]))
        result = {}

        def start():
            t0 = time.monotonic()
            status, answer = client.request("POST", f"/sessions/{noisy}/start", timeout=900)
            result.update(status=status, seconds=time.monotonic() - t0)

        starter = threading.Thread(target=start)
        starter.start()
        status_lat, exec_lat = [], []
        while starter.is_alive():
            t0 = time.monotonic()
            client.call("GET", "/status", timeout=900)
            status_lat.append(time.monotonic() - t0)
            request = execute_request("print x")
            t0 = time.monotonic()
            ws.send(json.dumps(request))
            while True:
                ws.settimeout(900)
                frame = json.loads(ws.recv())
                if frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "status" and \
                        frame["content"].get("execution_state") == "idle" and \
                        (frame.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"]:
                    break
            exec_lat.append(time.monotonic() - t0)
            time.sleep(0.05)
        starter.join()
        ws.close()
        print(json.dumps({"server_src": opts.server_src, "mb": opts.mb, "line_bytes": opts.line_bytes,
                          "noisy_start_status": result.get("status"),
                          "noisy_start_seconds": round(result.get("seconds", float("nan")), 2),
                          "status_samples": len(status_lat),
                          "status_max_ms": round(max(status_lat, default=float("nan")) * 1000, 1),
                          "status_p99_ms": round(pct(status_lat, 0.99) * 1000, 1),
                          "execute_max_ms": round(max(exec_lat, default=float("nan")) * 1000, 1),
                          "execute_p99_ms": round(pct(exec_lat, 0.99) * 1000, 1)}))
    finally:
        try:
            kids = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        for kid in kids:
            try:
                kid.kill()
            except psutil.NoSuchProcess:
                pass


if __name__ == "__main__":
    main()

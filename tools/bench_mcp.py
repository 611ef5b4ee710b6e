#!/usr/bin/env python
"""Benchmark the agents' path: REST execute and MCP tool calls against one ipykernel session.

    python tools/bench_mcp.py [-n 200]

Starts its own `python -m kcgevent --token none` server, registers a workspace
and starts an ipykernel session in it, then times N sequential calls of each:

- `POST /sessions/{id}/execute` with `1` (the REST execute path, through the queue);
- MCP `list_sessions` (the listener, the hop from its asyncio thread onto the
  gevent hub and back; no kernel involved);
- MCP `execute_code` and `evaluate_code` with `1` (the same execute path as REST,
  behind the MCP listener), with the official MCP client over Streamable HTTP.

The client is a plain (unpatched) asyncio program. The server and its kernel
are killed by pid at exit, also on failure.
"""
import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx2
import psutil
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kcgevent.client import Client as ApiClient, python_kernel_session  # noqa: E402


def start_server(workdir):
    conn = os.path.join(workdir, "conn.json")
    process = subprocess.Popen([sys.executable, "-m", "kcgevent", "--token", "none", "--connection-file", conn,
                                "--log-file", os.path.join(workdir, "server.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 30
    while not os.path.exists(conn):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    time.sleep(0.1)
    with open(conn) as f:
        return process, ApiClient(json.load(f))


def summary(name, samples):
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[int(len(ms) * 0.95) - 1]
    print(f"  {name:<28} {statistics.mean(ms):8.2f} {statistics.median(ms):8.2f} {p95:8.2f}")


async def mcp_calls(workspace, n):
    results = {}
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {workspace['token']}"}, timeout=60) as http:
        async with Client(streamable_http_client(workspace["url"], http_client=http), mode="legacy") as client:
            for tool, args in (("list_sessions", {}), ("execute_code", {"code": "1"}),
                               ("evaluate_code", {"code": "1"})):
                for _ in range(10):  # warm-up
                    await client.call_tool(tool, args)
                samples = []
                for _ in range(n):
                    started = time.perf_counter()
                    result = await client.call_tool(tool, args)
                    samples.append(time.perf_counter() - started)
                    assert not result.is_error, result
                results[tool] = samples
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="calls per measurement (default 200)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-mcp-")
    process, api = start_server(workdir)
    spawned = set()
    try:
        api.wait_ready()
        workspace = api.call("POST", "/mcp/workspaces", {"display_name": "bench"})
        body = python_kernel_session("bench", sys.executable)
        body["workspace_id"] = workspace["workspace_id"]
        api.call("PUT", "/sessions", body)
        api.call("POST", "/sessions/bench/start")
        spawned.update(p.pid for p in psutil.Process(process.pid).children(recursive=True))
        rest = []
        for i in range(args.n + 10):
            started = time.perf_counter()
            api.call("POST", "/sessions/bench/execute", {"code": "1"})
            if i >= 10:
                rest.append(time.perf_counter() - started)
        mcp = asyncio.run(mcp_calls(workspace, args.n))
        print(f"kcgevent agents' path (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, N={args.n}, "
              f"load {os.getloadavg()[0]:.2f})")
        print(f"  {'ms per call':<28} {'mean':>8} {'median':>8} {'p95':>8}")
        summary("REST execute '1'", rest)
        summary("MCP list_sessions", mcp["list_sessions"])
        summary("MCP execute_code '1'", mcp["execute_code"])
        summary("MCP evaluate_code '1'", mcp["evaluate_code"])
    finally:
        spawned.update(p.pid for p in psutil.Process(process.pid).children(recursive=True)
                       if process.poll() is None)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        for pid in spawned:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


if __name__ == "__main__":
    main()

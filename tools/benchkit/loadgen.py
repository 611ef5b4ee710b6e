"""A load generator that is not the bottleneck: several worker processes, each driving its share of the
sessions with one thread per session (blocking sockets, the GIL released while waiting; frames are only
regex-matched, never json-decoded).

The parent (`run_load`) hands each worker its sessions on stdin, waits for every worker to say `ready`
(channels open, warm-up round trips done), then says `go` to all at once and collects each worker's
latencies. Run as a worker: `python -m benchkit.loadgen` (with tools/ on sys.path).
"""
import json
import os
import random
import select
import subprocess
import sys
import threading
import time

from .procs import REAPER, BenchError, cpu_seconds, cpu_seconds_sum, now
from .servers import ROOT, RawFrames, is_execute_reply, is_idle

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Worker side


def roundtrip(ws, reader, timeout):
    """Seconds for one execute_request("1") until its execute_reply and idle; raises on an error reply."""
    from kcgevent.client import execute_request
    request = execute_request("1")
    msg_id = request["header"]["msg_id"].encode()
    deadline = time.monotonic() + timeout
    t0 = now()
    ws.send(json.dumps(request))
    got_reply = got_idle = False
    failed = False
    while not (got_reply and got_idle):
        payload = reader.next(deadline)
        if msg_id not in payload:
            continue
        if is_execute_reply(payload):
            got_reply = True
            failed = b'"status": "error"' in payload or b'"status":"error"' in payload
        elif is_idle(payload):
            got_idle = True
    if failed:
        raise BenchError("execute_reply with status error")
    return now() - t0


def drive(client, session_id, n, warmup, timeout, ready, go, out, think=0.0):
    """One session: open its channel, warm up, wait for `go`, then n sequential round trips (`think` s apart,
    the first after a random fraction of it so that sessions do not march in step)."""
    latencies, errors = [], []
    try:
        ws = client.open_channel(session_id, timeout=timeout)
        reader = RawFrames(ws)
        for _ in range(warmup):
            roundtrip(ws, reader, timeout)
    except Exception as exc:  # reported, not raised: the other sessions go on
        errors.append(f"setup {session_id}: {type(exc).__name__}: {exc}")
        ready.release()
        out.append((latencies, errors))
        return
    ready.release()
    go.wait(timeout * 4)
    if think:
        time.sleep(random.uniform(0, think))
    for i in range(n):
        if think and i:
            time.sleep(think)
        try:
            latencies.append(roundtrip(ws, reader, timeout))
        except Exception as exc:
            errors.append(f"{session_id}: {type(exc).__name__}: {exc}")
            break  # the connection's state is unknown now
    try:
        ws.close(timeout=2)
    except Exception:
        pass
    out.append((latencies, errors))


def worker_main():
    from kcgevent.client import Client
    config = json.loads(sys.stdin.readline())
    client = Client(config["info"], timeout=config["timeout"])
    ready = threading.Semaphore(0)
    go = threading.Event()
    out = []
    threads = [threading.Thread(target=drive, daemon=True,
                                args=(client, sid, config["n"], config["warmup"], config["timeout"], ready, go, out,
                                      config["think"]))
               for sid in config["sessions"]]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire(timeout=config["timeout"] * 2)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    t0, cpu0 = now(), time.process_time()
    go.set()
    for t in threads:
        t.join(config["timeout"] * (config["n"] + 1))
    wall, cpu = now() - t0, time.process_time() - cpu0  # (all threads, also the ones that ended)
    latencies = [x for lat, _ in out for x in lat]
    errors = [e for _, err in out for e in err]
    if len(out) < len(threads):
        errors.append(f"{len(threads) - len(out)} session thread(s) did not finish")
    print(json.dumps({"latencies": latencies, "errors": errors, "wall_s": wall, "cpu_s": cpu}), flush=True)
    return 0


# ---------------------------------------------------------------------------
# Parent side


def _read_line(proc, deadline, what):
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"load generator worker {proc.pid}: no {what} in time")
        readable, _, _ = select.select([proc.stdout], [], [], left)
        if readable:
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"load generator worker {proc.pid} exited ({what} expected)")
            return line.decode()


def run_load(server, session_ids, processes, n, warmup, think=0.0, timeout=60):
    """Drive `session_ids` of `server` from `processes` workers; latencies, errors and who used the CPU."""
    processes = max(1, min(processes, len(session_ids)))
    shares = [session_ids[i::processes] for i in range(processes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TOOLS, ROOT, os.environ.get("PYTHONPATH", "")])}
    workers = []
    try:
        for share in shares:
            proc = REAPER.track(subprocess.Popen([sys.executable, "-m", "benchkit.loadgen"], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, cwd=ROOT, env=env))
            workers.append(proc)
            proc.stdin.write((json.dumps({"info": server.info, "sessions": share, "n": n, "warmup": warmup,
                                          "think": think, "timeout": timeout}) + "\n").encode())
            proc.stdin.flush()
        deadline = time.monotonic() + timeout * 2 + 2 * warmup * len(session_ids)
        for proc in workers:
            if _read_line(proc, deadline, "ready").strip() != "ready":
                raise BenchError(f"load generator worker {proc.pid} did not get ready")
        kernels = [pid for pid in server.kernel_pids.values() if pid]
        helpers = server.helper_pids()
        base = {"server": cpu_seconds(server.pid), "helpers": cpu_seconds_sum(helpers),
                "kernels": cpu_seconds_sum(kernels), "generator": 0.0}
        t0 = now()
        for proc in workers:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        deadline = time.monotonic() + timeout * (n + 2)
        for proc in workers:
            results.append(json.loads(_read_line(proc, deadline, "results")))
        wall = now() - t0
        used = {"server": cpu_seconds(server.pid), "helpers": cpu_seconds_sum(helpers),
                "kernels": cpu_seconds_sum(kernels), "generator": sum(r["cpu_s"] for r in results)}
    finally:
        for proc in workers:
            REAPER.stop(proc, timeout=5)
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
    latencies = [x for r in results for x in r["latencies"]]
    errors = [e for r in results for e in r["errors"]]
    cpu_pct = {k: 100 * (used[k] - base[k]) / wall for k in used}  # generator: as each worker measured itself
    return {"sessions": len(session_ids), "processes": processes, "n_each": n, "think_ms": 1000 * think,
            "executes_per_s": len(latencies) / wall, "latencies": latencies,
            "errors": errors, "wall_s": wall, "cpu_pct": cpu_pct,
            "generator_cpu_pct_per_process": cpu_pct["generator"] / processes,
            "generator_busiest_pct": max(100 * r["cpu_s"] / r["wall_s"] for r in results),
            "server_ms_per_execute": 1000 * (used["server"] - base["server"]) / len(latencies) if latencies else None}


if __name__ == "__main__":
    sys.exit(worker_main())

#!/usr/bin/env python
"""How long a kernel start (and a kill) holds up every other session of a kcgevent server.

    python tools/bench_spawn.py [--cycles 20] [--transport tcp|socket] [--monitor] [--json out.json]
    python tools/bench_spawn.py --baseline DIR [--rounds 3]   # A/B against another kcgevent checkout

Measured from outside, as a client sees it: a separate probe process keeps one fake-kernel session busy
with back-to-back `execute_request("1")` round trips (each until its execute_reply and its idle status)
and records when each one started and how long it took, while this process starts and kills other
fake-kernel sessions one at a time. Each cycle is

    idle window  (nothing happens; as long as the previous start window: the control)
    start window (PUT /sessions + POST /sessions/{id}/start, until it returns)
    kill window  (POST kill, until the kernel is gone; DELETE)

For each window kind the report gives the worst round trip in it (median and max over the cycles) and how
many round trips took over --slow ms; "stall per start" is the median over cycles of (worst round trip in
the start window - worst in its idle window): what a start adds to the worst wait another session sees.
On 2 cores a starting kernel also competes for CPU (Python starting up), so not all of it is the hub being
blocked; --monitor tells which part is: the server runs with gevent's monitor thread
(GEVENT_MONITOR_THREAD_ENABLE=1, GEVENT_MAX_BLOCKING_TIME=--monitor-ms) and the report counts its "appears
to be blocked" reports and names the innermost frames they caught.

With --baseline DIR (another kcgevent checkout, e.g. `git worktree add /tmp/base main`) both servers are
measured the same way, --rounds times each, sides alternating (a fresh server, probe and --cycles cycles
per round), so that drift in the machine's load hits both alike; the windows of all rounds are pooled.

--mechanisms N instead compares the two ways KernelProcess.spawn starts a process, in a process of its own
that has loaded what a server loads (not inside a server): a greenlet ticks the hub and the worst gap
within 50 ms of each start of /bin/sleep is kept, for posix_spawn (the guardian's path), gevent's Popen
with the pre-exec hook (a Python-level fork), and no spawn at all (the control); --ballast MIB makes that
process hold more memory, as a server with many sessions does (what a fork copies grows with it).

Every process started is killed at the end (benchkit's Reaper), also on failure or Ctrl-C.
"""
import argparse
import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchkit.procs import REAPER, remove_scratch  # noqa: E402
from benchkit.servers import PYTHON, Channel, Server, fake_session_body, new_id  # noqa: E402


# -- the probe (a process of its own, so this one's GIL never delays it) ------------------------------

def run_probe(info_file, session_id, out_file):
    """Round trips until stdin closes; then write [(start monotonic, seconds), ...] to out_file."""
    import threading
    with open(info_file) as f:
        server = _ServerView(json.load(f))
    channel = Channel(server, session_id)
    channel.open()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    samples = []
    print("ready", flush=True)
    while not stop.is_set():
        t0 = time.monotonic()
        samples.append((t0, channel.roundtrip("1")))
    channel.close()
    with open(out_file, "w") as f:
        json.dump(samples, f)


class _ServerView:
    """What Channel needs of a Server: a client for the running server."""

    def __init__(self, info):
        from kcgevent.client import Client
        self.client = Client(info, timeout=60)
        self.kernel_pids = {}


class Probe:
    def __init__(self, server, session_id, workdir):
        self.info_file = os.path.join(workdir, "probe-info.json")
        with open(self.info_file, "w") as f:
            json.dump(server.info, f)
        self.out_file = os.path.join(workdir, "probe-samples.json")
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        self.process = REAPER.track(subprocess.Popen(
            [PYTHON, os.path.abspath(__file__), "--probe", self.info_file, session_id, self.out_file],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
        if self.process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the probe did not start")

    def finish(self, timeout=30):
        self.process.stdin.close()
        self.process.wait(timeout)
        self.process.stdout.close()
        with open(self.out_file) as f:
            return json.load(f)


# -- the cycles ------------------------------------------------------------------------------------

def run_cycles(server, cycles, warmup):
    """[(kind, t_begin, t_end)] for idle, start and kill windows (warm-up cycles left out)."""
    windows = []
    idle_for = 0.3
    for i in range(warmup + cycles):
        counted = i >= warmup
        t = time.monotonic()
        time.sleep(idle_for)
        if counted:
            windows.append(("idle", t, time.monotonic()))
        sid = new_id(f"spawn{i}")
        t = time.monotonic()
        server.create_session(fake_session_body(sid))
        t_end = time.monotonic()
        idle_for = t_end - t
        if counted:
            windows.append(("start", t, t_end))
        time.sleep(0.2)
        t = time.monotonic()
        server.remove_session(sid)
        if counted:
            windows.append(("kill", t, time.monotonic()))
        time.sleep(0.2)
    return windows


def worst_in(samples, begin, end):
    """The longest round trip overlapping [begin, end], and those in it."""
    inside = [rtt for t0, rtt in samples if t0 < end and t0 + rtt > begin]
    return (max(inside) if inside else 0.0), inside


def measure(runs, slow_s):
    """runs: [(samples, windows)], one per round (the probe's samples pooled with their own windows)."""
    per_kind = collections.defaultdict(list)
    slow = collections.Counter()
    windows = [w for _, ws in runs for w in ws]
    for samples, ws in runs:
        for kind, begin, end in ws:
            worst, inside = worst_in(samples, begin, end)
            per_kind[kind].append(worst)
            slow[kind] += sum(1 for rtt in inside if rtt > slow_s)
    rtts = [rtt for samples, _ in runs for _, rtt in samples]
    out = {"round_trips": len(rtts), "rtt_median_ms": round(1e3 * statistics.median(rtts), 3)}
    for kind, worsts in per_kind.items():
        out[kind] = {"windows": len(worsts), "worst_rtt_median_ms": round(1e3 * statistics.median(worsts), 2),
                     "worst_rtt_max_ms": round(1e3 * max(worsts), 2), "slow_rtts": slow[kind],
                     "window_median_s": round(statistics.median(
                         e - b for k, b, e in windows if k == kind), 3)}
    pairs = zip(per_kind["idle"], per_kind["start"])
    out["stall_per_start_ms"] = round(1e3 * statistics.median(s - i for i, s in pairs), 2)
    out["stall_per_kill_ms"] = round(1e3 * statistics.median(
        k - i for i, k in zip(per_kind["idle"], per_kind["kill"])), 2)
    return out


# -- gevent's monitor thread -----------------------------------------------------------------------

FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
SPAWN_FRAMES = {"_execute_child", "fork_and_watch", "fork", "posix_spawn", "spawn"}  # (KernelProcess.spawn too)


def monitor_reports(log_path):
    """Count the monitor's blocking reports; name each by the innermost kcgevent frame and the innermost
    frame of the blocked greenlet's stack."""
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return {"reports": 0, "while_spawning": 0, "where": {}}
    reports = text.split("appears to be blocked")[1:]
    where = collections.Counter()
    spawning = 0
    for report in reports:
        stack = report.split("Blocked Stack", 1)[-1].split("\n\n", 1)[0]
        frames = FRAME.findall(stack)
        if not frames:
            continue
        spawning += any(name in SPAWN_FRAMES for _, _, name in frames)
        ours = [fr for fr in frames if "/kcgevent/" in fr[0]]
        label = []
        if ours:
            label.append(f"{os.path.basename(ours[-1][0])}:{ours[-1][1]} {ours[-1][2]}")
        label.append(f"{os.path.basename(frames[-1][0])}:{frames[-1][1]} {frames[-1][2]}")
        where[" -> ".join(label)] += 1
    return {"reports": len(reports), "while_spawning": spawning, "where": dict(where.most_common(12))}


# -- the two spawn paths side by side (a server-like process of its own) -----------------------------

MECHANISMS_CHILD = """
from gevent import monkey; monkey.patch_all()
import json, os, statistics, sys, time
import gevent, zmq
import kcgevent.server, kcgevent.session.session  # what a server has loaded (its memory is what a fork copies)
from kcgevent.session.process import KernelProcess, plan_startup
context = zmq.Context.instance()  # and ZeroMQ's threads
ballast = bytearray(int(sys.argv[2]) << 20)  # a server holding more memory (sessions, logs): --ballast MiB
for page in range(0, len(ballast), 4096):
    ballast[page] = 1
gaps = []
def ticker():
    last = time.perf_counter()
    while True:
        gevent.sleep(0)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
gevent.spawn(ticker)
gevent.sleep(0.1)
worst = {"none": [], "posix_spawn": [], "fork+preexec_fn": []}
spawned = []
def start(how):
    if how != "none":
        plan = plan_startup(["/bin/sleep", "60"], dict(os.environ), None)
        plan.guards_itself = how == "posix_spawn"
        spawned.append(KernelProcess.spawn(plan, lambda stream, text: None))
try:
    for _ in range(int(sys.argv[1])):
        for how in worst:
            gaps.clear()
            gevent.spawn(start, how)
            gevent.sleep(0.05)
            worst[how].append(max(gaps))
            while spawned:
                spawned.pop().kill_tree(5)
finally:
    for kernel in spawned:
        kernel.kill_tree(5)
print(json.dumps({how: {"worst_gap_median_ms": round(1e3 * statistics.median(w), 2),
                        "worst_gap_max_ms": round(1e3 * max(w), 2)} for how, w in worst.items()}))
"""


def run_mechanisms(spawns, ballast_mib=0):
    """The hub's worst gap within 50 ms of starting /bin/sleep by each path of KernelProcess.spawn, in a
    process that has loaded what a server loads; "none" (no spawn) is the control."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    child = REAPER.track(subprocess.Popen([PYTHON, "-c", MECHANISMS_CHILD, str(spawns), str(ballast_mib)],
                                          stdout=subprocess.PIPE, env=env))
    out, _ = child.communicate(timeout=60 + spawns)
    if child.returncode:
        raise RuntimeError(f"the mechanisms run failed ({child.returncode})")
    return json.loads(out)


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=20, help="start/kill cycles measured (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="cycles run first and not counted (default 2)")
    p.add_argument("--transport", choices=("tcp", "socket"), default="tcp")
    p.add_argument("--slow", type=float, default=10.0, help="a round trip over this many ms counts as slow")
    p.add_argument("--monitor", action="store_true", help="run the server with gevent's monitor thread")
    p.add_argument("--monitor-ms", type=float, default=20.0, help="GEVENT_MAX_BLOCKING_TIME in ms (default 20)")
    p.add_argument("--baseline", metavar="DIR", help="another kcgevent checkout, measured alternately")
    p.add_argument("--rounds", type=int, help="rounds per side (default 1; with --baseline 3)")
    p.add_argument("--mechanisms", type=int, metavar="N", help="instead: N spawns by each path of KernelProcess."
                   "spawn (posix_spawn, fork + preexec_fn) and none, in a server-like process: the hub's worst gap")
    p.add_argument("--ballast", type=int, default=0, metavar="MIB",
                   help="with --mechanisms: the process also holds this much more memory (a busier server)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server log)")
    p.add_argument("--probe", nargs=3, metavar=("INFO", "SESSION", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def one_round(root, opts, workdir):
    """A fresh server from checkout `root`: its probe's samples, the windows, the monitor's reports."""
    server = Server("kcgevent", opts.transport, workdir, root=root)
    try:
        busy = server.create_session(fake_session_body(new_id("probe")))
        probe = Probe(server, busy, workdir)
        time.sleep(0.5)
        windows = run_cycles(server, opts.cycles, opts.warmup)
        samples = probe.finish()
    finally:
        server.stop()
    return samples, windows, (monitor_reports(server.out.name) if opts.monitor else None)


def merge_reports(reports):
    where = collections.Counter()
    for report in reports:
        where.update(report["where"])
    return {"reports": sum(r["reports"] for r in reports),
            "while_spawning": sum(r["while_spawning"] for r in reports), "where": dict(where.most_common(12))}


def main(argv=None):
    opts = parse_args(argv)
    if opts.probe:
        run_probe(*opts.probe)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    workdir = tempfile.mkdtemp(prefix="kcg-spawn-")
    if opts.monitor:
        os.environ.update(GEVENT_MONITOR_THREAD_ENABLE="1", GEVENT_MAX_BLOCKING_TIME=str(opts.monitor_ms / 1e3))
    sides = {"kcgevent": None}
    if opts.baseline:
        sides = {"baseline": os.path.abspath(opts.baseline), "kcgevent": None}
    rounds = opts.rounds or (3 if opts.baseline else 1)
    failed = True
    results = {"config": {"cycles": opts.cycles, "rounds": rounds, "transport": opts.transport,
                          "monitor": opts.monitor, "baseline": opts.baseline, "cpus": os.cpu_count(),
                          "loadavg_start": os.getloadavg()}}
    try:
        if opts.mechanisms:
            results["mechanisms"] = run_mechanisms(opts.mechanisms, opts.ballast)
            print(json.dumps(results, indent=2))
            failed = False
            return 0
        runs = {side: [] for side in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                runs[side].append(one_round(sides[side], opts, workdir))
        for side, side_runs in runs.items():
            results[side] = measure([(samples, windows) for samples, windows, _ in side_runs], opts.slow / 1e3)
            if opts.monitor:
                results[side]["monitor"] = merge_reports([report for _, _, report in side_runs])
        results["config"]["loadavg_end"] = os.getloadavg()
        print(json.dumps(results, indent=2))
        failed = False
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
    finally:
        leftovers = REAPER.cleanup()
        if leftovers:
            failed = True
            print(f"WARNING: could not kill pids {leftovers}", file=sys.stderr)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(results, f, indent=2)
        remove_scratch(workdir, keep=failed or opts.keep)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

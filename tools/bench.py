#!/usr/bin/env python
"""Benchmark kcgevent against Posit's Rust kcserver and against talking ZeroMQ to the kernel directly.

    python tools/bench.py [--quick] [--transport tcp|socket|both] [--only rt,flood,start,memory,concurrency]
                          [--kcserver PATH] [--json out.json]
    python tools/bench.py --durable

Starts its own servers (`python -m kcgevent` and, when found, `kcserver`, both with the same flags) and
kernels, and runs each workload on every side, per transport (tcp and the Unix socket transport):

rt           1. ipykernel: N sequential execute_request("1"), each until its execute_reply *and* its
                iopub idle; 2. the same with tests/kernels/fake_kernel.py. Sides interleaved in blocks
                (direct, kcserver, kcgevent, ...) after a warm-up. RTT mean/median/p95/p99 and CPU per
                round trip of the server process alone (kcgevent's per-kernel guardian processes
                separately: "helpers"), the kernel and this client.
flood        `flood 20000` on the fake kernel: all of "0\\n".."19999\\n", once, in order; msgs/s from the
                send to the last stream message; clients "ws+json" (websocket-client recv + json.loads,
                what a real client does) and "raw" (reads the socket, regex only: about the rate the
                server delivers). The same flood read directly over ZeroMQ is the reference.
start        ipykernel start: direct = spawn with a connection file + first kernel_info_reply; servers =
                PUT /sessions + POST start until it returns. Median of --start-repeats, sides alternating.
memory       fresh server: RSS after one GET /status, then with 1, 2, 4, 8 fake kernels; growth per
                kernel (least squares); kcgevent's helper processes' RSS/USS reported separately.
concurrency  fresh server, --sessions fake-kernel sessions each running --conc-executes sequential
                executes at once, driven by --conc-processes load generator processes (benchkit/loadgen);
                p50/p99 and errors, vs one session's p99 with the same generator on the same server.

--durable (instead of the above): the cost of kcgevent's --state-dir, and its restart time (benchkit/durable).

Every wait is bounded; every process started (servers, kernels, anything they spawned, load generators) is
recorded by pid and killed at exit, also on Ctrl-C, SIGTERM or failure.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import time

from benchkit import workloads
from benchkit.direct import DirectKernel
from benchkit.durable import bench_durable, report_durable
from benchkit.procs import REAPER, remove_scratch
from benchkit.report import report
from benchkit.servers import Channel, Server, fake_session_body, find_kcserver, ipykernel_session_body, new_id

WORKLOADS = ("rt", "flood", "start", "memory", "concurrency")
T0 = time.monotonic()


def say(message):
    """Progress, with the seconds since the start."""
    print(f"{time.monotonic() - T0:6.1f}s  {message}", flush=True)


def guarded(results, key, fn):
    """Run one measurement; a failure is recorded (and printed) instead of ending the benchmark."""
    try:
        results[key] = fn()
    except (Exception, TimeoutError) as exc:  # noqa: B014 - we want the message, then go on
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  !! {key}: {type(exc).__name__}: {exc}", flush=True)


def server_kinds(opts):
    return ("kcserver", "kcgevent") if opts.kcserver else ("kcgevent",)


def bench_relay(transport, opts, workdir, res, direct_fake, direct_py):
    """Round trips (fake kernel, ipykernel) and floods on one server of each kind, started side by side."""
    servers = []
    try:
        for kind in server_kinds(opts):
            say(f"[{transport}] starting {kind}")
            servers.append(Server(kind, transport, workdir, kcserver=opts.kcserver))
        res["server_pids"] = {s.kind: s.pid for s in servers}
        fakes = {}
        for server in servers:
            fake = server.start_session(fake_session_body(new_id("bench-fake")))
            fake.open()
            fake.roundtrip("sync")  # drains the session's startup frames
            fakes[server.kind] = fake

        def sides(channels, direct):
            out = {"direct": (direct.roundtrip, {"kernel": direct.pid})}
            for server in servers:
                channel = channels[server.kind]
                out[server.kind] = (channel.roundtrip, workloads.side_pids(server, channel.kernel_pid))
            return out

        if "rt" in opts.only:
            say(f"[{transport}] round trip, fake kernel: {opts.n} x {len(servers) + 1}")
            guarded(res, "rt_fake", lambda: workloads.interleaved_roundtrips(
                sides(fakes, direct_fake), opts.n, opts.warmup, opts.block))
        if "flood" in opts.only:
            floods = res.setdefault("flood", {})
            for server in servers:
                fake = fakes[server.kind]
                per = floods.setdefault(server.kind, {})
                pids = workloads.side_pids(server, fake.kernel_pid)
                say(f"[{transport}] {server.kind}: flood {opts.flood} x {opts.flood_repeats} (ws+json, raw)")
                fake.open()
                fake.roundtrip("sync")
                guarded(per, "ws_json", lambda: workloads.flood_runs("ws+json", fake.flood_json, opts.flood,
                                                                     opts.flood_repeats, pids))
                guarded(per, "raw", lambda: workloads.flood_runs("raw", workloads.raw_flood(fake), opts.flood,
                                                                 opts.flood_repeats, pids))
        for fake in fakes.values():
            fake.close()
        if "rt" in opts.only and direct_py is not None:
            def rt_ipykernel():
                pys = {}
                try:
                    for server in servers:
                        say(f"[{transport}] {server.kind}: starting an ipykernel session")
                        py = server.start_session(ipykernel_session_body(new_id("bench-py")))
                        py.open()
                        py.roundtrip("0")
                        pys[server.kind] = py
                    say(f"[{transport}] round trip, ipykernel: {opts.n} x {len(servers) + 1}")
                    return workloads.interleaved_roundtrips(sides(pys, direct_py), opts.n, opts.warmup,
                                                            opts.block)
                finally:
                    for py in pys.values():
                        py.close()
            guarded(res, "rt_ipykernel", rt_ipykernel)
    finally:
        for server in servers:
            server.stop()


def bench_transport(transport, opts, workdir, results, direct_fake, direct_py):
    res = results.setdefault(transport, {})
    if "rt" in opts.only or "flood" in opts.only:
        guarded(res, "relay", lambda: bench_relay(transport, opts, workdir, res, direct_fake, direct_py))
        if res.get("relay") is None:
            res.pop("relay")
    if "start" in opts.only:
        def start():
            servers = []
            try:
                for kind in server_kinds(opts):
                    servers.append(Server(kind, transport, workdir, kcserver=opts.kcserver))
                say(f"[{transport}] kernel start x {opts.start_repeats}")
                return workloads.kernel_starts(servers, workdir, opts.start_repeats, log=say)
            finally:
                for server in servers:
                    server.stop()
        guarded(res, "start", start)
    if "memory" in opts.only:
        mem = res.setdefault("memory", {})
        for kind in server_kinds(opts):
            say(f"[{transport}] {kind}: memory, idle and with {'/'.join(map(str, opts.memory_steps))} kernels")
            guarded(mem, kind, lambda: workloads.memory_profile(kind, transport, workdir, opts.kcserver,
                                                                opts.memory_steps))
    if "concurrency" in opts.only:
        conc = res.setdefault("concurrency", {})
        for kind in server_kinds(opts):
            say(f"[{transport}] {kind}: {opts.sessions} concurrent sessions x {opts.conc_executes} executes, "
                f"think {'/'.join(f'{t:g}' for t in opts.conc_think)} ms")
            guarded(conc, kind, lambda: workloads.concurrency(
                kind, transport, workdir, opts.kcserver, opts.sessions, opts.conc_processes, opts.conc_executes,
                opts.conc_single, opts.conc_warmup, [t / 1000 for t in opts.conc_think], log=say))


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes (N=50, one flood per client, 3 starts, 20 sessions x 20): ~3 minutes")
    p.add_argument("--transport", choices=("tcp", "socket", "both"), default="both")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})")
    p.add_argument("--kcserver", metavar="PATH",
                   help="Posit's kcserver binary (default $KCSERVER, else kcserver on PATH, else "
                        "/work/kc-rust/bin/kcserver); 'none' to leave it out")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--output", metavar="FILE", help="also write the printed report to FILE")
    p.add_argument("-n", type=int, help="round trips per side (default 300, --quick 50)")
    p.add_argument("--flood", type=int, default=20000, help="stream messages per flood (default 20000)")
    p.add_argument("--flood-repeats", type=int, help="floods per client (default 3, --quick 1)")
    p.add_argument("--warmup", type=int, default=20, help="untimed round trips per side first")
    p.add_argument("--block", type=int, default=25, help="round trips per interleaved block")
    p.add_argument("--no-ipykernel", action="store_true", help="skip the ipykernel round trips")
    p.add_argument("--start-repeats", type=int, help="kernel starts per side and transport (default 10, --quick 3)")
    p.add_argument("--memory-steps", default="1,2,4,8", help="kernel counts for the memory profile")
    p.add_argument("--sessions", type=int, help="concurrent sessions (default 100, --quick 20)")
    p.add_argument("--conc-executes", type=int, help="executes per session, concurrent (default 50, --quick 20)")
    p.add_argument("--conc-single", type=int, help="executes of the single-session baseline (default 300, "
                                                   "--quick 100)")
    p.add_argument("--conc-processes", type=int, default=4, help="load generator processes (default 4)")
    p.add_argument("--conc-think", help="comma-separated ms each session waits between its executes, one run "
                                        "each (default 0,100; --quick 0). 0: a closed loop, every session always "
                                        "has an execute in flight")
    p.add_argument("--conc-warmup", type=int, default=3, help="untimed executes per session first (default 3)")
    p.add_argument("--full-deserialize", action="store_true",
                   help="direct client uses Session.deserialize (dates and all) instead of HMAC + json.loads")
    p.add_argument("--validate-utf8", action="store_true",
                   help="let websocket-client validate UTF-8 in Python (slow; off by default)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, connection files)")
    p.add_argument("--backlog", type=int, default=100_000,
                   help="with --durable: unread messages in one session's log at the restart (default 100000)")
    p.add_argument("--durable", action="store_true",
                   help="measure the cost of kcgevent's --state-dir and the restart time instead")
    opts = p.parse_args(argv)
    opts.only = tuple(w.strip() for w in opts.only.split(",") if w.strip())
    unknown = set(opts.only) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s) {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    q = opts.quick
    opts.n = opts.n or (50 if q else 300)
    opts.flood_repeats = opts.flood_repeats or (1 if q else 3)
    opts.start_repeats = opts.start_repeats or (3 if q else 10)
    opts.sessions = opts.sessions or (20 if q else 100)
    opts.conc_executes = opts.conc_executes or (20 if q else 50)
    opts.conc_single = opts.conc_single or (100 if q else 300)
    opts.memory_steps = tuple(int(x) for x in opts.memory_steps.split(","))
    opts.conc_think = tuple(float(x) for x in (opts.conc_think or ("0" if q else "0,100")).split(","))
    opts.kcserver = None if opts.kcserver == "none" else find_kcserver(opts.kcserver)
    return opts


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    opts = parse_args(argv)
    Channel.validate_utf8 = opts.validate_utf8
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = tempfile.mkdtemp(prefix="kcg-bench-")
    transports = ("tcp", "socket") if opts.transport == "both" else (opts.transport,)
    results = {"config": {"n": opts.n, "flood": opts.flood, "flood_repeats": opts.flood_repeats,
                          "warmup": opts.warmup, "block": opts.block, "transports": transports,
                          "workloads": opts.only, "start_repeats": opts.start_repeats,
                          "memory_steps": opts.memory_steps, "sessions": opts.sessions,
                          "conc_executes": opts.conc_executes, "conc_single": opts.conc_single,
                          "conc_processes": opts.conc_processes, "conc_think_ms": opts.conc_think,
                          "kcserver": opts.kcserver,
                          "full_deserialize": opts.full_deserialize, "python": sys.version.split()[0],
                          "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    failed = interrupted = False
    direct = []
    text = None
    try:
        if opts.durable:
            print(f"state dir: floods {opts.flood} x {opts.flood_repeats}, then a restart", flush=True)
            durable_results = results.setdefault("durable", {})
            guarded(durable_results, "run", lambda: bench_durable(opts, workdir, durable_results))
            report_durable(durable_results, opts)
            failed = "error" in durable_results.get("run", {}) if durable_results.get("run") else False
            return 1 if failed else 0
        if not opts.kcserver:
            print("note: kcserver not found (--kcserver PATH, $KCSERVER or PATH): its columns are skipped",
                  flush=True)
        direct_fake = direct_py = None
        if {"rt", "flood"} & set(opts.only):
            say("starting direct fake kernel")
            direct_fake = DirectKernel("fake", workdir, opts.full_deserialize)
            direct.append(direct_fake)
            direct_fake.roundtrip("sync")
        if "flood" in opts.only:
            say(f"direct flood {opts.flood} x {opts.flood_repeats}")
            guarded(results, "direct_flood", lambda: workloads.flood_runs(
                "direct", direct_fake.flood, opts.flood, opts.flood_repeats, {"kernel": direct_fake.pid}))
        if "rt" in opts.only and not opts.no_ipykernel:
            say("starting direct ipykernel")
            try:
                direct_py = DirectKernel("ipykernel", workdir, opts.full_deserialize)
                direct.append(direct_py)
                direct_py.roundtrip("0")
            except Exception as exc:
                direct_py = None
                results["direct_ipykernel_error"] = f"{type(exc).__name__}: {exc}"
                print(f"  !! direct ipykernel: {type(exc).__name__}: {exc}", flush=True)
        for transport in transports:
            bench_transport(transport, opts, workdir, results, direct_fake, direct_py)
        text = report(results, opts)
        failed = '"error"' in json.dumps(results, default=str)
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
        if opts.output and text is not None:
            with open(opts.output, "w") as f:
                f.write(text + "\n")
        remove_scratch(workdir, keep=(failed and not interrupted) or opts.keep)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

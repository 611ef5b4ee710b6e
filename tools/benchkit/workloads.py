"""The workloads, each run the same way on every side (direct ZeroMQ, kcserver, kcgevent).

Every function returns plain dicts (JSON-ready); `report` turns them into text.
"""
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from .direct import DirectKernel
from .loadgen import run_load
from .procs import CpuMeter, memory_of, rss_mib
from .servers import Server, fake_session_body, ipykernel_session_body, new_id
from .stats import slope, summarize


def side_pids(server, kernel_pid):
    """What to meter for a server-side measurement: the server alone, its helpers, the kernel."""
    return {"server": server.pid, "helpers": server.helper_pids(), "kernel": kernel_pid}


def interleaved_roundtrips(sides, n, warmup, block, code="1"):
    """sides: name -> (roundtrip(code) -> seconds, pids to meter). Blocks of round trips, side after side,
    after a warm-up, so drift on the machine hits every side alike. Per side: times and CPU us per round trip."""
    for _ in range(warmup):
        for fn, _pids in sides.values():
            fn(code)
    times = {name: [] for name in sides}
    cpu = {name: {} for name in sides}
    done = 0
    while done < n:
        size = min(block, n - done)
        for name, (fn, pids) in sides.items():
            with CpuMeter(**pids) as m:
                for _ in range(size):
                    times[name].append(fn(code))
            for k, v in m.used.items():
                cpu[name][k] = cpu[name].get(k, 0.0) + v
        done += size
    out = {"sides": {}, "cpu_us_per_rt": {}}
    for name in sides:
        out["sides"][name] = summarize(times[name])
        out["cpu_us_per_rt"][name] = {k: 1e6 * v / n for k, v in cpu[name].items()}
    direct = out["sides"].get("direct")
    if direct:
        for name, s in out["sides"].items():
            if name != "direct":
                s["added_median_ms"] = s["median_ms"] - direct["median_ms"]
                s["added_mean_ms"] = s["mean_ms"] - direct["mean_ms"]
                s["overhead_median_pct"] = 100 * (s["median_ms"] / direct["median_ms"] - 1)
                s["overhead_mean_pct"] = 100 * (s["mean_ms"] / direct["mean_ms"] - 1)
    return out


def flood_runs(label, fn, n, repeats, pids):
    runs = []
    for _ in range(repeats):
        with CpuMeter(**pids) as m:
            seconds, problems, extra = fn(n)
        runs.append({"seconds": seconds, "rate": n / seconds, "ok": not problems, "problems": problems,
                     **extra, **m.as_dict()})
    rates = [r["rate"] for r in runs]
    cpu_server = [r["cpu_server_s"] for r in runs if "cpu_server_s" in r]
    return {"label": label, "n": n, "median_rate": statistics.median(rates), "min_rate": min(rates),
            "max_rate": max(rates), "ok": all(r["ok"] for r in runs), "runs": runs,
            "server_ms_per_1000": (1e6 * statistics.median(cpu_server) / n) if cpu_server else None}


def raw_flood(channel):
    """A flood read by the raw client on a fresh connection (the raw reader owns the socket's bytes)."""
    def one(n):
        channel.open()
        channel.roundtrip("sync")
        return channel.flood_raw(n)
    return one


# ---------------------------------------------------------------------------
# Kernel start


def kernel_starts(servers, workdir, repeats, log=print):
    """ipykernel starts: direct (spawn + first kernel_info_reply) and, per server, PUT /sessions + POST start
    until it returns; alternating sides each round. Seconds per start, per side."""
    times = {"direct": [], **{s.kind: [] for s in servers}}
    for i in range(repeats):
        direct = DirectKernel("ipykernel", workdir, reply_only=True)
        times["direct"].append(direct.started_s)
        direct.stop()
        for server in servers:
            sid = new_id("bench-start")
            t0 = time.perf_counter()
            server.create_session(ipykernel_session_body(sid))
            times[server.kind].append(time.perf_counter() - t0)
            server.remove_session(sid)
        log(f"    start {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v}
            for k, v in times.items()}


# ---------------------------------------------------------------------------
# Memory


def start_many(server, count, make_body, parallel=8):
    """Create and start `count` sessions, `parallel` at a time; their ids."""
    ids = [new_id("bench-m") for _ in range(count)]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, count))) as pool:
        list(pool.map(lambda sid: server.create_session(make_body(sid), timeout=120), ids))
    return ids


def memory_profile(kind, transport, workdir, kcserver, steps=(1, 2, 4, 8), settle=1.0):
    """Server RSS idle (after one GET /status) and with 1, 2, 4, 8 fake kernels; the helpers' memory too."""
    server = Server(kind, transport, workdir, kcserver=kcserver)
    try:
        server.client.call("GET", "/status")
        time.sleep(settle)
        points = [{"kernels": 0, "server_rss_mib": rss_mib(server.pid), "helpers": 0,
                   "helpers_rss_mib": 0.0, "helpers_uss_mib": 0.0}]
        have = 0
        for target in steps:
            start_many(server, target - have, fake_session_body)
            have = target
            time.sleep(settle)
            helpers = server.helper_pids()
            rss, uss = memory_of(helpers)
            points.append({"kernels": have, "server_rss_mib": rss_mib(server.pid), "helpers": len(helpers),
                           "helpers_rss_mib": rss, "helpers_uss_mib": uss})
    finally:
        server.stop()
    first, last = points[0], points[-1]
    further = [(p["kernels"], p["server_rss_mib"]) for p in points if p["kernels"]]
    return {"points": points, "idle_rss_mib": first["server_rss_mib"], "max_kernels": last["kernels"],
            "rss_at_max_mib": last["server_rss_mib"],
            "per_kernel_mib": slope([(p["kernels"], p["server_rss_mib"]) for p in points]),
            # (from the first kernel on: what the issue calls "each further kernel"; kcgevent loads the
            # kernel machinery with its first session, a one-time cost the slope above spreads over all)
            "per_further_kernel_mib": slope(further) if len(further) > 1 else None,
            "per_kernel_endpoints_mib": (last["server_rss_mib"] - first["server_rss_mib"]) / last["kernels"],
            "helpers_rss_at_max_mib": last["helpers_rss_mib"], "helpers_uss_at_max_mib": last["helpers_uss_mib"],
            "per_kernel_with_helpers_mib": slope([(p["kernels"], p["server_rss_mib"] + p["helpers_rss_mib"])
                                                  for p in points]),
            "per_kernel_with_helpers_uss_mib": slope([(p["kernels"], p["server_rss_mib"] + p["helpers_uss_mib"])
                                                      for p in points])}


# ---------------------------------------------------------------------------
# Concurrency


PACED_SINGLE_MAX = 150  # single-session executes when paced: 150 x 100 ms is already 15 s


def concurrency(kind, transport, workdir, kcserver, sessions, processes, n_each, n_single, warmup, thinks=(0.0,),
                log=print):
    """`sessions` fake-kernel sessions on one fresh server, all running sequential executes at once, driven
    by `processes` load generator processes; and, on the same server, one session alone (same generator).
    Once per pacing in `thinks` (seconds each session waits between executes; 0 = a closed loop).
    Returns {think in ms: {"single", "many", "p99_ratio"}} plus "create_s"."""
    server = Server(kind, transport, workdir, kcserver=kcserver)
    out = {}
    try:
        t0 = time.perf_counter()
        ids = start_many(server, sessions, fake_session_body, parallel=10)
        out["create_s"] = time.perf_counter() - t0
        log(f"    {kind}: {sessions} sessions started in {out['create_s']:.1f} s")
        out["idle"] = idle_cpu(server, IDLE_SECONDS)
        log(f"    {kind}: {sessions} idle sessions: server {out['idle']['server_pct']:.2f}% CPU")
        for think in thinks:
            single = run_load(server, ids[:1], 1, n_single if not think else min(n_single, PACED_SINGLE_MAX),
                              warmup, think)
            many = run_load(server, ids, processes, n_each, warmup, think)
            log(f"    {kind}: think {1000 * think:g} ms: 1 session ({len(single['latencies'])} round trips), "
                f"{sessions} sessions ({len(many['latencies'])} round trips, {len(many['errors'])} errors)")
            out[f"{1000 * think:g}"] = pair(single, many)
    finally:
        server.stop()
    return out


IDLE_SECONDS = 10.0


def idle_cpu(server, seconds):
    """CPU % of wall the server (and its helpers) use while its sessions' kernels idle and no client is
    connected: heartbeats, timers, watchers (what a laptop pays for kernels left open)."""
    time.sleep(1.0)  # the starts' after-effects settle
    with CpuMeter(server=server.pid, helpers=server.helper_pids()) as m:
        time.sleep(seconds)
    return {f"{k}_pct": 100 * v / m.wall for k, v in m.used.items() if k != "client"} | {"seconds": m.wall}


def pair(single, many):
    """Latency summaries of a single-session and a many-session load, and their p99 ratio."""
    out = {}
    for name, r in (("single", single), ("many", many)):
        lat = r.pop("latencies")
        r.update(summarize(lat) if lat else {"n": 0})
        r["errors_sample"] = r["errors"][:5]
        r["errors"] = len(r["errors"])
        out[name] = r
    if single.get("p99_ms") and many.get("p99_ms"):
        out["p99_ratio"] = many["p99_ms"] / single["p99_ms"]
    return out

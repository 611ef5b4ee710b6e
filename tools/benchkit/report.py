"""The printed report: details per workload, the side-by-side table per transport, targets and goals."""
import os
import sys

from .stats import ratio

TARGET_OVERHEAD_PCT = 10.0  # relay: ipykernel round trip within 10% of direct (median)
TARGET_ADDED_MS = 0.5  # relay: fake kernel round trip at most +0.5 ms (median)
TARGET_RATE = 10_000  # relay: flood msgs/s
GOAL_START_PCT = 10.0  # issue 10: kernel start <= direct + 10%
GOAL_IDLE_RSS_MIB = 40.0  # issue 10: idle RSS
GOAL_P99_FACTOR = 3.0  # issue 10: p99 of 100 sessions <= 3 x single-session p99
SIDES = ("direct", "kcserver", "kcgevent")
TRANSPORTS = ("tcp", "socket")


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(value, digits):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:,.{digits}f}"


def _num(x):
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def header(results, opts):
    cfg = results["config"]
    load = cfg["loadavg_start"], os.getloadavg()
    cfg["loadavg_end"] = load[1]
    lines = ["", f"kcgevent benchmark  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, N={opts.n}, "
                 f"flood={opts.flood} x {opts.flood_repeats}, workloads {','.join(opts.only)})",
             f"kcserver: {cfg.get('kcserver') or 'not found (its columns are skipped; --kcserver PATH)'}",
             f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load[0])}, "
             f"at end {'/'.join(f'{x:.2f}' for x in load[1])}"]
    if max(load[0][0], load[1][0]) > 0.5 * (os.cpu_count() or 1):
        lines.append("WARNING: the machine is busy with other work; latencies and rates are pessimistic and noisy.")
    return lines


def roundtrip_lines(results):
    lines = []
    for transport in TRANSPORTS:
        for key, label in (("rt_ipykernel", "ipykernel"), ("rt_fake", "fake kernel")):
            r = _get(results, transport, key)
            if r is None:
                continue
            if not lines:
                lines = ["", "Round trips (execute_request -> execute_reply + idle), ms:         mean  median     p95"
                             "     p99   CPU us/round trip (client/server/helpers/kernel)"]
            if "error" in r:
                lines.append(f"  [{transport:6s}] {label:12s} ERROR {r['error']}")
                continue
            for side in SIDES:
                s = r["sides"].get(side)
                if s is None:
                    continue
                cpu = r["cpu_us_per_rt"][side]
                cpus = "/".join("-" if k not in cpu else f"{cpu[k]:.0f}" for k in ("client", "server", "helpers",
                                                                                   "kernel"))
                added = f"  ({s['added_median_ms']:+.3f} ms median)" if "added_median_ms" in s else ""
                lines.append(f"  [{transport:6s}] {label:12s} {side:14s} {s['mean_ms']:13.3f} {s['median_ms']:7.3f} "
                             f"{s['p95_ms']:7.3f} {s['p99_ms']:7.3f}   {cpus}{added}")
    return lines


def flood_lines(results):
    lines = ["", "Flood (stream messages/s from the execute send to the last message): median [min..max], in order?,",
             "  then for the first run: wall s, CPU s used by client/server/helpers/kernel, server CPU per 1,000",
             "  messages (median of the runs), and the busiest process (CPU/wall: ~100% is the bottleneck)"]
    rows = []
    if results.get("direct_flood") is not None:
        rows.append(("direct ZeroMQ", results["direct_flood"]))
    for transport in TRANSPORTS:
        for side in ("kcserver", "kcgevent"):
            for key, label in (("ws_json", "ws+json"), ("raw", "raw frames")):
                r = _get(results, transport, "flood", side, key)
                if r is not None:
                    rows.append((f"[{transport}] {side} {label}", r))
    if not rows:
        return []
    for label, r in rows:
        if "error" in r:
            lines.append(f"  {label:30s} ERROR {r['error']}")
            continue
        first = r["runs"][0]
        used = {k: first.get(f"cpu_{k}_s") for k in ("client", "server", "helpers", "kernel")}
        cpu = "/".join("-" if v is None else f"{v:.2f}" for v in used.values())
        per = "-" if r.get("server_ms_per_1000") is None else f"{r['server_ms_per_1000']:.1f} ms/1000 msgs"
        busiest = busiest_process(first)
        lines.append(f"  {label:30s} {r['median_rate']:7.0f}/s [{r['min_rate']:.0f}..{r['max_rate']:.0f}]  "
                     f"{'yes' if r['ok'] else 'NO '}  wall {first['wall_s']:.2f}s cpu {cpu} server {per}  "
                     f"busiest {busiest}")
        problems = [p for run in r["runs"] for p in run["problems"]]
        if problems:
            lines.append(f"  {'':30s} problems: {problems[:5]}")
    return lines


def busiest_process(run):
    used = {k: run[f"cpu_{k}_s"] for k in ("client", "server", "helpers", "kernel") if f"cpu_{k}_s" in run}
    name = max(used, key=used.get)
    return f"{name} {100 * used[name] / run['wall_s']:.0f}%"


def start_lines(results):
    lines = []
    for transport in TRANSPORTS:
        r = _get(results, transport, "start")
        if r is None:
            continue
        if not lines:
            lines = ["", "Kernel start, ipykernel (direct: spawn + first kernel_info_reply; servers: PUT /sessions + "
                         "POST start until it returns), s: median [min..max]"]
        if "error" in r:
            lines.append(f"  [{transport:6s}] ERROR {r['error']}")
            continue
        for side in SIDES:
            if side in r:
                s = r[side]
                lines.append(f"  [{transport:6s}] {side:9s} {s['median_s']:.3f} [{s['min_s']:.3f}..{s['max_s']:.3f}]"
                             f"  ({len(s['runs'])} starts)")
    return lines


def memory_lines(results):
    lines = []
    for transport in TRANSPORTS:
        for side in ("kcserver", "kcgevent"):
            r = _get(results, transport, "memory", side)
            if r is None:
                continue
            if not lines:
                steps = "/".join(str(p["kernels"]) for p in r.get("points", []))
                lines = ["", "Memory (fresh server; idle = after one GET /status; then fake kernels), MiB:"
                             f" server RSS at {steps} kernels; helpers = non-kernel children (RSS, USS)"]
            if "error" in r:
                lines.append(f"  [{transport:6s}] {side:9s} ERROR {r['error']}")
                continue
            rss = "/".join(f"{p['server_rss_mib']:.1f}" for p in r["points"])
            lines.append(f"  [{transport:6s}] {side:9s} {rss};  per kernel {r['per_kernel_mib']:.3f} (least squares), "
                         f"{r['per_kernel_endpoints_mib']:.3f} (endpoints)")
            last = r["points"][-1]
            if last["helpers"]:
                lines.append(f"  [{transport:6s}] {side:9s} + {last['helpers']} helper processes: RSS "
                             f"{last['helpers_rss_mib']:.1f}, USS {last['helpers_uss_mib']:.1f}; per kernel with "
                             f"helpers {r['per_kernel_with_helpers_mib']:.3f} (RSS), "
                             f"{r['per_kernel_with_helpers_uss_mib']:.3f} (USS)")
    return lines


def paces(conc):
    """The pacings (think ms, as keys) a concurrency result holds, closed loop first."""
    return sorted((k for k in conc if k not in ("create_s", "idle", "error")), key=float)


def concurrency_lines(results):
    lines = []
    for transport in TRANSPORTS:
        for side in ("kcserver", "kcgevent"):
            r = _get(results, transport, "concurrency", side)
            if r is None:
                continue
            if not lines:
                lines = ["", "Concurrency (fake kernel, execute \"1\"), ms: p50 / p99, errors, executes/s; "
                             "CPU % of wall (server/helpers/kernels/generator)",
                         "  (think = what each session waits between its executes; think 0 is a closed loop: every "
                         "session always has an execute in flight,",
                         "  so a latency is about sessions x CPU per execute / CPUs, whatever the server)"]
            if "error" in r:
                lines.append(f"  [{transport:6s}] {side:9s} ERROR {r['error']}")
                continue
            for think in paces(r):
                for name in ("single", "many"):
                    x = r[think][name]
                    cpu = "/".join(f"{x['cpu_pct'][k]:.0f}" for k in ("server", "helpers", "kernels", "generator"))
                    lat = f"{x['median_ms']:.2f} / {x['p99_ms']:.2f}" if x.get("n") else "no samples"
                    lines.append(f"  [{transport:6s}] {side:9s} think {think:>3s}: {x['sessions']:4d} session(s) x "
                                 f"{x['n_each']} ({x['processes']} generator process(es)): {lat}, {x['errors']} "
                                 f"errors, {x['executes_per_s']:.0f}/s; CPU {cpu} (generator "
                                 f"{x['generator_cpu_pct_per_process']:.0f}% per process, busiest "
                                 f"{x['generator_busiest_pct']:.0f}%); wall {x['wall_s']:.1f} s")
                    if x.get("errors_sample"):
                        lines.append(f"  {'':18s} errors: {x['errors_sample']}")
    return lines


# ---------------------------------------------------------------------------
# The side-by-side table


def table_rows(results, transport):
    """[(metric, direct, kcserver, kcgevent, digits[, False: no ratio])] for one transport."""
    res = results.get(transport) or {}
    rows = []

    def rt(key, what):
        r = res.get(key)
        if not r or "error" in r:
            return
        sides = r["sides"]
        cpu = r["cpu_us_per_rt"]
        for stat, label in (("median_ms", "median"), ("p95_ms", "p95")):
            rows.append((f"{what} RTT {label} (ms)", *[_get(sides, s, stat) for s in SIDES], 3))
        rows.append((f"{what}: server CPU per execute (ms)", None,
                     *[None if s not in cpu else cpu[s]["server"] / 1000 for s in ("kcserver", "kcgevent")], 3))
        helpers = _get(cpu, "kcgevent", "helpers")
        if helpers:
            rows.append((f"{what}: kcgevent helper (guardian) CPU per execute (ms)", None, None, helpers / 1000, 3))

    rt("rt_ipykernel", "ipykernel")
    rt("rt_fake", "fake kernel")
    direct = results.get("direct_flood") or {}
    floods = {s: _get(res, "flood", s, "raw") or {} for s in ("kcserver", "kcgevent")}
    if any(floods.values()):
        vals = [direct] + [floods["kcserver"], floods["kcgevent"]]
        rows.append(("flood 20k: msgs/s (raw client)", *[v.get("median_rate") for v in vals], 0))
        rows.append(("flood: all in order, none lost", *[v.get("ok") for v in vals], 0, False))
        rows.append(("flood: server CPU per 1,000 msgs (ms)", None,
                     *[v.get("server_ms_per_1000") for v in vals[1:]], 2))
        rows.append(("flood: busiest process", *[busiest_process(v["runs"][0]) if v.get("runs") else None
                                                for v in vals], 0, False))
        js = [_get(res, "flood", s, "ws_json", "median_rate") for s in ("kcserver", "kcgevent")]
        rows.append(("flood: msgs/s (websocket-client + json.loads)", None, *js, 0))
    start = res.get("start")
    if start and "error" not in start:
        rows.append(("kernel start, ipykernel, median (s)", *[_get(start, s, "median_s") for s in SIDES], 3))
    mem = {s: _get(res, "memory", s) for s in ("kcserver", "kcgevent")}
    if any(m and "error" not in m for m in mem.values()):
        def m(key):
            return [None] + [None if not mem[s] or "error" in mem[s] else mem[s].get(key)
                             for s in ("kcserver", "kcgevent")]
        rows.append(("server RSS idle (MiB)", *m("idle_rss_mib"), 1))
        k = next(x["max_kernels"] for x in mem.values() if x and "error" not in x)
        rows.append((f"server RSS with {k} fake kernels (MiB)", *m("rss_at_max_mib"), 1))
        rows.append(("server RSS growth per kernel (MiB, least squares)", *m("per_kernel_mib"), 3))
        rows.append(("server RSS growth per further kernel, 1 to max (MiB)", *m("per_further_kernel_mib"), 3))
        rows.append((f"helper processes, {k} kernels: RSS sum (MiB)", *m("helpers_rss_at_max_mib"), 1))
        rows.append((f"helper processes, {k} kernels: USS sum (MiB)", *m("helpers_uss_at_max_mib"), 1))
        rows.append(("growth per kernel incl. helpers' RSS (MiB)", *m("per_kernel_with_helpers_mib"), 3))
        rows.append(("growth per kernel incl. helpers' USS (MiB)", *m("per_kernel_with_helpers_uss_mib"), 3))
    conc = {s: _get(res, "concurrency", s) for s in ("kcserver", "kcgevent")}
    conc = {s: c for s, c in conc.items() if c and "error" not in c}
    if any("idle" in c for c in conc.values()):
        n = next(c[t]["many"]["sessions"] for c in conc.values() for t in paces(c))
        rows.append((f"{n} idle sessions: server CPU (% of a core)",
                     *[None] + [_get(conc.get(s), "idle", "server_pct") for s in ("kcserver", "kcgevent")], 2))
    thinks = sorted({t for c in conc.values() for t in paces(c)}, key=float)
    for think in thinks:
        def c(*keys):
            return [None] + [_get(conc.get(s), think, *keys) for s in ("kcserver", "kcgevent")]
        n = next(x[think]["many"]["sessions"] for x in conc.values() if think in x)
        label = f"{n} sessions, think {think} ms"
        rows.append((f"1 session, think {think} ms: p99 (ms)", *c("single", "p99_ms"), 2))
        rows.append((f"{label}: p50 (ms)", *c("many", "median_ms"), 2))
        rows.append((f"{label}: p99 (ms)", *c("many", "p99_ms"), 2))
        rows.append((f"{label}: p99 / single p99", *c("p99_ratio"), 2))
        rows.append((f"{label}: errors", *c("many", "errors"), 0, False))
        rows.append((f"{label}: executes/s", *c("many", "executes_per_s"), 0))
        rows.append((f"{label}: server CPU per execute (ms)", *c("many", "server_ms_per_execute"), 3))
        rows.append((f"{label}: generator CPU % per process", *c("many", "generator_cpu_pct_per_process"), 0,
                     False))
    return rows


def table_lines(results, transport):
    rows = table_rows(results, transport)
    if not rows:
        return []
    head = ("metric", "direct ZeroMQ", "kcserver", "kcgevent", "kcgevent/kcserver")
    body = []
    for metric, d, k, g, digits, *with_ratio in rows:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (g, k))
        r = ratio(g, k) if numbers and with_ratio != [False] else None
        body.append((metric, _fmt(d, digits), _fmt(k, digits), _fmt(g, digits), _fmt(r, 2)))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(5)]

    def line(cells):
        return "| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                 for i, c in enumerate(cells)) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    out = ["", f"Side by side, transport {transport} (ratio < 1: kcgevent uses less / is faster where lower is better)",
           line(head), rule]
    out += [line(b) for b in body]
    return out


# ---------------------------------------------------------------------------
# Verdicts


def relay_targets(results):
    """The relay's own targets (kcgevent vs direct ZeroMQ), as the benchmark always checked them."""
    out = []
    for transport in TRANSPORTS:
        s = _get(results, transport, "rt_ipykernel", "sides", "kcgevent")
        if s:
            out.append((f"[{transport}] ipykernel overhead <= {TARGET_OVERHEAD_PCT:g}% (median)",
                        s["overhead_median_pct"] <= TARGET_OVERHEAD_PCT,
                        f"{s['overhead_median_pct']:+.1f}% (mean {s['overhead_mean_pct']:+.1f}%)"))
        s = _get(results, transport, "rt_fake", "sides", "kcgevent")
        if s:
            out.append((f"[{transport}] fake kernel added <= {TARGET_ADDED_MS:g} ms (median)",
                        s["added_median_ms"] <= TARGET_ADDED_MS,
                        f"{s['added_median_ms']:+.3f} ms (mean {s['added_mean_ms']:+.3f})"))
        for key, label in (("ws_json", "ws+json"), ("raw", "raw frames")):
            r = _get(results, transport, "flood", "kcgevent", key)
            if r and "error" not in r:
                out.append((f"[{transport}] flood ({label}) >= {TARGET_RATE}/s, none lost",
                             r["ok"] and r["median_rate"] >= TARGET_RATE,
                             f"{r['median_rate']:.0f}/s, {'in order' if r['ok'] else 'LOST/UNORDERED'}"))
    return out


def issue_goals(results):
    """Issue 10's goals, each measured side by side with kcserver. met: True, False or None (not measured)."""
    out = []
    for t in TRANSPORTS:
        res = results.get(t)
        if not res:
            continue

        def versus(name, ours, theirs, lower_is_better=True, unit=""):
            if ours is None:
                return
            if theirs is None:
                out.append((f"[{t}] {name}", None, f"kcgevent {_num(ours)}{unit}; kcserver not measured"))
                return
            met = ours <= theirs if lower_is_better else ours >= theirs
            value = f"kcgevent {_num(ours)}{unit} vs kcserver {_num(theirs)}{unit}"
            out.append((f"[{t}] {name}", met, value + (f" (ratio {ours / theirs:.2f})" if theirs else "")))

        cpu = _get(res, "rt_ipykernel", "cpu_us_per_rt") or {}
        versus("server CPU per ipykernel execute <= kcserver's", _get(cpu, "kcgevent", "server"),
               _get(cpu, "kcserver", "server"), unit=" us")
        helpers = _get(cpu, "kcgevent", "helpers")
        if helpers:
            versus("  ... counting kcgevent's guardian processes too", _get(cpu, "kcgevent", "server") + helpers,
                   _get(cpu, "kcserver", "server"), unit=" us")
        ours, theirs = _get(res, "flood", "kcgevent", "raw"), _get(res, "flood", "kcserver", "raw")
        if ours and "error" not in ours:
            theirs = theirs if theirs and "error" not in theirs else {}
            versus("flood: server CPU per message <= kcserver's", ours.get("server_ms_per_1000"),
                   theirs.get("server_ms_per_1000"), unit=" ms/1000")
            versus("flood: throughput >= kcserver's", ours["median_rate"], theirs.get("median_rate"),
                   lower_is_better=False, unit="/s")
            out.append((f"[{t}] flood: nothing lost or reordered", ours["ok"],
                        "all in order" if ours["ok"] else "LOST/UNORDERED"))
        start = res.get("start")
        if start and "kcgevent" in start:
            limit = start["direct"]["median_s"] * (1 + GOAL_START_PCT / 100)
            out.append((f"[{t}] kernel start <= direct + {GOAL_START_PCT:g}%", start["kcgevent"]["median_s"] <= limit,
                        f"{start['kcgevent']['median_s']:.3f} s vs direct {start['direct']['median_s']:.3f} s "
                        f"(limit {limit:.3f} s)"))
        mem = _get(res, "memory", "kcgevent")
        if mem and "error" not in mem:
            out.append((f"[{t}] idle RSS <= {GOAL_IDLE_RSS_MIB:g} MiB", mem["idle_rss_mib"] <= GOAL_IDLE_RSS_MIB,
                        f"{mem['idle_rss_mib']:.1f} MiB"))
            rust = _get(res, "memory", "kcserver")
            rust = rust if rust and "error" not in rust else {}
            if mem.get("per_further_kernel_mib") is not None:
                versus("RSS growth per further kernel (1 to max) <= kcserver's (server process)",
                       mem["per_further_kernel_mib"], rust.get("per_further_kernel_mib"), unit=" MiB")
            versus("RSS growth per kernel, 0 to max, <= kcserver's (server process)", mem["per_kernel_mib"],
                   rust.get("per_kernel_mib"), unit=" MiB")
            if mem["helpers_rss_at_max_mib"]:
                versus("  ... counting the guardians' unique memory (USS) too", mem["per_kernel_with_helpers_uss_mib"],
                       rust.get("per_kernel_with_helpers_uss_mib"), unit=" MiB")
        conc = _get(res, "concurrency", "kcgevent")
        for think in paces(conc) if conc and "error" not in conc else ():
            x = conc[think]
            r = x.get("p99_ratio")
            met = r is not None and r <= GOAL_P99_FACTOR and x["many"]["errors"] == 0 and x["single"]["errors"] == 0
            value = (f"p99 {x['many'].get('p99_ms', float('nan')):.2f} ms = {'-' if r is None else f'{r:.2f}'} x "
                     f"single {x['single'].get('p99_ms', float('nan')):.2f} ms, {x['many']['errors']} errors")
            rust = _get(res, "concurrency", "kcserver", think, "p99_ratio")
            if rust is not None:
                value += f" (kcserver: {rust:.2f} x)"
            out.append((f"[{t}] {x['many']['sessions']} sessions, think {think} ms: p99 <= {GOAL_P99_FACTOR:g} x "
                        "single, no errors", met, value))
    return out


def verdict_lines(title, verdicts):
    lines = ["", title]
    for name, met, value in verdicts:
        word = "n/a    " if met is None else ("MET    " if met else "NOT MET")
        lines.append(f"  {word}  {name}: {value}")
    return lines


def report(results, opts):
    """Print everything; the verdicts and the table are also stored in `results`."""
    lines = header(results, opts)
    for section in (roundtrip_lines, flood_lines, start_lines, memory_lines, concurrency_lines):
        lines += section(results)
    tables = {}
    for transport in TRANSPORTS:
        tables[transport] = table_lines(results, transport)
        lines += tables[transport]
    targets = relay_targets(results)
    goals = issue_goals(results)
    if targets:
        lines += verdict_lines("Relay targets (kcgevent vs direct ZeroMQ):", targets)
    if goals:
        lines += verdict_lines("Goals (issue 10, kcgevent vs kcserver in this run):", goals)
    results["verdicts"] = [{"target": n, "met": ok, "value": v} for n, ok, v in targets]
    results["goals"] = [{"goal": n, "met": ok, "value": v} for n, ok, v in goals]
    results["tables"] = {t: "\n".join(x) for t, x in tables.items() if x}
    text = "\n".join(lines)
    print(text, flush=True)
    return text

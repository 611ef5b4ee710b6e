"""--durable: what a state dir costs kcgevent (floods and round trips with and without --state-dir,
alternating), and how long a SIGKILLed state-dir server takes to serve its sessions again."""
import json
import os
import statistics
import time

from .procs import REAPER, BenchError, cpu_seconds, now
from .servers import Channel, Server, execute_request, fake_session_body, new_id
from .workloads import flood_runs

TARGET_STATE_DIR_COST_PCT = 20.0


def bench_durable(opts, workdir, results):
    """Floods with and without --state-dir (alternating), then a SIGKILL + restart of the durable one."""
    state_dir = os.path.join(workdir, "state")
    servers = {"plain": Server("kcgevent", "tcp", workdir),
               "state_dir": Server("kcgevent", "tcp", workdir, ["--state-dir", state_dir])}
    sessions = {}
    for name, server in servers.items():
        session = server.start_session(fake_session_body(new_id(f"bench-{name}")))
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
        ids.append(durable.start_session(fake_session_body(new_id(f"bench-more{i}"))).session_id)
    # One of them holds a backlog: a flood no client has read (kept on disk, recovered at restart).
    backlog = Channel(durable, ids[1])
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
    session = Channel(durable, ids[-1])
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

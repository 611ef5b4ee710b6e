#!/usr/bin/env python
"""How far is kcgevent's CPU from the least a Python relay can cost? (issue 10's CPU goals)

    python tools/bench_floor.py [-n 300] [--flood 20000] [--transport tcp|socket|both] [--kcserver PATH]

One run, side by side: the floor relay (benchkit/floor.py: a blocking pyzmq loop that passes raw
frames on and does nothing else), the same relay on gevent, kcserver and kcgevent. Per side, the CPU
of the relaying process alone: per ipykernel execute, per fake-kernel execute (round trips
interleaved in blocks, as bench.py does) and per 1,000 messages of a `flood` (fake kernel, raw
client). If the floor already costs more than kcserver, no relay in Python with pyzmq can match
kcserver, whatever it leaves out.
"""
import argparse
import signal
import sys
import tempfile

from benchkit import workloads
from benchkit.floor import FloorRelay
from benchkit.procs import REAPER, remove_scratch
from benchkit.servers import Server, fake_session_body, find_kcserver, ipykernel_session_body, new_id


def measure(transport, opts, workdir):
    """{"ipykernel": {side: us}, "fake": {side: us}, "flood": {side: ms per 1000}} for one transport."""
    servers = [Server(kind, transport, workdir, kcserver=opts.kcserver)
               for kind in (("kcserver", "kcgevent") if opts.kcserver else ("kcgevent",))]
    out = {"ipykernel": {}, "fake": {}, "flood": {}}
    try:
        for kernel, make_body, sync in (("fake", fake_session_body, "sync"),
                                        ("ipykernel", ipykernel_session_body, "0")):
            floors = {"floor": FloorRelay(kernel, workdir), "floor_gevent": FloorRelay(kernel, workdir, gevent=True)}
            channels = []
            try:
                sides = {name: (floor.roundtrip, {"server": floor.pid, "kernel": floor.kernel_pid})
                         for name, floor in floors.items()}
                for server in servers:
                    channel = server.start_session(make_body(new_id(f"floor-{kernel}")))
                    channel.open()
                    channel.roundtrip(sync)
                    channels.append(channel)
                    sides[server.kind] = (channel.roundtrip, workloads.side_pids(server, channel.kernel_pid))
                print(f"[{transport}] {kernel}: {opts.n} round trips per side", flush=True)
                rt = workloads.interleaved_roundtrips(sides, opts.n, opts.warmup, opts.block,
                                                      code="" if kernel == "fake" else "1")
                out[kernel] = {side: cpu["server"] for side, cpu in rt["cpu_us_per_rt"].items()}
                if kernel == "fake":
                    print(f"[{transport}] flood {opts.flood} x {opts.repeats} per side", flush=True)
                    for name, floor in floors.items():
                        out["flood"][name] = workloads.flood_runs(
                            "raw", floor.flood, opts.flood, opts.repeats, {"server": floor.pid})["server_ms_per_1000"]
                    for server, channel in zip(servers, channels):
                        out["flood"][server.kind] = workloads.flood_runs(
                            "raw", workloads.raw_flood(channel), opts.flood, opts.repeats,
                            {"server": server.pid})["server_ms_per_1000"]
            finally:
                for channel in channels:
                    channel.close()
                for floor in floors.values():
                    floor.stop()
    finally:
        for server in servers:
            server.stop()
    return out


def report(results):
    sides = ("floor", "floor_gevent", "kcserver", "kcgevent")
    rows = [("server CPU per ipykernel execute (us)", "ipykernel"), ("server CPU per fake-kernel execute (us)", "fake"),
            ("flood: server CPU per 1,000 msgs (ms)", "flood")]
    lines = [f"{'':44}" + "".join(f"{s:>13}" for s in sides) + f"{'kcgevent/floor':>16}"]
    for transport, res in results.items():
        lines.append(f"[{transport}]")
        for label, key in rows:
            vals = [res[key].get(s) for s in sides]
            cells = "".join(f"{v:13.1f}" if v is not None else f"{'-':>13}" for v in vals)
            ratio = f"{vals[-1] / vals[0]:15.2f}x" if vals[0] and vals[-1] is not None else ""
            lines.append(f"  {label:42}{cells}{ratio}")
    lines.append("floor: benchkit/floor.py, a blocking pyzmq loop that passes raw frames on (no check, "
                 "no parsing, no state); floor_gevent: the same on gevent (zmq.green, a greenlet per socket); "
                 "both the same for every transport (their client is on a Unix socket).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=300, help="round trips per side (default 300)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--block", type=int, default=25)
    p.add_argument("--flood", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3, help="floods per side (default 3)")
    p.add_argument("--transport", choices=("tcp", "socket", "both"), default="both")
    p.add_argument("--kcserver", metavar="PATH", help="as in bench.py; 'none' to leave it out")
    opts = p.parse_args(argv)
    opts.kcserver = None if opts.kcserver == "none" else find_kcserver(opts.kcserver)
    workdir = tempfile.mkdtemp(prefix="kcbf-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        transports = ("tcp", "socket") if opts.transport == "both" else (opts.transport,)
        results = {t: measure(t, opts, workdir) for t in transports}
        print(report(results))
    finally:
        REAPER.cleanup()
        remove_scratch(workdir, keep=False)


if __name__ == "__main__":
    sys.exit(main())

"""How to run asyncio kernel provisioners from kcgevent's gevent process: measure the two options.

    python tools/bench_bridge.py [--calls N]

A. a native thread (gevent.monkey.get_original("_thread", "start_new_thread"); A': a worker of
   gevent's threadpool) running its own asyncio loop on an unpatched selector; greenlets submit
   with run_coroutine_threadsafe and are woken through the hub's threadsafe callback;
B. the provisioner host, a helper process speaking JSON lines (kcgevent/provisioning/host.py).

For each: the time to get ready, the round trip of a no-op call, the worst stall of the gevent
hub meanwhile (a greenlet that wakes every millisecond records how late it is), and whether the
blocking, thread-using and process-spawning code that provisioners run works (a local kernel
launched with jupyter_client's launch_kernel and polled to its exit; a threading.Thread +
threading.Event handshake, the way paramiko's transport works).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kcgevent.provisioning.client import ProvisionerHost  # noqa: E402

# Not get_original("threading", "Thread"): its start() looks up the patched _start_new_thread and
# makes a greenlet (found the hard way: the "thread" ran the loop on the hub's thread and hung).
start_native_thread = monkey.get_original("_thread", "start_new_thread")
OriginalSelector = monkey.get_original("selectors", "DefaultSelector")


class ThreadBridge:
    """Option A: one native thread, one asyncio loop (the thread from the real _thread module, or a
    worker of gevent's own thread pool)."""

    def __init__(self, pool=False):
        self.loop = asyncio.SelectorEventLoop(OriginalSelector())
        self.hub = gevent.get_hub()
        if pool:
            self.hub.threadpool.spawn(self._run)
        else:
            start_native_thread(self._run, ())

    def _run(self):
        self.loop.run_forever()

    def call(self, coro, timeout=30):
        result = AsyncResult()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)

        def done(fut):
            def deliver():
                if fut.exception() is not None:
                    result.set_exception(fut.exception())
                else:
                    result.set(fut.result())
            self.hub.loop.run_callback_threadsafe(deliver)
        future.add_done_callback(done)
        return result.get(timeout=timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


class HubLag:
    """The worst lateness of a greenlet that asks to wake every millisecond."""

    def __init__(self):
        self.worst = 0.0
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            t = time.perf_counter()
            gevent.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)

    def stop(self):
        self.greenlet.kill()
        return self.worst


async def noop():
    return 1


async def local_kernel_round_trip():
    """What LocalProvisioner does: launch_kernel (subprocess.Popen), poll until exit."""
    from jupyter_client.launcher import launch_kernel
    proc = launch_kernel([sys.executable, "-c", "import time; time.sleep(0.3)"])
    deadline = time.monotonic() + 10
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            return "poll() never saw the exit"
        await asyncio.sleep(0.05)
    return f"ok (exit {proc.returncode})"


async def thread_event_handshake():
    """What paramiko's transport does: a worker thread sets an Event the caller blocks on."""
    import threading
    event = threading.Event()
    threading.Thread(target=event.set, daemon=True).start()
    return "ok" if event.wait(5) else "the worker thread never ran (Event.wait timed out)"


def probe(call):
    try:
        return call()
    except Exception as exc:  # the point is to see how it fails
        return f"failed: {type(exc).__name__}: {exc}"


def measure_thread(calls, pool=False):
    t0 = time.perf_counter()
    bridge = ThreadBridge(pool)
    ready = time.perf_counter() - t0
    lag = HubLag()
    t0 = time.perf_counter()
    for _ in range(calls):
        bridge.call(noop())
    rtt = (time.perf_counter() - t0) / calls
    kernel = probe(lambda: bridge.call(local_kernel_round_trip(), timeout=15))
    threads = probe(lambda: bridge.call(thread_event_handshake(), timeout=15))
    worst = lag.stop()
    bridge.stop()
    return ready, rtt, worst, kernel, threads


def measure_host(calls):
    t0 = time.perf_counter()
    host = ProvisionerHost()
    host.ensure_started()
    ready = time.perf_counter() - t0
    lag = HubLag()
    t0 = time.perf_counter()
    for _ in range(calls):
        host.call("ping", 10)
    rtt = (time.perf_counter() - t0) / calls
    worst = lag.stop()
    host.stop()
    # the host runs provisioners unpatched: the same probes, in a plain interpreter
    import subprocess
    code = ("import asyncio, sys; sys.path.insert(0, %r); from tools.bench_bridge_probes import main; main()"
            % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    kernel, threads = (out.stdout.strip().split("\n") + ["?", "?"])[:2]
    return ready, rtt, worst, kernel, threads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'option':<36}{'ready':>9}{'round trip':>12}{'hub stall':>11}  local kernel / thread+Event")
    for name, measure in (("A native thread + asyncio loop", measure_thread),
                          ("A' gevent threadpool worker + loop", lambda calls: measure_thread(calls, pool=True)),
                          ("B helper process (JSON lines)", measure_host)):
        ready, rtt, worst, kernel, threads = measure(args.calls)
        print(f"{name:<36}{ready * 1000:>7.1f}ms{rtt * 1e6:>10.0f}us{worst * 1000:>9.1f}ms  {kernel} / {threads}")


if __name__ == "__main__":
    main()

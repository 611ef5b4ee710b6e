"""The probes of bench_bridge.py, run in a plain (unpatched) interpreter, as the provisioner host runs."""
import asyncio
import sys
import time


async def local_kernel_round_trip():
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
    import threading
    event = threading.Event()
    threading.Thread(target=event.set, daemon=True).start()
    return "ok" if event.wait(5) else "the worker thread never ran"


def main():
    print(asyncio.run(local_kernel_round_trip()))
    print(asyncio.run(thread_event_handshake()))

#!/usr/bin/env python
"""Can the MCP SDK's server run inside a gevent-patched process? The experiment behind kcgevent/mcp/listener.py.

    python tools/probe_mcp_thread.py [-n 200]

For each way of hosting the SDK's asyncio server (Starlette + uvicorn) in a
`monkey.patch_all()` process, a child process serves one tool whose handler
hops onto the gevent hub (a greenlet does the work, as kcgevent's tools do),
next to a gevent WSGI server on the hub. The parent (unpatched) drives the
SDK's Streamable HTTP client and reports ms per tool call, or that it hung,
whether the hub still answered HTTP meanwhile, and whether another asyncio
user on the hub (`asyncio.run` in a greenlet) still works:

- native:   an unpatched `_thread.start_new_thread` with its own asyncio loop
            over the unpatched selector (what kcgevent does);
- native+gevent-selector: the same thread, asyncio over gevent's patched selector;
- greenlet: the patched `threading.Thread`, i.e. an asyncio loop run by a
            greenlet on the hub (gevent issue 2026's territory); "loop first"
            starts that greenlet before the hub's web server;
- "greenlet, unpatched selector": the loop of a greenlet blocks in a real
            select(), so the hub never runs again;
- "uvicorn binds": uvicorn resolves and binds the address itself, which
            goes through asyncio's default executor (a thread pool: greenlets
            once patched) instead of a socket bound beforehand.
"""
import argparse
import asyncio
import os
import selectors
import subprocess
import sys
import time
import urllib.request

CHILD = r'''
from gevent import monkey
monkey.patch_all()
import asyncio, socket, sys
import gevent
from gevent.pywsgi import WSGIServer
import mcp_types as types
import uvicorn
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import TransportSecuritySettings

mode = sys.argv[1]
hub = gevent.get_hub()

def on_hub(fn):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    def run():
        value = fn()
        loop.call_soon_threadsafe(future.set_result, value)
    hub.loop.run_callback_threadsafe(gevent.spawn, run)
    return future

async def list_tools(ctx, params):
    return types.ListToolsResult(tools=[types.Tool(name="on_hub", input_schema={"type": "object"})])

async def call_tool(ctx, params):
    text = await on_hub(lambda: (gevent.sleep(0), "from a greenlet")[1])
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

app = Server("probe", on_list_tools=list_tools, on_call_tool=call_tool).streamable_http_app(
    json_response=True, transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
sock = monkey.get_original("socket", "socket")(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
if mode.endswith("uvicorn binds"):
    sock.close()
else:
    sock.listen(16)
web = WSGIServer(("127.0.0.1", 0), lambda e, s: (s("200 OK", []), [b"hub ok"])[1], log=None)
if mode != "greenlet, loop first":
    web.start()

def serve():
    native = mode in ("native", "native, uvicorn binds", "greenlet, unpatched selector")
    selector = monkey.get_original("selectors", "DefaultSelector")() if native else None
    loop = asyncio.SelectorEventLoop(selector)
    asyncio.set_event_loop(loop)
    binds = mode.endswith("uvicorn binds")  # uvicorn resolves the host itself: asyncio's default executor
    config = uvicorn.Config(app, log_level="error", lifespan="on", host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    server.capture_signals = __import__("contextlib").nullcontext
    loop.run_until_complete(server.serve(sockets=None if binds else [sock]))

if mode.startswith("greenlet"):
    import threading
    threading.Thread(target=serve, daemon=True).start()
    if mode == "greenlet, loop first":
        web.start()
else:
    monkey.get_original("_thread", "start_new_thread")(serve, ())
print(port, web.server_port, flush=True)
gevent.sleep(1.0)
try:  # another asyncio user on the hub (a provisioner bridge, jupyter_core's run_sync, ...)
    asyncio.run(asyncio.sleep(0))
    print("ok", flush=True)
except RuntimeError as exc:
    print(f"RuntimeError: {exc}", flush=True)
gevent.sleep(600)
'''


async def drive(port, n):
    from mcp import Client
    async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
        await client.call_tool("on_hub", {})
        started = time.perf_counter()
        for _ in range(n):
            await client.call_tool("on_hub", {})
        return (time.perf_counter() - started) / n * 1000


def read_line(child, timeout):
    """A line of the child's stdout, or "" if none comes within `timeout` s."""
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        return child.stdout.readline() if selector.select(timeout) else ""


def probe(mode, n):
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        line = read_line(child, 20)
        if not line:
            print(f"  {mode:<26} the child never got as far as serving (the hub did not run again)")
            return
        mcp_port, hub_port = map(int, line.split())
        time.sleep(1.0)
        try:
            per_call = f"{asyncio.run(asyncio.wait_for(drive(mcp_port, n), 15)):.2f} ms/tool call"
        except (asyncio.TimeoutError, TimeoutError):
            per_call = "HUNG (15 s)"
        try:
            hub = urllib.request.urlopen(f"http://127.0.0.1:{hub_port}/", timeout=3).read().decode()
        except OSError as exc:
            hub = f"no answer ({exc})"
        second = read_line(child, 10).strip() or "(no answer)"
        print(f"  {mode:<24} {per_call:<26} hub HTTP: {hub:<7} asyncio.run() on the hub: {second}")
    finally:
        child.kill()
        child.wait(5)
        child.stdout.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    print(f"MCP SDK server inside gevent (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, N={args.n})")
    for mode in ("native", "native, uvicorn binds", "native+gevent-selector", "greenlet", "greenlet, loop first",
                 "greenlet, uvicorn binds", "greenlet, unpatched selector"):
        probe(mode, args.n)


if __name__ == "__main__":
    main()

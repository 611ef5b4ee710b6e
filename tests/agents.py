"""The official MCP client as the agent in tests, plus a Positron window on the workspace channel.

The test process is gevent-patched (conftest), and the SDK client is asyncio:
each agent scenario runs in a native worker thread of gevent's threadpool with
its own asyncio loop over the unpatched selector, so the calling greenlet
waits cooperatively while a window greenlet answers command requests.
"""
import asyncio
import base64
import json
import os
import socket
import struct
import threading
import zlib
from contextlib import asynccontextmanager

import gevent
import httpx2
import websocket
from gevent import monkey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import Implementation

_NativeSelector = monkey.get_original("selectors", "DefaultSelector")
AGENT = Implementation(name="test-agent", version="9.8.7")


def _native_loop():
    """An asyncio loop for a native thread; child processes are watched by pidfd (no helper thread,
    which monkey-patching would turn into a greenlet that never runs there)."""
    loop = asyncio.SelectorEventLoop(_NativeSelector())
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    return loop


def run_agent(scenario, *args, timeout=90):
    """Run `await scenario(*args)` on a fresh asyncio loop in a native thread; return its result."""

    def target():
        with asyncio.Runner(loop_factory=_native_loop) as runner:
            return runner.run(asyncio.wait_for(scenario(*args), timeout))

    return gevent.get_hub().threadpool.apply(target)


def spawn_agent(scenario, *args, timeout=90):
    """`run_agent` in a greenlet (get its result with `.get()`)."""
    return gevent.spawn(run_agent, scenario, *args, timeout=timeout)


@asynccontextmanager
async def agent(workspace, path_suffix="", token=None, mode="legacy"):
    """An MCP client session on a registered workspace (its URL and token)."""
    token = workspace["token"] if token is None else token
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        transport = streamable_http_client(workspace["url"] + path_suffix, http_client=http)
        async with Client(transport, mode=mode, client_info=AGENT) as client:
            yield client


def structured(result):
    """The structured content of a tool result, or its text decoded as JSON."""
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def schema_validator(name):
    """A JSON Schema validator for one of the contracts in schemas/."""
    import jsonschema
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas", name)
    with open(path, encoding="utf-8") as f:
        return jsonschema.Draft202012Validator(json.load(f))


def tiny_png(width=3, height=2):
    """A valid PNG (red pixels) built with zlib and struct: no imaging library needed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_display_code(png):
    """Python for the kernel that displays `png` through IPython's display machinery."""
    return ("import base64\nfrom IPython.display import Image, display\n"
            f"display(Image(data=base64.b64decode({base64.b64encode(png).decode()!r})))")


class Window:
    """A Positron window on the workspace channel (websocket-client, in the patched process)."""

    def __init__(self, server, workspace_id):
        path, header = f"/mcp/workspaces/{workspace_id}/channel", server.client.headers()
        if server.info.get("port"):
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.info['port']}{path}", timeout=30,
                                                  header=header)
        else:  # the Unix socket transport: the upgrade goes to the server's own socket
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(server.info["socket_path"])
            self.ws = websocket.create_connection(f"ws://localhost{path}", timeout=30, header=header, socket=sock)
        self.frames = []
        self.lock = threading.Lock()

    def send(self, frame):
        self.ws.send(json.dumps(frame))

    def hello(self, commands=(), session_ids=(), foreground=None, focused=False):
        self.send({"kind": "hello", "positron_version": "2026.11.0", "commands": list(commands),
                   "session_ids": list(session_ids), "foreground_session_id": foreground, "focused": focused})

    def recv(self, timeout=30):
        self.ws.settimeout(timeout)
        frame = json.loads(self.ws.recv())
        self.frames.append(frame)
        return frame

    def next_request(self, timeout=30):
        """The next command_request (other frames are kept in `frames`)."""
        while True:
            frame = self.recv(timeout)
            if frame.get("kind") == "command_request":
                return frame

    def reply(self, request, ok=True, result=None, reason=None, message=None):
        frame = {"kind": "command_reply", "id": request["id"], "ok": ok}
        if ok:
            frame["result"] = result
        else:
            frame.update(reason=reason, message=message)
        self.send(frame)

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass

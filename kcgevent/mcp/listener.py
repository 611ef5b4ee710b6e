"""The agents' MCP endpoint: the official MCP SDK's Streamable HTTP server, on its own loopback port.

The SDK's server is asyncio (Starlette + anyio); kcgevent is gevent with
monkey-patching. It runs here in one *native* thread (the unpatched
`_thread.start_new_thread`) with its own asyncio loop over the unpatched
selector, served by uvicorn on a socket we bind. Tool calls hop onto the
gevent hub with the hub's thread-safe callback, run as ordinary greenlets
against the session verbs, and hand their result back with
`loop.call_soon_threadsafe`. Nothing in this thread touches gevent objects
otherwise. A greenlet-hosted loop (the patched `threading.Thread`) serves
too, but while it runs no other greenlet can use asyncio (`asyncio.run`
raises "cannot be called from a running event loop", gevent issue 2026), and
over the unpatched selector it blocks the hub outright; see
tools/probe_mcp_thread.py.

In front of the SDK sits a small ASGI gate, in the order of Kallichore's
listener: routing (`/mcp/w/<workspace>[/s/<session>]`, the server card),
the DNS-rebinding guard (loopback Host and Origin, else 403), the bearer
token (401 without `WWW-Authenticate`, so agents do not start OAuth), and the
token's workspace matching the path (403).
"""
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import socket
import time
from urllib.parse import unquote, urlsplit

import gevent
from gevent import monkey

from ..config import VERSION
from .workspaces import tokens_equal

log = logging.getLogger(__name__)

_start_native_thread = monkey.get_original("_thread", "start_new_thread")
_NativeSelector = monkey.get_original("selectors", "DefaultSelector")
_NativeSocket = monkey.get_original("socket", "socket")

ROUTE = re.compile(r"^/mcp/w/(?P<workspace>[^/]+)(?:/s/(?P<session>[^/]+)|/(?P<card>server-card))?/?$")
NOT_FOUND = "Not found; a workspace's MCP endpoint is at /mcp/w/<workspace-id>"
MAX_BODY = 4 * 1024 * 1024
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PROTOCOL_VERSIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"]


def is_loopback_host(host):
    """`localhost`, 127.x.y.z or [::1], with or without a port; anything else is foreign."""
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_origin(origin):
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and is_loopback_host(parts.netloc)


def bearer_token(header):
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def server_card(workspace, port):
    url = f"http://127.0.0.1:{port}/mcp/w/{workspace.id}"
    return {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json",
        "name": "co.posit/positron", "version": VERSION, "title": "Positron",
        "description": "The user's live Positron interpreter sessions and IDE",
        "websiteUrl": "https://positron.posit.co",
        "remotes": [{"type": "streamable-http", "url": url,
                     "headers": [{"name": "Authorization", "isRequired": True, "isSecret": True}],
                     "supportedProtocolVersions": PROTOCOL_VERSIONS}],
        "_meta": {"co.posit.positron/workspace": {"id": workspace.id, "displayName": workspace.display_name}},
    }


async def respond(send, status, body=b"", content_type="text/plain; charset=utf-8", headers=()):
    if isinstance(body, str):
        body = body.encode()
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Hub:
    """Runs functions on the gevent hub from the listener's asyncio thread."""

    def __init__(self):
        self.hub = gevent.get_hub()

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(method, value):
            try:
                loop.call_soon_threadsafe(lambda: future.done() or method(value))
            except RuntimeError:  # the loop is closed: the listener stopped meanwhile
                pass

        def greenlet():
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 (handed to the awaiting coroutine)
                settle(future.set_exception, exc)
            else:
                settle(future.set_result, result)

        self.hub.loop.run_callback_threadsafe(gevent.spawn, greenlet)
        return await future


class McpListener:
    """The listener's lifecycle, called on the hub: start with the first workspace, stop with the last."""

    def __init__(self, registry, preferred_port=0):
        self.registry = registry
        self.preferred_port = preferred_port
        self.port = 0
        self.sock = None
        self.server = None
        self.hub = Hub()
        self._thread_done = False
        self._thread_error = None
        self.stopping = False

    def _bind(self):
        for port in ([self.preferred_port] if self.preferred_port else []) + [0]:
            # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is TCP,
            # and without it every response waits ~40 ms for a delayed ACK (measured: 45 -> ~4 ms a call)
            sock = _NativeSocket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.bind(("127.0.0.1", port))
            except (OSError, OverflowError):  # taken, or not a port number
                sock.close()
                log.info("MCP: port %s is taken; using another", port)
                continue
            sock.listen(128)
            return sock
        raise OSError("no port for the MCP listener")

    def start(self):
        """Bind, then start the thread; the SDK is imported there (~0.8 s) so the hub keeps relaying."""
        self.sock = self._bind()
        self.port = self.sock.getsockname()[1]
        _start_native_thread(self._run, ())
        deadline = time.monotonic() + START_TIMEOUT
        while self.server is None or not self.server.started:
            if self._thread_done or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the MCP listener did not start: {self._thread_error or 'timed out'}")
            gevent.sleep(0.01)
        log.info("MCP listener for agents on http://127.0.0.1:%d/mcp/w/<workspace>", self.port)

    def _run(self):
        # asyncio.Runner cancels what is left (the SDK's session tasks) before closing the loop
        runner = asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(_NativeSelector()))
        try:
            import uvicorn  # the SDK's own dependency

            config = uvicorn.Config(self.app(), lifespan="on", log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=1)
            self.server = quiet_server(config)
            runner.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 (reported by start/stop)
            self._thread_error = repr(exc)
            log.error("MCP listener failed: %r", exc)
        finally:
            with contextlib.suppress(Exception):
                runner.close()
            self._thread_done = True

    def stop(self):
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT
        while not self._thread_done and time.monotonic() < deadline:
            if self.server is not None:
                self.server.should_exit = True
            gevent.sleep(0.02)
        if not self._thread_done:
            log.warning("MCP listener thread did not stop within %.0f s", STOP_TIMEOUT)
        with contextlib.suppress(OSError):
            self.sock.close()
        log.info("MCP listener stopped")

    # -- the ASGI application -------------------------------------------------------------

    def app(self):
        """The ASGI app: the gate in front of the SDK's Streamable HTTP app (built in the listener's thread)."""
        from mcp.server.lowlevel.server import Server
        from mcp.server.transport_security import TransportSecuritySettings

        from .tools import CALLER_NOTE, INSTRUCTIONS, TOOLS, call_tool

        hub, registry = self.hub, self.registry

        async def list_tools(ctx, params):
            import mcp_types as types
            return types.ListToolsResult(tools=TOOLS)

        async def run_tool(ctx, params):
            route = ctx.request.scope.get("kcgevent", {}) if ctx.request is not None else {}
            client = ctx.session.client_params
            info = client.client_info.model_dump(exclude_none=True) if client and client.client_info else {}
            return await hub.run(call_tool, registry, route.get("workspace"), route.get("caller"), info,
                                 params.name, params.arguments or {})

        sdk = Server("positron", version=VERSION, title="Positron",
                     description="The user's live Positron interpreter sessions and IDE",
                     instructions=INSTRUCTIONS + CALLER_NOTE, on_list_tools=list_tools, on_call_tool=run_tool)
        inner = sdk.streamable_http_app(
            json_response=True, transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        self.session_manager = sdk.session_manager
        return Gate(self, inner)

    def live_sessions(self):
        """Protocol sessions the SDK still serves (it ends idle ones after 30 min), or None if unknown.

        Reads the session manager's table (a private attribute, hence the guard) from the hub:
        copying a dict's keys is atomic under the GIL.
        """
        table = getattr(getattr(self, "session_manager", None), "_server_instances", None)
        return set(table) if isinstance(table, dict) else None


def quiet_server(config):
    """uvicorn's Server without signal handling (signals belong to the gevent side)."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return QuietServer(config)


class Gate:
    """ASGI: routing, the server card, and auth in front of the SDK's app."""

    def __init__(self, listener, inner):
        self.listener = listener
        self.registry = listener.registry
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        match = ROUTE.match(scope["path"])
        if match is None:
            return await respond(send, 404, NOT_FOUND)
        host, origin = headers.get("host"), headers.get("origin")
        if host is not None and not is_loopback_host(host):
            return await respond(send, 403, "Forbidden: the Host header is not a loopback address")
        if origin is not None and not is_loopback_origin(origin):
            return await respond(send, 403, "Forbidden: the Origin is not a loopback origin")
        workspace_id = match["workspace"]
        if match["card"]:
            return await self.card(scope, headers, send, workspace_id)
        token = bearer_token(headers.get("authorization"))
        if token is None:
            return await respond(send, 401, "Unauthorized: send 'Authorization: Bearer <token>' with the "
                                 "workspace's token (POSITRON_MCP_TOKEN)")
        owner = self.token_owner(token)
        if owner is None:
            return await respond(send, 401, "Invalid bearer token")
        if owner.id != workspace_id:
            return await respond(send, 403, "Forbidden: this token belongs to another workspace; use the URL and "
                                 "token from the same Positron window")
        if self.listener.stopping:
            return await respond(send, 503, "The MCP listener is shutting down")
        body = b""
        if scope["method"] == "POST":
            body = await read_body(receive)
            if body is None:
                return await respond(send, 413, "Request body too large")
        scope = dict(scope, path="/mcp", raw_path=b"/mcp",
                     kcgevent={"workspace": workspace_id, "caller": match["session"]})
        await self.inner(scope, replay(body, receive),
                         self.tracking_clients(send, workspace_id, match["session"], body, scope["method"],
                                               headers))

    def tracking_clients(self, send, workspace_id, caller, body, method, headers):
        """A `send` that records an agent (its initialize answered) or forgets it (its DELETE answered)
        before the response leaves, so `/status` never lags what the agent has seen."""
        initialize = find_initialize(body)
        session_header = headers.get("mcp-session-id")
        hub, registry = self.listener.hub, self.registry
        bridge = bridge_of(headers)

        def connected(session_id):
            workspace = registry.get(workspace_id)
            if workspace is not None:
                registry.client_connected(workspace, session_id, initialize, caller, bridge)

        def disconnected():
            workspace = registry.get(workspace_id)
            if workspace is not None:
                registry.client_disconnected(workspace, session_header)

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                code = message["status"]
                session_id = next((v.decode("latin-1") for k, v in message.get("headers", [])
                                   if k.lower() == b"mcp-session-id"), None)
                if initialize is not None and code == 200 and session_id:
                    await hub.run(connected, session_id)
                elif method == "DELETE" and session_header and code < 300:
                    await hub.run(disconnected)
            await send(message)

        return send_tracked

    def token_owner(self, token):
        """The workspace whose token this is, compared in constant time (read from the hub's dicts)."""
        found = None
        for workspace in list(self.registry.items.values()):
            if tokens_equal(token, workspace.token):
                found = workspace
        return found

    async def card(self, scope, headers, send, workspace_id):
        if scope["method"] not in ("GET", "HEAD"):
            return await respond(send, 405, "Method not allowed: the server card is read with GET",
                                 headers=[("allow", "GET")])
        workspace = self.registry.items.get(workspace_id)
        if workspace is None:
            return await respond(send, 404, f"No workspace {workspace_id}")
        body = json.dumps(server_card(workspace, self.listener.port), indent=2).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        extra = [("etag", etag), ("cache-control", "no-cache")]
        if headers.get("if-none-match") == etag:
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(k.encode(), v.encode()) for k, v in extra]})
            return await send({"type": "http.response.body", "body": b""})
        return await respond(send, 200, body, "application/mcp-server-card+json", extra)


def bridge_of(headers):
    """(pid, working directory) that `kcgevent mcp-stdio` sends about itself, or None."""
    pid = headers.get("x-kcgevent-bridge-pid", "")
    if not pid.isdigit():
        return None
    return int(pid), unquote(headers.get("x-kcgevent-bridge-cwd", "")) or None


async def read_body(receive):
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def replay(body, receive):
    """A `receive` that first gives back the body we read, then the real stream (disconnects)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def find_initialize(body):
    """The clientInfo of an `initialize` request in a POST body, or None."""
    if not body:
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None
    for item in message if isinstance(message, list) else [message]:
        if isinstance(item, dict) and item.get("method") == "initialize":
            params = item.get("params") or {}
            info = params.get("clientInfo") if isinstance(params, dict) else None
            return info if isinstance(info, dict) else {}
    return None

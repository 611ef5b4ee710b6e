"""`kcgevent mcp-stdio`: an MCP server on stdin/stdout that relays to a workspace's HTTP endpoint.

For agents configured with a command rather than a URL. A plain asyncio
program (no gevent): the SDK's stdio transport frames and validates the
JSON-RPC messages, httpx2 (the SDK's HTTP client) carries them upstream.

Where the endpoint is, in this order: `--workspace` looked up in the
connections directory Positron writes (`connections.json` and the
workspace's descriptor with its token); `POSITRON_MCP_URL` and
`POSITRON_MCP_TOKEN`; the workspace whose folder most deeply contains the
current directory. The client's `initialize` is replayed to every new
upstream, and the upstream's `mcp-session-id` is kept (and ended with a
DELETE when stdin closes). A refused request
(401, 403, 404, 503) or an unreachable endpoint re-resolves and retries once.
While no endpoint answers, the bridge answers `initialize`, `ping` and
`tools/list` itself (with the real tool list) and fails tool calls with
`POSITRON_NOT_RUNNING` or `NO_WORKSPACE` and guidance. `server/discover` is
answered "method not found", so clients use the initialize handshake.
"""
import argparse
import json
import logging
import os
import re
import sys
from urllib.parse import quote

import anyio
import httpx2
import mcp_types as types
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage

from ..config import VERSION
from .tools import INSTRUCTIONS, TOOLS

log = logging.getLogger("kcgevent.mcp.stdio")

REFUSED = (401, 403, 404, 503)
BRIDGE_PID_HEADER = "X-Kcgevent-Bridge-Pid"  # our own: how the listener learns an agent's pid and cwd
BRIDGE_CWD_HEADER = "X-Kcgevent-Bridge-Cwd"  # (percent-encoded)
PROTOCOL_FALLBACK = "2025-06-18"
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")


class Unreachable(Exception):
    """No endpoint, or it refused us, or the connection failed before a response."""


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def default_connections_dir():
    return os.environ.get("POSITRON_MCP_CONNECTIONS") or None


def descriptor(connections_dir, workspace_id, entry=None):
    """(url, token) of a workspace from its descriptor file, or None."""
    path = (entry or {}).get("descriptor") or os.path.join(connections_dir, "workspaces", f"{workspace_id}.json")
    data = read_json(path)
    if not isinstance(data, dict) or not data.get("url"):
        return None
    return data["url"], data.get("token")


def resolve(connections_dir, workspace_id, cwd, env, retry=False):
    """(url, token) of the endpoint to use, or None.

    On a retry the workspace named by POSITRON_MCP_URL is looked up in the
    connections directory first: a restarted supervisor has moved the port.
    """
    index = read_json(os.path.join(connections_dir, "connections.json")) if connections_dir else None
    workspaces = (index or {}).get("workspaces") or {}
    env_url, env_token = env.get("POSITRON_MCP_URL"), env.get("POSITRON_MCP_TOKEN")
    if not workspace_id and retry and env_url:
        match = re.search(r"/mcp/w/([a-z0-9-]+)", env_url)
        workspace_id = match.group(1) if match else None
    if workspace_id and connections_dir:
        found = descriptor(connections_dir, workspace_id, workspaces.get(workspace_id))
        if found:
            return found
    if env_url and env_token:
        return env_url, env_token
    best, depth = None, -1
    for wid, entry in workspaces.items():
        for folder in (entry or {}).get("folders") or []:
            folder = os.path.realpath(str(folder))
            if (cwd == folder or cwd.startswith(folder.rstrip(os.sep) + os.sep)) and len(folder) > depth:
                best, depth = (wid, entry), len(folder)
    if best is not None:
        return descriptor(connections_dir, best[0], best[1])
    return None


class Bridge:
    def __init__(self, connections_dir, workspace_id, http=None):
        self.connections_dir = connections_dir
        self.workspace_id = workspace_id
        self.http = http
        self.endpoint = None
        self.session_id = None
        self.protocol_version = None
        self.initialize = None  # the client's initialize request, replayed upstream
        self.lock = anyio.Lock()

    def resolve(self, retry=False):
        self.endpoint = resolve(self.connections_dir, self.workspace_id, os.path.realpath(os.getcwd()), os.environ,
                                retry)
        self.session_id = None
        return self.endpoint

    def headers(self):
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self.endpoint[1]:
            headers["Authorization"] = f"Bearer {self.endpoint[1]}"
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        if self.protocol_version:
            headers["mcp-protocol-version"] = self.protocol_version
        headers.update(bridge_headers())
        return headers

    async def post(self, payload):
        """POST one JSON-RPC message upstream; the decoded reply (None for 202), or Unreachable."""
        if self.endpoint is None:
            raise Unreachable("no endpoint")
        try:
            response = await self.http.post(self.endpoint[0], json=payload, headers=self.headers())
        except httpx2.HTTPError as exc:
            raise Unreachable(str(exc)) from None
        if response.status_code in REFUSED:
            raise Unreachable(f"HTTP {response.status_code}")
        if response.headers.get("mcp-session-id"):
            self.session_id = response.headers["mcp-session-id"]
        if response.status_code == 202 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return last_sse_message(response.text)
        return response.json()

    async def connect(self, retry=False):
        """Find an endpoint and replay the client's initialize to it (once per upstream)."""
        if self.resolve(retry) is None:
            raise Unreachable("no endpoint")
        if self.initialize is not None:
            reply = await self.post(self.initialize)
            result = (reply or {}).get("result") or {}
            self.protocol_version = result.get("protocolVersion", self.protocol_version)
            await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def relay(self, payload):
        """Send upstream, reconnecting once when refused or unreachable."""
        async with self.lock:
            if self.endpoint is None:
                await self.connect()
        try:
            return await self.post(payload)
        except Unreachable:
            async with self.lock:
                await self.connect(retry=True)
            return await self.post(payload)

    async def close(self):
        """End the upstream protocol session (so the workspace stops listing this agent); best effort."""
        if self.endpoint is None or not self.session_id:
            return
        with anyio.move_on_after(2):
            try:
                await self.http.delete(self.endpoint[0], headers=self.headers())
            except httpx2.HTTPError:
                pass

    # -- answering ------------------------------------------------------------------------

    async def handle(self, message):
        """The reply to one client message (None for notifications)."""
        root = message.root if hasattr(message, "root") else message
        payload = root.model_dump(by_alias=True, exclude_none=True, mode="json")
        method = payload.get("method")
        is_request = "id" in payload and method is not None
        if method == "server/discover":
            return error(payload["id"], types.METHOD_NOT_FOUND, "server/discover is not relayed; use initialize")
        if method == "initialize":
            self.initialize = payload
            self.protocol_version = None
            for retry in (False, True):
                try:
                    async with self.lock:
                        if self.resolve(retry) is None:
                            raise Unreachable("no endpoint")
                        reply = await self.post(payload)
                    self.protocol_version = ((reply or {}).get("result") or {}).get("protocolVersion")
                    return reply
                except Unreachable:
                    self.endpoint = None
            return offline_initialize(payload)
        try:
            reply = await self.relay(payload)
        except Unreachable as exc:
            self.endpoint = None
            return offline_answer(payload, str(exc), self.workspace_id) if is_request else None
        except (ValueError, httpx2.HTTPError) as exc:  # the connection died mid-request: it may have run
            return error(payload["id"], types.INTERNAL_ERROR, f"Lost the connection to Positron: {exc}") \
                if is_request else None
        return reply if is_request else None


def bridge_headers():
    """Who is relaying (shown as the client's pid and working_directory in the workspace's status)."""
    return {BRIDGE_PID_HEADER: str(os.getpid()), BRIDGE_CWD_HEADER: quote(os.getcwd())}


def last_sse_message(text):
    data = None
    for line in text.splitlines():
        if line.startswith("data:"):
            try:
                data = json.loads(line[5:].strip())
            except ValueError:
                continue
    return data


def error(request_id, code, message):
    return types.JSONRPCError(jsonrpc="2.0", id=request_id,
                              error=types.ErrorData(code=code, message=message)).model_dump(
        by_alias=True, exclude_none=True, mode="json")


def result(request_id, value):
    return {"jsonrpc": "2.0", "id": request_id,
            "result": value.model_dump(by_alias=True, exclude_none=True, mode="json")}


def offline_initialize(payload):
    wanted = (payload.get("params") or {}).get("protocolVersion")
    version = wanted if wanted in HANDSHAKE_VERSIONS else PROTOCOL_FALLBACK
    init = types.InitializeResult(
        protocol_version=version,
        capabilities=types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False)),
        server_info=types.Implementation(name="positron", title="Positron", version=VERSION,
                                         description="The user's live Positron interpreter sessions and IDE"),
        instructions=INSTRUCTIONS)
    return result(payload["id"], init)


def offline_answer(payload, why, workspace_id):
    method = payload["method"]
    if method == "ping":
        return {"jsonrpc": "2.0", "id": payload["id"], "result": {}}
    if method == "tools/list":
        return result(payload["id"], types.ListToolsResult(tools=TOOLS))
    if method == "tools/call":
        if workspace_id:
            code, text = "POSITRON_NOT_RUNNING", (f"Positron's workspace {workspace_id} is not reachable ({why}). "
                                                  "Start Positron on that folder with AI features on, then retry.")
        else:
            code, text = "NO_WORKSPACE", ("No Positron workspace found: set POSITRON_MCP_URL and POSITRON_MCP_TOKEN, "
                                          "pass --workspace with --connections, or run from a workspace folder.")
        call = types.CallToolResult(content=[types.TextContent(type="text", text=f"{code}: {text}")],
                                    structured_content={"status": "error", "error": {"code": code, "message": text}},
                                    is_error=True)
        return result(payload["id"], call)
    return error(payload["id"], types.METHOD_NOT_FOUND, f"{method} is not available while Positron is offline")


async def serve(connections_dir, workspace_id):
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=5.0)) as http:
        bridge = Bridge(connections_dir, workspace_id, http)
        async with stdio_server() as (read_stream, write_stream):

            async def answer(message):
                reply = await bridge.handle(message)
                if reply is not None:
                    await write_stream.send(SessionMessage(types.jsonrpc_message_adapter.validate_python(reply)))

            async with anyio.create_task_group() as tasks:
                async for item in read_stream:
                    if isinstance(item, Exception):
                        log.warning("mcp-stdio: unreadable message: %s", item)
                        continue
                    tasks.start_soon(answer, item.message)
                tasks.cancel_scope.cancel()  # stdin is closed: the agent is gone
            await write_stream.aclose()  # ends the transport's writer, so the bridge exits
        await bridge.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kcgevent mcp-stdio", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default=default_connections_dir(),
                        help="Positron's MCP connections directory (<globalStorage>/mcp)")
    parser.add_argument("--workspace", help="the workspace id to connect to")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    anyio.run(serve, args.connections, args.workspace)

"""MCP workspaces: the records Positron registers, their windows, and command brokering.

A workspace is what one Positron window (or several windows on the same
folder) registers with `POST /mcp/workspaces`: an id, a display name and a
token for agents. Its record outlives the windows' channels: the token, the
command catalog, the sessions the windows claimed and the foreground session
all survive a window closing, so terminal agents keep working.

Everything here runs on the gevent hub. The agents' listener (another
thread) only reads `items` (plain dict reads; tokens compared in constant time) and calls in through
`gevent`'s thread-safe callback for anything else.
"""
import logging
import re
import secrets
import time
import uuid

import gevent
from gevent.event import AsyncResult, Event

from ..errors import ApiError
from ..session.wire import dumps, rfc3339

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
TOKEN_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SLUG_LIMIT = 24


def iso_now():
    return rfc3339(time.time())


def slug(display_name):
    """Lowercase ASCII alphanumerics with single hyphens, at most 24 characters."""
    text = re.sub(r"[^a-z0-9]+", "-", (display_name or "").lower()).strip("-")[:SLUG_LIMIT].strip("-")
    return text or "workspace"


def mint_id(display_name):
    suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
    return f"{slug(display_name)}-{suffix}"


def valid_id(workspace_id):
    """A supplied id must be safe in a URL path segment (the route-injection guard)."""
    return isinstance(workspace_id, str) and bool(ID_PATTERN.match(workspace_id))


def valid_token(token):
    return isinstance(token, str) and bool(TOKEN_PATTERN.match(token))


def tokens_equal(given, expected):
    return secrets.compare_digest(given.encode(), expected.encode())


class CommandFailed(Exception):
    """A brokered command did not produce a result: `code` for the agent, plus details."""

    def __init__(self, code, message, **details):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class Window:
    """One attached workspace channel (a Positron window)."""

    def __init__(self, workspace, ws):
        self.workspace = workspace
        self.ws = ws
        self.focus_seq = 0
        self.attached_seq = 0
        self.positron_version = None

    def send(self, frame):
        self.ws.send(dumps(frame))


class Pending:
    """A command_request waiting for its window's command_reply."""

    def __init__(self, request_id, window):
        self.request_id = request_id
        self.window = window
        self.result = AsyncResult()


class Workspace:
    def __init__(self, workspace_id, display_name, token):
        self.id = workspace_id
        self.display_name = display_name
        self.token = token
        self.commands = []  # the catalog the windows sent (AgentCommand objects)
        self.claimed = set()  # session ids the windows reported
        self.foreground = None
        self.positron_version = None
        self.windows = []
        self.pending = {}
        self.clients = {}  # MCP protocol session id -> McpClient dict
        self.next_client_id = 1
        self.attached = Event()  # set while a window is attached
        self.disconnected_since = iso_now()
        self.removed = False
        self._seq = 0

    def next_seq(self):
        self._seq += 1
        return self._seq

    @property
    def connected(self):
        return bool(self.windows)

    def serving_window(self):
        """The last-focused window; if none ever reported focus, the most recently attached one."""
        if not self.windows:
            return None
        return max(self.windows, key=lambda w: (w.focus_seq, w.attached_seq))

    def status(self):
        return {"id": self.id, "display_name": self.display_name, "connected": self.connected,
                "clients": sorted(self.clients.values(), key=lambda c: c["id"])}


class Workspaces:
    """The registry, plus the agents' listener it starts with the first workspace."""

    def __init__(self, supervisor, listener_factory=None):
        self.supervisor = supervisor
        self.items = {}
        self.by_token = {}
        self.request_count = 0
        self.listener = None
        self._listener_factory = listener_factory

    # -- registration --------------------------------------------------------------

    def register(self, body):
        """Create or refresh a workspace; returns (McpWorkspace dict, created)."""
        self._ensure_listener(body.get("preferred_port"))  # first: a listener that fails records nothing
        display_name = str(body.get("display_name") or "").strip() or "workspace"
        wanted = body.get("workspace_id")
        workspace_id = wanted if valid_id(wanted) else None
        if wanted and workspace_id is None:
            log.warning("MCP: workspace id %r is not usable; minting a new one", wanted)
        created = False
        workspace = self.items.get(workspace_id) if workspace_id else None
        if workspace is None:
            if workspace_id is None:
                workspace_id = mint_id(display_name)
                while workspace_id in self.items:
                    workspace_id = mint_id(display_name)
            token = body.get("token")
            if not valid_token(token) or token in self.by_token:
                token = secrets.token_hex(32)
            workspace = Workspace(workspace_id, display_name, token)
            self.items[workspace_id] = workspace
            self.by_token[token] = workspace
            created = True
        else:
            workspace.display_name = display_name
        return self.describe(workspace), created

    def describe(self, workspace):
        port = self.listener.port
        return {"workspace_id": workspace.id, "token": workspace.token, "port": port,
                "url": f"http://127.0.0.1:{port}/mcp/w/{workspace.id}"}

    def deregister(self, workspace_id):
        """Remove a workspace (False if unknown); the listener stops with the last one."""
        workspace = self.items.pop(workspace_id, None)
        if workspace is None:
            return False
        self.by_token.pop(workspace.token, None)
        workspace.removed = True
        workspace.attached.set()  # wake brokered calls waiting for a window: they fail now
        for pending in list(workspace.pending.values()):
            pending.result.set(("gone", None))
        for window in list(workspace.windows):
            window.ws.close(1001, "workspace deregistered")
        if not self.items:
            self._stop_listener()
        return True

    def get(self, workspace_id):
        return self.items.get(workspace_id)

    # -- the agents' listener --------------------------------------------------------

    def _ensure_listener(self, preferred_port):
        if self.listener is not None:
            if preferred_port:
                log.info("MCP: listener already on port %d; preferred port %s ignored", self.listener.port,
                         preferred_port)
            return
        factory = self._listener_factory
        if factory is None:
            from .listener import McpListener as factory
        listener = factory(self, preferred_port or 0)
        try:
            listener.start()
        except (OSError, RuntimeError) as exc:
            log.error("MCP: the agents' listener could not start: %s", exc)
            raise ApiError(500, "500", f"The MCP listener for agents could not start: {exc}") from None
        self.listener = listener

    def _stop_listener(self):
        listener, self.listener = self.listener, None
        self.request_count = 0
        if listener is not None:
            listener.stop()

    def shutdown(self):
        for workspace_id in list(self.items):
            self.deregister(workspace_id)
        self._stop_listener()

    def status(self):
        if self.listener is None:
            return {"active": False, "port": 0, "request_count": 0, "workspaces": []}
        self._forget_gone_clients()
        return {"active": True, "port": self.listener.port, "request_count": self.request_count,
                "workspaces": [self.items[k].status() for k in sorted(self.items)]}

    def kernel_env(self, session):
        """POSITRON_MCP_URL / _TOKEN for a kernel of a registered workspace (else nothing)."""
        workspace = self.items.get(session.spec.get("workspace_id") or "")
        if workspace is None or self.listener is None:
            return {}
        url = f"http://127.0.0.1:{self.listener.port}/mcp/w/{workspace.id}/s/{session.session_id}"
        return {"POSITRON_MCP_URL": url, "POSITRON_MCP_TOKEN": workspace.token}

    # -- agents (MCP clients) ---------------------------------------------------------

    def client_connected(self, workspace, mcp_session_id, client_info, caller_session=None, bridge=None):
        """An agent initialized a protocol session; `bridge` is (pid, cwd) when it came through mcp-stdio."""
        info = client_info or {}
        client = {"id": workspace.next_client_id, "connected_at": iso_now()}
        workspace.next_client_id += 1
        for key in ("name", "version"):
            if isinstance(info.get(key), str):
                client[key] = info[key]
        pid, cwd = bridge or (None, None)
        if pid is not None:
            client["pid"] = pid
        if cwd:
            client["working_directory"] = cwd
        if caller_session:
            client["session_id"] = caller_session
        workspace.clients[mcp_session_id] = client
        self._clients_changed(workspace)

    def client_disconnected(self, workspace, mcp_session_id):
        if workspace.clients.pop(mcp_session_id, None) is not None:
            self._clients_changed(workspace)

    def _forget_gone_clients(self):
        """Agents that vanished without a DELETE leave when the SDK ends their idle session."""
        live = getattr(self.listener, "live_sessions", lambda: None)()
        if live is None:
            return
        for workspace in self.items.values():
            for session_id in [s for s in workspace.clients if s not in live]:
                self.client_disconnected(workspace, session_id)

    def _clients_changed(self, workspace):
        frame = {"kind": "clients_changed", "clients": workspace.status()["clients"]}
        for window in list(workspace.windows):
            gevent.spawn(self._send_quietly, window, frame)

    @staticmethod
    def _send_quietly(window, frame):
        try:
            window.send(frame)
        except Exception:  # the window's reader notices the broken connection
            log.debug("MCP: frame to a window not sent", exc_info=True)

    # -- windows ------------------------------------------------------------------------

    def attach(self, workspace, ws):
        window = Window(workspace, ws)
        window.attached_seq = workspace.next_seq()
        workspace.windows.append(window)
        workspace.attached.set()
        self._send_quietly(window, {"kind": "clients_changed", "clients": workspace.status()["clients"]})
        return window

    def detach(self, window):
        workspace = window.workspace
        if window not in workspace.windows:
            return
        workspace.windows.remove(window)
        if not workspace.windows:
            workspace.attached.clear()
            workspace.disconnected_since = iso_now()
        for pending in list(workspace.pending.values()):
            if pending.window is window:
                pending.result.set(("detached", None))

    def on_frame(self, window, frame):
        """One JSON frame from a window (unknown kinds are ignored)."""
        workspace = window.workspace
        kind = frame.get("kind")
        if kind == "hello":
            window.positron_version = workspace.positron_version = frame.get("positron_version")
            if isinstance(frame.get("commands"), list):
                workspace.commands = frame["commands"]
            if isinstance(frame.get("session_ids"), list):
                workspace.claimed = {s for s in frame["session_ids"] if isinstance(s, str)}
            if "foreground_session_id" in frame:
                workspace.foreground = frame.get("foreground_session_id")
            if frame.get("focused"):
                window.focus_seq = workspace.next_seq()
        elif kind == "commands_changed" and isinstance(frame.get("commands"), list):
            workspace.commands = frame["commands"]
        elif kind == "foreground_changed":
            workspace.foreground = frame.get("session_id")
        elif kind == "sessions_changed" and isinstance(frame.get("session_ids"), list):
            workspace.claimed = {s for s in frame["session_ids"] if isinstance(s, str)}
        elif kind == "focused":
            window.focus_seq = workspace.next_seq()
        elif kind == "command_reply":
            pending = workspace.pending.get(frame.get("id"))
            if pending is not None and pending.window is window:
                pending.result.set(("reply", frame))
            # else: a reply after its timeout (or for another window's request): ignored

    # -- brokering -------------------------------------------------------------------

    def run_command(self, workspace, command_id, args, agent):
        """Run a Positron command in the last-focused window; return (result, elapsed_ms).

        Waits (bounded) for a window to attach, re-dispatches to a sibling when the
        serving window detaches, and gives up after the reply deadline.
        """
        config = self.supervisor.config
        attach_wait = getattr(config, "mcp_attach_timeout", 15.0)
        reply_wait = getattr(config, "mcp_command_timeout", 45.0)
        started = time.monotonic()
        request_id = str(uuid.uuid4())
        attach_deadline = started + attach_wait
        reply_deadline = None
        while True:
            if workspace.removed:
                raise CommandFailed("POSITRON_DISCONNECTED", "The workspace is no longer registered")
            window = workspace.serving_window()
            if window is None:
                if reply_deadline is not None:  # the serving window left and no sibling is attached
                    raise CommandFailed("POSITRON_DISCONNECTED", "The Positron window running the command "
                                        "closed and no other window is attached",
                                        positron_disconnected_since=workspace.disconnected_since)
                if not workspace.attached.wait(max(0.0, attach_deadline - time.monotonic())):
                    raise CommandFailed("POSITRON_DISCONNECTED", f"No Positron window attached within "
                                        f"{attach_wait:g} s", positron_disconnected_since=workspace.disconnected_since)
                continue
            if reply_deadline is None:
                reply_deadline = time.monotonic() + reply_wait
            remaining = max(0.0, reply_deadline - time.monotonic())
            pending = Pending(request_id, window)
            workspace.pending[request_id] = pending
            try:
                window.send({"kind": "command_request", "id": request_id, "command_id": command_id,
                             "args": list(args or []), "agent": agent or {},
                             "deadline_ms": int(remaining * 1000)})
            except Exception:
                self.detach(window)
                workspace.pending.pop(request_id, None)
                continue
            try:
                outcome, reply = pending.result.get(timeout=remaining)
            except gevent.Timeout:
                raise CommandFailed("timeout", f"Positron did not answer within {reply_wait:g} s",
                                    reason="timeout") from None
            finally:
                workspace.pending.pop(request_id, None)
            if outcome == "detached":
                continue
            if outcome == "gone":
                raise CommandFailed("POSITRON_DISCONNECTED", "The workspace is no longer registered")
            elapsed = int((time.monotonic() - started) * 1000)
            if reply.get("ok"):
                return reply.get("result"), elapsed
            reason = reply.get("reason") or "error"
            raise CommandFailed("COMMAND_FAILED", reply.get("message") or f"The command failed ({reason})",
                                reason=reason)

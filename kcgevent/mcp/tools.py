"""The six tools agents get, run on the gevent hub against the same session verbs as any client.

`call_tool` returns an `mcp_types.CallToolResult`. A failure is an `isError`
result whose text starts with the error code (`SESSION_NOT_FOUND: ...`) and
whose structured content carries `{error: {code, message}}`; every result is
decorated with whether Positron is connected.
"""
import json
import time

import mcp_types as types

from ..config import VERSION
from ..errors import ApiError
from ..session import execute as execute_mod
from .workspaces import CommandFailed

TEXT_BUDGET = 32 * 1024  # stdout, stderr and the result's text share it
DEFAULT_TIMEOUT = 60
MAX_TIMEOUT = 600
IMAGE_TYPES = ("image/png", "image/jpeg")
START_CONSOLE = "workbench.action.language.runtime.startNewConsoleSession"

INSTRUCTIONS = """\
These tools reach the user's live Positron interpreter sessions (Python, R, ...) and the IDE itself.
Prefer execute_code and evaluate_code over shelling out to run code: they run in the session the user
sees, with its variables and packages. Call list_sessions first to see what is running. Use
evaluate_code to inspect state (it leaves no trace in the console history and refuses to queue behind
running code unless wait is true); use execute_code for work the user should see. interrupt_session
stops runaway code. list_positron_commands and run_positron_command drive the IDE."""

CALLER_NOTE = """

You are running inside one of these sessions: code aimed at your own session is refused
(SESSION_IS_CALLER), since it would wait for itself."""

_CODE_INPUT = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "The code to run."},
        "session_id": {"type": "string", "description": "Target session (default: the foreground one)."},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT,
                      "description": f"Seconds before the kernel is interrupted (default {DEFAULT_TIMEOUT})."},
        "wait": {"type": "boolean", "description": "Wait for a busy session instead of failing."},
    },
    "required": ["code"],
}

TOOLS = [
    types.Tool(name="list_sessions", title="List sessions",
               description="The interpreter sessions of this Positron workspace (never starts one).",
               input_schema={"type": "object", "properties": {}},
               annotations=types.ToolAnnotations(read_only_hint=True)),
    types.Tool(name="execute_code", title="Execute code",
               description="Run code in a session as if typed in its console (queued behind running code); "
                           "returns stdout, stderr, the result and images.",
               input_schema=_CODE_INPUT),
    types.Tool(name="evaluate_code", title="Evaluate code",
               description="Run code for inspection: no console history entry, no execution count; fails with "
                           "RUNTIME_BUSY while the session is busy unless wait is true.",
               input_schema=_CODE_INPUT),
    types.Tool(name="interrupt_session", title="Interrupt a session",
               description="Interrupt the code running in a session.",
               input_schema={"type": "object", "properties": {"session_id": {"type": "string"}}}),
    types.Tool(name="list_positron_commands", title="List Positron commands",
               description="Search the Positron commands agents may run (case-insensitive substring match).",
               input_schema={"type": "object", "properties": {"query": {"type": "string"},
                                                               "limit": {"type": "integer", "minimum": 1}}},
               annotations=types.ToolAnnotations(read_only_hint=True)),
    types.Tool(name="run_positron_command", title="Run a Positron command",
               description="Run a Positron command in the user's focused window and return its result.",
               input_schema={"type": "object", "properties": {"command_id": {"type": "string"},
                                                               "args": {"type": "array"}},
                             "required": ["command_id"]}),
]
TOOL_NAMES = [tool.name for tool in TOOLS]


class ToolError(Exception):
    def __init__(self, code, message, **details):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class Call:
    """One tool call: the workspace it came through, the caller, the agent."""

    def __init__(self, registry, workspace, caller_session, client_info):
        self.registry = registry
        self.workspace = workspace
        self.caller_session = caller_session
        self.client_info = client_info or {}

    @property
    def sessions(self):
        return self.registry.supervisor.sessions

    def visible(self, session):
        owner = session.spec.get("workspace_id")
        if owner == self.workspace.id:
            return True
        return session.session_id in self.workspace.claimed and (not owner or self.registry.get(owner) is None)

    def resolve(self, session_id):
        if session_id:
            session = self.sessions.get(session_id)
            if session is None:
                raise ToolError("SESSION_NOT_FOUND", f"There is no session {session_id}")
            if not self.visible(session):
                raise ToolError("SESSION_NOT_VISIBLE", f"Session {session_id} belongs to another workspace")
            return session
        visible = [s for s in self.sessions.values() if self.visible(s)]
        foreground = self.sessions.get(self.workspace.foreground or "")
        if foreground is not None and self.visible(foreground):
            return foreground
        if len(visible) == 1:
            return visible[0]
        if not visible:
            raise ToolError("NO_SESSION_SELECTED", "There is no session in this workspace; start one in Positron "
                            f"(command {START_CONSOLE})", candidates=[])
        raise ToolError("NO_SESSION_SELECTED", "Several sessions are running and none is in the foreground; "
                        "pass session_id", candidates=[s.session_id for s in visible])

    def attribution(self, tool):
        attribution = {"source": "agent"}
        if isinstance(self.client_info.get("name"), str):
            attribution["agent_name"] = self.client_info["name"]
        if isinstance(self.client_info.get("version"), str):
            attribution["agent_version"] = self.client_info["version"]
        attribution["workspace_id"] = self.workspace.id
        attribution["tool"] = tool
        return attribution

    def decorate(self, structured):
        workspace = self.workspace
        structured["positron_connected"] = workspace.connected
        if not workspace.connected:
            structured["positron_disconnected_since"] = workspace.disconnected_since
        if workspace.positron_version:
            structured["positron_version"] = workspace.positron_version
        structured["server_version"] = VERSION
        return structured

    def meta(self):
        return {"positron_connected": self.workspace.connected,
                "positron_workspace": {"id": self.workspace.id, "name": self.workspace.display_name}}


# -- the tools ----------------------------------------------------------------------------


def list_sessions(call, args):
    rows, others = [], 0
    for session in call.sessions.values():
        if not call.visible(session):
            others += 1
            continue
        row = {"session_id": session.session_id, "display_name": session.spec.get("display_name", ""),
               "language": session.spec.get("language", ""), "mode": session.spec.get("session_mode", "console"),
               "status": session.status, "working_directory": session.working_directory,
               "queue_length": len(session.queue.pending) + (1 if session.queue.active else 0),
               "is_foreground": session.session_id == call.workspace.foreground}
        if call.caller_session:
            row["is_your_own_session"] = session.session_id == call.caller_session
        rows.append(row)
    return {"sessions": rows, "workspace": {"id": call.workspace.id, "name": call.workspace.display_name},
            "sessions_in_other_workspaces": others}, []


def _timeout(args):
    value = args.get("timeout_s", DEFAULT_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ToolError("INVALID_ARGUMENT", "timeout_s must be a positive number of seconds")
    return min(float(value), MAX_TIMEOUT)


def run_code(call, args, tool):
    code = args.get("code")
    if not isinstance(code, str):
        raise ToolError("INVALID_ARGUMENT", "code must be a string")
    timeout = _timeout(args)
    session = call.resolve(args.get("session_id"))
    if call.caller_session and session.session_id == call.caller_session:
        raise ToolError("SESSION_IS_CALLER", "This is the session you are running in: code sent to it would "
                        "wait for you to finish")
    busy = session.status == "busy" or session.queue.active is not None
    if tool == "evaluate_code" and busy and not args.get("wait"):
        raise ToolError("RUNTIME_BUSY", f"Session {session.session_id} is busy; pass wait: true to queue behind "
                        "the running code")
    started = time.monotonic()
    try:
        reply = execute_mod.execute(session, code, store_history=tool == "execute_code", timeout=timeout,
                                    attribution=call.attribution(tool))
    except execute_mod.ExecutionFailed as exc:
        code_ = "timed_out" if exc.code == "timeout" else exc.code
        raise ToolError(code_, exc.message, session_id=session.session_id) from None
    return shape_code_result(reply, session.session_id, int((time.monotonic() - started) * 1000))


def shape_code_result(reply, session_id, elapsed_ms):
    """ExecuteReply -> (structured content, image blocks), text within the shared budget."""
    stdout = "".join(o["text"] for o in reply["output"] if o["type"] == "stream" and o["stream_name"] != "stderr")
    stderr = "".join(o["text"] for o in reply["output"] if o["type"] == "stream" and o["stream_name"] == "stderr")
    bundles = [o["data"] for o in reply["output"] if o["type"] == "display_data"]
    if reply.get("data"):
        bundles.append(reply["data"])
    images = []
    for bundle in bundles:
        for mime in IMAGE_TYPES:
            if isinstance(bundle.get(mime), str):
                images.append(types.ImageContent(type="image", data=bundle[mime].strip(), mime_type=mime))
    result = {k: v for k, v in (reply.get("data") or {}).items() if k not in IMAGE_TYPES}
    budget = Budget(TEXT_BUDGET)
    structured = {"status": reply["status"], "execution_count": reply["execution_count"],
                  "stdout": budget.take(stdout), "stderr": budget.take(stderr),
                  "result": {k: budget.take(v) for k, v in result.items()}, "images": len(images)}
    errors = [o for o in reply["output"] if o["type"] == "error"]
    if reply["status"] == "error" or errors:
        source = errors[-1] if errors else reply
        structured["error"] = {"name": source.get("error_name", ""), "message": source.get("error_message", ""),
                               "traceback": source.get("error_traceback", [])}
    structured.update(truncated=budget.clipped, session_id=session_id, elapsed_ms=elapsed_ms)
    return structured, images


class Budget:
    """A text budget shared by several fields; what does not fit is cut with a note."""

    def __init__(self, size):
        self.left = size
        self.clipped = False

    def take(self, text):
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= self.left:
            self.left -= len(data)
            return text
        self.clipped = True
        kept = data[:max(0, self.left)].decode("utf-8", "ignore")
        self.left = 0
        return kept + f"\n[... {len(data) - len(kept.encode())} bytes omitted ...]"


def interrupt_session(call, args):
    session = call.resolve(args.get("session_id"))
    try:
        session.interrupt()
    except ApiError as exc:
        raise ToolError("INTERRUPT_FAILED", exc.message, session_id=session.session_id) from None
    return {"status": "ok", "session_id": session.session_id}, []


def list_positron_commands(call, args):
    query = str(args.get("query") or "").lower()
    limit = args.get("limit") or 50
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ToolError("INVALID_ARGUMENT", "limit must be a positive integer")
    catalog = [c for c in call.workspace.commands if isinstance(c, dict)]

    def haystack(command):
        names = " ".join(str(a.get("name", "")) for a in command.get("args") or [] if isinstance(a, dict))
        return f"{command.get('id', '')} {command.get('description', '')} {names}".lower()

    matched = [c for c in catalog if query in haystack(c)]
    return {"commands": matched[:limit], "matched": len(matched), "total": len(catalog),
            "truncated": len(matched) > limit}, []


def run_positron_command(call, args):
    command_id = args.get("command_id")
    if not isinstance(command_id, str) or not command_id:
        raise ToolError("INVALID_ARGUMENT", "command_id must be a non-empty string")
    command_args = args.get("args") or []
    if not isinstance(command_args, list):
        raise ToolError("INVALID_ARGUMENT", "args must be an array")
    agent = {k: v for k, v in call.client_info.items() if k in ("name", "version") and isinstance(v, str)}
    try:
        result, elapsed = call.registry.run_command(call.workspace, command_id, command_args, agent)
    except CommandFailed as exc:
        raise ToolError(exc.code, exc.message, command_id=command_id, **exc.details) from None
    return {"status": "ok", "command_id": command_id, "result": result, "elapsed_ms": elapsed}, []


HANDLERS = {
    "list_sessions": list_sessions,
    "execute_code": lambda call, args: run_code(call, args, "execute_code"),
    "evaluate_code": lambda call, args: run_code(call, args, "evaluate_code"),
    "interrupt_session": interrupt_session,
    "list_positron_commands": list_positron_commands,
    "run_positron_command": run_positron_command,
}


def call_tool(registry, workspace_id, caller_session, client_info, name, arguments):
    """Run tool `name` (on the hub); always returns a CallToolResult."""
    workspace = registry.get(workspace_id)
    if workspace is None:
        return error_result("NO_WORKSPACE", f"The workspace {workspace_id} is no longer registered")
    registry.request_count += 1
    registry.supervisor.nudge()
    call = Call(registry, workspace, caller_session, client_info)
    handler = HANDLERS.get(name)
    try:
        if handler is None:
            raise ToolError("UNKNOWN_TOOL", f"There is no tool {name}; the tools are {', '.join(TOOL_NAMES)}")
        structured, images = handler(call, arguments or {})
    except ToolError as exc:
        return error_result(exc.code, exc.message, call, **exc.details)
    structured = call.decorate(structured)
    content = [types.TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))] + images
    return types.CallToolResult(content=content, structured_content=structured, is_error=False,
                                _meta=call.meta())


def error_result(code, message, call=None, **details):
    structured = {"status": "error", "error": {"code": code, "message": message}, **details}
    if call is not None:
        structured = call.decorate(structured)
    result = types.CallToolResult(content=[types.TextContent(type="text", text=f"{code}: {message}")],
                                  structured_content=structured, is_error=True,
                                  _meta=call.meta() if call is not None else None)
    return result

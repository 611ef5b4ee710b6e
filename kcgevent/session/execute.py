"""Running code for a caller that wants the result back (REST `execute`, the MCP tools).

The request goes through the session's execution queue exactly like a
WebSocket client's, so it waits behind running code and every attached client
sees its output. A collector keyed by msg_id gathers the kernel's answers;
the execution is complete when both the shell `execute_reply` and the iopub
`idle` have arrived. A deadline covers the whole execution: when it passes the
kernel is interrupted (so it is usable again) and the caller gets a timeout.

For agents, an `executionRequested` event goes on the session's channel
*before* the request is queued, so it precedes all of its iopub traffic (and
is kept for an absent client like any frame); the same attribution travels in
the request's `metadata.attribution`, which is how history learns the agent.
"""
import logging
import time

import gevent
from gevent.event import Event

from ..errors import ApiError
from . import wire

log = logging.getLogger(__name__)

READY_WAIT = 30.0  # seconds a starting kernel gets before an execute gives up
DROP_CHECK = 0.25  # seconds between checks that a queued request is still queued
STARTING = ("uninitialized", "starting", "ready")
OUTPUT_TYPES = ("stream", "display_data", "error", "execute_result", "execute_reply", "status")


class ExecutionFailed(ApiError):
    """An execute that could not run or finish; `code` is what callers (and MCP tools) report."""

    def __init__(self, status, code, message):
        super().__init__(status, code, message)


def mime_strings(data):
    """A MIME bundle with every value as text (non-strings rendered as JSON)."""
    out = {}
    for mime, value in (data or {}).items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "".join(value)
        out[mime] = value if isinstance(value, str) else wire.dumps(value).decode()
    return out


class Collector:
    """The kernel's answers to one execute_request, in order."""

    def __init__(self, msg_id):
        self.msg_id = msg_id
        self.output = []
        self.data = None
        self.result_metadata = {}
        self.reply = None
        self.got_idle = False
        self.done = Event()
        self.abandoned = None  # a reason, when the kernel went away first
        self.started = False  # the request reached the kernel (it was active, or answers came)

    def observe(self, msg_type, content):
        self.started = True
        if msg_type == "stream":
            self.output.append({"type": "stream", "stream_name": content.get("name", "stdout"),
                                "text": str(content.get("text", ""))})
        elif msg_type == "display_data":
            self.output.append({"type": "display_data", "data": mime_strings(content.get("data")),
                                "metadata": content.get("metadata") or {}})
        elif msg_type == "error":
            self.output.append({"type": "error", "error_name": str(content.get("ename", "")),
                                "error_message": str(content.get("evalue", "")),
                                "error_traceback": [str(t) for t in content.get("traceback") or []]})
        elif msg_type == "execute_result":
            self.data = mime_strings(content.get("data"))
            self.result_metadata = content.get("metadata") or {}
        elif msg_type == "execute_reply":
            self.reply = content
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.got_idle = True
        if self.reply is not None and self.got_idle:
            self.done.set()

    def abandon(self, reason):
        self.abandoned = reason
        self.done.set()

    def to_json(self):
        """The ExecuteReply."""
        reply = self.reply or {}
        status = "ok" if reply.get("status", "ok") == "ok" else "error"
        data = {"status": status, "execution_count": int(reply.get("execution_count") or 0),
                "output": self.output}
        if self.data is not None:
            data["data"] = self.data
        if status == "error":
            data["error_name"] = str(reply.get("ename", ""))
            data["error_message"] = str(reply.get("evalue", ""))
            data["error_traceback"] = [str(t) for t in reply.get("traceback") or []]
        return data


_last_parent = [b"", None]  # (raw parent header, its msg_id): a flood shares one parent


def parent_msg_id(msg):
    """The parent's msg_id, parsing each distinct parent header once."""
    raw = msg.parent_raw
    if raw != _last_parent[0]:
        _last_parent[0], _last_parent[1] = raw, msg.parent_msg_id
    return _last_parent[1]


def observe(session, msg):
    """Feed a kernel message to open history entries and collectors (called only while there are some)."""
    if msg.msg_type not in OUTPUT_TYPES:
        return
    try:
        parent = parent_msg_id(msg)
        if parent is None:
            return
        content = msg.content
        if not isinstance(content, dict):
            return
        record(session, parent, msg.msg_type, content)
    except ValueError:  # a parent or content that is not JSON: the relay passes it on, we skip it
        log.warning("session %s: %s message not recorded (unparsable)", session.session_id, msg.msg_type)


def record(session, parent_msg_id, msg_type, content):
    """Feed one answer to `parent_msg_id` to its open history entry and its collector, if any
    (also what the idle probe learns in place of a lost idle)."""
    if session.history.open:
        session.history.observe(parent_msg_id, msg_type, content)
    collector = session.collectors.get(parent_msg_id)
    if collector is not None:
        collector.observe(msg_type, content)


def abandon_all(session, reason):
    """The kernel is gone: nothing will finish the executions under way."""
    session.history.clear_open()
    for collector in list(session.collectors.values()):
        collector.abandon(reason)


def wait_until_ready(session, timeout=READY_WAIT):
    deadline = time.monotonic() + timeout
    while session.status in STARTING:
        if time.monotonic() >= deadline:
            raise ExecutionFailed(409, "SESSION_NOT_READY",
                                  f"Session {session.session_id} did not become ready within {timeout:.0f} s "
                                  f"(it is {session.status})")
        gevent.sleep(0.1)
    if session.connection is None or session.status in ("exited", "offline"):
        raise ExecutionFailed(409, "SESSION_NOT_READY",
                              f"Session {session.session_id} cannot run code: it is {session.status}")


def announce(session, msg_id, code, attribution):
    session.channel.event("executionRequested", {"msg_id": msg_id, "code": code,
                                                 "requested_at": wire.utc_now_iso(),
                                                 "attribution": attribution})


def execute(session, code, *, silent=False, store_history=True, stop_on_error=True, timeout=None,
            attribution=None, ready_wait=READY_WAIT):
    """Run `code` through the queue and return the ExecuteReply dict (blocks this greenlet).

    Raises ExecutionFailed: `SESSION_NOT_READY`, `timeout` (the kernel was
    interrupted), or `CHANNEL_CLOSED` (the kernel went away first).
    """
    wait_until_ready(session, ready_wait)
    msg_id = wire.new_msg_id()
    content = {"code": code, "silent": bool(silent), "store_history": bool(store_history),
               "user_expressions": {}, "allow_stdin": False, "stop_on_error": bool(stop_on_error)}
    metadata = {"attribution": attribution} if attribution else {}
    msg = wire.ClientMessage({"msg_id": msg_id, "msg_type": "execute_request"}, None, "shell", content,
                             metadata, [])
    collector = Collector(msg_id)
    session.collectors[msg_id] = collector
    try:
        if attribution:
            announce(session, msg_id, code, attribution)
        session._deliver(msg)
        _wait(session, msg, collector, timeout)
    finally:
        session.collectors.pop(msg_id, None)
    if collector.abandoned:
        raise ExecutionFailed(409, "CHANNEL_CLOSED", f"The kernel went away before the execution finished: "
                              f"{collector.abandoned}")
    return collector.to_json()


def _wait(session, msg, collector, timeout):
    """Wait for the collector; interrupt at the deadline; notice a request dropped from the queue."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            _interrupt_quietly(session, msg)
            raise ExecutionFailed(408, "timeout", f"The execution did not finish within {timeout:g} s; "
                                  "the kernel was interrupted")
        if collector.done.wait(DROP_CHECK if remaining is None else min(DROP_CHECK, remaining)):
            return
        queue = session.queue
        if queue.active is msg:
            collector.started = True
        elif not collector.started and msg not in queue.pending:
            # An interrupt (or a restart) cleared the queue before this request reached the kernel
            raise ExecutionFailed(409, "interrupted", "The execution was dropped from the queue before it "
                                  "ran (the session was interrupted or restarted)")


def _interrupt_quietly(session, msg):
    """Stop a timed-out execution: drop it from the queue if it never ran, else interrupt the kernel."""
    queue = session.queue
    if msg in queue.pending:
        queue.pending.remove(msg)
        return
    try:
        session.interrupt()
    except ApiError:
        pass

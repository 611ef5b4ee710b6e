"""Execution history: what ran in a session and what it printed, clipped to a small size.

Pure bookkeeping, no I/O. The session calls `started()` when an
execute_request goes to the kernel and `observe()` for kernel messages while
entries are open; `GET /sessions/{id}/history` serves the last 100 entries,
`ActiveSession.history` the last 3.

Clipping keeps each entry small however much the code printed: input and
output are capped at 4 KiB each, keeping the first and the most recent half
with a marker line `[... N bytes omitted ...]` between them (N = the bytes
left out); an error keeps its name (256 B), message (2 KiB) and the *end* of
its traceback, 4 KiB in all.
"""
import time
from collections import OrderedDict, deque

MAX_ENTRIES = 100
RECENT_ENTRIES = 3
TEXT_LIMIT = 4096
ERROR_LIMIT = 4096
ERROR_NAME_LIMIT = 256
ERROR_MESSAGE_LIMIT = 2048
OPEN_LIMIT = 64  # entries still taking output; older ones are closed (their kernel never finished them)


def _utf8_head(data, limit):
    return data[:limit].decode("utf-8", "ignore")


def _utf8_tail(data, limit):
    return data[len(data) - limit:].decode("utf-8", "ignore") if limit else ""


def clip_middle(text, limit=TEXT_LIMIT):
    """(text, clipped): keep the first and last halves of `limit` bytes, with a marker between."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, False
    half = limit // 2
    omitted = len(data) - 2 * half
    return f"{_utf8_head(data, half)}\n[... {omitted} bytes omitted ...]\n{_utf8_tail(data, half)}", True


def clip_head(text, limit):
    """(text, clipped): at most `limit` bytes from the start."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, False
    return _utf8_head(data, limit), True


def clip_error(name, message, traceback):
    """(error dict, clipped): name and message capped, the traceback's end kept within the budget."""
    name, cut_name = clip_head(str(name or ""), ERROR_NAME_LIMIT)
    message, cut_message = clip_head(str(message or ""), ERROR_MESSAGE_LIMIT)
    budget = ERROR_LIMIT - len(name.encode()) - len(message.encode())
    kept, cut_tb = [], False
    for line in reversed([str(line) for line in traceback or []]):
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > budget:
            cut_tb = True
            break
        kept.append(line)
        budget -= size
    kept.reverse()
    return {"name": name, "message": message, "traceback": kept}, cut_name or cut_message or cut_tb


def render_bundle(data):
    """The text of a MIME bundle in history: its text/plain, else the list of its types."""
    if not isinstance(data, dict):
        return ""
    text = data.get("text/plain")
    if isinstance(text, list):
        text = "".join(str(t) for t in text)
    if isinstance(text, str):
        return text
    return "[" + ", ".join(data) + "]"


class Entry:
    """One execution; its output is kept as head and tail bytes, clipped when rendered."""

    __slots__ = ("msg_id", "input", "head", "tail", "tail_bytes", "output_bytes", "error", "timestamp", "source",
                 "agent", "got_reply", "got_idle")

    def __init__(self, msg_id, code, timestamp_ms, attribution=None):
        self.msg_id = msg_id
        self.input = code
        self.head = b""  # the first TEXT_LIMIT bytes of the output
        self.tail = deque()  # chunks holding (at least) its last TEXT_LIMIT bytes
        self.tail_bytes = 0
        self.output_bytes = 0
        self.error = None
        self.timestamp = timestamp_ms
        attribution = attribution if isinstance(attribution, dict) else {}
        self.source = attribution.get("source")
        self.agent = attribution.get("agent_name")
        self.got_reply = False
        self.got_idle = False

    def add_output(self, text):
        """Append output, keeping only what the clipped form can show (memory stays bounded)."""
        data = text.encode("utf-8", "surrogatepass")
        self.output_bytes += len(data)
        if len(self.head) < TEXT_LIMIT:
            self.head += data[:TEXT_LIMIT - len(self.head)]
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes - len(self.tail[0]) >= TEXT_LIMIT:
            self.tail_bytes -= len(self.tail.popleft())

    def output_text(self):
        """(text, clipped): the output, its first and last halves around a marker if too long."""
        if self.output_bytes <= TEXT_LIMIT:
            return self.head.decode("utf-8", "replace"), False
        half = TEXT_LIMIT // 2
        omitted = self.output_bytes - 2 * half
        return (f"{_utf8_head(self.head, half)}\n[... {omitted} bytes omitted ...]\n"
                f"{_utf8_tail(b''.join(self.tail), half)}"), True

    def to_json(self):
        code, cut_in = clip_middle(self.input)
        output, cut_out = self.output_text()
        data = {"input": code, "output": output}
        cut_err = False
        if self.error is not None:
            data["error"], cut_err = clip_error(*self.error)
        data["timestamp"] = self.timestamp
        if self.source:
            data["source"] = self.source
        if self.agent:
            data["agent"] = self.agent
        data["truncated"] = cut_in or cut_out or cut_err
        return data


class ExecutionHistory:
    """The last `MAX_ENTRIES` executions of one session, oldest first."""

    def __init__(self, limit=MAX_ENTRIES):
        self.entries = deque(maxlen=limit)
        self.open = OrderedDict()  # msg_id -> Entry still receiving kernel messages

    def started(self, msg_id, content, metadata=None, now=None):
        """An execute_request went to the kernel; silent ones and agents' evaluate_code are not recorded."""
        attribution = (metadata or {}).get("attribution")
        if content.get("silent") or (isinstance(attribution, dict) and attribution.get("tool") == "evaluate_code"):
            return None
        code = content.get("code")
        if not isinstance(code, str):
            return None
        stamp = int((time.time() if now is None else now) * 1000)
        entry = Entry(msg_id, code, stamp, attribution)
        self.entries.append(entry)
        self.open[msg_id] = entry
        while len(self.open) > OPEN_LIMIT:
            self.open.popitem(last=False)
        return entry

    def observe(self, parent_msg_id, msg_type, content):
        """A kernel message whose parent is `parent_msg_id` (call only while `open` is not empty)."""
        entry = self.open.get(parent_msg_id)
        if entry is None:
            return
        if msg_type == "stream":
            entry.add_output(str(content.get("text", "")))
        elif msg_type in ("execute_result", "display_data"):
            entry.add_output(render_bundle(content.get("data")) + "\n")
        elif msg_type == "error":
            entry.error = (content.get("ename"), content.get("evalue"), content.get("traceback"))
        elif msg_type == "execute_reply":
            if content.get("status") == "error" and entry.error is None:
                entry.error = (content.get("ename"), content.get("evalue"), content.get("traceback"))
            entry.got_reply = True
        elif msg_type == "status" and content.get("execution_state") == "idle":
            entry.got_idle = True
        if entry.got_reply and entry.got_idle:
            del self.open[parent_msg_id]

    def to_json(self, last=None):
        entries = list(self.entries)
        if last is not None:
            entries = entries[-last:] if last else []
        return [entry.to_json() for entry in entries]

    def clear_open(self):
        """The kernel went away: nothing more will arrive for open entries."""
        self.open.clear()

"""One constructor per kernel event: the `{"kind":"kernel", <name>: payload}` frames
the server sends a session's client besides relayed Jupyter messages.

Each name and payload shape is the one in schemas/channel-server-message.json
(a test builds every event here and validates it there), so event names are
no longer free strings scattered through the code. Each returns the encoded
frame (bytes), ready for `Channel.publish` or `WebSocket.send`.
"""
import functools

from .wire import kernel_event

NAMES = ("status", "output", "exited", "executionQueued", "executionRequested", "workingDirChanged",
         "resourceUsage", "clientDisconnected", "handshakeCompleted", "messagesDropped", "outputGap", "error")


@functools.lru_cache(maxsize=64)
def status(state, reason):
    """The session status changed (`state` is one of the session statuses). (Two per execute,
    from a handful of (state, reason) pairs: the encoded frames are kept.)"""
    return kernel_event("status", {"status": state, "reason": reason})


def output(stream, text):
    """A line (or lines) the kernel process wrote on "stdout" or "stderr"."""
    return kernel_event("output", [stream, text])


def exited(code):
    """The kernel process exited (-1: killed by a signal)."""
    return kernel_event("exited", code)


def execution_queued(msg_id):
    """An execute_request was held: another one is running."""
    return kernel_event("executionQueued", msg_id)


def execution_requested(msg_id, code, requested_at, attribution):
    """An agent asked for an execution (sent before the request is queued); `attribution` says who."""
    return kernel_event("executionRequested", {"msg_id": msg_id, "code": code, "requested_at": requested_at,
                                               "attribution": attribution})


def working_dir_changed(path):
    return kernel_event("workingDirChanged", path)


def resource_usage(sample):
    """A ResourceSampler sample: cpu_percent, memory_bytes, thread_count, sampling_period_ms, timestamp."""
    return kernel_event("resourceUsage", sample)


def client_disconnected(reason):
    return kernel_event("clientDisconnected", reason)


def handshake_completed(session_id, connection_info):
    """The kernel reported its ports over the JEP 66 registration socket."""
    return kernel_event("handshakeCompleted", [session_id, connection_info])


def messages_dropped(first_seq, last_seq):
    """Frames `first_seq`..`last_seq` were dropped before any client received them."""
    return kernel_event("messagesDropped", {"count": last_seq - first_seq + 1, "first_seq": first_seq,
                                            "last_seq": last_seq})


def output_gap(reason):
    """Kernel messages may be missing here (the supervisor restarted while the kernel ran)."""
    return kernel_event("outputGap", {"reason": reason})


def error(code, message):
    """Something the client sent could not be handled (e.g. "invalid_message", "kernel_not_running")."""
    return kernel_event("error", {"code": code, "message": message})

"""The execution queue: one execute_request at the kernel at a time, the rest
held in FIFO order (clients see `executionQueued`), as Kallichore does.

The next request is released when the active one is finished, i.e. on its
iopub `idle` or its successful `execute_reply` (whichever comes first), not on
any idle: a comm message's idle must not release code early. After an error
reply only the idle releases it: ipykernel (stop_on_error) aborts requests that
reach it before it has finished with the failed one.
"""
from collections import deque


class ExecutionQueue:
    def __init__(self):
        self.active = None
        self.pending = deque()

    def submit(self, msg):
        """Queue `msg`; True if it became active (send it now), False if held."""
        if self.active is None:
            self.active = msg
            return True
        self.pending.append(msg)
        return False

    def finished(self, msg_id):
        """The request `msg_id` is done; return the next one to send, if any."""
        if self.active is None or msg_id is None or self.active.msg_id != msg_id:
            return None
        self.active = self.pending.popleft() if self.pending else None
        return self.active

    def clear_pending(self):
        self.pending.clear()

    def clear(self):
        self.active = None
        self.pending.clear()

    def to_json(self):
        data = {}
        if self.active is not None:
            data["active"] = self.active.as_json()
        data["length"] = len(self.pending)
        data["pending"] = [m.as_json() for m in self.pending]
        return data

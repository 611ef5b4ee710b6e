"""Getting a session out of `busy` when the kernel's `idle` never arrives.

A session's status follows the kernel's iopub `status` messages. ipykernel publishes them through an
XPUB socket with ZeroMQ's default send high-water mark (1,000 messages per subscriber), and a PUB
socket whose queue to a subscriber is full drops what it is given, silently. The queue fills when
the kernel publishes faster than its socket to us drains, for longer than the OS socket buffer in
between can absorb: a burst of small messages on a busy machine (measured: flushed prints over ipc
lost hundreds to thousands of messages in 3 runs of 8; tests/test_idle_probe.py freezes the server
to lose an idle on purpose). Our SUB takes everything (RCVHWM 0, read by libzmq's own I/O thread,
which needs no GIL), but it cannot get back what the kernel never sent. When the `idle` that ends an
execution is among what goes, the session would stay `busy` for good: GET /status says busy, idle
shutdown never comes, and a REST execute waits for that idle until its own deadline.

The check costs nothing per message: when the execute_reply of the queue's active request arrives
before its idle (as usual: the idle follows within milliseconds), a timer is armed; the session
leaving `busy` stops it before it fires. If it fires with the session still busy and no later
execution of the queue under way (after an error reply the queue waits for the idle, so it may still
hold the request whose idle is lost), we ask the kernel: a kernel_info_request of our own on shell,
which waits there behind whatever the kernel is still doing, and whose answers are never relayed
(`KernelConnection.internal`). The iopub `idle` of that request is the kernel itself saying it is
idle now: the session becomes `idle` (clients get the supervisor's `status` event; no Jupyter
message is made up), the lost idle is logged as a warning, a history entry or REST execute waiting
for that idle is completed, and the queue moves on. If that idle is lost too, we ask again,
PROBE_ATTEMPTS times in all.
"""
import logging

import gevent
from gevent.hub import get_hub

from . import execute as execute_mod
from . import wire

log = logging.getLogger(__name__)

PROBE_DELAY = 3.0  # seconds after an execute_reply without its idle before the kernel is asked
PROBE_ATTEMPTS = 3  # kernel_info requests sent for one missing idle, each waiting PROBE_DELAY for its idle
IDLE = {"execution_state": "idle"}
REASON = "kernel_info_reply after a lost idle"


class IdleProbe:
    """One per session: notices an execute_reply whose idle does not follow, and asks the kernel."""

    def __init__(self, session, delay=PROBE_DELAY):
        self.session = session
        self.delay = delay  # 0 or less: never ask
        self.lost_for = None  # msg_id of the execute whose reply came before its idle
        self.probe_id = None  # msg_id of our latest kernel_info request
        self._probe_conn = None  # the connection it went on
        self._replied = False  # its reply has arrived (its idle should follow)
        # msg_id -> (connection, answers seen) of each request of ours still in the connection's
        # `internal` set: an id leaves it once both its reply and its idle came (either may come first)
        self._unanswered = {}
        self._attempts = 0
        self._timer = None  # made on first use; repeating, restarted with again() (see kernel.py)

    # -- from the relay (constant time) -----------------------------------------------------------

    def reply_arrived(self, msg_id):
        """An execute_reply arrived (before the queue moves on): expect its idle within `delay`.
        Only for the queue's active request: if its idle came first, the queue has moved on already.
        (The reply may also come before the request's busy: the pump reads shell before iopub.)"""
        active = self.session.queue.active
        if active is None or active.msg_id != msg_id or self.delay <= 0:
            return
        self.lost_for = msg_id
        self._attempts = 0
        timer = self._timer
        if timer is None:
            timer = self._timer = get_hub().loop.timer(self.delay, self.delay)
        timer.again(self._check)

    def not_busy(self):
        """The session left `busy` (the idle came, or the kernel went): nothing to recover."""
        if self._timer is not None:
            self._timer.stop()
        self.lost_for = None

    # -- the check ---------------------------------------------------------------------------------

    def _check(self):
        """The timer fired (in the hub: nothing here may block; the probe is sent by a greenlet)."""
        self._timer.stop()
        session = self.session
        conn = session.connection
        active = session.queue.active
        if session.status != "busy" or conn is None or (active is not None and active.msg_id != self.lost_for):
            return  # not our case: the next execution is under way, or the status moved on
        if self.probe_id is not None and self._probe_conn is conn and not self._replied:
            return  # the kernel has not reached our request yet: it is busy (its reply re-arms)
        if self._attempts >= PROBE_ATTEMPTS:
            log.warning("session %s: the kernel's idle for %s did not arrive, nor that of %d kernel_info "
                        "requests; the session stays busy", session.session_id, self.lost_for, self._attempts)
            return
        self._attempts += 1
        gevent.spawn(self._send_probe, conn)

    def _send_probe(self, conn):
        for old in [i for i, (c, _) in self._unanswered.items() if c.closed]:  # (kernels since replaced)
            del self._unanswered[old]
        msg_id = wire.new_msg_id()
        self.probe_id, self._probe_conn, self._replied = msg_id, conn, False
        self._unanswered[msg_id] = (conn, set())
        conn.on_internal = self.on_internal
        conn.internal.add(msg_id.encode())  # before sending: the pump may see its answers at once
        log.info("session %s: no idle after the execute_reply of %s; asking the kernel whether it is idle",
                 self.session.session_id, self.lost_for)
        try:
            conn.send("shell", "kernel_info_request", {}, msg_id=msg_id)
        except Exception:  # (the connection closed meanwhile: the session's exit handling takes over)
            log.debug("session %s: kernel_info probe not sent", self.session.session_id, exc_info=True)
            self._unanswered.pop(msg_id, None)
            self.probe_id = self._probe_conn = None

    # -- answers to our requests (KernelConnection.on_internal) ------------------------------------

    def on_internal(self, msg):
        """A kernel message answering one of the connection's own requests (never relayed)."""
        msg_id = msg.parent_msg_id
        entry = self._unanswered.get(msg_id)
        if entry is None:
            return  # a late answer to a start-up kernel_info
        conn, seen = entry
        if msg.channel == "shell" and msg.msg_type == "kernel_info_reply":
            answer = "reply"
        elif msg.channel == "iopub" and msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
            answer = "idle"
        else:
            return
        seen.add(answer)
        if len(seen) == 2:
            del self._unanswered[msg_id]
            conn.internal.discard(msg_id.encode())
        if msg_id != self.probe_id:
            return  # an earlier attempt's
        if answer == "reply":
            self._replied = True
            if "idle" not in seen and self.session.status == "busy" and self._timer is not None:
                self._timer.again(self._check)  # its idle should follow: ask again if it does not
            return
        self.probe_id = self._probe_conn = None
        if self._timer is not None:
            self._timer.stop()
        self._recover(conn)

    def _recover(self, conn):
        """The kernel published idle after serving our request: it is idle now."""
        session = self.session
        if session.status != "busy" or conn is not session.connection:
            return  # the execution's own idle came meanwhile (only late), or the kernel went
        lost = self.lost_for
        log.warning("session %s: the kernel's iopub idle for %s was lost (ZeroMQ drops what a full PUB queue is "
                    "given); the kernel's answer to our kernel_info says it is idle", session.session_id, lost)
        if lost is not None:
            execute_mod.record(session, lost, "status", IDLE)
        session.went_idle(lost, REASON, after_execute=True)

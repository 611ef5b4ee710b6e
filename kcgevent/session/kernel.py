"""ZeroMQ sockets to one kernel instance, and the pump greenlet that reads them.

One `KernelConnection` per kernel instance (a restart makes a new one). The
pump drains every readable socket before waiting again, so a burst of iopub
messages is handled in one go; sends come from any greenlet and are
serialized per socket so multipart messages never interleave.

The four kernel sockets are plain pyzmq sockets, not zmq.green ones:
zmq.green costs tens of microseconds per message on the relay's hot path (a
state watcher per socket firing on every FD signal, a Poller and two gevent
Timeouts built per poll). The pump drains the sockets it has reason to look
at, then waits; each socket's FD has a watcher, started once, that marks its
socket "unchecked" and wakes the pump, so no poll of all four is needed after
a wake, and messages arriving on several sockets at once leave in one
WebSocket write (the pump writes what each pass produced: Channel.flush_now).

ZeroMQ's FD is edge-triggered: it signals a change of state, and whoever next
processes the socket's commands (a recv, a send, zmq_poll) consumes the
signal. So a socket stays "unchecked" until a recv or a zmq_poll found it
empty (from then on its FD signals the next message), and after every send,
which may have consumed a signal meant for the pump, a zmq_poll of that
socket says whether the pump must look at it again (and wakes it if it waits).
"""
import logging
import struct
import time
import zlib

import gevent
import zmq
from gevent.hub import Waiter, get_hub
from gevent.lock import Semaphore
from zmq.backend import zmq_poll

from . import wire

log = logging.getLogger(__name__)

CHANNELS = ("shell", "control", "stdin", "iopub")
PUMP_BATCH = 100
# Per drain, ask zmq_poll before each of the first POLL_FIRST receives instead of receiving until
# zmq.Again: raising Again costs more than a poll (pyzmq builds the exception in Python, with an
# import), and a round trip's wake-ups bring one or two messages. Floods go on to Again.
POLL_FIRST = 4
# kernel_info at start: a request a second until the kernel answers, then (its iopub status lost to
# ZeroMQ's slow joiner: a fast kernel answers before our subscription reaches it) soon again
IOPUB_RETRY = 0.05  # seconds
PUMP_IDLE_WAKE = 1.0  # seconds: a safety net only; the pump is woken by its sockets
SEND_RETRY_WAKE = 0.05  # seconds: the same while a send waits for room (rare: HWM reached)
# pyzmq's own (Cython) recv/send/get, called directly on the hot path
_plain_recv = zmq.backend.Socket.recv
_plain_send = zmq.backend.Socket.send
_plain_get = zmq.backend.Socket.get
# plain ints: pyzmq's enums cost a Python-level call for every `|` or `&`
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
EVENTS, POLLIN, POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


def recv_ready_multipart(sock):
    """One whole message from a readable socket (raises zmq.Again if none).

    Frames are received uncopied because a Frame knows whether more parts
    follow: cheaper than asking the socket for RCVMORE after each part.
    """
    frame = _plain_recv(sock, NOBLOCK, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _plain_recv(sock, NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


def monitor_event(monitor):
    """The id of the next event on a socket monitor (zmq.Again if none). As zmq.utils.monitor's
    recv_monitor_message, which would import asyncio into the server (0.85 MiB) for these 6 bytes."""
    return struct.unpack("=hi", monitor.recv_multipart(NOBLOCK)[0][:6])[0]


HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_PHASES = 4
HEARTBEAT_TIMEOUT = 5.0


class KernelConnectError(Exception):
    """Connecting or the first kernel_info round trip failed.

    `kind` is "timeout", "aborted" (the process exited) or "error" (e.g. a bad signature).
    """

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


class KernelConnection:
    """shell/control/stdin DEALERs and an iopub SUB, connected to `info`."""

    def __init__(self, context, info, session_id, username, protocol_version):
        self.info = info
        self.session_id = session_id
        self.username = username
        self.protocol_version = protocol_version
        self.signer = wire.Signer(info.get("key", ""))
        self.context = context
        self.sockets = {}
        self._locks = {name: Semaphore() for name in CHANNELS}
        self.closed = False
        self.internal = set()  # msg_ids of our own kernel_info requests: their replies are not relayed
        self.on_internal = None  # called with each answer to them, once the pump runs (see idle_probe.py)
        self._handshake_monitors = {}  # channel name -> monitor socket, until its handshake is seen
        self._pump = None
        self._heartbeat = None
        self._hub = get_hub()
        self._index = {name: i for i, name in enumerate(CHANNELS)}
        self._poll_one = []  # [[(socket, POLLIN)]] the same, one list per socket
        # Per socket (CHANNELS order): may it hold messages nobody has looked for yet?
        self._unchecked = [True] * len(CHANNELS)
        self._watchers = []  # one read watcher per socket FD, started once (see _on_fd_signal)
        self._timer = None  # the safety-net wake-up of a wait, made once
        self._waiter = None  # the Waiter of whoever waits for readable sockets (pump or kernel_info)

    def url(self, port):
        transport = self.info.get("transport", "tcp")
        sep = ":" if transport == "tcp" else self.info.get("ipc_separator", "-")  # (see session/ipc.py)
        return f"{transport}://{self.info['ip']}{sep}{port}"

    def connect(self):
        identity = self.session_id.encode()
        for name in ("shell", "control", "stdin"):
            sock = self.context.socket(zmq.DEALER, socket_class=zmq.Socket)  # plain: see the module doc
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.setsockopt(zmq.LINGER, 0)
            self.sockets[name] = sock
            if name != "shell":
                self._watch_handshake(name)  # before connecting, or the event may come first
            sock.connect(self.url(self.info[f"{name}_port"]))
        iopub = self.context.socket(zmq.SUB, socket_class=zmq.Socket)
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        iopub.setsockopt(zmq.LINGER, 0)
        iopub.setsockopt(zmq.RCVHWM, 0)  # never drop output on our side
        iopub.connect(self.url(self.info["iopub_port"]))
        self.sockets["iopub"] = iopub
        loop = self._hub.loop
        for index, name in enumerate(CHANNELS):
            sock = self.sockets[name]
            self._poll_one.append([(sock, POLLIN)])
            watcher = loop.io(_plain_get(sock, zmq.FD), 1)
            watcher.start(self._on_fd_signal, index)
            self._watchers.append(watcher)
        # (repeating, restarted with again(): a one-shot gevent timer restarted after it fired once
        # fires at once, every time)
        self._timer = loop.timer(PUMP_IDLE_WAKE, PUMP_IDLE_WAKE)

    # -- sending -----------------------------------------------------------

    def header(self, msg_id, msg_type):
        return wire.make_header(msg_id, msg_type, self.session_id, self.username, self.protocol_version)

    def full_parent(self, parent):
        """Client parents carry msg_id/msg_type only; kernels want the full shape."""
        if not parent or "msg_id" not in parent:
            return {}
        full = self.header(parent["msg_id"], parent.get("msg_type", ""))
        for key in ("session", "username", "date", "version"):
            if parent.get(key):
                full[key] = parent[key]
        return full

    def send(self, channel, msg_type, content, *, msg_id=None, parent=None, metadata=None, buffers=()):
        """Sign and send one message; returns its msg_id."""
        msg_id = msg_id or wire.new_msg_id()
        frames = wire.serialize(self.signer, self.header(msg_id, msg_type), self.full_parent(parent),
                                metadata, content, buffers)
        sock = self.sockets[channel]
        with self._locks[channel]:
            while True:
                try:
                    _plain_send(sock, frames[0], NOBLOCK | SNDMORE)
                    break
                except zmq.Again:  # the queue is full (or no peer yet): wait cooperatively
                    self._wait_writable(sock)
            # Once the first part is queued, ZeroMQ takes the rest of the message.
            for frame in frames[1:-1]:
                _plain_send(sock, frame, SNDMORE)
            _plain_send(sock, frames[-1], 0)
        index = self._index[channel]
        if zmq_poll(self._poll_one[index], 0):
            # This send may have consumed the FD signal that would have told the pump.
            self._unchecked[index] = True
            waiter = self._waiter
            if waiter is not None:
                self._hub.loop.run_callback(waiter.switch, None)
        return msg_id

    def _wait_writable(self, sock):
        """Wait cooperatively until `sock` has room to send (re-checking EVENTS before each wait)."""
        watcher = self._hub.loop.io(_plain_get(sock, zmq.FD), 1)
        try:
            while not _plain_get(sock, EVENTS) & POLLOUT:
                # Another greenlet may consume the FD's signal first: wait briefly, then ask again.
                with gevent.Timeout(SEND_RETRY_WAKE, False):
                    self._hub.wait(watcher)
        finally:
            watcher.close()

    # -- receiving ---------------------------------------------------------

    def _on_fd_signal(self, index):
        """Socket `index`'s FD signalled: it may hold messages; wake whoever waits (nobody while
        the pump drains: it looks at the socket before waiting again)."""
        self._unchecked[index] = True
        self._wake()

    def _on_wait_timeout(self):
        """The safety net: look at every socket."""
        self._unchecked[:] = [True] * len(CHANNELS)
        self._wake()

    def _wake(self):
        """Switch to whoever waits in `_wait_readable` (from the hub's own callbacks), once."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(None)

    def _wait_readable(self, timeout):
        """Sleep until a socket's FD signals (marking it unchecked) or `timeout` (marking all).

        The FD watchers stay started for the connection's life: starting and stopping four
        watchers and a timer around every wait cost more than the message it waited for, and
        as each watcher names its socket, no zmq_poll of all four is needed after a wake."""
        waiter = self._waiter = Waiter(self._hub)
        if timeout == PUMP_IDLE_WAKE:
            timer = self._timer
            timer.again(self._on_wait_timeout)
        else:
            timer = self._hub.loop.timer(timeout)
            timer.start(self._on_wait_timeout)
        try:
            waiter.get()
        finally:
            self._waiter = None
            timer.stop()
            if timer is not self._timer:
                timer.close()

    def _receive(self, batch):
        """Yield (index, frames) from the unchecked sockets, at most `batch` messages from each.

        A socket found empty is checked; one that gave `batch` messages stays unchecked.
        """
        unchecked = self._unchecked
        for index, name in enumerate(CHANNELS):
            if not unchecked[index]:
                continue
            unchecked[index] = False  # before receiving: a send meanwhile may set it again
            sock = self.sockets[name]
            poll_one = self._poll_one[index]
            for count in range(batch):
                if count < POLL_FIRST:
                    if not zmq_poll(poll_one, 0):
                        break
                    frames = recv_ready_multipart(sock)  # POLLIN: a whole message is there
                else:
                    try:
                        frames = recv_ready_multipart(sock)
                    except zmq.Again:
                        break
                yield index, frames
            else:
                unchecked[index] = True

    def recv_ready(self, timeout_ms):
        """Yield (channel, frames) for what arrives within `timeout_ms` (then drains)."""
        if not any(self._unchecked):
            self._wait_readable(timeout_ms / 1000)
        for index, frames in self._receive(1 << 30):
            yield CHANNELS[index], frames

    def start_pump(self, on_message, on_pass=None):
        """Spawn the greenlet that hands every kernel message to `on_message`, and calls
        `on_pass()` after each pass over the sockets (to write what the pass produced)."""
        self._pump = gevent.spawn(self._run_pump, on_message, on_pass)
        return self._pump

    def _run_pump(self, on_message, on_pass):
        unchecked = self._unchecked
        unchecked[:] = [True] * len(CHANNELS)  # whatever came before, look everywhere once
        try:
            while not self.closed:
                if not any(unchecked):
                    self._wait_readable(PUMP_IDLE_WAKE)
                    continue
                # Drain, but at most PUMP_BATCH per socket so the others get a turn.
                for index in range(len(CHANNELS)):
                    if unchecked[index]:
                        unchecked[index] = False  # before receiving: a send meanwhile may set it again
                        if self._drain(index, PUMP_BATCH, on_message):
                            unchecked[index] = True
                        if self.closed:
                            return
                if on_pass is not None:
                    on_pass()
                if any(unchecked):
                    # More to read: first let the WebSocket writer, HTTP and pings run (a
                    # flooding kernel must not starve them).
                    gevent.sleep(0)
        except zmq.ZMQError:
            if not self.closed:
                raise

    def _drain(self, index, batch, on_message):
        """Receive, parse and hand on at most `batch` messages from socket `index`; True if it
        may hold more. (The pump's inner loop, written out: a flood spends its time here.)"""
        name = CHANNELS[index]
        sock = self.sockets[name]
        poll_one = self._poll_one[index]
        signer = self.signer
        parse = wire.parse_kernel_frames
        for count in range(batch):
            try:
                if count < POLL_FIRST and not zmq_poll(poll_one, 0):
                    return False
                frame = _plain_recv(sock, NOBLOCK, False)  # (recv_ready_multipart, inlined)
            except zmq.Again:
                return False
            frames = [frame.bytes]
            while frame.more:
                frame = _plain_recv(sock, NOBLOCK, False)
                frames.append(frame.bytes)
            try:
                msg, header_raw = parse(name, frames, signer)
            except wire.WireError as exc:
                log.warning("session %s: dropped a %s message from the kernel: %s", self.session_id, name, exc)
                continue
            if self.internal and self.is_internal(msg):
                if self.on_internal is not None:
                    self.on_internal(msg)
                continue  # an answer to one of our own kernel_info requests
            try:
                on_message(msg, header_raw)
            except Exception:  # a bug in one message's handling must not stop the relay
                log.exception("session %s: failed to handle a %s message", self.session_id, name)
            if self.closed:
                return False
        return True

    def is_internal(self, msg):
        """Whether `msg` answers one of our own kernel_info requests (never relayed).
        (The cheap substring test first: the pump asks for every message while there are some.)"""
        parent = msg.parent_raw
        return b"kernel_info_request" in parent and any(i in parent for i in self.internal)

    # -- kernel_info at start ---------------------------------------------------

    def kernel_info(self, timeout, should_abort, on_early_message):
        """Ask for kernel_info until the reply *and* its iopub status have arrived.

        The iopub status proves our SUB subscription is live (ZeroMQ's slow
        joiner): from then on nothing the kernel publishes is missed. Messages
        that are not about our requests go to `on_early_message`.
        Raises KernelConnectError on timeout, bad signature or abort.
        """
        deadline = time.monotonic() + timeout
        ours = set()
        reply = None
        iopub_live = False
        next_request = 0.0
        handshakes = self._handshake_monitors
        try:
            while not (reply is not None and iopub_live and not self._pending_handshakes(handshakes)):
                now = time.monotonic()
                if now >= deadline:
                    raise KernelConnectError("Timed out waiting to connect to session's ZeroMQ sockets after "
                                             f"{timeout:g} seconds", "timeout")
                reason = should_abort()
                if reason:
                    raise KernelConnectError(reason, "aborted")
                if now >= next_request:
                    msg_id = self.send("shell", "kernel_info_request", {})
                    ours.add(msg_id)
                    self.internal.add(msg_id.encode())
                    next_request = now + (0.2 if reply is not None else 1.0)
                for name, frames in self.recv_ready(50):
                    try:
                        msg, header_raw = wire.parse_kernel_frames(name, frames, self.signer)
                    except wire.WireError as exc:
                        raise KernelConnectError(f"invalid message from the kernel on {name}: {exc}",
                                                 "error") from None
                    if msg.parent_msg_id in ours:
                        if name == "shell" and msg.msg_type == "kernel_info_reply" and reply is None:
                            reply = msg.content
                            if not iopub_live:  # its status went before our SUB was live: ask again soon
                                next_request = min(next_request, time.monotonic() + IOPUB_RETRY)
                        elif name == "iopub":
                            iopub_live = True
                        continue
                    on_early_message(msg, header_raw)
        finally:
            for name, monitor in handshakes.items():
                self.sockets[name].disable_monitor()
                monitor.close(0)
        return reply

    def _watch_handshake(self, name):
        """A monitor that reports when our `name` connection is really up.

        kernel_info proves shell and iopub; a kernel can only reach *us* on stdin
        (input_request) once that socket's ZMTP handshake is done, or the message
        is dropped by the kernel's ROUTER. So start waits for control and stdin too.
        """
        event = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", None)
        if event is not None:  # libzmq < 4.3 cannot tell: kernel_info alone must do
            self._handshake_monitors[name] = self.sockets[name].get_monitor_socket(event)

    def _pending_handshakes(self, monitors):
        """Drop the monitors whose socket has completed its handshake; True while any remain."""
        for name, monitor in list(monitors.items()):
            try:
                while True:
                    if monitor_event(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self.sockets[name].disable_monitor()
                        monitor.close(0)
                        del monitors[name]
                        break
            except zmq.Again:
                pass
        return bool(monitors)

    # -- heartbeat ----------------------------------------------------------------

    def start_heartbeat(self, on_change, interval=HEARTBEAT_INTERVAL, timeout=HEARTBEAT_TIMEOUT):
        """Ping the kernel's heartbeat; `on_change(alive)` when that flips."""
        self._heartbeat = gevent.spawn(self._run_heartbeat, on_change, interval, timeout)

    def _run_heartbeat(self, on_change, interval, timeout):
        # Pings keep to one of HEARTBEAT_PHASES slots of a grid shared by all kernels: the kernels
        # of a slot ping in one loop iteration and their answers come back together, so 100 idle
        # kernels wake the server (and its ZeroMQ thread) a few times per slot instead of 200 times
        # per interval (~0.7% of a core instead of ~1.3%). Not one slot for all: a wave of 100
        # pings would hold every busy session up at once, and paced clients fall into step with it.
        phase = zlib.crc32(self.session_id.encode()) % HEARTBEAT_PHASES * interval / HEARTBEAT_PHASES
        alive = True
        sock, watcher = self._new_hb_socket()
        try:
            while not self.closed:
                answered = self._ping(sock, watcher, timeout)
                if not answered:
                    # A REQ socket that missed a reply can't send again: start afresh.
                    watcher.close()
                    sock.close(0)
                    sock, watcher = self._new_hb_socket()
                if answered != alive and not self.closed:
                    alive = answered
                    on_change(alive)
                gevent.sleep(interval - (time.monotonic() - phase) % interval)
        except zmq.ZMQError:
            pass
        finally:
            watcher.close()
            sock.close(0)

    def _ping(self, sock, watcher, timeout):
        """One heartbeat round trip on a plain REQ socket; True if answered within `timeout`.
        (zmq.green's poll built a Poller and two gevent Timeouts per ping: ~0.2 ms each, 1% of a
        core idle with 100 kernels. Here the socket's FD watcher wakes us, as for the pump.)"""
        try:
            _plain_send(sock, b"kcgevent-heartbeat", NOBLOCK)
        except zmq.Again:
            return False  # (no connection yet, or never answered before: that is no answer either)
        deadline = time.monotonic() + timeout
        # EVENTS first each time: it also re-arms the edge-triggered FD for the next change
        while not _plain_get(sock, EVENTS) & POLLIN:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return False
            with gevent.Timeout(left, False):
                self._hub.wait(watcher)
        _plain_recv(sock, NOBLOCK)
        return True

    def _new_hb_socket(self):
        """A plain REQ socket to the kernel's heartbeat, and a (not started) watcher of its FD."""
        sock = self.context.socket(zmq.REQ, socket_class=zmq.Socket)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.url(self.info["hb_port"]))
        return sock, self._hub.loop.io(_plain_get(sock, zmq.FD), 1)

    def close(self):
        self.closed = True
        current = gevent.getcurrent()
        for greenlet in (self._pump, self._heartbeat):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=True, timeout=2)
        for watcher in self._watchers:  # before the sockets (and their FDs) go
            watcher.close()
        self._watchers = []
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets = {}

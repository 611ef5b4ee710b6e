"""ZeroMQ sockets to one kernel instance, and the pump greenlet that reads them.

One `KernelConnection` per kernel instance (a restart makes a new one). The
pump drains every readable socket before polling again, so a burst of iopub
messages is handled in one go; sends come from any greenlet and are
serialized per socket so multipart messages never interleave.
"""
import logging
import time

import gevent
import zmq.backend as zmq_backend
import zmq.green as zmq
from gevent.lock import Semaphore

from . import wire

log = logging.getLogger(__name__)

CHANNELS = ("shell", "control", "stdin", "iopub")
PUMP_BATCH = 100
# pyzmq's own (Cython) recv/send/get, without zmq.green's bookkeeping on every call
_plain_recv = zmq_backend.Socket.recv
_plain_send = zmq_backend.Socket.send
_plain_get = zmq_backend.Socket.get


def recv_ready_multipart(sock):
    """One whole message from a socket the poller says is readable (raises zmq.Again if none)."""
    frames = [_plain_recv(sock, zmq.NOBLOCK)]
    while _plain_get(sock, zmq.RCVMORE):
        frames.append(_plain_recv(sock, zmq.NOBLOCK))
    return frames

HEARTBEAT_INTERVAL = 2.0
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
        self._pump = None
        self._heartbeat = None

    def url(self, port):
        transport = self.info.get("transport", "tcp")
        sep = ":" if transport == "tcp" else "-"
        return f"{transport}://{self.info['ip']}{sep}{port}"

    def connect(self):
        identity = self.session_id.encode()
        for name in ("shell", "control", "stdin"):
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.url(self.info[f"{name}_port"]))
            self.sockets[name] = sock
        iopub = self.context.socket(zmq.SUB)
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        iopub.setsockopt(zmq.LINGER, 0)
        iopub.setsockopt(zmq.RCVHWM, 0)  # never drop output on our side
        iopub.connect(self.url(self.info["iopub_port"]))
        self.sockets["iopub"] = iopub

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
            try:  # the common case, without zmq.green's bookkeeping
                _plain_send(sock, frames[0], zmq.NOBLOCK | zmq.SNDMORE)
            except zmq.Again:  # the queue is full: wait cooperatively
                sock.send_multipart(frames, copy=False)
                return msg_id
            # Once the first part is queued, ZeroMQ takes the rest of the message.
            for frame in frames[1:-1]:
                _plain_send(sock, frame, zmq.SNDMORE)
            _plain_send(sock, frames[-1], 0)
        return msg_id

    # -- receiving ---------------------------------------------------------

    def recv_ready(self, timeout_ms):
        """Yield (channel, frames) for what arrives within `timeout_ms` (then drains)."""
        poller = zmq.Poller()
        for name in CHANNELS:
            poller.register(self.sockets[name], zmq.POLLIN)
        for sock, _ in poller.poll(timeout_ms):
            name = self._name_of(sock)
            while True:
                try:
                    yield name, sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def _name_of(self, sock):
        for name, s in self.sockets.items():
            if s is sock:
                return name
        raise KeyError(sock)

    def start_pump(self, on_message):
        """Spawn the greenlet that hands every kernel message to `on_message`."""
        self._pump = gevent.spawn(self._run_pump, on_message)
        return self._pump

    def _run_pump(self, on_message):
        poller = zmq.Poller()
        names = {}
        for name in CHANNELS:
            poller.register(self.sockets[name], zmq.POLLIN)
            names[self.sockets[name]] = name
        while not self.closed:
            try:
                ready = poller.poll(1000)
            except zmq.ZMQError:
                if self.closed:
                    return
                raise
            for sock, _ in ready:
                name = names[sock]
                for _ in range(PUMP_BATCH):  # drain, but let the other sockets have a turn
                    try:
                        frames = recv_ready_multipart(sock)
                    except zmq.Again:
                        break
                    self._dispatch(name, frames, on_message)
                sock._Socket__state_changed()  # what zmq.green does after each recv, once per batch
            # zmq.green's poll returns at once while messages wait: without this yield a
            # flooding kernel would starve the WebSocket writer, HTTP and pings.
            gevent.sleep(0)

    def _dispatch(self, name, frames, on_message):
        try:
            msg, header_raw = wire.parse_kernel_frames(name, frames, self.signer)
        except wire.WireError as exc:
            log.warning("session %s: dropped a %s message from the kernel: %s", self.session_id, name, exc)
            return
        if self.internal and any(msg_id in msg.parent_raw for msg_id in self.internal):
            return  # a late answer to one of our start-up kernel_info requests
        try:
            on_message(msg, header_raw)
        except Exception:  # a bug in one message's handling must not stop the relay
            log.exception("session %s: failed to handle a %s message", self.session_id, name)

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
        while not (reply is not None and iopub_live):
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
                    raise KernelConnectError(f"invalid message from the kernel on {name}: {exc}", "error") from None
                if msg.parent_msg_id in ours:
                    if name == "shell" and msg.msg_type == "kernel_info_reply" and reply is None:
                        reply = msg.content
                    elif name == "iopub":
                        iopub_live = True
                    continue
                on_early_message(msg, header_raw)
        return reply

    # -- heartbeat ----------------------------------------------------------------

    def start_heartbeat(self, on_change, interval=HEARTBEAT_INTERVAL, timeout=HEARTBEAT_TIMEOUT):
        """Ping the kernel's heartbeat; `on_change(alive)` when that flips."""
        self._heartbeat = gevent.spawn(self._run_heartbeat, on_change, interval, timeout)

    def _run_heartbeat(self, on_change, interval, timeout):
        alive = True
        sock = self._new_hb_socket()
        try:
            while not self.closed:
                sock.send(b"kcgevent-heartbeat")
                answered = sock.poll(int(timeout * 1000))
                if answered:
                    sock.recv()
                else:
                    # A REQ socket that missed a reply can't send again: start afresh.
                    sock.close(0)
                    sock = self._new_hb_socket()
                if bool(answered) != alive and not self.closed:
                    alive = bool(answered)
                    on_change(alive)
                gevent.sleep(interval)
        except zmq.ZMQError:
            pass
        finally:
            sock.close(0)

    def _new_hb_socket(self):
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.url(self.info["hb_port"]))
        return sock

    def close(self):
        self.closed = True
        current = gevent.getcurrent()
        for greenlet in (self._pump, self._heartbeat):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=True, timeout=2)
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets = {}

"""JEP 66 kernel handshake: the kernel binds its own ports and tells us on a
registration socket (used for `protocol_version` >= 5.5).

Many kernels are *told* 5.5 (ipykernel's own kernelspec says so) but do not register. Waiting the
whole connection timeout for them (what Kallichore does: 30 s, then HandshakeFailed) is avoided by
SilentKernelProbe, which notices such a kernel within about HANDSHAKE_GRACE seconds.
"""
import json
import logging
import time

import psutil
import zmq.green as zmq

from . import wire

log = logging.getLogger(__name__)
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
HANDSHAKE_GRACE = 2.0  # seconds a kernel that listens on its ports gets to register before we stop waiting
PROBE_INTERVAL = 0.25


class HandshakeFailed(Exception):
    """No valid handshake within the timeout (`kind` = "timeout" or "aborted")."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


class NoHandshake(Exception):
    """The kernel listens on its ports but does not register: start it with a connection file."""


def wants_handshake(protocol_version):
    """True for protocol versions 5.5 and later (unparsable means no)."""
    try:
        major, minor = (int(p) for p in str(protocol_version).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 5)


class Registration:
    """A REP socket on 127.0.0.1 that receives one signed handshake_request."""

    def __init__(self, context, key):
        self.key = key
        self.signer = wire.Signer(key)
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")

    def file_content(self):
        return {"transport": "tcp", "signature_scheme": "hmac-sha256", "ip": "127.0.0.1",
                "key": self.key, "registration_port": self.port}

    def wait(self, timeout, should_abort, probe=None):
        """The kernel's five ports, once it has registered; raises HandshakeFailed.

        ``probe()`` (optional) is asked between polls: it returns ports found another way, or
        raises NoHandshake; either ends the wait."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                reason = should_abort()
                if reason:
                    raise HandshakeFailed(reason, "aborted")
                if time.monotonic() >= deadline:
                    raise HandshakeFailed("Timeout waiting for handshake", "timeout")
                if not self.socket.poll(50):
                    ports = probe() if probe is not None else None
                    if ports:
                        return ports
                    continue
                ports = self._answer(self.socket.recv_multipart())
                if ports:
                    return ports
        finally:
            self.socket.close(0)

    def _answer(self, frames):
        """Reply to one request; return its ports if it was a valid handshake."""
        try:
            msg, _ = wire.parse_kernel_frames("registration", frames, self.signer)
            content = msg.content
            ports = {k: int(content[k]) for k in PORT_KEYS}
        except (wire.WireError, KeyError, TypeError, ValueError) as exc:
            # REP must answer before it can receive again; say what was wrong.
            self.socket.send(json.dumps({"status": "error", "error": f"invalid handshake: {exc}",
                                         "capabilities": {}}).encode())
            log.warning("invalid JEP 66 handshake request: %s", exc)
            return None
        if msg.msg_type != "handshake_request":
            self.socket.send(json.dumps({"status": "error", "error": "expected handshake_request",
                                         "capabilities": {}}).encode())
            return None
        header = wire.make_header(wire.new_msg_id(), "handshake_reply", msg.header.get("session", ""),
                                  msg.header.get("username", ""), msg.header.get("version", "5.5"))
        self.socket.send_multipart(wire.serialize(self.signer, header, msg.header, {},
                                                  {"status": "ok", "capabilities": {}}))
        return ports


class SilentKernelProbe:
    """Notices, while we wait for a JEP 66 registration, a kernel that will never send one.

    Two signs, checked every PROBE_INTERVAL: the kernel wrote the ports it bound into the file we
    gave it (ipykernel merges them into its connection file), which we can use at once; or its
    process tree has been listening on at least five TCP ports for HANDSHAKE_GRACE seconds
    without registering, which raises NoHandshake (the caller restarts it with a connection file).
    A real 5.5 kernel registers as soon as it has bound its sockets, well within the grace.
    """

    def __init__(self, registration_file, pid, grace=HANDSHAKE_GRACE):
        self.registration_file = registration_file
        self.pid = pid
        self.grace = grace
        self._next = 0.0
        self._listening_since = None
        self.found_in_file = False

    def __call__(self):
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + PROBE_INTERVAL
        ports = self._ports_from_file()
        if ports:
            self.found_in_file = True
            log.info("pid %s did not register (JEP 66) but wrote its ports into its connection file; "
                     "using them", self.pid)
            return ports
        if self._listening_ports() < len(PORT_KEYS):
            return None
        if self._listening_since is None:
            self._listening_since = now
        elif now - self._listening_since >= self.grace:
            raise NoHandshake(f"pid {self.pid} listens on its ports but sent no JEP 66 handshake "
                              f"within {self.grace:g} s")
        return None

    def _ports_from_file(self):
        try:
            with open(self.registration_file, encoding="utf-8") as f:
                content = json.load(f)
            ports = {k: int(content[k]) for k in PORT_KEYS}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not (completely) written, or not by a kernel that does this
        return ports if all(ports.values()) else None

    def _listening_ports(self):
        """How many TCP ports the kernel's process tree listens on."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        ports = set()
        for proc in procs:
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.Error:
                continue
            ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
        return len(ports)

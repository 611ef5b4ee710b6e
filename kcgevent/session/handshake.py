"""JEP 66 kernel handshake: the kernel binds its own ports and tells us on a
registration socket (used for `protocol_version` >= 5.5)."""
import json
import logging
import time

import zmq.green as zmq

from . import wire

log = logging.getLogger(__name__)
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class HandshakeFailed(Exception):
    """No valid handshake within the timeout (`kind` = "timeout" or "aborted")."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


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

    def wait(self, timeout, should_abort):
        """The kernel's five ports, once it has registered; raises HandshakeFailed."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                reason = should_abort()
                if reason:
                    raise HandshakeFailed(reason, "aborted")
                if time.monotonic() >= deadline:
                    raise HandshakeFailed("Timeout waiting for handshake", "timeout")
                if not self.socket.poll(50):
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

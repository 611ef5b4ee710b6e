"""A tiny, fast, scriptable Jupyter kernel for tests and benchmarks.

Real kernels cannot misbehave on demand (crash at start, hang, sign badly,
flood iopub...), and ipykernel is too slow to measure supervisor overhead.
This kernel speaks Jupyter wire protocol 5.3 with plain blocking pyzmq (no
gevent, no ipykernel) and does as little work per message as possible.

Usage::

    python tests/kernels/fake_kernel.py [flags] CONNECTION_FILE
    python tests/kernels/fake_kernel.py [flags] -f CONNECTION_FILE

Prints ``fake kernel ready`` (flushed) on stdout once it serves.

Connection file: the standard Jupyter JSON (shell_port, iopub_port,
stdin_port, control_port, hb_port, ip, key, transport, signature_scheme;
port 0 means "pick one"). If it contains ``registration_port`` instead, the
kernel does the JEP 66 handshake: it binds all five sockets on random ports,
connects a REQ socket to tcp://ip:registration_port, sends a signed
``handshake_request`` with content {shell_port, iopub_port, stdin_port,
control_port, hb_port}, waits up to 10 s for a ``handshake_reply`` (a warning
on stderr if none comes) and then serves anyway.

Sockets (all bound by the kernel): shell ROUTER, control ROUTER, stdin
ROUTER, iopub PUB (SNDHWM=0: a flood is never silently dropped by the
kernel), hb ROUTER echoing through ``zmq.proxy`` in a thread (wire-compatible
with REQ heartbeat clients; keeps beating during sleep/burn/flood, stops when
the process is SIGSTOP'd). Incoming messages with a bad signature are
ignored (logged on stderr).

Every shell/control message is wrapped in iopub status busy ... idle with the
request as parent. Replies go to the request's identities.

Requests:
  kernel_info_request   shell and control; implementation "fake", language "fake".
  execute_request       see the command language below (shell only).
  shutdown_request      shell or control: shutdown_reply {status ok, restart}
                        then exit 0 (reply is flushed first).
  interrupt_request     control: interrupt_reply, aborts a running sleep/input.
  is_complete_request   {status complete}.
  comm_info_request     {status ok, comms {}}.
  any other *_request   the matching *_reply with {status ok}.

Command language (``code`` of an execute_request, one command per line,
blank lines skipped, the first error stops the cell)::

  print TEXT      iopub stream stdout "TEXT\\n"
  flood N [WIDTH] N stream messages "0\\n" .. "N-1\\n", one message each (numbers right-aligned
                  to WIDTH characters if given: big messages)
  sleep SECONDS   interruptible sleep (SIGINT or interrupt_request on control
                  -> error reply ename "KeyboardInterrupt")
  input PROMPT    input_request on stdin (same identity as the shell peer),
                  waits (interruptibly) for input_reply, then stream
                  "got: VALUE\\n"; allow_stdin false -> StdinNotImplementedError
  exit CODE       os._exit(CODE) immediately, no reply
  stderr TEXT     write TEXT to the process's real stderr (flushed)
  stdout TEXT     write TEXT to the process's real stdout (flushed)
  cd PATH         os.chdir(PATH)
  spawn_child     start ``sleep 600`` as a child, stream "child PID\\n"
                  (same process group; never reaped: for tree-kill tests)
  burn SECONDS    busy-loop the CPU (not interruptible)
  error           error reply ename "FakeError"
  anything else   echoed as stream "LINE\\n"

Any Python exception while running a command (bad int, missing dir...)
becomes an error reply named after the exception class. execute_input is
published and execution_count incremented unless ``silent`` is true.

SIGINT during an execution interrupts its next (or current) sleep/input; when idle it is ignored.

Fault flags:
  --exit-at-start CODE  print "fake kernel starting" (stdout) and
                        "fatal: exiting with CODE" (stderr), exit CODE,
                        before binding anything (after --startup-delay)
  --hang                bind, beat, but never answer shell/control
  --bad-hmac            sign every outgoing message with a wrong key
  --startup-delay SEC   sleep before binding
  --ignore-shutdown     answer shutdown_request but keep running
  --no-sigint           SIGINT is SIG_IGN (only interrupt_request interrupts)
  --handshake-never     JEP 66: bind and serve but never send the handshake
  --handshake-exit CODE JEP 66: exit CODE instead of sending the handshake
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import zmq

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
HANDSHAKE_TIMEOUT = 10.0
EMPTY = b"{}"

KERNEL_INFO = {
    "status": "ok",
    "protocol_version": PROTOCOL_VERSION,
    "implementation": "fake",
    "implementation_version": "1.0",
    "language_info": {
        "name": "fake",
        "version": "1.0",
        "mimetype": "text/plain",
        "file_extension": ".txt",
    },
    "banner": "fake kernel",
    "help_links": [],
}

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class FakeError(Exception):
    """Raised by the ``error`` command; its name is the reply's ename."""


class Interrupted(Exception):
    """An interruptible wait was aborted (SIGINT or interrupt_request)."""


class StdinNotImplementedError(Exception):
    """``input`` in a cell sent with allow_stdin false, as ipykernel does."""


# --------------------------------------------------------------------------
# Wire framing


class Message:
    """A parsed incoming message; the raw header is kept to reuse as parent."""

    __slots__ = ("idents", "header", "header_raw", "content")

    def __init__(self, idents, header, header_raw, content):
        self.idents = idents
        self.header = header
        self.header_raw = header_raw
        self.content = content

    @property
    def msg_type(self) -> str:
        return self.header.get("msg_type", "")


class Wire:
    """Signs, builds and parses Jupyter frames without jupyter_client.

    Keeps one pre-keyed HMAC and copies it per message, which is the cheapest
    way to sign in pure Python.
    """

    def __init__(self, key: bytes, scheme: str = "hmac-sha256", bad_hmac: bool = False):
        digest = getattr(hashlib, scheme.split("-", 1)[1])
        self._verify_mac = hmac.new(key, digestmod=digest) if key else None
        sign_key = key + b"-wrong" if bad_hmac else key
        if bad_hmac and not sign_key:
            sign_key = b"wrong"
        self._sign_mac = hmac.new(sign_key, digestmod=digest) if sign_key else None
        self.session = uuid.uuid4().hex
        self._ids = itertools.count()
        self._id_prefix = f"{self.session}_{os.getpid()}_"

    @staticmethod
    def _digest(mac, parts) -> bytes:
        if mac is None:
            return b""
        h = mac.copy()
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def frames(self, msg_type: str, content: dict, parent: bytes = EMPTY) -> list:
        """The frames after the delimiter: signature, header, parent, metadata, content."""
        header = json.dumps({
            "msg_id": self._id_prefix + str(next(self._ids)),
            "msg_type": msg_type,
            "session": self.session,
            "username": "fake",
            "date": datetime.now(timezone.utc).isoformat(),
            "version": PROTOCOL_VERSION,
        }).encode()
        body = [header, parent, EMPTY, json.dumps(content).encode()]
        return [self._digest(self._sign_mac, body)] + body

    def send(self, sock, msg_type, content, parent=EMPTY, idents=()):
        sock.send_multipart([*idents, DELIM, *self.frames(msg_type, content, parent)])

    def parse(self, frames: list) -> Message | None:
        """Split identities, check the signature; None for garbage."""
        try:
            i = frames.index(DELIM)
            sig, header, parent, metadata, content = frames[i + 1:i + 6]
        except ValueError:
            log("dropping message without delimiter")
            return None
        if self._verify_mac is not None:
            check = self._digest(self._verify_mac, (header, parent, metadata, content))
            if not hmac.compare_digest(sig, check):
                log("dropping message with invalid signature")
                return None
        return Message(frames[:i], json.loads(header), header, json.loads(content))


def log(text: str) -> None:
    """Diagnostics go to stderr so the supervisor's log capture sees them."""
    sys.stderr.write(f"fake kernel: {text}\n")
    sys.stderr.flush()


def recv(wire: Wire, sock) -> Message | None:
    return wire.parse(sock.recv_multipart())


# --------------------------------------------------------------------------
# Heartbeat and signals


def heartbeat(sock) -> None:
    """Echo forever in C (zmq.proxy releases the GIL); ends on context term."""
    try:
        zmq.proxy(sock, sock)
    except zmq.ContextTerminated:
        pass
    finally:
        sock.close(linger=0)


class SigintPipe:
    """Turns SIGINT into a readable fd that a zmq.Poller can watch.

    signal.set_wakeup_fd is written by the C-level handler whatever thread
    receives the signal, so a poll blocked in the main thread always wakes;
    no exception is ever raised at an arbitrary point (e.g. mid-multipart).
    """

    def __init__(self, enabled: bool):
        self.fd = None
        if not enabled:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self.fd = self._r.fileno()

    def drain(self) -> bool:
        """Empty the pipe; True if a SIGINT was pending."""
        if self.fd is None:
            return False
        seen = False
        while True:
            try:
                data = self._r.recv(512)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = seen or signal.SIGINT in data


# --------------------------------------------------------------------------
# The kernel


class FakeKernel:
    """Serves shell/control/stdin from one poll loop in the main thread.

    Long commands (sleep, input) run a nested poll over control, stdin and
    the SIGINT pipe, so interrupts and control requests are served while a
    cell is running; the heartbeat has its own thread.
    """

    def __init__(self, config: dict, opts):
        self.opts = opts
        self.config = config
        self.wire = Wire(config.get("key", "").encode(),
                         config.get("signature_scheme", "hmac-sha256"),
                         opts.bad_hmac)
        self.ctx = zmq.Context()
        self.execution_count = 0
        self.interrupt_pending = False
        self.children = []
        self.sigint = None

    # -- setup ------------------------------------------------------------

    def bind(self, ports: dict) -> dict:
        """Bind the five sockets; returns the actual ports."""
        transport = self.config.get("transport", "tcp")
        ip = self.config.get("ip", "127.0.0.1")
        self.shell = self.ctx.socket(zmq.ROUTER)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.stdin = self.ctx.socket(zmq.ROUTER)
        self.iopub = self.ctx.socket(zmq.PUB)
        self.iopub.sndhwm = 0
        hb = self.ctx.socket(zmq.ROUTER)
        socks = dict(zip(PORT_NAMES, (self.shell, self.iopub, self.stdin, self.control, hb)))
        actual = {}
        for name, sock in socks.items():
            actual[name] = bind_one(sock, transport, ip, ports.get(name, 0))
        threading.Thread(target=heartbeat, args=(hb,), name="hb", daemon=True).start()
        return actual

    def handshake(self, ports: dict) -> None:
        """JEP 66: tell the registration socket where we listen."""
        ip = self.config.get("ip", "127.0.0.1")
        req = self.ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(f"tcp://{ip}:{self.config['registration_port']}")
        req.send_multipart([DELIM, *self.wire.frames("handshake_request", ports)])
        if not req.poll(HANDSHAKE_TIMEOUT * 1000):
            log("no handshake_reply within 10 s; serving anyway")
        else:
            reply = self.wire.parse(req.recv_multipart())
            if reply is None or reply.msg_type != "handshake_reply":
                log("unexpected handshake reply; serving anyway")
        req.close()

    # -- main loop ----------------------------------------------------------

    def serve(self) -> None:
        self.sigint = SigintPipe(not self.opts.no_sigint)
        print("fake kernel ready", flush=True)
        if self.opts.hang:
            while True:
                time.sleep(3600)
        poller = zmq.Poller()
        for sock in (self.shell, self.control, self.stdin):
            poller.register(sock, zmq.POLLIN)
        if self.sigint.fd is not None:
            poller.register(self.sigint.fd, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll():
                if sock is self.shell or sock is self.control:
                    msg = recv(self.wire, sock)
                    if msg is not None:
                        self.dispatch(sock, msg)
                elif sock is self.stdin:
                    recv(self.wire, sock)  # stray input_reply: nobody waits
                else:
                    self.sigint.drain()  # SIGINT while idle: ignored

    def dispatch(self, sock, msg: Message) -> None:
        """Busy, handle, idle: the envelope clients use to know we're done."""
        parent = msg.header_raw
        if msg.msg_type == "execute_request" and sock is self.shell:
            # An interrupt from before this execution is not for it; one that arrives once its
            # busy is out (even before a sleep starts) interrupts it, as in ipykernel. (Forgotten
            # after the busy, an interrupt sent by a client that saw the busy could be lost.)
            self.interrupt_pending = False
            self.sigint.drain()
        self.publish("status", {"execution_state": "busy"}, parent)
        msg_type = msg.msg_type
        if msg_type == "execute_request" and sock is self.shell:
            self.execute(sock, msg)
        elif msg_type == "kernel_info_request":
            self.reply(sock, msg, "kernel_info_reply", KERNEL_INFO)
        elif msg_type == "shutdown_request":
            self.shutdown(sock, msg)
        elif msg_type == "interrupt_request":
            self.interrupt_pending = True
            self.reply(sock, msg, "interrupt_reply", {"status": "ok"})
        elif msg_type == "is_complete_request":
            self.reply(sock, msg, "is_complete_reply", {"status": "complete"})
        elif msg_type == "comm_info_request":
            self.reply(sock, msg, "comm_info_reply", {"status": "ok", "comms": {}})
        elif msg_type.endswith("_request"):
            self.reply(sock, msg, msg_type[:-8] + "_reply", {"status": "ok"})
        self.publish("status", {"execution_state": "idle"}, parent)

    def reply(self, sock, msg: Message, msg_type: str, content: dict) -> None:
        self.wire.send(sock, msg_type, content, msg.header_raw, msg.idents)

    def publish(self, msg_type: str, content: dict, parent: bytes) -> None:
        topic = b"stream.stdout" if msg_type == "stream" else b"kernel.fake." + msg_type.encode()
        self.wire.send(self.iopub, msg_type, content, parent, (topic,))

    def shutdown(self, sock, msg: Message) -> None:
        restart = bool(msg.content.get("restart", False))
        self.reply(sock, msg, "shutdown_reply", {"status": "ok", "restart": restart})
        if not self.opts.ignore_shutdown:
            self.publish("status", {"execution_state": "idle"}, msg.header_raw)
            self.exit(0)

    def exit(self, code: int) -> None:
        """Flush queued replies (linger) before leaving; the hb thread sees ETERM."""
        for sock in (self.shell, self.control, self.stdin, self.iopub):
            sock.close(linger=1000)
        self.ctx.term()
        hard_exit(code)

    # -- execute ----------------------------------------------------------

    def execute(self, sock, msg: Message) -> None:
        content = msg.content
        code = content.get("code", "")
        if not content.get("silent", False):
            self.execution_count += 1
            self.publish("execute_input",
                         {"code": code, "execution_count": self.execution_count},
                         msg.header_raw)
        try:
            for line in code.splitlines():
                if line.strip():
                    self.run_line(line, msg)
        except Interrupted:
            return self.execute_error(sock, msg, "KeyboardInterrupt", "")
        except Exception as exc:  # any command failure becomes an error reply
            return self.execute_error(sock, msg, type(exc).__name__, str(exc))
        self.reply(sock, msg, "execute_reply", {
            "status": "ok", "execution_count": self.execution_count,
            "user_expressions": {}, "payload": [],
        })

    def execute_error(self, sock, msg, ename: str, evalue: str) -> None:
        traceback = [f"{ename}: {evalue}"]
        self.publish("error", {"ename": ename, "evalue": evalue, "traceback": traceback},
                     msg.header_raw)
        self.reply(sock, msg, "execute_reply", {
            "status": "error", "execution_count": self.execution_count,
            "ename": ename, "evalue": evalue, "traceback": traceback,
        })

    def stream(self, text: str, msg: Message) -> None:
        self.publish("stream", {"name": "stdout", "text": text}, msg.header_raw)

    def run_line(self, line: str, msg: Message) -> None:
        """One command of the language documented in the module docstring."""
        cmd, _, arg = line.partition(" ")
        if cmd == "print":
            self.stream(arg + "\n", msg)
        elif cmd == "flood":
            count, _, width = arg.partition(" ")
            self.flood(int(count), msg, int(width or 0))
        elif cmd == "sleep":
            self.wait(float(arg), False)
        elif cmd == "input":
            self.stream(f"got: {self.input(arg, msg)}\n", msg)
        elif cmd == "exit":
            hard_exit(int(arg or 0))
        elif cmd == "stderr":
            write_flush(sys.stderr, arg)
        elif cmd == "stdout":
            write_flush(sys.stdout, arg)
        elif cmd == "cd":
            os.chdir(arg)
        elif cmd == "spawn_child":
            child = subprocess.Popen(["sleep", "600"])
            self.children.append(child)
            self.stream(f"child {child.pid}\n", msg)
        elif cmd == "burn":
            burn(float(arg))
        elif cmd == "error":
            raise FakeError(arg or "fake error")
        else:
            self.stream(line + "\n", msg)

    def flood(self, count: int, msg: Message, width: int = 0) -> None:
        send = self.wire.send
        iopub, parent = self.iopub, msg.header_raw
        for i in range(count):
            send(iopub, "stream", {"name": "stdout", "text": f"{i:>{width}}\n"}, parent, (b"stream.stdout",))

    def input(self, prompt: str, msg: Message) -> str:
        if not msg.content.get("allow_stdin", True):
            raise StdinNotImplementedError("input requested but allow_stdin is false")
        self.wire.send(self.stdin, "input_request", {"prompt": prompt, "password": False},
                       msg.header_raw, msg.idents)
        return self.wait(None, True)

    def wait(self, timeout: float | None, want_input: bool):
        """Sleep (or wait for input_reply) while serving control and SIGINT.

        Returns the input value, or None when the timeout ran out; raises
        Interrupted on SIGINT or interrupt_request.
        """
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        if want_input:
            poller.register(self.stdin, zmq.POLLIN)
        if self.sigint.fd is not None:
            poller.register(self.sigint.fd, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ms = None
            if deadline is not None:
                ms = (deadline - time.monotonic()) * 1000
                if ms <= 0:
                    return None
            for sock, _ in poller.poll(ms):
                if sock is self.control:
                    msg = recv(self.wire, sock)
                    if msg is not None:
                        self.dispatch(sock, msg)
                elif sock is self.stdin:
                    msg = recv(self.wire, sock)
                    if msg is not None and msg.msg_type == "input_reply":
                        return msg.content.get("value", "")
                elif self.sigint.drain():
                    raise Interrupted()
            if self.interrupt_pending:
                self.interrupt_pending = False
                raise Interrupted()


# --------------------------------------------------------------------------
# Helpers and entry point


def bind_one(sock, transport: str, ip: str, port: int) -> int:
    if transport == "ipc":
        port = port or 1
        sock.bind(f"ipc://{ip}-{port}")
        return port
    if not port:
        return sock.bind_to_random_port(f"tcp://{ip}")
    sock.bind(f"tcp://{ip}:{port}")
    return port


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def write_flush(stream, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def hard_exit(code: int) -> None:
    """os._exit: no atexit, no waiting on zmq or on children."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fake Jupyter kernel for tests.")
    p.add_argument("connection_file", nargs="?")
    p.add_argument("-f", dest="connection_file_opt", metavar="CONNECTION_FILE")
    p.add_argument("--exit-at-start", type=int, metavar="CODE")
    p.add_argument("--hang", action="store_true")
    p.add_argument("--bad-hmac", action="store_true")
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="SEC")
    p.add_argument("--ignore-shutdown", action="store_true")
    p.add_argument("--no-sigint", action="store_true")
    p.add_argument("--handshake-never", action="store_true")
    p.add_argument("--handshake-exit", type=int, metavar="CODE")
    opts = p.parse_args(argv)
    opts.connection_file = opts.connection_file or opts.connection_file_opt
    if not opts.connection_file:
        p.error("a connection file is required")
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    if opts.startup_delay:
        time.sleep(opts.startup_delay)
    if opts.exit_at_start is not None:
        print("fake kernel starting", flush=True)
        write_flush(sys.stderr, f"fatal: exiting with {opts.exit_at_start}")
        sys.exit(opts.exit_at_start)
    with open(opts.connection_file) as f:
        config = json.load(f)
    kernel = FakeKernel(config, opts)
    if "registration_port" in config:
        ports = kernel.bind({})
        if opts.handshake_exit is not None:
            hard_exit(opts.handshake_exit)
        if not opts.handshake_never:
            kernel.handshake(ports)
    else:
        kernel.bind(config)
    kernel.serve()


if __name__ == "__main__":
    main()

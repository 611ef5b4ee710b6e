"""The floor: the least any Python relay costs, to weigh kcgevent's CPU against what Python can reach.

`FloorRelay` puts a relay process between this client and a kernel that does nothing but relay: one
blocking `zmq.Poller` loop (no gevent, no greenlets), the kernel's messages passed on as their raw
frames (no signature check, no parsing, no envelope, no log, no session state), all a wake-up's
messages in one write. Only the execute_request is built and signed, as any supervisor must.
Its CPU per round trip or per flooded message is a lower bound for a relay written in Python with
pyzmq; kcgevent does all of that work and more.

With `gevent=True` the same relay runs on gevent as the design card has it (zmq.green, a greenlet
per kernel socket, a write per message): the floor of the architecture rather than of the language.

Client <-> relay, over a Unix socket: 4-byte big-endian length, then the payload. Client to relay:
the code to execute. Relay to client: one kernel message, its frames joined with b"\\0".
"""
import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid

LEN = struct.Struct(">I")


def relay_main(connection_file, socket_path, mode="plain"):
    if mode == "gevent":
        from gevent import monkey
        monkey.patch_all()
        import gevent
        import zmq.green as zmq
    else:
        import zmq

    with open(connection_file) as f:
        info = json.load(f)
    ctx = zmq.Context()

    def connect(kind, port):
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.connect(f"tcp://{info['ip']}:{info[port]}")
        return sock

    shell = connect(zmq.DEALER, "shell_port")
    iopub = connect(zmq.SUB, "iopub_port")
    iopub.rcvhwm = 0
    iopub.setsockopt(zmq.SUBSCRIBE, b"")
    signer = hmac.new(info["key"].encode(), digestmod=hashlib.sha256)
    session = uuid.uuid4().hex
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(1)
    print("ready", flush=True)
    client, _ = listener.accept()
    listener.close()

    def execute(code):
        header = json.dumps({"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "session": session,
                             "username": "floor", "date": "2026-01-01T00:00:00Z", "version": "5.3"}).encode()
        content = json.dumps({"code": code, "silent": False, "store_history": True, "user_expressions": {},
                              "allow_stdin": False, "stop_on_error": True}).encode()
        parts = [header, b"{}", b"{}", content]
        h = signer.copy()
        for part in parts:
            h.update(part)
        shell.send_multipart([b"<IDS|MSG>", h.hexdigest().encode(), *parts])

    if mode == "gevent":
        def pump(sock):
            while True:
                data = b"\0".join(sock.recv_multipart())
                client.sendall(LEN.pack(len(data)) + data)
        gevent.spawn(pump, shell)
        gevent.spawn(pump, iopub)
    poller = zmq.Poller()
    for sock in (shell, iopub, client.fileno()) if mode != "gevent" else (client.fileno(),):
        poller.register(sock, zmq.POLLIN)
    pending = b""
    while True:
        for sock, _ in poller.poll():
            if sock is shell or sock is iopub:
                out = []
                while True:
                    try:
                        data = b"\0".join(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    out += (LEN.pack(len(data)), data)
                if out:
                    client.sendall(b"".join(out))
                continue
            data = client.recv(1 << 16)
            if not data:
                return
            pending += data
            while len(pending) >= 4 and len(pending) >= 4 + LEN.unpack_from(pending)[0]:
                size = LEN.unpack_from(pending)[0]
                execute(pending[4:4 + size].decode())
                pending = pending[4 + size:]


class FloorRelay:
    """A kernel (started and checked ready by `DirectKernel`) behind the floor relay process."""

    def __init__(self, kind, workdir, gevent=False):
        from .direct import DirectKernel
        from .procs import REAPER, BenchError

        self.kernel = DirectKernel(kind, workdir)
        self.kernel.close()  # its sockets only proved the kernel ready; the relay has its own
        path = os.path.join(workdir, f"floor-{uuid.uuid4().hex[:6]}.sock")
        self.process = REAPER.track(subprocess.Popen([sys.executable, __file__, self.kernel.connection_file, path,
                                                      "gevent" if gevent else "plain"],
                                                     stdout=subprocess.PIPE, text=True))
        line = self.process.stdout.readline().strip()
        if line != "ready":
            raise BenchError(f"the floor relay did not start (said {line!r})")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._buffer = b""
        self._settle()

    @property
    def pid(self):
        return self.process.pid

    @property
    def kernel_pid(self):
        return self.kernel.pid

    def _settle(self):
        """Until a round trip completes: the relay's SUB socket is live (ZeroMQ's slow joiner)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.roundtrip("", timeout=1)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def _message(self, deadline):
        """(header, content) of the next kernel message."""
        while len(self._buffer) < 4 or len(self._buffer) < 4 + LEN.unpack_from(self._buffer)[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("floor relay: no complete answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("floor relay: no complete answer in time") from None
            if not data:
                raise EOFError("the floor relay closed the connection")
            self._buffer += data
        size = LEN.unpack_from(self._buffer)[0]
        frames = self._buffer[4:4 + size].split(b"\0")
        self._buffer = self._buffer[4 + size:]
        at = frames.index(b"<IDS|MSG>")
        return json.loads(frames[at + 2]), json.loads(frames[at + 5])

    def _run(self, code, timeout, on_message=None):
        deadline = time.monotonic() + timeout
        self.sock.sendall(LEN.pack(len(code.encode())) + code.encode())
        got_reply = got_idle = False
        while not (got_reply and got_idle):  # one request at a time: everything answers it
            header, content = self._message(deadline)
            msg_type = header["msg_type"]
            got_reply |= msg_type == "execute_reply"
            got_idle |= msg_type == "status" and content.get("execution_state") == "idle"
            if on_message is not None:
                on_message(msg_type, content)

    def roundtrip(self, code, timeout=30):
        t0 = time.perf_counter()
        self._run(code, timeout)
        return time.perf_counter() - t0

    def flood(self, n, timeout=120):
        from .servers import FloodTally

        tally = FloodTally()
        self._run(f"flood {n}", timeout, lambda msg_type, content: msg_type == "stream" and tally.saw(content["text"]))
        return tally.result(n)

    def stop(self):
        from .procs import REAPER

        self.sock.close()
        REAPER.stop(self.process)
        self.kernel.stop()


if __name__ == "__main__":
    relay_main(*sys.argv[1:4])

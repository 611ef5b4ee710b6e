"""The baseline: a plain synchronous pyzmq client (jupyter_client's Session for signing) talking ZeroMQ
to a kernel it started itself, the way a supervisor would, with nothing in between."""
import hmac
import json
import os
import subprocess
import time
import uuid

import zmq
from jupyter_client.session import Session

from .procs import REAPER, BenchError, now, remaining
from .servers import FAKE_KERNEL, PYTHON, FloodTally

from kcgevent.session.session import free_ports  # noqa: E402  (servers put the repository on sys.path)


class DirectKernel:
    """`kind` "ipykernel" or "fake"; ready once a kernel_info_reply came (and, unless `reply_only`, an
    iopub status for it: the SUB socket is live). `started_s`: from before writing the connection file
    and spawning to the first kernel_info_reply (the direct side of the kernel start measurement)."""

    def __init__(self, kind, workdir, full_deserialize=False, timeout=60, reply_only=False):
        self.kind = kind
        t0 = now()
        key = uuid.uuid4().hex
        ports = free_ports(5)
        info = {"shell_port": ports[0], "iopub_port": ports[1], "stdin_port": ports[2], "control_port": ports[3],
                "hb_port": ports[4], "ip": "127.0.0.1", "key": key, "transport": "tcp",
                "signature_scheme": "hmac-sha256", "kernel_name": ""}
        tag = f"direct-{kind}-{uuid.uuid4().hex[:6]}"
        self.connection_file = os.path.join(workdir, f"{tag}.json")
        with open(self.connection_file, "w") as f:
            json.dump(info, f)
        if kind == "ipykernel":
            argv = [PYTHON, "-m", "ipykernel_launcher", "-f", self.connection_file]
        else:
            argv = [PYTHON, FAKE_KERNEL, self.connection_file]
        self.out = open(os.path.join(workdir, f"{tag}.out"), "wb")
        # own session/process group, like kcgevent does for its kernels
        self.process = REAPER.track(subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True))
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="bench")
        self.full_deserialize = full_deserialize
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.linger = 0
        self.iopub.rcvhwm = 0  # as kcgevent does: never drop on our side
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)
        self._wait_ready(timeout, reply_only)
        self.started_s = now() - t0

    @property
    def pid(self):
        return self.process.pid

    def _wait_ready(self, timeout, reply_only=False):
        """kernel_info until both its reply and an iopub status for it arrived (SUB is live)."""
        deadline = time.monotonic() + timeout
        ours = set()
        got_reply = got_iopub = False
        next_send = 0.0
        while not (got_reply and (got_iopub or reply_only)):
            if self.process.poll() is not None:
                raise BenchError(f"direct {self.kind} exited with {self.process.returncode}; see {self.out.name}")
            t = time.monotonic()
            if t > deadline:
                raise BenchError(f"direct {self.kind} not ready within {timeout} s")
            if t >= next_send:
                ours.add(self.session.send(self.shell, "kernel_info_request", {})["header"]["msg_id"])
                next_send = t + 0.5
            for sock, _ in self.poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header, parent, _content = self.decode(frames)
                    if parent.get("msg_id") in ours:
                        if sock is self.shell:
                            got_reply = True
                        else:
                            got_iopub = True

    def decode(self, frames):
        """(header, parent, content) of a kernel message, signature checked."""
        _idents, msg_list = self.session.feed_identities(frames, copy=True)
        if self.full_deserialize:
            msg = self.session.deserialize(msg_list, content=True, copy=True)
            return msg["header"], msg["parent_header"], msg["content"]
        if self.session.auth is not None:
            check = self.session.sign(msg_list[1:5])
            if not hmac.compare_digest(msg_list[0], check):
                raise BenchError("invalid signature from the kernel")
        return json.loads(msg_list[1]), json.loads(msg_list[2]), json.loads(msg_list[4])

    def _execute(self, code):
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        return self.session.send(self.shell, "execute_request", content)["header"]["msg_id"]

    def _messages_for(self, msg_id, deadline, silence):
        """(msg_type, content) of each message answering `msg_id`, until its reply and idle have come."""
        got_reply = got_idle = False
        while not (got_reply and got_idle):
            ready = self.poller.poll(min(remaining(deadline), silence) * 1000)
            if not ready:
                raise TimeoutError(f"direct: nothing from the kernel for {silence} s")
            for sock, _ in ready:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header, parent, content = self.decode(frames)
                    if parent.get("msg_id") != msg_id:
                        continue
                    msg_type = header["msg_type"]
                    got_reply |= msg_type == "execute_reply"
                    got_idle |= msg_type == "status" and content.get("execution_state") == "idle"
                    yield msg_type, content

    def roundtrip(self, code, timeout=30):
        deadline = time.monotonic() + timeout
        t0 = now()
        for _ in self._messages_for(self._execute(code), deadline, timeout):
            pass
        return now() - t0

    def flood(self, n, timeout=120):
        deadline = time.monotonic() + timeout
        tally = FloodTally()
        for msg_type, content in self._messages_for(self._execute(f"flood {n}"), deadline, 30):
            if msg_type == "stream":
                tally.saw(content["text"])
        return tally.result(n)

    def close(self):
        for sock in (self.shell, self.iopub):
            sock.close(0)
        self.ctx.term()

    def stop(self):
        """Close our sockets and end the kernel."""
        self.close()
        REAPER.stop(self.process)

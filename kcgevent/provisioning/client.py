"""The gevent side of the provisioner host (host.py): start it, call it, stop it.

Why a helper process rather than an asyncio loop in a native thread of this process (measured
with ``python tools/bench_bridge.py``; figures in docs/kernels.md): both answer a call in well under a
millisecond, which is nothing next to a provisioner's own work (seconds of SSH or cluster API
calls). What decides it is correctness. In a native thread, the provisioners' blocking libraries
still use gevent's patched socket, threading and subprocess modules: paramiko's transport thread
becomes a greenlet of that thread's own hub, which only runs while something in the thread waits
on gevent, and gevent's child watchers only work on the main loop; jupyter_client's ``run_sync``
in greenlets collides on one loop (gevent issue 2026). The helper process runs them unpatched,
costs one interpreter (~0.5 s to start, once, when the first provisioned kernel starts), and
isolates a provisioner that crashes or blocks.

One host per supervisor, started on first use. Calls are JSON lines; each waits with a bound.
"""
import itertools
import json
import logging
import os
import sys

import gevent
from gevent import subprocess
from gevent.event import AsyncResult
from gevent.lock import Semaphore

log = logging.getLogger("kcgevent.provisioner")
host_log = logging.getLogger("kcgevent.provisioner.host")

START_TIMEOUT = 60.0  # importing jupyter_client on a loaded 2-core machine


class HostError(Exception):
    """The host could not do what was asked; `kind` is the provisioner's exception class name."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


class HostGone(HostError):
    def __init__(self, message):
        super().__init__("HostGone", message)


class ProvisionerHost:
    """A running host process and the calls waiting for its answers."""

    def __init__(self, env=None, lock=None, grace=0.0):
        self._env = env
        self.lock = lock  # with a state dir: kernels outlive us for `grace` s, for a server that comes back
        self.grace = grace
        self._process = None
        self._pending = {}
        self._ids = itertools.count(1)
        self._write_lock = Semaphore()
        self._start_lock = Semaphore()
        self._reader = None
        self._stderr_reader = None
        self._listeners = {}  # kernel id -> on_output(stream, line)

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    def ensure_started(self):
        with self._start_lock:
            if self._process is not None and self._process.poll() is None:
                return
            self._start()

    def _start(self):
        env = dict(self._env or os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        for name in ("PYTEST_CURRENT_TEST", "PYTEST_RUN_CONFIG"):  # provisioners behave differently under them
            env.pop(name, None)
        argv = [sys.executable, "-m", "kcgevent.provisioning.host"]
        if self.lock:
            argv += ["--lock", self.lock, "--grace", str(self.grace)]
        self._process = subprocess.Popen(argv,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=env, start_new_session=True)
        ready = AsyncResult()
        self._pending[None] = ready
        self._reader = gevent.spawn(self._read, self._process)
        self._stderr_reader = gevent.spawn(self._log_stderr, self._process)
        try:
            ready.get(timeout=START_TIMEOUT)
        except gevent.Timeout:
            self.stop()
            raise HostGone(f"the provisioner host did not start within {START_TIMEOUT:g} s") from None
        log.info("provisioner host started (pid %s)", self._process.pid)

    def _read(self, process):
        for line in iter(process.stdout.readline, b""):
            try:
                message = json.loads(line)
            except ValueError:
                host_log.warning("unreadable answer from the provisioner host: %r", line[:200])
                continue
            if message.get("event") == "output":
                self._deliver_output(message)
                continue
            waiter = self._pending.pop(message.get("id"), None)
            if waiter is None:
                continue
            if "error" in message:
                waiter.set_exception(HostError(message["error"]["type"], message["error"]["message"]))
            else:
                waiter.set(message.get("ok"))
        code = process.wait()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.set_exception(HostGone(f"the provisioner host exited (code {code})"))

    def subscribe(self, kernel_id, on_output):
        """Have `on_output(stream, line)` called for what the kernel `kernel_id` prints (local kernels)."""
        self._listeners[kernel_id] = on_output

    def unsubscribe(self, kernel_id, on_output):
        if self._listeners.get(kernel_id) == on_output:  # a restarted kernel's launcher may have taken over
            del self._listeners[kernel_id]

    def _deliver_output(self, message):
        listener = self._listeners.get(message.get("kernel_id"))
        if listener is None:
            return
        try:
            listener(message.get("stream", "stdout"), message.get("line", ""))
        except Exception:
            log.exception("output callback failed")

    def _log_stderr(self, process):
        for line in iter(process.stderr.readline, b""):
            host_log.info("%s", line.decode("utf-8", "replace").rstrip())

    def call(self, op, timeout, **arguments):
        """Ask the host to do `op`; its result, or HostError / gevent.Timeout after `timeout` s."""
        self.ensure_started()
        rid = next(self._ids)
        waiter = AsyncResult()
        self._pending[rid] = waiter
        try:
            with self._write_lock:
                self._process.stdin.write((json.dumps({"id": rid, "op": op, **arguments}) + "\n").encode())
                self._process.stdin.flush()
        except OSError as exc:
            self._pending.pop(rid, None)
            raise HostGone(f"the provisioner host is not reachable: {exc}") from None
        try:
            return waiter.get(timeout=timeout)
        except gevent.Timeout:
            self._pending.pop(rid, None)
            raise HostError("Timeout", f"the provisioner did not answer '{op}' within {timeout:g} s") from None

    def stop(self, timeout=5.0):
        """End the host (its kernels are left as they are: decide about them first)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for greenlet in (self._reader, self._stderr_reader):
            if greenlet is not None:
                greenlet.join(2)
        for stream in (process.stdout, process.stderr):
            stream.close()

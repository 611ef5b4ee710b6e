"""The launcher seam: how a session starts, watches, signals and ends its kernel, and finds it again.

A `KernelSession` knows kernels only through a `KernelLauncher`. One launcher instance drives one kernel
instance (a restart makes a new launcher). `LocalLauncher` runs a local process (through the kernel
guardian, `guardian.py`, on POSIX); a provisioner-backed launcher implements the same interface. A
launcher's `to_state()` is saved in the state dir so that a supervisor started again can rebuild it with
`restore_launcher()` and reach the same kernel.

Threading: everything runs on the gevent hub; callbacks are called from greenlets the launcher owns.
"""
import abc
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Optional

import gevent
import gevent.socket
import psutil
from gevent.event import Event

from . import process as proc_mod
from .iopub_capture import CaptureClaim

log = logging.getLogger(__name__)

GUARDIAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guardian.py")
USE_GUARDIAN = os.name == "posix"
_PROC_CWD = os.path.exists("/proc/self/cwd")  # Linux: a kernel's cwd is one readlink away
GUARDIAN_REPORT_TIMEOUT = 10.0  # seconds for the guardian to say it started the kernel
TAIL_INTERVAL = 0.05  # seconds between looks at the output files while output flows
TAIL_IDLE_INTERVAL = 0.25  # ... and while it does not
TAIL_CHUNK = 1 << 16
EXIT_POLL = 0.2  # seconds between checks of a restored kernel without pidfd support
PUNCH_EVERY = 1 << 20  # give back the disk space of delivered output each time this much more was read

try:  # Linux: fallocate(PUNCH_HOLE) frees delivered output without moving the kernel's write offset
    import ctypes
    _fallocate = ctypes.CDLL(None, use_errno=True).fallocate if sys.platform.startswith("linux") else None
    if _fallocate is not None:
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (ImportError, OSError, AttributeError):  # pragma: no cover
    _fallocate = None
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _punch(fd, length):
    """Free the first `length` bytes (whole 4 KiB blocks) of a file; best effort."""
    length &= ~4095
    if _fallocate is not None and length > 0:
        _fallocate(fd, _FALLOC_PUNCH, 0, length)


@dataclasses.dataclass
class LaunchRequest:
    """Everything a launcher needs to start one kernel instance."""

    argv: list  # the kernel's command line, `{connection_file}` already substituted
    env: dict  # the kernel's complete environment
    working_directory: str  # "" or a missing directory: the server's own
    connection_file: str  # the connection (or JEP 66 registration) file written for the kernel
    connection_info: Optional[dict] = None  # what that file holds; None for a JEP 66 registration
    startup_environment: str = "none"  # "none", "shell", "command" or "script" (see process.py)
    startup_environment_arg: Optional[str] = None
    session_id: str = ""


class LaunchError(Exception):
    """The kernel could not be started at all (nothing is left running).

    `reason` becomes the session's status reason; `errno` the StartupError's exit code (None if not an
    OS error).
    """

    def __init__(self, message, errno=None, reason="failed to spawn process"):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.reason = reason


class KernelLauncher(abc.ABC):
    """One kernel instance: start it, watch it, signal it, end it, and describe how to find it again.

    The session gives two callbacks at construction: `on_output(stream, line)` for each line the kernel
    writes ("stdout"/"stderr", newline included), and `on_exit(code)`, called exactly once when the
    kernel is gone and its output delivered (code: the OS exit code, -1 if killed by a signal). A launcher
    that fails in `start()` does not call `on_exit`.
    """

    kind = None  # the name recorded by to_state(), which restore_launcher() dispatches on

    def __init__(self, on_output, on_exit):
        self.on_output = on_output
        self.on_exit = on_exit

    @abc.abstractmethod
    def start(self, request):
        """Start the kernel described by `request` (a LaunchRequest); raise LaunchError if it cannot be.

        Returns once the kernel process exists (not when it is ready: the session connects ZeroMQ)."""

    @property
    @abc.abstractmethod
    def pid(self):
        """The kernel's OS process id, or None if there is none (remote kernel) or it has exited."""

    @abc.abstractmethod
    def poll(self):
        """None while the kernel runs; its exit code once it has exited and its output was delivered."""

    @abc.abstractmethod
    def wait(self, timeout=None):
        """Block this greenlet until the kernel has exited (as `poll`) or `timeout` s passed; return poll()."""

    @abc.abstractmethod
    def send_signal(self, sig):
        """Send `sig` to the kernel process (best effort; nothing if it has exited)."""

    @abc.abstractmethod
    def interrupt(self):
        """Interrupt the kernel as a terminal would (SIGINT to its process group on POSIX)."""

    @abc.abstractmethod
    def kill(self, timeout=5.0):
        """Kill the kernel and every process it started (the whole tree); wait up to `timeout` s for
        the exit. True if everything is gone."""

    @abc.abstractmethod
    def cleanup(self):
        """Release what the launcher keeps for this kernel (files, sockets); called once the kernel has
        exited for good (session deleted, restarted or server shut down)."""

    @abc.abstractmethod
    def to_state(self):
        """A JSON-able dict with `kind` and all that `from_state` needs to reach this kernel again after
        the supervisor died (pids with their start times, files, offsets already delivered)."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, state, on_output, on_exit, **context):
        """Rebuild a launcher from `to_state()`'s dict. The kernel may have exited meanwhile: then
        `poll()` answers its exit code (-1 if unknown) at once and `on_exit` is not called."""

    # -- optional, with defaults ------------------------------------------------------------------

    @property
    def connection_info(self):
        """ZeroMQ connection info the launcher chose itself (a provisioner may), else None."""
        return None

    def shutdown_requested(self, restart=False):
        """The session is about to send the kernel a shutdown_request (a provisioner may need to know)."""

    def startup_output(self):
        """What the kernel printed while starting, for a StartupError ("\\n"-joined lines)."""
        return ""

    def kernel_connected(self, connection_info):
        """The session is connected to the kernel (`connection_info`: its ZeroMQ endpoints and key).
        A launcher that can listen to iopub while no supervisor runs learns where from this."""

    def iopub_capture(self):
        """After a restore: a CaptureClaim (iopub_capture.py) for what was kept of the kernel's iopub
        while no supervisor listened, or None if this launcher keeps nothing."""
        return None

    def describe_failure(self, kind):
        """The StartupError `details` for a kernel that exited ("exit") or did not connect ("connect")."""
        return "Kernel failed to start" if kind == "exit" else "Kernel failed to connect to ZeroMQ sockets"

    def cwd(self):
        """The kernel's current directory, or None if unknown. (Asked after every execute: on
        Linux one readlink, rather than psutil's Process, which first reads /proc/<pid>/stat.)"""
        pid = self.pid
        if pid is None:
            return None
        try:
            if _PROC_CWD:
                return os.readlink(f"/proc/{pid}/cwd")
            return psutil.Process(pid).cwd()
        except (psutil.Error, OSError):
            return None


_LAUNCHERS = {}


def register(cls):
    """Class decorator: make `cls` restorable under its `kind`."""
    _LAUNCHERS[cls.kind] = cls
    return cls


def restore_launcher(state, on_output, on_exit, **context):
    """The launcher saved as `state` (a `to_state()` dict); ValueError if its kind is unknown."""
    try:
        cls = _LAUNCHERS[state["kind"]]
    except (KeyError, TypeError):
        raise ValueError(f"unknown launcher kind in saved state: {state!r:.80}") from None
    return cls.from_state(state, on_output, on_exit, **context)


# ---------------------------------------------------------------------------------------------------
# Local processes


def _create_time(pid):
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_process(pid, started):
    """Is `pid` still the process that started at `started` (and not a zombie)?"""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@register
class LocalLauncher(KernelLauncher):
    """A kernel process on this machine.

    On POSIX the kernel runs under the guardian (`guardian.py`), which leads the process group, adopts
    whatever the kernel abandons, ends the whole tree when the supervisor is gone (at once, or after
    `grace` seconds when a state dir's `lock` says a supervisor may come back) and records the kernel's
    pid and exit code in `workdir/status.json`. With `durable` the kernel's stdout/stderr go to files in
    `workdir` that this launcher tails, so they survive the supervisor; otherwise to pipes it reads.
    """

    kind = "local"

    def __init__(self, on_output, on_exit, workdir, lock=None, grace=0.0, durable=False):
        super().__init__(on_output, on_exit)
        self.workdir = workdir
        self.lock = lock
        self.grace = grace
        self.durable = durable
        self._process = None  # the KernelProcess we spawned (the guardian, or the kernel itself)
        self._guardian_pid = None
        self._guardian_started = None
        self._kernel_pid = None
        self._exit_code = None
        self._exited = Event()
        self._starting = False
        self._failed = False
        self._offsets = {"stdout": 0, "stderr": 0}  # bytes of each output file delivered
        self._partial = {"stdout": b"", "stderr": b""}
        self._punched = {"stdout": 0, "stderr": 0}
        self._tail = None
        self._watch = None

    # -- start ----------------------------------------------------------------------------------

    def start(self, request):
        try:
            plan = proc_mod.plan_startup(request.argv, request.env, request.working_directory,
                                         request.startup_environment, request.startup_environment_arg)
        except proc_mod.StartupScriptError as exc:
            raise LaunchError(str(exc), reason="startup script not found") from None
        if USE_GUARDIAN:
            os.makedirs(self.workdir, mode=0o700, exist_ok=True)
            self._remove_files()
            if any("\0" in arg for arg in plan.command):  # (what spawning it ourselves would say)
                raise LaunchError("Failed to start process for session: embedded null byte",
                                  reason="failed to spawn process: embedded null byte")
            with open(os.open(os.path.join(self.workdir, "argv"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                              0o600), "wb") as f:
                f.write(b"\0".join(os.fsencode(arg) for arg in plan.command))  # (the guardian reads it)
            # The guardian ties itself to us (--parent) and enters the kernel's directory itself, so it
            # is started without a fork of the server (process.uses_native_spawn).
            plan = dataclasses.replace(plan, command=self._guardian_command(plan.cwd), cwd=None,
                                       guards_itself=True)
        self._starting = True
        try:
            self._process = proc_mod.KernelProcess.spawn(plan, self._on_process_output, on_exit=self._on_process_exit)
        except proc_mod.SpawnError as exc:
            raise LaunchError(f"Failed to start process for session: {exc}", errno=exc.errno,
                              reason=f"failed to spawn process: {exc}") from None
        try:
            if USE_GUARDIAN:
                self._guardian_pid = self._process.pid
                self._guardian_started = _create_time(self._process.pid)
                self._await_guardian_report()
            else:
                self._kernel_pid = self._process.pid
        except LaunchError:
            self._failed = True  # its exit is not the session's business
            raise
        finally:
            self._starting = False
        if self.durable:
            self._tail = gevent.spawn(self._run_tail)

    def _guardian_command(self, cwd):
        argv = [sys.executable, "-I", "-S", GUARDIAN, "--dir", self.workdir, "--parent", str(os.getpid())]
        if cwd:
            argv += ["--cwd", cwd]
        if self.lock:
            argv += ["--lock", self.lock, "--grace", str(self.grace)]
        if self.durable:
            argv += ["--output", self.workdir]
        return argv

    def _await_guardian_report(self):
        """The guardian's status.json: the kernel's pid, or why it could not be started."""
        deadline = time.monotonic() + GUARDIAN_REPORT_TIMEOUT
        while True:
            status = self._read_status()
            if status.get("kernel_pid"):
                self._kernel_pid = status["kernel_pid"]
                return
            if status.get("spawn_error"):
                code, text = status["spawn_error"]
                self._process.wait(5)
                message = f"{text} (os error {code})" if code else text
                raise LaunchError(f"Failed to start process for session: {message}", errno=code or None,
                                  reason=f"failed to spawn process: {message}")
            if self._process.exited.is_set() or time.monotonic() > deadline:
                self._process.kill_tree()
                raise LaunchError("Failed to start process for session: the kernel guardian did not start "
                                  f"(exit code {self._process.exit_code})")
            gevent.sleep(0.005)

    def _read_status(self):
        try:
            with open(os.path.join(self.workdir, "status.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # -- output ---------------------------------------------------------------------------------

    def _on_process_output(self, stream, line):
        self.on_output(stream, line)

    def _run_tail(self):
        """Deliver new lines of the output files as they grow (until the exit drains them)."""
        while not self._exited.is_set():
            got = self._read_output(final=False)
            gevent.sleep(TAIL_INTERVAL if got else TAIL_IDLE_INTERVAL)

    def _read_output(self, final):
        """Deliver what the output files hold past our offsets; True if anything was read."""
        got = False
        for stream in ("stdout", "stderr"):
            try:
                fd = os.open(os.path.join(self.workdir, stream), os.O_RDWR)
            except OSError:
                continue
            try:
                while True:
                    chunk = os.pread(fd, TAIL_CHUNK, self._offsets[stream] + len(self._partial[stream]))
                    if not chunk:
                        break
                    got = True
                    self._deliver_chunk(stream, self._partial[stream] + chunk)
                    gevent.sleep(0)  # a flood must not hold the hub
                if self._offsets[stream] - self._punched[stream] >= PUNCH_EVERY:
                    _punch(fd, self._offsets[stream])  # the file stays append-only; its disk use stays bounded
                    self._punched[stream] = self._offsets[stream]
            finally:
                os.close(fd)
            if final and self._partial[stream]:
                self._deliver_line(stream, self._partial[stream])
                self._partial[stream] = b""
        return got

    def _deliver_chunk(self, stream, data):
        lines = data.split(b"\n")
        rest = lines.pop()
        for raw in lines:
            self._deliver_line(stream, raw + b"\n")
        while len(rest) >= proc_mod.MAX_LINE_BYTES:
            self._deliver_line(stream, rest[:proc_mod.MAX_LINE_BYTES])
            rest = rest[proc_mod.MAX_LINE_BYTES:]
        self._partial[stream] = rest

    def _deliver_line(self, stream, raw):
        self._offsets[stream] += len(raw)
        line = raw.decode("utf-8", "replace")
        if self._process is not None:
            self._process._deliver(stream, line)  # startup markers are recognised there
        else:
            try:
                self.on_output(stream, line)
            except Exception:
                log.exception("kernel %s: output callback failed", self._kernel_pid)

    # -- exit -----------------------------------------------------------------------------------

    def _on_process_exit(self, code):
        if self._failed or (self._starting and not self._kernel_pid):
            return  # start() reports this failure itself
        self._finish(code)

    def _finish(self, code):
        if self._exited.is_set():
            return
        if self.durable:
            self._read_output(final=True)
        if USE_GUARDIAN:
            recorded = self._read_status().get("exit_code")
            if recorded is not None:
                code = recorded
        self._exit_code = -1 if code is None else code
        self._exited.set()
        if self._tail is not None:
            self._tail.kill(block=False)
        try:
            self.on_exit(self._exit_code)
        except Exception:
            log.exception("kernel %s: exit callback failed", self._kernel_pid)

    # -- the interface --------------------------------------------------------------------------

    @property
    def pid(self):
        return None if self._exited.is_set() else self._kernel_pid

    def poll(self):
        return self._exit_code if self._exited.is_set() else None

    def wait(self, timeout=None):
        self._exited.wait(timeout)
        return self.poll()

    def send_signal(self, sig):
        if self._kernel_pid and not self._exited.is_set():
            try:
                os.kill(self._kernel_pid, sig)
            except OSError:
                pass

    def interrupt(self):
        if self._process is not None:
            self._process.interrupt()
        elif self._guardian_alive():
            try:
                os.killpg(self._guardian_pid, signal.SIGINT)
            except OSError:
                pass

    def kill(self, timeout=5.0):
        if self._process is not None:
            self._process.kill_tree(timeout)
        elif self._guardian_alive():
            victims = []
            try:
                guardian = psutil.Process(self._guardian_pid)
                victims = guardian.children(recursive=True) + [guardian]
                os.killpg(self._guardian_pid, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass
            for proc in victims:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(victims, timeout=min(timeout, 1.0))
        return self.wait(timeout) is not None

    def cleanup(self):
        if self._tail is not None:
            self._tail.kill(block=False)
        if self._watch is not None:
            self._watch.kill(block=False)
        self._remove_files()

    def _remove_files(self):
        for name in ("status.json", "argv", "argv.json", "stdout", "stderr", "iopub.json", "capture",
                     "capture.done", "capture.stop"):  # (argv.json: what older versions wrote)
            try:
                os.unlink(os.path.join(self.workdir, name))
            except OSError:
                pass

    def startup_output(self):
        return self._process.startup_output() if self._process is not None else ""

    def kernel_connected(self, connection_info):
        if not (self.durable and USE_GUARDIAN and self.lock):
            return
        import zmq  # where the guardian finds pyzmq, should it have to listen to iopub itself
        transport = connection_info.get("transport", "tcp")
        url = (f"tcp://{connection_info['ip']}:{connection_info['iopub_port']}" if transport == "tcp"
               else f"{transport}://{connection_info['ip']}{connection_info.get('ipc_separator', '-')}"
                    f"{connection_info['iopub_port']}")
        content = {"url": url, "pythonpath": [os.path.dirname(os.path.dirname(os.path.abspath(zmq.__file__)))]}
        tmp = os.path.join(self.workdir, "iopub.json.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(content, f)
        os.replace(tmp, os.path.join(self.workdir, "iopub.json"))

    def iopub_capture(self):
        claim = CaptureClaim(self.workdir)
        return claim if self.durable and USE_GUARDIAN and claim.pending() else None

    def describe_failure(self, kind):
        if self._process is not None:
            return self._process.describe_failure(kind)
        return super().describe_failure(kind)

    def cwd(self):
        if self._process is not None and not USE_GUARDIAN:
            return self._process.cwd()
        return super().cwd()

    # -- finding the kernel again -------------------------------------------------------------------

    def to_state(self):
        return {"kind": self.kind, "workdir": self.workdir, "durable": self.durable,
                "guardian_pid": self._guardian_pid, "guardian_started": self._guardian_started,
                "kernel_pid": self._kernel_pid, "offsets": dict(self._offsets)}

    @classmethod
    def from_state(cls, state, on_output, on_exit, lock=None, grace=0.0, **context):
        launcher = cls(on_output, on_exit, state["workdir"], lock=lock, grace=grace,
                       durable=bool(state.get("durable")))
        launcher._guardian_pid = state.get("guardian_pid")
        launcher._guardian_started = state.get("guardian_started")
        launcher._kernel_pid = state.get("kernel_pid")
        offsets = state.get("offsets") or {}
        launcher._offsets = {name: int(offsets.get(name) or 0) for name in ("stdout", "stderr")}
        if launcher._guardian_alive():
            if launcher.durable:
                launcher._tail = gevent.spawn(launcher._run_tail)
            launcher._watch = gevent.spawn(launcher._watch_guardian)
        else:
            if launcher.durable:
                launcher._read_output(final=True)
            recorded = launcher._read_status().get("exit_code")
            launcher._exit_code = -1 if recorded is None else recorded
            launcher._exited.set()
        return launcher

    def _guardian_alive(self):
        return bool(self._guardian_started) and _same_process(self._guardian_pid, self._guardian_started)

    def _watch_guardian(self):
        """A restored kernel is not our child: learn of its guardian's end by pidfd (or by polling)."""
        fd = None
        try:
            fd = os.pidfd_open(self._guardian_pid)
        except (AttributeError, OSError):
            pass
        try:
            if fd is not None and self._guardian_alive():
                gevent.socket.wait_read(fd)
            while self._guardian_alive():
                gevent.sleep(EXIT_POLL)
        finally:
            if fd is not None:
                os.close(fd)
        self._finish(None)


class LauncherFactory:
    """Makes a launcher for each kernel start, and rebuilds saved ones (a Supervisor collaborator).

    `workdir_for(session_id)` names a private directory a LocalLauncher may use for that session. With a
    state dir, `lock` is its lock file, `grace` the --restart-grace seconds, and output goes to files
    (`durable`). Replace or extend `new()` to choose another launcher per session (e.g. a provisioner).
    """

    def __init__(self, workdir_for, lock=None, grace=0.0, durable=False):
        self.workdir_for = workdir_for
        self.lock = lock
        self.grace = grace
        self.durable = durable
        self._provisioner_host = None

    def new(self, session, on_output, on_exit):
        """A fresh, unstarted launcher for `session`'s next kernel: a ProvisionerLauncher when the
        session's kernelspec names a kernel provisioner, else a LocalLauncher."""
        kernelspec = session.spec.get("kernelspec") or {}
        if kernelspec.get("provisioner") is not None:
            from .provisioner import ProvisionerLauncher, new_kernel_id
            # a restart keeps the kernel id, hence the provisioner instance, of the kernel before
            kernel_id = getattr(session.launcher, "kernel_id", None) or new_kernel_id()
            return ProvisionerLauncher(on_output, on_exit, self.provisioner_host, kernel_id, kernelspec)
        return LocalLauncher(on_output, on_exit, self.workdir_for(session.session_id), lock=self.lock,
                             grace=self.grace, durable=self.durable)

    def restore(self, state, on_output, on_exit):
        """The launcher `state` (a to_state() dict) describes, reconnected to its kernel if it lives."""
        if state.get("kind") == "provisioner":
            from . import provisioner  # noqa: F401 (registers the kind)
            launcher = restore_launcher(state, on_output, on_exit, provisioner_host=self.provisioner_host)
            return launcher
        return restore_launcher(state, on_output, on_exit, lock=self.lock, grace=self.grace)

    @property
    def provisioner_host(self):
        """The provisioner host process (kcgevent/provisioning), started on first use."""
        if self._provisioner_host is None:
            from ..provisioning.client import ProvisionerHost
            self._provisioner_host = ProvisionerHost(lock=self.lock, grace=self.grace)
        return self._provisioner_host

    def close(self):
        """Stop the provisioner host, if one runs (its kernels were ended or are kept: see ProvisionerHost)."""
        if self._provisioner_host is not None:
            self._provisioner_host.stop()
            self._provisioner_host = None

"""The kernel's OS process: environment, startup-environment wrapper, spawn, output readers, exit
watcher, signals and tree kill (kallichore-behavior.md 4.2, 4.3, 4.4, 4.13).

Where Kallichore is buggy (section 7, items 10, 15, 20) we differ on purpose:
- the shell wrapper ends with ``exec <kernel>``, so the recorded pid is the kernel itself and
  interrupt, kill and resource sampling reach it rather than a shell;
- POSIX quoting is correct (``shlex.quote``), the shell is taken from the session's env first, no
  ``-i``, and csh/tcsh get no bogus login flag;
- markers are never passed on as output;
- stdin is /dev/null, the kernel leads its own session/process group (so the whole tree can be
  signalled), and on Linux it receives SIGTERM when the server dies.

Everything here is cooperative: reader greenlets, an exit-watcher greenlet. A program that ends
itself with the server (``StartupPlan.guards_itself``: our guardian) is started with posix_spawn
(native_spawn.py), which does not hold the hub; anything else with gevent's subprocess, whose
Python-level fork does (for a few ms), but which can run the pre-exec hook that ties the child to the
server (PR_SET_PDEATHSIG).
"""

import collections
import ctypes
import dataclasses
import functools
import logging
import os
import shlex
import signal
import sys
import time
from typing import Optional

import gevent
import psutil
from gevent import subprocess
from gevent.event import Event
from gevent.socket import wait_read

from . import native_spawn

log = logging.getLogger(__name__)

IS_WINDOWS = sys.platform == "win32"
IS_LINUX = sys.platform.startswith("linux")

MARKER_BEGIN = "KALLICHORE_STARTUP_BEGIN"
MARKER_SUCCESS = "KALLICHORE_STARTUP_SUCCESS"
STARTUP_MODES = ("none", "shell", "command", "script")

OUTPUT_BYTES_KEPT = 256 * 1024  # the end of the output, for a StartupError
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
READER_JOIN_TIMEOUT = 2.0
POLL_INTERVAL = 0.05

_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows: both mean TerminateProcess
_PR_SET_PDEATHSIG = 1
# Loaded in the parent: the pre-exec hook must not import or dlopen anything after fork().
_LIBC = ctypes.CDLL(None, use_errno=True) if IS_LINUX else None


class StartupScriptError(Exception):
    """The startup script is missing or unusable; raised before anything is spawned."""


class SpawnError(Exception):
    """The OS refused to start the process; ``errno`` is the raw OS error, or None."""

    def __init__(self, errno, message):
        super().__init__(message)
        self.errno = errno
        self.message = message


# ---------------------------------------------------------------------------------------------
# Environment and argv


_ENV_ACTIONS = {
    "replace": lambda existing, value: value,
    "append": lambda existing, value: existing + value,
    "prepend": lambda existing, value: value + existing,
}


def resolve_env(actions, base=None):
    """A copy of ``base`` (default: the server's environment) with the VarActions applied in order.

    No separator is inserted by append/prepend: clients include ``:`` themselves. On Windows names
    are upper-cased, as environment names are case-insensitive there.
    """
    env = dict(os.environ if base is None else base)
    if IS_WINDOWS:
        env = {name.upper(): value for name, value in env.items()}
    for action in actions or ():
        name = action["name"].upper() if IS_WINDOWS else action["name"]
        try:
            apply = _ENV_ACTIONS[action["action"]]
        except KeyError:
            raise ValueError(f"Unknown environment action: {action['action']!r}") from None
        env[name] = apply(env.get(name, ""), action["value"])
    return env


def substitute_argv(argv, connection_file):
    """Replace every ``{connection_file}`` substring, as kernelspecs expect."""
    return [arg.replace("{connection_file}", connection_file) for arg in argv]


# ---------------------------------------------------------------------------------------------
# Startup plan


@dataclasses.dataclass
class StartupPlan:
    """What to exec and how. ``mode`` is the *effective* startup environment: ``command`` or
    ``script`` without an argument runs as ``shell``, anything runs as ``none`` without a shell."""

    command: list
    cwd: Optional[str] = None
    env: Optional[dict] = None
    shell: Optional[str] = None
    mode: str = "none"
    arg: Optional[str] = None
    # The program ends itself when the server dies (the guardian: --parent) and takes no working
    # directory (``cwd`` must be None): it needs no pre-exec hook, so it is started without a fork.
    guards_itself: bool = False


def plan_startup(argv, env, working_directory, startup_environment="none",
                 startup_environment_arg=None):
    """Build the final command line. Raises StartupScriptError for an unusable startup script."""
    mode = startup_environment or "none"
    if mode not in STARTUP_MODES:
        raise ValueError(f"Unknown startup environment: {mode!r}")
    cwd = _usable_cwd(working_directory)
    direct = StartupPlan(list(argv), cwd, env)
    if IS_WINDOWS or mode == "none":
        return direct
    shell = choose_shell(env)
    if shell is None:
        log.warning("No shell found; running the kernel without startup environment %r", mode)
        return direct
    mode, arg = _effective_mode(mode, startup_environment_arg)
    if mode == "script":
        arg = _check_script(arg, working_directory)
    script = _wrap(mode, arg, shell, _kernel_command(argv, env))
    return StartupPlan([shell, *_shell_flags(shell), "-c", script], cwd, env, shell, mode, arg)


def _usable_cwd(working_directory):
    """The working directory if it is a directory; otherwise None (inherit ours), with a warning."""
    if not working_directory:
        return None
    if os.path.isdir(working_directory):
        return working_directory
    log.warning("Working directory %r does not exist or is not a directory; "
                "using the server's", working_directory)
    return None


def choose_shell(session_env):
    """The session env's SHELL, else ours, else /bin/bash, else /bin/sh; None if none exists.

    The session's SHELL comes first (Kallichore ignores it): it is the shell the user asked for.
    """
    for source, candidate in (("session", session_env.get("SHELL")),
                              ("server", os.environ.get("SHELL"))):
        if candidate and os.path.isfile(candidate):
            return candidate
        if candidate:
            log.warning("The %s's SHELL %r does not exist", source, candidate)
    return next((sh for sh in ("/bin/bash", "/bin/sh") if os.path.isfile(sh)), None)


def _effective_mode(mode, arg):
    """Drop arguments that cannot apply, warning about them."""
    if mode == "shell" and arg:
        log.warning("startup_environment_arg is ignored in 'shell' mode")
        return mode, None
    if mode in ("command", "script") and not arg:
        log.warning("Startup environment %r has no argument; running as 'shell'", mode)
        return "shell", None
    return mode, arg


def _check_script(path, working_directory):
    """Resolve a relative script against the working directory and check it is a readable file."""
    path = os.path.abspath(os.path.join(working_directory or "", path))
    try:
        os.stat(path)
    except OSError as err:
        raise StartupScriptError(
            f"Startup script not found or cannot be read: '{path}' ({err.strerror})") from err
    if not os.path.isfile(path):
        raise StartupScriptError(f"Startup script '{path}' exists but is not a file")
    if not os.access(path, os.R_OK):
        raise StartupScriptError(
            f"Startup script not found or cannot be read: '{path}' (Permission denied)")
    return path


def _kernel_command(argv, env):
    """``exec`` + the quoted argv: the shell is replaced by the kernel, which keeps the shell's pid.

    On macOS, SIP strips DYLD_* variables when launching the (protected) shell, so they are passed
    again through env(1), which is exec'd too and so also keeps the pid.
    """
    words = [shlex.quote(arg) for arg in argv]
    dyld = env.get("DYLD_LIBRARY_PATH") if sys.platform == "darwin" else None
    if dyld is not None:
        words = ["/usr/bin/env", shlex.quote(f"DYLD_LIBRARY_PATH={dyld}"), *words]
    return "exec " + " ".join(words)


def _is_csh(shell):
    return os.path.basename(shell) in ("csh", "tcsh")


def _wrap(mode, arg, shell, kernel):
    """Surround the kernel command with the startup step and its progress markers.

    The step ends with a newline rather than ``;`` so that a trailing comment or ``&`` in a user's
    command cannot swallow or detach the rest. csh has neither ``{ }`` grouping nor ``.``.
    """
    if mode == "shell":
        return kernel
    csh = _is_csh(shell)
    step = arg if mode == "command" else f"{'source' if csh else '.'} {shlex.quote(arg)}"
    group = step if csh else "{ " + step + "\n}"
    return f"echo {MARKER_BEGIN} && {group} && echo {MARKER_SUCCESS} && {kernel}"


def _shell_flags(shell):
    """A login flag, so the user's profile (PATH, conda, modules...) is read.

    Never ``-i``: an interactive shell tries to take over a controlling terminal and use job
    control, which fails or stops the process (SIGTTOU/SIGTTIN) in a headless server, and reads rc
    files written for humans. csh/tcsh cannot combine a login flag with ``-c``, so they get none.
    """
    name = os.path.basename(shell)
    if name in ("bash", "zsh"):
        return ["--login"]
    if name in ("csh", "tcsh"):
        return []
    return ["-l"]


# ---------------------------------------------------------------------------------------------
# Orphan protection


def parent_death_preexec(parent_pid=None):
    """Pre-exec hook (Linux): have the kernel receive SIGTERM when the server dies, even by SIGKILL.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. Under gevent all spawns
    run on the main thread, so that is the server's death; never spawn from a thread-pool thread.
    The setting survives exec (the binaries are not setuid), hence the shell's ``exec`` of the
    kernel. If the parent died before the prctl, the child signals itself. Only the kernel is told,
    not its descendants. (A fuller fallback, not implemented: a tiny watchdog per kernel that polls
    its parent and kills the process group; it would also cover macOS.)
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _platform_spawn_options():
    """A new session (POSIX) so the whole tree can be signalled; parent-death signal on Linux."""
    if IS_WINDOWS:
        return {"close_fds": False}  # the kernel must inherit its JPY_INTERRUPT_EVENT handle
    options = {"start_new_session": True}
    if IS_LINUX:
        options["preexec_fn"] = functools.partial(parent_death_preexec, os.getpid())
    return options


def uses_native_spawn(plan):
    """Whether ``plan`` is started with posix_spawn (no fork on the hub) rather than gevent's Popen.

    Only a program that guards itself: any other needs the pre-exec hook (Linux) for the orphan
    guarantee. Windows keeps gevent's Popen (no fork there anyway)."""
    if not plan.guards_itself or IS_WINDOWS or not native_spawn.available():
        return False
    if plan.cwd is not None:
        raise ValueError("a program that guards itself takes its working directory as an argument")
    return True


# ---------------------------------------------------------------------------------------------
# Process helpers


def pid_alive(pid):
    """True if ``pid`` is a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _proc_alive(proc):
    """Like pid_alive, for a psutil.Process, also guarding against pid reuse."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.AccessDenied, OSError):
        return True
    except psutil.Error:
        return False


def _signal_proc(proc, sig):
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


# ---------------------------------------------------------------------------------------------
# The running process


class KernelProcess:
    """A spawned kernel with its output readers and exit watcher.

    ``on_output(stream, text)`` is called with one or more whole lines at a time ("stdout"/"stderr",
    newlines included except maybe on the last line), never with marker lines. ``exited`` is set
    once the process is gone and its output delivered (or the readers gave up after
    READER_JOIN_TIMEOUT, when a descendant keeps the pipes open); ``exit_code`` is then the OS
    code, -1 if killed by a signal. ``on_exit(code)`` is called once, after ``exited`` is set.
    """

    def __init__(self, popen, plan, on_output, on_exit=None):
        self._popen = popen
        self.pid = popen.pid
        self.plan = plan
        self.exit_code = None
        self.exited = Event()
        self.startup_begin_seen = False
        self.startup_success_seen = False
        self._on_output = on_output
        self._on_exit = on_exit
        self._psutil = None
        self._lines = collections.deque()  # (stream, text) as delivered, bounded by OUTPUT_BYTES_KEPT
        self._kept = 0
        self._readers = [gevent.spawn(self._read, "stdout", popen.stdout),
                         gevent.spawn(self._read, "stderr", popen.stderr)]
        gevent.spawn(self._watch)

    @classmethod
    def spawn(cls, plan, on_output, on_exit=None):
        """Start ``plan``; raises SpawnError if the OS refuses."""
        try:
            if uses_native_spawn(plan):
                popen = native_spawn.spawn(plan.command, plan.env)
            else:
                popen = subprocess.Popen(
                    plan.command, cwd=plan.cwd, env=plan.env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, **_platform_spawn_options())
        except OSError as err:
            raise SpawnError(err.errno, _os_error_text(err)) from err
        except (subprocess.SubprocessError, ValueError) as err:
            raise SpawnError(None, str(err)) from err
        log.debug("Spawned pid %s: %s", popen.pid, plan.command)
        return cls(popen, plan, on_output, on_exit)

    # -- output ---------------------------------------------------------------------------------

    def _read(self, stream, pipe):
        """Deliver whole lines until EOF, a chunk at a time, yielding between chunks.

        A kernel writing millions of short lines must neither starve other greenlets nor be held
        up by a per-line cost: each read (up to READ_BYTES) is split at C speed and its complete
        lines go out together; a line longer than MAX_LINE_BYTES is cut. Each read waits for the
        pipe to be readable first: read1 allocates its READ_BYTES result before it blocks, which
        would hold that much memory per pipe for as long as the kernel is quiet.
        """
        carry = b""
        try:
            while True:
                if not IS_WINDOWS:  # (read1 never leaves bytes buffered: it reads into its result)
                    wait_read(pipe.fileno())
                data = pipe.read1(READ_BYTES)
                if not data:
                    break
                data = carry + data
                cut = data.rfind(b"\n") + 1
                if not cut and len(data) >= MAX_LINE_BYTES:
                    cut = MAX_LINE_BYTES
                carry = data[cut:]
                if cut:
                    self._deliver(stream, data[:cut].decode("utf-8", "replace"))
                gevent.sleep(0)  # let the other sessions (and the HTTP API) run between chunks
        except (OSError, ValueError):
            log.debug("pid %s: %s pipe closed while reading", self.pid, stream)
        if carry:
            self._deliver(stream, carry.decode("utf-8", "replace"))

    def _deliver(self, stream, text):
        if self.plan.mode in ("command", "script") and not self.startup_success_seen:
            text = "".join(line for line in text.splitlines(keepends=True) if not self._take_marker(line))
            if not text:
                return
        self._keep(stream, text)
        try:
            self._on_output(stream, text)
        except Exception:
            log.exception("pid %s: output callback failed", self.pid)

    def _keep(self, stream, text):
        """Remember the end of the output (for StartupError), bounded in bytes."""
        self._lines.append((stream, text))
        self._kept += len(text)
        while self._kept > OUTPUT_BYTES_KEPT and len(self._lines) > 1:
            self._kept -= len(self._lines.popleft()[1])

    def _take_marker(self, line):
        """Record a startup marker line; True if ``line`` was one (and must not be passed on)."""
        if self.plan.mode not in ("command", "script"):
            return False
        text = line.rstrip("\r\n")
        if text == MARKER_BEGIN and not self.startup_begin_seen:
            self.startup_begin_seen = True
            return True
        if text == MARKER_SUCCESS and self.startup_begin_seen and not self.startup_success_seen:
            self.startup_success_seen = True
            return True
        return False

    def output_lines(self):
        """The last (stream, line) pairs (about OUTPUT_BYTES_KEPT of them), markers excluded."""
        return [(stream, line) for stream, text in self._lines for line in text.splitlines(keepends=True)]

    def startup_output(self):
        """Captured output as Kallichore reports it: lines joined by "\\n", no final newline."""
        return "\n".join(line.removesuffix("\n").removesuffix("\r") for _, line in self.output_lines())

    # -- exit -----------------------------------------------------------------------------------

    def _watch(self):
        code = self._popen.wait()
        done = gevent.joinall(self._readers, timeout=READER_JOIN_TIMEOUT)
        if len(done) < len(self._readers):
            log.warning("pid %s exited but its output pipes are still open; "
                        "dropping further output", self.pid)
            gevent.killall(self._readers)
        self._popen.stdout.close()
        self._popen.stderr.close()
        self.exit_code = code if code >= 0 else -1
        self.exited.set()
        log.debug("pid %s exited with code %s", self.pid, self.exit_code)
        if self._on_exit is not None:
            try:
                self._on_exit(self.exit_code)
            except Exception:
                log.exception("pid %s: exit callback failed", self.pid)

    def cwd(self):
        """The kernel's current directory, or None if it can't be read (cheap: one readlink)."""
        try:
            if self._psutil is None:
                self._psutil = psutil.Process(self.pid)
            return self._psutil.cwd()
        except (psutil.Error, OSError):
            return None

    def wait(self, timeout=None):
        """The exit code once exited, or None if still running after ``timeout`` seconds."""
        self.exited.wait(timeout)
        return self.exit_code

    # -- signals --------------------------------------------------------------------------------

    def interrupt(self):
        """SIGINT to the kernel's process group, like jupyter_client: a child the kernel is running
        (``!sleep``) is interrupted too, as in a terminal. Windows uses JPY_INTERRUPT_EVENT."""
        if IS_WINDOWS:
            raise NotImplementedError("On Windows, interrupt by setting JPY_INTERRUPT_EVENT")
        self._signal_kernel(signal.SIGINT)

    def kill_tree(self, timeout=5.0):
        """SIGKILL the kernel, its process group and all its descendants; wait up to ``timeout``.

        Descendants are collected before the kernel dies (then they are re-parented and
        untraceable); the group catches those that escaped the tree. True if all are gone.
        """
        victims = self._descendants()
        self._signal_tree(_SIGKILL, victims)
        return self._wait_gone(victims, timeout)

    def terminate_tree(self, timeout=5.0):
        """SIGTERM the tree, SIGKILL what is left after ``timeout``. True if all are gone."""
        victims = self._descendants()
        self._signal_tree(signal.SIGTERM, victims)
        if self._wait_gone(victims, timeout):
            return True
        self._signal_tree(_SIGKILL, victims)
        return self._wait_gone(victims, timeout)

    def _running(self):
        return self._popen.returncode is None

    def _descendants(self):
        if not self._running():
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except (psutil.Error, OSError):  # (OSError: out of fds; the process group is still signalled)
            return []

    def _signal_kernel(self, sig):
        """Signal the kernel's process group (it leads it), or just the kernel if it left it.

        Only while the kernel is unreaped: until then its pid, hence the group id, cannot be reused.
        """
        if not self._running():
            return
        if not IS_WINDOWS:
            try:
                os.killpg(self.pid, sig)
                return
            except OSError:
                pass
        try:
            self._popen.send_signal(sig)
        except OSError:
            pass

    def _signal_tree(self, sig, victims):
        self._signal_kernel(sig)
        for proc in victims:
            _signal_proc(proc, sig)

    def _wait_gone(self, victims, timeout):
        """Wait (bounded) for the kernel to have exited and ``victims`` to be gone."""
        deadline = time.monotonic() + timeout
        self.exited.wait(timeout)
        while any(_proc_alive(proc) for proc in victims):
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(POLL_INTERVAL)
        return not self._running()

    # -- failure details ------------------------------------------------------------------------

    def describe_failure(self, kind):
        """The StartupError ``details`` for ``kind`` "exit" (died while starting) or "connect"
        (did not connect), using the startup markers to tell which step failed."""
        if kind not in ("exit", "connect"):
            raise ValueError(f"Unknown failure kind: {kind!r}")
        kernel_failed = ("Kernel failed to start" if kind == "exit"
                         else "Kernel failed to connect to ZeroMQ sockets")
        if self.plan.mode not in ("command", "script"):
            return kernel_failed
        step = f"Startup {self.plan.mode}"
        if self.startup_success_seen:
            cause = kernel_failed
        elif self.startup_begin_seen:
            cause = f"{step} failed" if kind == "exit" else f"{step} failed to execute"
        else:
            cause = (f"{step} could not be executed" if kind == "exit"
                     else f"{step} failed before execution")
        return f"Shell: {self.plan.shell}\n{step}: {self.plan.arg}\n{cause}"


def _os_error_text(err):
    """Rust's rendering of an OS error, which clients may already show: "<text> (os error N)"."""
    if err.errno is None:
        return str(err)
    return f"{err.strerror} (os error {err.errno})"

"""Start a child without forking the server in Python (POSIX), and learn of its exit from the hub.

gevent's ``subprocess.Popen`` forks in Python: while the server's memory is copied and the parent's
side of the fork runs, the hub is held, and every other session's messages wait (tools/bench_spawn.py
measures it). With a ``preexec_fn`` not even the standard library could use vfork. ``os.posix_spawn``
(glibc: clone with CLONE_VM|CLONE_VFORK, no Python in the child) returns as soon as the child has
exec'd, and reports an exec failure as an OSError.

What posix_spawn cannot do, the program started here must do itself: it gets no working directory
(it starts in ours), no pre-exec hook (so no PR_SET_PDEATHSIG), and inherits any inheritable
descriptor of ours (Python makes none: PEP 446). kcgevent starts only its own guardian this way, which
takes ``--cwd`` and ``--parent`` and closes stray descriptors first thing (guardian.py).

The exit is learnt from the hub's child watcher (SIGCHLD), never a blocking waitpid: the watcher is
started before the hub runs again, so it cannot miss the child (the loop reaps only in its own turn).
"""
import os
import shutil
import signal
import sys

import gevent
from gevent import monkey
from gevent.event import Event

# Popen's restore_signals: what Python ignores, the child gets back at the default.
_RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name))


def available():
    """posix_spawn with a new session: Linux (glibc >= 2.26, musl). Elsewhere (macOS) gevent's Popen
    stays in use: untested there, and a Python-level fork is what it always was."""
    return sys.platform.startswith("linux") and hasattr(os, "posix_spawn")


class SpawnedChild:
    """What KernelProcess uses of a Popen: ``pid``, ``stdout``/``stderr`` (gevent file objects on the
    pipes), ``returncode`` (None while running; -N if killed by signal N), ``wait()`` (cooperative),
    ``send_signal()``."""

    def __init__(self, pid, stdout, stderr, watcher):
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = None
        self._exited = Event()
        self._watcher = watcher
        watcher.start(self._on_exit)

    def _on_exit(self):
        self._watcher.stop()
        self.returncode = os.waitstatus_to_exitcode(self._watcher.rstatus)
        self._watcher.close()
        self._exited.set()

    def wait(self, timeout=None):
        """The return code once the child has exited (None if still running after ``timeout``)."""
        self._exited.wait(timeout)
        return self.returncode

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        """Only while unreaped: after that the pid may be another process's."""
        if self.returncode is None:
            os.kill(self.pid, sig)


def spawn(argv, env=None):
    """Start ``argv`` in a new session, stdin /dev/null, stdout/stderr to pipes; a SpawnedChild.

    ``argv[0]`` without a slash is looked up in ``env``'s PATH, as Popen does. Raises OSError if the
    program cannot be executed (errno from exec), ValueError for an argument the OS cannot take.
    """
    from gevent.fileobject import FileObjectPosix  # (POSIX only: this module is imported on Windows too)
    env = dict(os.environ if env is None else env)
    path = _resolve(argv[0], env)
    hub = gevent.get_hub()
    hub.loop.install_sigchld()  # (libev leaves SIGCHLD alone until a child is to be watched)
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    try:
        # (gevent's patched posix_spawn would start a watcher of its own, which we do not use)
        pid = monkey.get_original("os", "posix_spawn")(
            path, list(argv), env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
            setsid=True, setsigmask=(), setsigdef=_RESET_SIGNALS)
        watcher = hub.loop.child(pid)  # before anything yields to the hub (referenced, as gevent's Popen does)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return SpawnedChild(pid, FileObjectPosix(out_r, "rb"), FileObjectPosix(err_r, "rb"), watcher)


def _resolve(program, env):
    if os.path.dirname(program):
        return program
    found = shutil.which(program, path=os.pathsep.join(os.get_exec_path(env)))
    if found is None:
        raise FileNotFoundError(2, os.strerror(2), program)
    return found


def _pipe():
    """A pipe whose ends are not 0, 1 or 2 (a dup2 onto itself would keep close-on-exec set)."""
    ends = []
    for fd in os.pipe():
        if fd < 3:
            import fcntl
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = moved
        ends.append(fd)
    return ends

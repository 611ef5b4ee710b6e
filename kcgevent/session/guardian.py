"""The kernel guardian: a tiny parent process per kernel that makes sure nothing outlives its supervisor
for longer than it should.

Run as ``python -I -S guardian.py --dir DIR [options]``, the kernel's command line in ``DIR/argv`` (its
arguments, NUL-separated; not on ours, so that nothing mistakes the guardian for the kernel) (standard
library only, no kcgevent import: it starts in a few milliseconds and no kernel environment can break
it; not even `json`, whose import takes longer than the rest and 1.3 MiB: every kernel start waits for
it, and every kernel has a guardian). It

- is started by the server with posix_spawn, not a fork (process.py, native_spawn.py), so it does
  itself what a pre-exec hook would have done: it closes every descriptor it inherited beyond stdio,
  takes the server's pid (``--parent``) and asks for SIGTERM when the server dies (PR_SET_PDEATHSIG;
  SIGUSR1 with ``--lock``), and starts the kernel in ``--cwd``;
- starts the kernel as its child, in its own process group (the group the server signals for an
  interrupt), with SIGINT/SIGTERM/SIGPIPE back at their defaults;
- is the child subreaper (Linux) of everything below it, so a process the kernel starts and then
  abandons (``sleep 600 &``) stays in its tree and is killed with it;
- writes ``status.json`` (atomically) in its directory: its own pid, the kernel's pid, and the kernel's
  exit code once known; a supervisor that restarts finds the kernel again through this file;
- watches the supervisor. Without ``--lock`` the supervisor is its parent: when the parent dies (or
  sends SIGTERM) the guardian ends the kernel's whole tree at once. With ``--lock FILE`` (a state dir)
  the supervisor is whoever holds the POSIX lock on FILE: while no one holds it, a countdown of
  ``--grace`` seconds runs; a supervisor that takes the lock again stops it; when it expires, the tree
  is ended;
- with ``--output DIR``, gives the kernel ``DIR/stdout`` and ``DIR/stderr`` (append-only files) instead
  of its own pipes, so a kernel that prints while no supervisor runs never gets EPIPE;
- with ``--lock``, listens to the kernel's iopub while no supervisor does (once the supervisor wrote
  ``DIR/iopub.json``: the endpoint, and where pyzmq is), keeping every message in ``DIR/capture``; a
  supervisor that is back and listening itself creates ``DIR/capture.stop``, and the guardian then
  hands over ``DIR/capture.done`` (the supervisor relays it and drops the overlap with its own stream);
- exits with the kernel's status (the same code, or killed by the same signal) after ending whatever
  the kernel left behind.
"""
import errno
import os
import struct
import sys
import time

# The functions of `signal` are those of _signal: the module only wraps them with enums, and importing
# it (enum, functools, collections) took a fifth of the guardian's start, which every kernel start waits for.
import _signal as signal

try:
    import ctypes
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except (ImportError, OSError):  # pragma: no cover - exotic builds
    _LIBC = None
try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TICK = 0.2  # seconds between checks of the supervisor when no signal arrives
LOCK_TICK = 0.05  # the same with a state dir: the sooner we listen to iopub, the less is lost
CAPTURE_UNCLAIMED = 30.0  # seconds a capture goes on while a supervisor holds the lock without claiming it
TERM_WAIT = 2.0  # seconds the tree gets between SIGTERM and SIGKILL
PF_EXITING = 0x4  # /proc/<pid>/stat flags: the process is exiting
_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t)


def prctl(option, value):
    if _LIBC is not None:
        _LIBC.prctl(option, value, 0, 0, 0)


def to_json(value):
    """`value` (a dict, list, str, int or None) as JSON, ASCII only (what json.dumps would write, but
    control characters as \\u escapes)."""
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        out = []
        for char in value:
            code = ord(char)
            if char in '"\\':
                out.append("\\" + char)
            elif 0x20 <= code < 0x7f:
                out.append(char)
            elif code < 0x10000:
                out.append("\\u%04x" % code)
            else:  # a surrogate pair
                code -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 | code >> 10, 0xDC00 | code & 0x3FF))
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(to_json(item) for item in value) + "]"
    return "{" + ", ".join(f"{to_json(key)}: {to_json(item)}" for key, item in value.items()) + "}"


def write_status(directory, status):
    tmp = os.path.join(directory, "status.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(to_json(status))
    os.replace(tmp, os.path.join(directory, "status.json"))


def lock_held(path):
    """True if some process holds a POSIX lock on `path` (tested with F_GETLK: we never take it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        request = struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, request)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
    except OSError:
        return True  # cannot tell: do not end kernels on a doubt
    finally:
        os.close(fd)


class Capture:
    """The kernel's iopub, kept in a file while no supervisor listens (records: frame count, then each
    frame as length + bytes; big-endian 4-byte integers).

    Made ready while the supervisor runs (pyzmq loaded, connected, but not subscribed: the kernel's PUB
    then sends us nothing), so that `start()` at the supervisor's death only has to subscribe. (A
    supervisor that dies before we saw its iopub.json gets one made then, a little later.)
    """

    def __init__(self, directory):
        import json  # (only with a state dir: not on every kernel's start)
        with open(os.path.join(directory, "iopub.json")) as f:
            config = json.load(f)
        for path in config.get("pythonpath") or []:
            if path not in sys.path:
                sys.path.append(path)
        import zmq
        self.zmq = zmq
        self.directory = directory
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(config["url"])
        self.file = None

    def start(self):
        self.socket.setsockopt(self.zmq.SUBSCRIBE, b"")
        fd = os.open(os.path.join(self.directory, "capture"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.file = os.fdopen(fd, "ab")

    def pump(self, timeout):
        """Keep what arrives within `timeout` seconds (and whatever is already there)."""
        zmq = self.zmq
        if self.socket.poll(int(timeout * 1000)):
            while True:
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.file.write(struct.pack(">I", len(frames)))
                for frame in frames:
                    self.file.write(struct.pack(">I", len(frame)))
                    self.file.write(frame)
            self.file.flush()

    def finish(self):
        """Hand the capture over (the supervisor listens itself now)."""
        self.pump(0)
        self.file.close()
        self.socket.close(0)
        self.context.term()
        os.replace(os.path.join(self.directory, "capture"), os.path.join(self.directory, "capture.done"))
        try:
            os.unlink(os.path.join(self.directory, "capture.stop"))
        except OSError:
            pass


def prepare_capture(directory):
    """A Capture made ready; None while the supervisor has not said where iopub is; False if it cannot
    be made (no pyzmq...): then the gap stays as wide as the supervisor's absence."""
    if not os.path.exists(os.path.join(directory, "iopub.json")):
        return None
    try:
        return Capture(directory)
    except Exception:  # never let listening cost the kernel its guardian
        return False


def descendants(root):
    """Pids below `root` (Linux /proc walk; elsewhere empty: the process group is signalled instead)."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def signal_tree(kernel, sig):
    """`sig` to every process below us: as the subreaper we are the ancestor of all the kernel started,
    also of those that left its process group. Without /proc, the kernel alone."""
    pids = descendants(os.getpid()) if os.path.isdir("/proc") else [kernel]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def reap(kernel_pid):
    """Reap every exited child; return the kernel's wait status if it was among them, else None."""
    status = None
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == kernel_pid:
            status = code


def spawn(argv, output_dir, cwd=None):
    """Fork and exec the kernel (in `cwd`); raise OSError (errno from chdir or exec) if it could not be
    started."""
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, False)
    pid = os.fork()
    if pid == 0:  # the kernel
        try:
            os.close(read_end)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if output_dir:
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    out = os.open(os.path.join(output_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    os.dup2(out, fd)
                    os.close(out)
            if cwd:
                os.chdir(cwd)
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(write_end, b"%d %s" % (exc.errno or 0, (exc.strerror or str(exc)).encode()))
        finally:
            os._exit(127)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        failure = f.read()
    if failure:
        os.waitpid(pid, 0)
        code, _, text = failure.partition(b" ")
        raise OSError(int(code), text.decode(errors="replace"))
    return pid


def close_inherited():
    """Close every descriptor above stdio: posix_spawn passed on whatever the server had inheritable (Python
    makes none, a C library might), and neither we nor the kernel should hold it."""
    try:
        top = max(int(name) for name in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        top = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 256
    os.closerange(3, top + 1)


def parse(args):
    options = {"lock": None, "grace": 0.0, "output": None, "dir": None, "parent": None, "cwd": None}
    while args:
        name, value = args[0], args[1]
        options[name.lstrip("-")] = value
        args = args[2:]
    options["grace"] = float(options["grace"])
    options["parent"] = int(options["parent"] or os.getppid())
    with open(os.path.join(options["dir"], "argv"), "rb") as f:
        return options, [os.fsdecode(arg) for arg in f.read().split(b"\0")]


def mirror_exit(status):
    """Exit the way the kernel did."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(args):
    close_inherited()
    options, argv = parse(args)
    directory = options["dir"]
    parent = options["parent"]
    watched = [signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]
    wait_signal = signal_waiter(watched)
    # The supervisor's death wakes us at once. Without a state dir it is the end (SIGTERM: the tree is
    # ended); with one, the supervisor may come back and the lock tells (SIGUSR1), and we listen to
    # iopub as early as we can.
    prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1 if options["lock"] else signal.SIGTERM))
    if os.getppid() != parent:  # it died before the prctl
        if not options["lock"]:
            remove_session_files(directory)
            os._exit(1)  # no one to start the kernel for
        os.kill(os.getpid(), signal.SIGUSR1)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the kernel, our group mate
    try:
        kernel = spawn(argv, options["output"], options["cwd"])
    except OSError as exc:
        write_status(directory, {"guardian_pid": os.getpid(), "spawn_error": [exc.errno, exc.strerror]})
        os._exit(127)
    write_status(directory, {"guardian_pid": os.getpid(), "kernel_pid": kernel, "exit_code": None})
    if options["lock"] and options["output"]:
        null = os.open(os.devnull, os.O_WRONLY)  # our own pipes may lose their reader: never write there
        os.dup2(null, 1)
        os.dup2(null, 2)
    orphaned_since = None
    ending = None  # monotonic time of the SIGTERM to the tree, once we decided to end it
    capture, claimed_wait, standby = None, None, None
    tick = LOCK_TICK if options["lock"] else TICK
    while True:
        status = reap(kernel)
        if status is not None:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            write_status(directory, {"guardian_pid": os.getpid(), "kernel_pid": kernel, "exit_code": code})
            end_tree(kernel)
            if not options["lock"] and supervisor_gone(parent, status):
                remove_session_files(directory)  # nobody else will: the supervisor is gone for good
            mirror_exit(status)
        now = time.monotonic()
        if ending is None:
            if options["lock"]:
                alive = lock_held(options["lock"])
            else:
                alive = os.getppid() == parent
            if alive:
                orphaned_since = None
            elif orphaned_since is None:
                orphaned_since = now
            if options["lock"]:
                if capture is None and standby is None:
                    # Also once the supervisor is gone: it may die before we saw its iopub.json (a
                    # fast kernel and client can get from the start to a busy cell in 100 ms).
                    standby = prepare_capture(directory)
                if not alive and capture is None and standby and \
                        not os.path.exists(os.path.join(directory, "capture.done")):
                    capture, standby = standby, None
                    claimed_wait = None
                    try:
                        capture.start()
                    except Exception:
                        capture = None
                elif alive and capture is not None:
                    claimed_wait = claimed_wait or now
                    if os.path.exists(os.path.join(directory, "capture.stop")) or \
                            now - claimed_wait > CAPTURE_UNCLAIMED:
                        capture.finish()
                        capture = None
            if orphaned_since is not None and now - orphaned_since >= options["grace"]:
                ending = now
                signal_tree(kernel, signal.SIGTERM)
        elif now - ending >= TERM_WAIT:
            signal_tree(kernel, signal.SIGKILL)
        if capture is not None:
            capture.pump(tick)
            signo = wait_signal(0)
        else:
            signo = wait_signal(tick)
        if signo in (signal.SIGTERM, signal.SIGHUP) and ending is None:
            if not options["lock"] or signo == signal.SIGTERM:
                ending = time.monotonic()
                signal_tree(kernel, signal.SIGTERM)


def signal_waiter(signals):
    """A function waiting up to `timeout` s for one of `signals`; returns its number or None.

    sigtimedwait where there is one (Linux); elsewhere (macOS) handlers and a sleep that a signal cuts
    short at most by TICK."""
    if hasattr(signal, "sigtimedwait"):
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)

        def wait(timeout):
            got = signal.sigtimedwait(signals, timeout)
            return got.si_signo if got is not None else None
        return wait
    received = []
    for sig in signals:
        signal.signal(sig, lambda signo, _frame: received.append(signo))

    def wait(timeout):
        if not received:
            time.sleep(timeout)
        return received.pop(0) if received else None
    return wait


def supervisor_gone(parent, kernel_status):
    """Whether our supervisor (`parent`, no state dir) is gone or going, when the kernel has exited.

    A supervisor that dies closes its end of the kernel's output pipes before its children are
    handed to a new parent, so a kernel may die of SIGPIPE while getppid() still names the dying
    supervisor: its PF_EXITING flag (or, for that case only, 0.1 s more) tells. A supervisor that is
    alive removes a session's files itself, and may be restarting the kernel under the same names."""
    deadline = time.monotonic() + (0.1 if os.WIFSIGNALED(kernel_status) and
                                   os.WTERMSIG(kernel_status) == signal.SIGPIPE else 0.0)
    while True:
        if os.getppid() != parent:
            return True
        try:
            with open(f"/proc/{parent}/stat", "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING:
                return True
        except (OSError, ValueError, IndexError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def remove_session_files(directory):
    """The supervisor died without a state dir: remove this session's files from its private kernel
    directory (``<dir>/../kcgevent-*``: the connection and registration files, the ipc sockets and our
    own directory), and the directory itself once the last session's guardian has done so."""
    kernel_dir, name = os.path.split(os.path.normpath(directory))
    if not name.startswith("launcher_") or not os.path.basename(kernel_dir).startswith("kcgevent-"):
        return
    stem = name[len("launcher_"):]
    digest = stem.rsplit("-", 1)[-1]  # the session id's hash, which also names its ipc sockets
    try:
        entries = os.listdir(kernel_dir)
    except OSError:
        return
    mine = {f"connection_{stem}.json", f"registration_{stem}.json"}
    for entry in entries:
        if entry in mine or (len(digest) == 10 and entry.startswith(f"k-{digest}")):
            try:
                os.unlink(os.path.join(kernel_dir, entry))
            except OSError:
                pass
    import shutil  # (only here: the guardian's start stays small)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.rmdir(kernel_dir)  # fails while other sessions' files are there: the last one removes it
    except OSError:
        pass


def end_tree(kernel):
    """The kernel is gone: whatever it left behind goes too (SIGTERM, then SIGKILL)."""
    if not descendants(os.getpid()):
        return
    signal_tree(kernel, signal.SIGTERM)
    deadline = time.monotonic() + TERM_WAIT
    while time.monotonic() < deadline:
        reap(-1)
        if not descendants(os.getpid()):
            break
        time.sleep(0.05)
    signal_tree(kernel, signal.SIGKILL)
    time.sleep(0.01)
    reap(-1)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # pragma: no cover
        os._exit(130)
    except OSError as exc:
        if exc.errno != errno.EINTR:
            raise

"""The state dir (--state-dir): what a server needs to come back after it died, and the lock that keeps
a second server off it.

    DIR/lock                   POSIX lock held by the running server (kernel guardians test it)
    DIR/server.json            listener address, token, server_id
    DIR/kernels/               the kernels' connection files
    DIR/sessions/<stem>/id     the session id (written once: a damaged record still names its session)
    DIR/sessions/<stem>/session.json   the session's model (atomic replace)
    DIR/sessions/<stem>/kernel/        the launcher's files (guardian status, kernel stdout/stderr)
    DIR/sessions/<stem>/log/           the outbound log (log_file.FileLog)

Every directory is 0700 and every file 0600. Records are replaced atomically (write to a temporary
file, rename); nothing is fsynced: this guards against the server dying, not the machine.
"""
import json
import logging
import os
import shutil
import struct

try:
    import fcntl
except ImportError:  # Windows: no state dir
    fcntl = None

from .kernel_files import KernelFiles
from .session.log_file import FileLog

log = logging.getLogger(__name__)

RECORD_VERSION = 1
_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t); as in session/guardian.py


class StateDirError(Exception):
    """The state dir cannot be used (one line, for the command line)."""


def make_private_dir(path):
    """Create `path` (0700) if missing; take group/other bits away if it exists."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def atomic_write(path, data):
    """Replace `path` by `data` (bytes): readers see the old or the new content, never a part."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def lock_holder(path):
    """The pid holding a POSIX lock on `path`, or None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return pid if kind != fcntl.F_UNLCK else None
    except OSError:
        return None
    finally:
        os.close(fd)


class SavedSession:
    """One session as found in the state dir: its id, its record (None if unreadable) and what is wrong."""

    def __init__(self, directory, session_id, record, problem):
        self.directory = directory
        self.session_id = session_id
        self.record = record
        self.problem = problem


class StateStore:
    """A locked state dir. `open()` it; `close()` (or the process's end) lets the next server in."""

    def __init__(self, path):
        if fcntl is None:
            raise StateDirError("--state-dir is not supported on this platform")
        self.path = os.path.abspath(path)
        self.lock_path = os.path.join(self.path, "lock")
        self.sessions_dir = os.path.join(self.path, "sessions")
        self.kernels_dir = os.path.join(self.path, "kernels")
        self._lock_fd = None

    @classmethod
    def open(cls, path):
        """Create (if needed) and lock the state dir at `path`; StateDirError if another server has it."""
        store = cls(path)
        try:
            make_private_dir(store.path)
            make_private_dir(store.sessions_dir)
            make_private_dir(store.kernels_dir)
            fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirError(f"Cannot use the state dir {store.path}: {exc.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = lock_holder(store.lock_path)
            who = f" (pid {holder})" if holder else ""
            raise StateDirError(f"Another kcgevent server{who} is using the state dir {store.path}") from None
        store._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return store

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- the server record --------------------------------------------------------------------------

    def load_server(self):
        """The saved server record, or {} if there is none (or it is unreadable: reported)."""
        path = os.path.join(self.path, "server.json")
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("State dir: the server record %s is unreadable (%s); starting afresh", path, exc)
            return {}
        return record if isinstance(record, dict) else {}

    def save_server(self, record):
        atomic_write(os.path.join(self.path, "server.json"), json.dumps(record, indent=1).encode())

    # -- sessions -------------------------------------------------------------------------------

    def session_dir(self, session_id):
        return os.path.join(self.sessions_dir, KernelFiles.file_stem(session_id))

    def launcher_dir(self, session_id):
        return os.path.join(self.session_dir(session_id), "kernel")

    def open_log(self, session_id, limit, byte_limit=None):
        return FileLog(os.path.join(self.session_dir(session_id), "log"), limit, byte_limit)

    def add_session(self, session_id):
        """Make the session's directory and name it (before anything else is saved)."""
        directory = self.session_dir(session_id)
        make_private_dir(directory)
        atomic_write(os.path.join(directory, "id"), session_id.encode("utf-8", "surrogatepass"))

    def save_session(self, session_id, record):
        record = {"version": RECORD_VERSION, **record}
        atomic_write(os.path.join(self.session_dir(session_id), "session.json"),
                     json.dumps(record, separators=(",", ":")).encode())

    def remove_session(self, session_id):
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)

    def clear_sessions(self):
        """Every session is gone (clean shutdown): no record, key or output is left."""
        for name in os.listdir(self.sessions_dir):
            shutil.rmtree(os.path.join(self.sessions_dir, name), ignore_errors=True)
        for name in os.listdir(self.kernels_dir):
            try:
                os.unlink(os.path.join(self.kernels_dir, name))
            except OSError:
                pass

    def load_sessions(self):
        """Every saved session as a SavedSession, oldest first; damaged ones say what is wrong."""
        found = []
        for name in sorted(os.listdir(self.sessions_dir)):
            directory = os.path.join(self.sessions_dir, name)
            if not os.path.isdir(directory):
                continue
            try:
                with open(os.path.join(directory, "id"), "rb") as f:
                    session_id = f.read().decode("utf-8", "surrogatepass")
            except OSError:
                log.warning("State dir: %s names no session; removed", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            record, problem = None, None
            try:
                with open(os.path.join(directory, "session.json")) as f:
                    record = json.load(f)
                if not isinstance(record, dict) or record.get("session_id") != session_id:
                    raise ValueError("not a record of this session")
            except FileNotFoundError:
                problem = "its record is missing"
                record = None
            except (OSError, ValueError) as exc:
                problem = f"its record is damaged ({exc})"
                record = None
            found.append(SavedSession(directory, session_id, record, problem))
        found.sort(key=lambda saved: (saved.record or {}).get("created", 0))
        return found

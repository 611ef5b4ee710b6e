"""Unix-domain socket transport: the main API socket and the per-session channel sockets.

Differences from kcserver, on purpose (kallichore-behavior.md sections 1.3, 3.1, 5, 7 item 14):
sockets are created 0600 atomically (bound under umask 0o177, no chmod race); per-session sockets
live in a private 0700 directory and are named after a hash of the whole session id, so ids with a
common prefix never collide; a live socket or a non-socket file at the path is never removed; each
session has one listener, closed with the session.
"""
import collections
import hashlib
import os
import socket
import stat
import tempfile

from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from .select import TransportError

MAX_PATH_BYTES = 104  # sun_path on macOS/BSD; Linux allows 108, clients assume the smaller one
BACKLOG = 128


class UnixWSGIServer(WSGIServer):
    """WSGIServer for listeners without an IP address (Unix sockets, named pipes).

    pywsgi leaves SERVER_NAME and SERVER_PORT empty and REMOTE_ADDR unset when the address is not a
    (host, port) tuple. PEP 3333 requires the first two to be non-empty, and Werkzeug builds URLs
    from them when a request has no Host header; REMOTE_ADDR is set empty because there is no peer IP.
    """

    def update_environ(self):
        if not isinstance(self.address, tuple):
            self.environ.setdefault("SERVER_NAME", "localhost")
            self.environ.setdefault("SERVER_PORT", "80")
            self.environ.setdefault("REMOTE_ADDR", "")
            self.environ.setdefault("REMOTE_PORT", "")
        super().update_environ()


def default_socket_dir():
    """$XDG_RUNTIME_DIR (private to the user) if set, else the system temp dir."""
    return os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


def _fits(path):
    return len(os.fsencode(path)) <= MAX_PATH_BYTES


def _check_length(path):
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise TransportError(
            f"Unix socket path too long: {size} characters (maximum: {MAX_PATH_BYTES}). Path: {path}")


def _pick_dir(socket_dir, name):
    """The directory for `name`: socket_dir if given, else XDG_RUNTIME_DIR, falling back to the temp
    dir when the XDG path would exceed the length limit."""
    if socket_dir is not None:
        return socket_dir
    preferred = default_socket_dir()
    if not _fits(os.path.join(preferred, name)):
        return tempfile.gettempdir()
    return preferred


def _remove_stale(path):
    """Remove a socket file nobody listens on; refuse anything else (live socket, regular file...)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(
            f"Refusing to replace {path}: it exists and is not a socket; remove it or choose another path")
    probe = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except OSError as exc:
        raise TransportError(f"Cannot check existing socket {path}: {exc}") from exc
    else:
        raise TransportError(
            f"Unix socket {path} is in use by another process; stop it or choose another path")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TransportError(f"Cannot remove stale socket {path}: {exc}") from exc


def bind_unix(path):
    """Bind and listen on a 0600 Unix socket at path. Returns (socket, (st_dev, st_ino)); the identity
    lets close() unlink the file only if it is still the one we created."""
    _check_length(path)
    _remove_stale(path)
    sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask is process-wide, but bind() does not yield to other greenlets; only a native thread
    # creating a file in these few microseconds would see it.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise TransportError(f"Cannot bind Unix socket {path}: {exc}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(BACKLOG)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path, identity):
    """Unlink path if it is still the file we bound (someone may have replaced it since)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _make_private_dir(path):
    """Create (or take back) a 0700 directory that must belong to us, never following a symlink."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise TransportError(
                f"{path} exists and is not a directory owned by this user; remove it") from None
    except OSError as exc:
        raise TransportError(f"Cannot create socket directory {path}: {exc}") from exc
    os.chmod(path, 0o700)


class UnixListener:
    """The main API socket: --unix-socket, or <socket_dir>/kc-<pid>.sock (the name clients expect)."""

    transport = "socket"

    def __init__(self, unix_socket=None, socket_dir=None, pid=None):
        pid = os.getpid() if pid is None else pid
        if unix_socket:
            path = os.path.abspath(unix_socket)
        else:
            name = f"kc-{pid}.sock"
            path = os.path.join(_pick_dir(socket_dir, name), name)
        _check_length(path)
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"Cannot create directory for {path}: {exc}") from exc
        self.path = path
        self.socket, self._identity = bind_unix(path)
        self._closed = False

    def describe(self):
        return {"socket_path": self.path}

    def listening_line(self):
        return f"Listening on Unix socket: {self.path}"

    def wsgi_server(self, app, **kwargs):
        return UnixWSGIServer(self.socket, app, **kwargs)

    def close(self):
        if not self._closed:
            self._closed = True
            self.socket.close()
            unlink_if_ours(self.path, self._identity)


_Channel = collections.namedtuple("_Channel", "path server identity")


class SessionSockets:
    """One private Unix socket per session for its channel (Positron connects to it with
    ws+unix://<path>:/api/channels/<id>; every request path is passed through to the app).

    Sockets live in <socket_dir>/kc-<pid>.d/ (0700) as <sha256(session_id)[:16]>.sock, 0600.
    server_kwargs go to each UnixWSGIServer (default log=None: no access log).
    """

    def __init__(self, socket_dir=None, pid=None, **server_kwargs):
        self._dir_name = f"kc-{os.getpid() if pid is None else pid}.d"
        self._socket_dir = socket_dir
        self._dir = None
        self._channels = {}
        server_kwargs.setdefault("log", None)
        self._server_kwargs = server_kwargs

    def _private_dir(self):
        if self._dir is None:
            sample = os.path.join(self._dir_name, "0" * 16 + ".sock")
            candidates = (self._socket_dir or default_socket_dir(), tempfile.gettempdir())
            parent = next((d for d in candidates if _fits(os.path.join(d, sample))), candidates[-1])
            _check_length(os.path.join(parent, sample))
            path = os.path.join(parent, self._dir_name)
            _make_private_dir(path)
            self._dir = path
        return self._dir

    def path_for(self, session_id):
        """The socket path of an open session channel, or None."""
        channel = self._channels.get(session_id)
        return channel.path if channel else None

    def open(self, session_id, wsgi_app):
        """Serve wsgi_app on the session's socket (created on first call) and return its path."""
        channel = self._channels.get(session_id)
        if channel is None:
            digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            path = os.path.join(self._private_dir(), digest + ".sock")
            sock, identity = bind_unix(path)
            server = UnixWSGIServer(sock, wsgi_app, **self._server_kwargs)
            try:
                server.start()
            except BaseException:
                server.close()
                unlink_if_ours(path, identity)
                raise
            channel = self._channels[session_id] = _Channel(path, server, identity)
        return channel.path

    def close(self, session_id):
        """Stop accepting on the session's socket and remove it. Connections already accepted are
        left to the caller (the channel handler disconnects its client)."""
        channel = self._channels.pop(session_id, None)
        if channel is not None:
            channel.server.stop()
            unlink_if_ours(channel.path, channel.identity)

    def close_all(self):
        for session_id in list(self._channels):
            self.close(session_id)
        if self._dir is not None:
            # A server restarted from a state dir keeps its predecessor's names: sockets that one
            # bound for sessions nobody reconnected to are left in the directory, nobody listening.
            try:
                names = os.listdir(self._dir)
            except OSError:
                names = []  # removed already (by whoever made --socket-dir)
            for name in names:
                try:
                    _remove_stale(os.path.join(self._dir, name))
                except TransportError:
                    pass  # live, or not a socket: not ours to remove
            try:
                os.rmdir(self._dir)
            except OSError:
                pass  # not empty: leave alone what we did not create
            self._dir = None

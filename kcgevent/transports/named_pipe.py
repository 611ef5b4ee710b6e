"""Windows named-pipe transport: \\\\.\\pipe\\kallichore-<pid> for the API, one pipe per session channel.

UNTESTED: CI runs on Linux. Only the pure parts (pipe names, describe(), listening_line()) and the
accept-loop server (with a socket-backed stand-in listener) are exercised by tests. Everything that
calls _winapi (CreateNamedPipe, ConnectNamedPipe, ReadFile, WriteFile, cancellation, CloseHandle) has
never run. The module imports on any platform; _winapi is imported only where it is used.

How it works: pipe handles are opened overlapped, so a read and a write on the same instance can be
pending at once (a WebSocket needs both). Each pending operation waits for completion in a thread of
a dedicated gevent ThreadPool, so the hub never blocks; closing a connection cancels its pending
operations and the handle is released once they have finished. As in multiprocessing.connection,
a fresh pipe instance is created before the previous one is connected, so a client always finds
one. Limits: a connection holds one pool thread per pending operation
(MAX_WAITERS bounds the total); the security descriptor is the default one, as in kcserver.
"""
import io
import sys
import uuid

import gevent
from gevent.threadpool import ThreadPool

from .select import TransportError
from .unix import UnixWSGIServer

PIPE_PREFIX = "\\\\.\\pipe\\"
BUFFER_SIZE = 65536
MAX_WAITERS = 256
_ERROR_NO_DATA = 232
_ERROR_OPERATION_ABORTED = 995
_EOF_ERRORS = (109, _ERROR_NO_DATA, 233)  # ERROR_BROKEN_PIPE, ERROR_NO_DATA, ERROR_PIPE_NOT_CONNECTED

_pool = None


def _waiters():
    global _pool
    if _pool is None:
        _pool = ThreadPool(MAX_WAITERS)
    return _pool


def pipe_name_for_server(pid):
    return f"{PIPE_PREFIX}kallichore-{pid}"


def pipe_name_for_session():
    return f"{PIPE_PREFIX}kallichore-{uuid.uuid4().hex}"


class PipeConnection:
    """Socket-like view of one connected pipe instance: the calls pywsgi and a WebSocket loop make
    (recv, recv_into, send, sendall, makefile('rb'), close). There is no fileno: it cannot be
    select()ed, duplicated or given to code that polls file descriptors (so no simple-websocket
    ping_interval, which uses a selector)."""

    def __init__(self, handle):
        self._handle = handle
        self._pending = set()
        self._closed = False

    def _wait(self, ov):
        """Wait in a pool thread for an overlapped operation; returns (transferred, error)."""
        self._pending.add(ov)
        result = _waiters().spawn(ov.GetOverlappedResult, True)
        result.rawlink(lambda _result: self._finished(ov))
        try:
            return result.get()
        except BaseException:
            ov.cancel()  # e.g. the greenlet was killed: do not leave the thread waiting forever
            raise

    def _finished(self, ov):
        self._pending.discard(ov)
        if self._closed and not self._pending:
            self._release()

    def _release(self):
        import _winapi
        if self._handle is not None:
            _winapi.CloseHandle(self._handle)
            self._handle = None

    def recv(self, bufsize):
        import _winapi
        if self._closed:
            return b""
        try:
            ov, _ = _winapi.ReadFile(self._handle, bufsize, overlapped=True)
        except OSError as exc:
            if exc.winerror in _EOF_ERRORS:
                return b""
            raise
        try:
            _, error = self._wait(ov)
        except OSError as exc:
            if exc.winerror in _EOF_ERRORS:
                return b""
            raise
        return b"" if error == _ERROR_OPERATION_ABORTED else ov.getbuffer()

    def recv_into(self, buffer, nbytes=0):
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def send(self, data):
        import _winapi
        if self._closed:
            raise BrokenPipeError("pipe connection is closed")
        try:
            ov, _ = _winapi.WriteFile(self._handle, data, overlapped=True)
            written, error = self._wait(ov)
        except OSError as exc:
            if exc.winerror in _EOF_ERRORS:
                raise BrokenPipeError(str(exc)) from exc
            raise
        if error:
            raise BrokenPipeError(f"pipe write aborted (error {error})")
        return written

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self.send(view):]

    def makefile(self, mode="rb", buffering=-1):
        if mode != "rb":
            raise ValueError("pipe connections only support makefile('rb')")
        return io.BufferedReader(_PipeReader(self), BUFFER_SIZE if buffering < 1 else buffering)

    def dup(self):
        """simple-websocket (flask-sock) tries dup() and falls back to the original on this error."""
        raise NotImplementedError("pipe connections cannot be duplicated")

    def close(self):
        if not self._closed:
            self._closed = True
            for ov in list(self._pending):
                ov.cancel()
            if not self._pending:
                self._release()


class _PipeReader(io.RawIOBase):
    """Raw reader for makefile(); `_sock` is where WebSocket libraries look for the connection."""

    def __init__(self, conn):
        super().__init__()
        self._sock = conn

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._sock.recv_into(buffer)


class NamedPipeListener:
    """Server end of a named pipe; accept() returns (PipeConnection, name) for each client."""

    transport = "named-pipe"
    socket = None  # nothing the hub can watch: serve with wsgi_server()

    def __init__(self, name):
        self.name = name
        self._closed = False
        self._connecting = None
        self._next = self._create(first=True)

    def _create(self, first=False):
        import _winapi
        flags = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
        if first:  # fail instead of sharing the name with another server
            flags |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
        try:
            return _winapi.CreateNamedPipe(
                self.name, flags, _winapi.PIPE_WAIT,  # byte mode: type and read mode are 0
                _winapi.PIPE_UNLIMITED_INSTANCES, BUFFER_SIZE, BUFFER_SIZE,
                _winapi.NMPWAIT_WAIT_FOREVER, _winapi.NULL)
        except OSError as exc:
            raise TransportError(f"Cannot create named pipe {self.name}: {exc}") from exc

    def accept(self):
        import _winapi
        if self._closed:
            raise OSError("named pipe listener is closed")
        handle, self._next = self._next, self._create()
        conn = PipeConnection(handle)
        try:
            ov = _winapi.ConnectNamedPipe(handle, overlapped=True)
        except OSError as exc:
            if exc.winerror != _ERROR_NO_DATA:  # the client came and went: the reader will see EOF
                conn.close()
                raise
            return conn, self.name
        self._connecting = conn
        try:
            _, error = conn._wait(ov)
        except BaseException:
            conn.close()
            raise
        finally:
            self._connecting = None
        if error:
            conn.close()
            raise OSError(f"ConnectNamedPipe failed (error {error})")
        return conn, self.name

    def describe(self):
        return {"named_pipe": self.name}

    def listening_line(self):
        return f"Listening on named pipe: {self.name}"

    def wsgi_server(self, app, **kwargs):
        return PipeWSGIServer(self, app, **kwargs)

    def close(self):
        import _winapi
        if not self._closed:
            self._closed = True
            if self._connecting is not None:
                self._connecting.close()
            _winapi.CloseHandle(self._next)


class PipeWSGIServer(UnixWSGIServer):
    """WSGIServer fed by a greenlet calling listener.accept(): the hub has no fd to watch for pipes.

    Works with any listener that has `name`, a blocking-cooperative `accept()` and `close()`.
    """

    _accepter = None

    def set_listener(self, listener):
        self.family = None
        self.address = listener.name
        self.socket = listener

    def start_accepting(self):
        if self._accepter is None:
            self._accepter = gevent.spawn(self._accept_loop)

    def stop_accepting(self):
        if self._accepter is not None:
            self._accepter.kill(block=False)
            self._accepter = None

    def _accept_loop(self):
        while True:
            try:
                conn, address = self.socket.accept()
            except (OSError, TransportError):
                if not self.started:
                    return
                self.loop.handle_error(self, *sys.exc_info())
                gevent.sleep(self.min_delay)
                continue
            self.do_handle(conn, address)


class SessionPipes:
    """One named pipe per session channel (the Windows twin of unix.SessionSockets)."""

    def __init__(self, **server_kwargs):
        self._channels = {}
        server_kwargs.setdefault("log", None)
        self._server_kwargs = server_kwargs

    def path_for(self, session_id):
        """The pipe name of an open session channel, or None."""
        server = self._channels.get(session_id)
        return server.address if server else None

    def open(self, session_id, wsgi_app):
        """Serve wsgi_app on the session's pipe (created on first call) and return the pipe name."""
        if session_id not in self._channels:
            listener = NamedPipeListener(pipe_name_for_session())
            server = listener.wsgi_server(wsgi_app, **self._server_kwargs)
            server.start()
            self._channels[session_id] = server
        return self._channels[session_id].address

    def close(self, session_id):
        server = self._channels.pop(session_id, None)
        if server is not None:
            server.stop()

    def close_all(self):
        for session_id in list(self._channels):
            self.close(session_id)

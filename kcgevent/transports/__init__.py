"""Listener shims: where the server listens (tcp, Unix socket, Windows named pipe) and how clients
find it.

Every listener returned by open_listener() has:
  transport         "tcp" | "socket" | "named-pipe"
  socket            the bound, listening gevent socket (None for named pipes)
  describe()        the transport's connection-file fields, in order
  listening_line()  the line printed after binding
  wsgi_server(app, **kwargs)  an unstarted gevent.pywsgi.WSGIServer for this listener (use it rather
                    than WSGIServer(listener.socket, app): it fixes the environ on Unix sockets,
                    sets TCP_NODELAY on TCP, and is the only way to serve a named pipe)
  close()           stop listening and remove the files it created; idempotent
"""
import os

from .select import TransportError, choose_transport
from .tcp import TcpListener, set_nodelay
from .unix import SessionSockets, UnixListener

__all__ = ["TransportError", "choose_transport", "open_listener", "session_channels", "set_nodelay"]


def open_listener(transport, *, port=0, unix_socket=None, socket_dir=None, pid=None):
    """Bind the main listener for an already validated transport; TransportError on failure."""
    pid = os.getpid() if pid is None else pid
    if transport == "tcp":
        return TcpListener(port)
    if transport == "socket":
        return UnixListener(unix_socket, socket_dir, pid)
    if transport == "named-pipe":
        from .named_pipe import NamedPipeListener, pipe_name_for_server  # (Windows only)
        return NamedPipeListener(pipe_name_for_server(pid))
    raise TransportError(f"Invalid transport type '{transport}'")


def session_channels(transport, *, socket_dir=None, pid=None, **server_kwargs):
    """The per-session channel listeners for this transport: SessionSockets (socket), SessionPipes
    (named-pipe), or None for tcp, where channels are WebSocket upgrades on the main port.

    Both have open(session_id, wsgi_app) -> path, path_for(session_id), close(session_id), close_all().
    """
    if transport == "socket":
        return SessionSockets(socket_dir, pid, **server_kwargs)
    if transport == "named-pipe":
        from .named_pipe import SessionPipes
        return SessionPipes(**server_kwargs)
    return None

"""TCP listener on 127.0.0.1 only (IPv4, like kcserver): the API must never be reachable off-host."""
import socket
import sys

from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from .select import TransportError

HOST = "127.0.0.1"
BACKLOG = 128

# On Windows SO_REUSEADDR lets another process bind the same port; SO_EXCLUSIVEADDRUSE is the analogue
# of the Unix flag (quick rebinding after a restart) without the port theft.
_REUSE_OPTION = socket.SO_EXCLUSIVEADDRUSE if sys.platform == "win32" else socket.SO_REUSEADDR


def set_nodelay(sock):
    """Turn off Nagle on a TCP socket: channel frames are small and latency-bound. No-op otherwise."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayWSGIServer(WSGIServer):
    """WSGIServer that sets TCP_NODELAY on every accepted connection (HTTP replies and WebSockets).

    SERVER_NAME is `localhost` (what a reverse lookup of 127.0.0.1 gives) without pywsgi asking the
    resolver at start: that lookup would start gevent's resolver thread pool just for this name.
    """

    def update_environ(self):
        self.environ.setdefault("SERVER_NAME", "localhost")
        super().update_environ()

    def handle(self, sock, address):
        set_nodelay(sock)
        super().handle(sock, address)


class TcpListener:
    """A listening socket on 127.0.0.1:<port>; port 0 lets the OS choose."""

    transport = "tcp"

    def __init__(self, port=0):
        sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _REUSE_OPTION, 1)
            sock.bind((HOST, port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise TransportError(f"Cannot listen on {HOST}:{port}: {exc}") from exc
        self.socket = sock
        self.port = sock.getsockname()[1]

    def describe(self):
        return {"port": self.port, "base_path": f"http://{HOST}:{self.port}"}

    def listening_line(self):
        return f"Listening at {HOST}:{self.port}"

    def wsgi_server(self, app, **kwargs):
        return NoDelayWSGIServer(self.socket, app, **kwargs)

    def close(self):
        self.socket.close()

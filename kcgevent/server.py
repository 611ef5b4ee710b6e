"""Running the standalone server: listener, token, app, discovery, signals.

The order follows kcserver: validate, bind, print where we listen, settle the
token, announce (connection file / handshake socket), serve until shutdown.
Validation errors raise `ServerError`, which the CLI prints as one line and
exits 1 on, before anything is written.
"""
import gc
import logging
import os
import secrets
import signal
import sys

import gevent
from gevent.event import Event

from . import announce, limits
from .api.channels import SocketEndpoints
from .app import create_app
from .config import VERSION, ServerConfig
from .kernel_files import KernelFiles
from .session.launcher import LauncherFactory
from .state import StateDirError, StateStore
from .supervisor import Supervisor
from .transports import TransportError, open_listener, session_channels
from .transports.select import choose_transport

log = logging.getLogger("kcgevent")

BANNER = f"kcgevent: a Jupyter Kernel supervisor. Version {VERSION}."


class ServerError(Exception):
    """A problem with the command line or the environment: print it and exit 1."""


def read_token(token_arg):
    """None for `none`; else the token in FILE (which is then deleted); else a new one."""
    if token_arg is None:
        return secrets.token_hex(8), True
    if token_arg == "none":
        return None, False
    try:
        with open(token_arg) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ServerError(f"Cannot read the token file {token_arg}: {exc.strerror}") from None
    if not token or len(token) > 64:
        raise ServerError(f"The token in {token_arg} must be 1 to 64 characters (got {len(token)})")
    try:
        os.unlink(token_arg)
    except OSError as exc:
        log.warning("Could not delete the token file %s: %s", token_arg, exc)
    return token, False


class Server:
    """One kcgevent server process: call `run()`; it returns when the server has shut down."""

    def __init__(self, *, transport=None, port=0, token=None, unix_socket=None, socket_dir=None,
                 connection_file=None, handshake_socket=None, log_file=None, config=None):
        try:
            self.transport = choose_transport(transport, unix_socket, connection_file, port)
        except TransportError as exc:
            raise ServerError(str(exc)) from None
        self.port = port
        self.token_arg = token
        self.unix_socket = unix_socket
        self.socket_dir = socket_dir
        self.connection_file = connection_file
        self.handshake_socket = handshake_socket
        self.log_file = log_file
        self.config = config or ServerConfig()
        self.stopped = Event()
        self.listener = None
        self.wsgi = None

    def run(self):
        limits.raise_fd_limit()
        state, saved = self._open_state()
        if saved.get("transport") not in (None, self.transport):
            log.warning("State dir: the saved server used transport %s; serving %s on a new address",
                        saved["transport"], self.transport)
            saved = {"token": saved.get("token"), "server_id": saved.get("server_id")}
        self.name_pid = saved.get("name_pid") or os.getpid()  # names default socket paths: keep them
        try:
            self.listener = open_listener(self.transport, port=self.port or saved.get("port") or 0,
                                          unix_socket=self.unix_socket or saved.get("unix_socket"),
                                          socket_dir=self.socket_dir, pid=self.name_pid)
        except TransportError as exc:
            raise ServerError(f"Failed to create transport: {exc}") from None
        print(self.listener.listening_line(), flush=True)
        if "token" in saved and (self.token_arg is None or not os.path.exists(self.token_arg)):
            token, generated = saved["token"], False  # a restart keeps the token clients have
        else:
            token, generated = read_token(self.token_arg)
        if token is None:
            log.warning("Authentication is disabled (--token none): anyone who can reach the server can run code")
        elif generated and not (self.connection_file or self.handshake_socket):
            log.info("Generated random auth token: %s", token)
        self.config.token = token
        supervisor = self._make_supervisor(state, saved)
        app = create_app(self.config, supervisor)
        supervisor.on_shutdown.append(self._stop)
        access_log = logging.getLogger("kcgevent.access") if self.config.access_log else None
        self.wsgi = self.listener.wsgi_server(app, log=access_log, error_log=log,
                                              handler_class=limits.timeout_handler(self.config.http_timeout))
        limits.quiet_accept_errors(self.wsgi)
        self.wsgi.start()
        print(BANNER, flush=True)
        self._announce(supervisor, token)
        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, supervisor.request_shutdown)
        supervisor.start_background()
        # What start-up made (modules, the app, schemas: ~50,000 objects) lives as long as the
        # server: out of the collector's reach, a full collection no longer walks it (12 ms,
        # during which no session is served).
        gc.freeze()
        self.stopped.wait()
        log.info("Server stopped")

    def _open_state(self):
        """Lock the state dir (if any) before anything else: (store or None, saved server record)."""
        if not self.config.state_dir:
            return None, {}
        try:
            state = StateStore.open(self.config.state_dir)
        except StateDirError as exc:
            raise ServerError(str(exc)) from None
        return state, state.load_server()

    def _make_supervisor(self, state, saved):
        """The Supervisor and its collaborators; with a state dir, the server record is saved and the
        saved sessions come back."""
        endpoints = self._channel_endpoints()
        if state is None:
            return Supervisor(self.config, channel_endpoints=endpoints)
        launchers = LauncherFactory(state.launcher_dir, lock=state.lock_path, grace=self.config.restart_grace,
                                    durable=True)
        supervisor = Supervisor(self.config, kernel_files=KernelFiles(state.kernels_dir), launchers=launchers,
                                state=state, channel_endpoints=endpoints, server_id=saved.get("server_id"))
        address = self.listener.describe()
        state.save_server({"transport": self.transport, "port": address.get("port"),
                           "unix_socket": address.get("socket_path"), "name_pid": self.name_pid,
                           "token": self.config.token, "server_id": supervisor.server_id, "pid": os.getpid()})
        supervisor.restore()
        return supervisor

    def _channel_endpoints(self):
        """Per-session channel listeners for the socket and named-pipe transports (None for tcp:
        channels are WebSocket upgrades on the main port)."""
        sockets = session_channels(self.transport, socket_dir=self.socket_dir, pid=self.name_pid,
                                   log=None, error_log=log)
        return None if sockets is None else SocketEndpoints(sockets)

    def _announce(self, supervisor, token):
        info = announce.connection_info(self.listener, server_path=os.path.abspath(sys.argv[0]),
                                        server_pid=os.getpid(), bearer_token=token,
                                        log_path=self.log_file, server_id=supervisor.server_id)
        try:
            if self.connection_file:
                announce.write_connection_file(self.connection_file, info)
                log.info("Wrote connection details to %s", self.connection_file)
            if self.handshake_socket:
                announce.send_handshake(self.handshake_socket, info)
        except (OSError, announce.AnnounceError) as exc:
            supervisor.shutdown()  # also stops the listener (on_shutdown)
            raise ServerError(f"Could not announce the server: {exc}") from None

    def _stop(self):
        if self.wsgi is not None:
            self.wsgi.stop(timeout=1)
        if self.listener is not None:
            self.listener.close()
        self.stopped.set()

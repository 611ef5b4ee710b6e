"""Command line: `python -m kcgevent [serve flags]`, plus small client commands.

With no subcommand the arguments are kcserver's (so existing launchers work
unchanged); `run` and `sessions` are client commands for people and scripts.
"""
import logging
import os
import sys

import argh

from . import __version__
from .config import ServerConfig, VERSION
from .server import Server, ServerError

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "error": logging.ERROR}


def setup_logging(level_name, log_file):
    """Warnings and errors to stderr, the rest to stdout; everything to --log-file too."""
    level_name = level_name or "info"
    if level_name not in LOG_LEVELS:
        print(f"Invalid log level '{level_name}'; using 'info'")
        level_name = "info"
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(LOG_LEVELS[level_name])
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    handlers = [out, err]
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file, mode="w"))
        except OSError as exc:
            raise ServerError(f"Cannot write the log file {log_file}: {exc.strerror}") from None
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


@argh.arg("-p", "--port", type=int, help="TCP port on 127.0.0.1 (0: any free port; tcp transport only)")
@argh.arg("-t", "--token", help="file holding the bearer token (deleted after reading), or 'none' for no auth")
@argh.arg("--log-file", help="also write the log to this file")
@argh.arg("--connection-file", help="write how to reach the server (JSON) to this file")
@argh.arg("--handshake-socket", help="send the connection details to this client-owned socket")
@argh.arg("-i", "--idle-shutdown-hours", type=int, help="exit after this many idle hours (0: 30 seconds)")
@argh.arg("-r", "--resource-sample-interval", type=int, help="resource sampling interval in ms (0: off)")
@argh.arg("-l", "--log-level", help="trace, debug, info, warn or error")
@argh.arg("--transport", help="tcp, socket (Unix) or named-pipe (Windows)")
@argh.arg("--socket-dir", help="directory for the Unix sockets we create")
@argh.arg("--unix-socket", help="serve HTTP on this Unix socket path")
@argh.arg("--buffer-limit", type=int, help="frames kept per session for clients that are away")
@argh.arg("--buffer-bytes", type=int, help="bytes of frames kept per session for clients that are away "
          "(default 64 MiB)")
@argh.arg("--shutdown-timeout", type=float, help="seconds kernels get to exit at shutdown before being killed")
@argh.arg("--ping-interval", type=float, help="seconds between WebSocket pings (a client missing 4, or whose "
          "socket takes nothing for 3 intervals, is dropped)")
@argh.arg("--heartbeat-interval", type=float, help="seconds between kernel heartbeats")
@argh.arg("--heartbeat-timeout", type=float, help="seconds without a heartbeat reply before a kernel is offline")
@argh.arg("--idle-shutdown-seconds", type=float, help="like --idle-shutdown-hours, in seconds (for tests)")
@argh.arg("--mcp-command-timeout", type=float, help="seconds an agent's Positron command waits for the window's reply")
@argh.arg("--state-dir", help="keep sessions here so that kernels survive a crash of the server and a server "
          "started again on it serves them (also KCGEVENT_STATE_DIR)")
@argh.arg("--restart-grace", type=float, help="with --state-dir: seconds kernels wait for a server to come back "
          "before they end")
@argh.arg("--max-body-bytes", type=int, help="largest HTTP request body accepted (larger: 413)")
@argh.arg("--max-message-bytes", type=int, help="largest channel message accepted (larger: WebSocket close 1009)")
@argh.arg("--http-timeout", type=float, help="seconds before an idle or half-sent HTTP connection is closed")
@argh.arg("--access-log", help="log every HTTP request at info")
@argh.arg("--kernel-transport", choices=("ipc", "tcp"),
          help="how started kernels listen: ipc (private Unix sockets; default on POSIX) or tcp (127.0.0.1)")
def serve(port=0, token=None, log_file=None, connection_file=None, handshake_socket=None,
          idle_shutdown_hours=None, resource_sample_interval=1000, log_level=None, transport=None,
          socket_dir=None, unix_socket=None, buffer_limit=100_000, buffer_bytes=64 << 20, shutdown_timeout=5.0,
          ping_interval=10.0, heartbeat_interval=2.0, heartbeat_timeout=5.0, idle_shutdown_seconds=None,
          state_dir=None, restart_grace=60.0, max_body_bytes=16 * 1024 * 1024, max_message_bytes=64 * 1024 * 1024,
          http_timeout=60.0, access_log=False, kernel_transport=None, mcp_command_timeout=45.0,
          version=False):
    """Run the kernel supervisor server."""
    if version:
        print(f"kcgevent {__version__} (Kallichore API {VERSION})")
        return
    for flag, seconds in (("--ping-interval", ping_interval), ("--heartbeat-interval", heartbeat_interval),
                          ("--heartbeat-timeout", heartbeat_timeout)):
        if not seconds > 0:  # (0 would make a busy loop of the pings)
            print(f"Error: {flag} must be a positive number of seconds (got {seconds:g})", file=sys.stderr)
            sys.exit(1)
    config = ServerConfig(idle_shutdown_hours=idle_shutdown_hours,
                          resource_sample_interval_ms=max(0, resource_sample_interval),
                          log_level=log_level, buffer_limit=buffer_limit, buffer_bytes=buffer_bytes,
                          shutdown_timeout=shutdown_timeout,
                          ping_interval=ping_interval, heartbeat_interval=heartbeat_interval,
                          heartbeat_timeout=heartbeat_timeout, idle_shutdown_seconds=idle_shutdown_seconds,
                          state_dir=state_dir or os.environ.get("KCGEVENT_STATE_DIR") or None,
                          restart_grace=max(0.0, restart_grace),
                          max_body_bytes=max_body_bytes, max_message_bytes=max_message_bytes,
                          http_timeout=http_timeout if http_timeout > 0 else None, access_log=access_log,
                          mcp_command_timeout=mcp_command_timeout)
    if kernel_transport:
        config.kernel_transport = kernel_transport
    try:
        server = Server(transport=transport, port=port, token=token, unix_socket=unix_socket,
                        socket_dir=socket_dir, connection_file=connection_file,
                        handshake_socket=handshake_socket, log_file=log_file, config=config)
        setup_logging(log_level, log_file)
        server.run()
    except ServerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mcp-stdio":
        from .mcp.stdio import main as mcp_stdio
        return mcp_stdio(argv[1:])
    if argv and argv[0] in ("run", "sessions", "kernelspecs"):
        from .newcomer import kernelspecs, run, sessions
        parser = argh.ArghParser(prog="kcgevent")
        parser.add_commands([run, sessions, kernelspecs])
        parser.dispatch(argv)
    else:
        parser = argh.ArghParser(prog="kcgevent", description="A durable supervisor for Jupyter kernels. "
                                 "Client commands: 'kcgevent run --help', 'kcgevent sessions --help', "
                                 "'kcgevent kernelspecs --help', 'kcgevent mcp-stdio --help'.")
        parser.set_default_command(serve)
        parser.dispatch(argv)

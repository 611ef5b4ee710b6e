"""Transport selection and validation (kallichore-behavior.md section 1.2).

TransportError lives here because validation is its first user; the listeners raise it for bind
failures too, so the CLI has one error type to print as ``Error: <msg>`` before exiting with 1.
"""
import sys

TRANSPORTS = ("tcp", "socket", "named-pipe")


class TransportError(Exception):
    """An invalid transport choice or a listener that could not be created; the message says why."""


def choose_transport(transport, unix_socket, connection_file, port, platform=sys.platform):
    """Return the effective transport ("tcp", "socket" or "named-pipe") or raise TransportError.

    --transport wins; otherwise --unix-socket implies socket (Unix), then --connection-file picks the
    platform's local transport (socket on Unix, named-pipe on Windows); otherwise tcp.
    """
    windows = platform == "win32"
    if transport is None:
        if unix_socket and not windows:
            transport = "socket"
        elif connection_file:
            transport = "named-pipe" if windows else "socket"
        else:
            transport = "tcp"
    elif transport not in TRANSPORTS:
        raise TransportError(
            f"Invalid transport type '{transport}'. Valid values are 'tcp', 'socket' (Unix only), "
            "and 'named-pipe' (Windows only).")

    if transport == "named-pipe" and not windows:
        raise TransportError(
            "The named-pipe transport is only supported on Windows; use --transport socket or "
            "--transport tcp")
    if transport == "socket" and windows:
        raise TransportError(
            "The socket transport is not supported on Windows; use --transport named-pipe or "
            "--transport tcp")
    if port and transport != "tcp":
        raise TransportError(
            f"--port can only be used with the tcp transport (current: {transport}); remove --port "
            "or add --transport tcp")
    if unix_socket and windows:
        raise TransportError("--unix-socket is not supported on Windows; remove --unix-socket")
    if unix_socket and transport != "socket":
        raise TransportError(
            f"--unix-socket can only be used with the socket transport (current: {transport}); "
            "remove --unix-socket or use --transport socket")
    return transport

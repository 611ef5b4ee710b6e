"""ZeroMQ `ipc://` endpoints for the kernels we start, inside the supervisor's private directory.

A kernel listening on 127.0.0.1 TCP ports can be reached by every local user (the ports are listed
in /proc/net/tcp, and subscribing to iopub needs no key). Unix sockets in a 0700 directory can only
be reached by our own user. jupyter_client's convention: `ip` is a path prefix and the socket of
port N is the file `<ip>-<N>`; ipykernel and IRkernel both follow it. Some kernels (ark's amalthea)
format every endpoint as `<transport>://<ip>:<port>` and so bind `<ip>:<N>`: we look for the file
the kernel made and connect to that one.
"""
import hashlib
import os
import time

import gevent

# A Unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS, with the NUL).
MAX_SOCKET_PATH = 100
PORTS = (1, 2, 3, 4, 5)
SEPARATORS = ("-", ":")  # jupyter_client's, then `ip:port` as tcp would have it
POLL_INTERVAL = 0.005  # seconds: the wait is on the path of every start; a check is two stat() calls


class SocketWaitFailed(Exception):
    """The kernel made no socket file in time, or exited first (`kind`: "timeout" or "aborted")."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


def bound_separator(prefix, port):
    """The separator of the socket file the kernel made for `port`, or None while there is none."""
    for sep in SEPARATORS:
        if os.path.exists(f"{prefix}{sep}{port}"):
            return sep
    return None


def wait_for_socket(prefix, port, timeout, should_abort):
    """Wait (bounded) until the kernel has bound `port`'s socket; its separator."""
    deadline = time.monotonic() + timeout
    while True:
        sep = bound_separator(prefix, port)
        if sep is not None:
            return sep
        reason = should_abort()
        if reason:
            raise SocketWaitFailed(reason, "aborted")
        if time.monotonic() >= deadline:
            raise SocketWaitFailed(f"Timed out waiting for the kernel's ipc sockets after {timeout:g} seconds",
                                   "timeout")
        gevent.sleep(POLL_INTERVAL)


def endpoint_prefix(kernel_dir, session_id):
    """`<kernel_dir>/k-<hash of the session id>`, or None when the socket paths would be too long."""
    prefix = os.path.join(kernel_dir, "k-" + hashlib.sha256(session_id.encode()).hexdigest()[:12])
    if len(os.fsencode(prefix)) + len("-5") > MAX_SOCKET_PATH:
        return None
    return prefix


def restrict(prefix, sep):
    """Make the kernel's socket files 0600 (the kernel's umask made them; the 0700 directory already
    keeps others out, this keeps every file in our directories private too)."""
    for port in PORTS:
        try:
            os.chmod(f"{prefix}{sep}{port}", 0o600)
        except OSError:
            pass


def remove_endpoints(prefix):
    """Remove the socket files a kernel left behind (it may have been killed)."""
    if prefix is None:
        return
    for port in PORTS:
        for sep in SEPARATORS:
            try:
                os.unlink(f"{prefix}{sep}{port}")
            except OSError:
                pass

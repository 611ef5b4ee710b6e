"""ZeroMQ `ipc://` endpoints for the kernels we start, inside the supervisor's private directory.

A kernel listening on 127.0.0.1 TCP ports can be reached by every local user (the ports are listed
in /proc/net/tcp, and subscribing to iopub needs no key). Unix sockets in a 0700 directory can only
be reached by our own user. jupyter_client's convention: `ip` is a path prefix and the socket of
port N is the file `<ip>-<N>`; ipykernel and IRkernel both follow it.
"""
import hashlib
import os

# A Unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS, with the NUL).
MAX_SOCKET_PATH = 100
PORTS = (1, 2, 3, 4, 5)


def endpoint_prefix(kernel_dir, session_id):
    """`<kernel_dir>/k-<hash of the session id>`, or None when the socket paths would be too long."""
    prefix = os.path.join(kernel_dir, "k-" + hashlib.sha256(session_id.encode()).hexdigest()[:12])
    if len(os.fsencode(prefix)) + len("-5") > MAX_SOCKET_PATH:
        return None
    return prefix


def remove_endpoints(prefix):
    """Remove the socket files a kernel left behind (it may have been killed)."""
    if prefix is None:
        return
    for port in PORTS:
        try:
            os.unlink(f"{prefix}-{port}")
        except OSError:
            pass

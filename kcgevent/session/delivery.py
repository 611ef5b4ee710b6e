"""What the peer of a channel socket has taken: the kernel's view, asked with ioctl/getsockopt.

TCP (Linux): `TIOCOUTQ` is the number of bytes written that the peer's TCP has
not acknowledged (after our FIN, the FIN counts as one more). Once the peer
reset the connection the count stays as it was, so it is exact after the end.

Unix stream sockets (Linux): what we write lands in the peer's receive queue at
once and stays charged to our socket until the peer *reads* it; `TIOCOUTQ`
reports that charge in buffer units (not bytes), so only zero is meaningful:
zero means the peer has read everything. A peer that closes with unread data
discards it and leaves ECONNRESET on our socket (measured: recv() raises it;
a peer that read everything leaves a plain EOF), so "zero and no reset" means
"all read", and after a reset only what we saw read before counts.

Elsewhere (Windows, macOS named pipes...) nothing is known: `pending` is None.
"""
import errno
import socket
import struct

try:
    import fcntl
    import termios
    TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)
except ImportError:  # Windows
    fcntl = termios = TIOCOUTQ = None

TCP_INFO = getattr(socket, "TCP_INFO", None)
TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection that is over (both FINs acknowledged, or reset)


def is_tcp(sock):
    return getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def is_unix(sock):
    return getattr(sock, "family", None) == getattr(socket, "AF_UNIX", object())


def pending(sock):
    """TIOCOUTQ of `sock` (see the module docstring for its unit), or None if unknown."""
    if TIOCOUTQ is None or not (is_tcp(sock) or is_unix(sock)):
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return None


def tcp_over(sock):
    """True once a TCP connection is over for the kernel (reset, or closed on both sides)."""
    if TCP_INFO is None or not is_tcp(sock):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 8)[0] == TCP_CLOSE
    except (OSError, ValueError):
        return True


def take_reset(sock):
    """True if the socket holds a pending ECONNRESET (consumed here: SO_ERROR clears it)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    except (OSError, ValueError):
        return False


def abort(sock):
    """Close at once, discarding what was not sent: on TCP a reset (SO_LINGER 0), so the peer can
    never read later what we count as not delivered."""
    if is_tcp(sock):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):
            pass
    try:
        sock.close()
    except OSError:
        pass

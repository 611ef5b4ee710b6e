"""Resource limits of the standalone server: file descriptors and idle HTTP connections.

A client that opens connections and leaves them idle (or half-open) must not
use up the server's file descriptors: every connection's socket gets a read
timeout, so an idle keep-alive or a request that stops arriving half-way is
closed after `timeout` seconds. A WebSocket clears the timeout when it takes
the socket over (its own pings decide when a client is gone). When accept()
still fails (EMFILE), gevent's server pauses accepting and retries with a
backoff instead of giving up, so the server recovers as soon as fds free up.
"""
import errno
import json
import logging
import socket
import time

import gevent
from gevent.pywsgi import WSGIHandler

try:
    import resource
except ImportError:  # Windows
    resource = None

log = logging.getLogger(__name__)

FD_CEILING = 1 << 20  # used when the hard limit is "unlimited"


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; (old soft, new soft), or None where unsupported."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("Could not raise the file descriptor limit from %s to %s: %s", soft, target, exc)
            return soft, soft
        log.debug("File descriptor limit raised from %s to %s", soft, target)
        return soft, target
    return soft, soft


def timeout_handler(timeout):
    """A WSGIHandler class whose connections time out after `timeout` idle seconds (None: never)."""

    class TimeoutHandler(WSGIHandler):
        def handle(self):
            if timeout and hasattr(self.socket, "settimeout"):
                self.socket.settimeout(timeout)
            super().handle()

        def _handle_client_error(self, ex):
            """A request that stops arriving half-way is the client's doing: one line and a 408,
            where gevent would print a traceback to stderr and answer 400."""
            if not isinstance(ex, socket.timeout):
                return super()._handle_client_error(ex)
            log.info("Closed a connection from %s: its request stopped arriving for %g s (--http-timeout)",
                     self.client_address, timeout)
            return "408", REQUEST_TIMEOUT_RESPONSE

    return TimeoutHandler


_TIMEOUT_BODY = json.dumps({"code": "408", "message": "The request did not arrive completely within "
                            "--http-timeout; the connection is closed"}).encode()
REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_TIMEOUT_BODY)
                            + _TIMEOUT_BODY)


class AcceptFailed(Exception):
    """accept() failed for want of resources: gevent's server pauses accepting and tries again."""


OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # errnos of the machine's limits, not bugs
ACCEPT_WARNING_INTERVAL = 10.0


def quiet_accept_errors(server):
    """One warning every ACCEPT_WARNING_INTERVAL s instead of a traceback per failed accept().

    gevent's server backs off (up to a second) after any accept error and retries; that is the
    behaviour we want. Only its report changes: the failure is re-raised as AcceptFailed, which the
    hub is told not to print.
    """
    hub = gevent.get_hub()
    if AcceptFailed not in hub.NOT_ERROR:
        hub.NOT_ERROR = (*hub.NOT_ERROR, AcceptFailed)
    read = server.do_read
    last_warning = [float("-inf")]

    def do_read():
        try:
            return read()
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            now = time.monotonic()
            if now - last_warning[0] >= ACCEPT_WARNING_INTERVAL:
                last_warning[0] = now
                log.warning("Cannot accept connections (%s); retrying. Idle connections are closed after "
                            "--http-timeout.", exc.strerror)
            raise AcceptFailed(exc.strerror) from None

    server.do_read = do_read

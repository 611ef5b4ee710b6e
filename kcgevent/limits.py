"""Resource limits of the standalone server: file descriptors and idle HTTP connections.

A client that opens connections and leaves them idle (or half-open) must not
use up the server's file descriptors: every connection's socket gets a read
timeout, so an idle keep-alive or a request that stops arriving half-way is
closed after `timeout` seconds. A WebSocket clears the timeout when it takes
the socket over (its own pings decide when a client is gone). When accept()
still fails (EMFILE), gevent's server pauses accepting and retries with a
backoff instead of giving up, so the server recovers as soon as fds free up.
"""
import logging

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

    return TimeoutHandler

"""The client side of a session: an ordered outbound log and at most one client.

Everything a session says (kernel messages and supervisor events) is appended
to one log with increasing sequence numbers. A writer greenlet per attached
client sends from its cursor, many frames per write. Because the log outlives
connections, nothing is lost when the client goes away:

- while no client is attached, frames wait in the log;
- on handover (a second client connects) the old writer stops at a frame
  boundary, the old client gets `clientDisconnected` and a Close, and the new
  client starts exactly where the old one stopped;
- when a connection drops, frames the peer's TCP never acknowledged
  (`TIOCOUTQ`, Linux) are sent again to the next client;
- a client that says where it is (`?after=N`, N = the last `seq` it
  processed) gets `seq` in every frame and resumes exactly after N: this is
  the exactly-once path, for clients that can use it.

The log is bounded (`limit` frames). Frames already sent go first; if unsent
frames must be dropped, the next client is told with a `messagesDropped`
event naming the sequence range.
"""
# Storage interface the Channel expects from its log (OutboundLog in outbound_log.py keeps frames in
# memory; a file-backed log must offer the same, with the same meaning):
#   append(frame: bytes) -> seq        seqs start at 1 and grow by one per frame, never reused
#   read(seq, max_frames, max_bytes)   [(seq, frame)] from max(seq, first_seq) on, in order
#   first_seq, next_seq, len(log)      oldest kept seq, seq of the next append, frames kept
#   nbytes, limit, byte_limit          bytes kept, the two bounds (byte_limit may be None)
#   over_limit() -> bool               more than `limit` frames or `byte_limit` bytes (newest always kept)
#   trim(keep_from) -> (first, last) | None
#                                      enforce the bounds: frames before keep_from go first; returns the
#                                      range of the others that had to go (reported as messagesDropped)
#   forget_delivered(delivered_upto, keep_bytes) -> count
#                                      forget acknowledged frames except the newest keep_bytes of them
#   forget_before(seq) -> count, clear()
# The Channel calls these from one greenlet at a time and never holds a frame after handing it to the
# socket, so a store may drop its copy (or page it out) as soon as forget_* / trim say so.
import logging
import struct

try:
    import fcntl
    import termios
except ImportError:  # Windows: no TIOCOUTQ; drops replay from the client's cursor
    fcntl = termios = None

import gevent
from gevent.event import Event

from .outbound_log import BATCH_FRAMES, OutboundLog
from .wire import kernel_event
from ..websocket import ConnectionClosed

log = logging.getLogger(__name__)

PING_INTERVAL = 10.0
HANDOVER_TIMEOUT = 2.0
DISCONNECT_REASON = "Another client is connecting to this session."


def unacked_bytes(sock):
    """Bytes written to `sock` that its peer has not acknowledged (0 if unknown)."""
    if fcntl is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]
    except (OSError, ValueError, AttributeError):
        return 0


class Client:
    """One attached WebSocket and the greenlet that writes the log to it."""

    def __init__(self, channel, ws, cursor, with_seq):
        self.channel = channel
        self.ws = ws
        self.cursor = cursor
        self.with_seq = with_seq
        self.sent = []  # (seq, end byte offset) of frames in flight, for TIOCOUTQ
        self.bytes_sent = 0
        self.stopping = False
        self.writer = None
        self.pinger = None

    def run_writer(self):
        log_ = self.channel.log
        try:
            while not self.stopping:
                batch = log_.read(self.cursor)
                if not batch:
                    self.channel.changed.clear()
                    self.channel.changed.wait()
                    continue
                notice = self.channel.take_drop_notice()  # frames this client fell too far behind for
                if notice is not None:
                    self.ws.send(notice)
                self._send(batch)
                self.channel.on_progress()
        except ConnectionClosed:
            pass

    def _send(self, batch):
        payloads = []
        for seq, frame in batch:
            if self.with_seq:
                frame = frame[:-1] + b',"seq":%d}' % seq
            payloads.append(frame)
            self.bytes_sent += len(frame) + (2 if len(frame) < 126 else 4 if len(frame) < 65536 else 10)
            self.sent.append((seq, self.bytes_sent))
        self.ws.send_frames(payloads)
        self.cursor = batch[-1][0] + 1
        if len(self.sent) > 4 * BATCH_FRAMES:
            del self.sent[: len(self.sent) - 2 * BATCH_FRAMES]

    def run_pinger(self):
        try:
            while not self.ws.closed:
                if not self.ws.ping():
                    log.warning("session %s: client stopped answering pings; dropping it", self.channel.session_id)
                    self.ws.shutdown()
                    return
                gevent.sleep(self.channel.ping_interval)
        except ConnectionClosed:
            pass

    def first_unacknowledged(self):
        """The first seq the peer's TCP did not acknowledge (the cursor if all were)."""
        pending = unacked_bytes(self.ws.sock)
        if pending <= 0:
            return self.cursor
        acked_upto = self.bytes_sent - pending
        for seq, end in self.sent:
            if end > acked_upto:
                return seq
        return self.cursor


class Channel:
    """The session's outbound log plus the currently attached client, if any."""

    def __init__(self, session_id, limit, ping_interval=PING_INTERVAL, byte_limit=None, log=None):
        self.session_id = session_id
        self.log = OutboundLog(limit, byte_limit) if log is None else log  # log: e.g. a FileLog
        self.changed = Event()  # set when frames are appended (wakes the writer)
        self.ping_interval = ping_interval
        self.client = None
        self.cursor = 1  # where the next client without `after` starts
        self.on_connect_change = None  # callback(connected: bool)
        self._lost = None  # (first, last) seqs of unsent frames dropped and not yet reported

    @property
    def connected(self):
        return self.client is not None

    def publish(self, frame):
        self.log.append(frame)
        self.changed.set()
        if self.log.over_limit():
            self._trim()

    def event(self, name, payload):
        self.publish(kernel_event(name, payload))

    def on_progress(self):
        if self.log.over_limit():
            self._trim()

    def _trim(self):
        keep = self.client.cursor if self.client else self.cursor
        lost = self.log.trim(keep)
        if lost:
            if self.client:
                self.client.cursor = max(self.client.cursor, self.log.first_seq)
            self.cursor = max(self.cursor, self.log.first_seq)
            self._lost = lost if self._lost is None else (self._lost[0], lost[1])

    def take_drop_notice(self):
        """A `messagesDropped` frame for unsent frames the limit forced out (once), or None."""
        if self._lost is None:
            return None
        (first, last), self._lost = self._lost, None
        return kernel_event("messagesDropped", {"count": last - first + 1, "first_seq": first, "last_seq": last})

    def attach(self, ws, after=None):
        """Make `ws` the session's client, replacing (and notifying) any current one."""
        old = self.client
        if old is not None:
            self._hand_over(old)
        cursor = self.cursor if after is None else max(int(after) + 1, 1)
        if after is not None and cursor < self.log.first_seq:
            ws.send(kernel_event("messagesDropped", {
                "count": self.log.first_seq - cursor, "first_seq": cursor, "last_seq": self.log.first_seq - 1}))
            cursor = self.log.first_seq
            self._lost = None  # that notice covers them
        else:
            notice = self.take_drop_notice()
            if notice is not None:
                ws.send(notice)
        cursor = min(cursor, self.log.next_seq)
        client = Client(self, ws, cursor, with_seq=after is not None)
        self.client = client
        client.writer = gevent.spawn(client.run_writer)
        client.pinger = gevent.spawn(client.run_pinger)
        if self.on_connect_change:
            self.on_connect_change(True)
        return client

    def _hand_over(self, old):
        """Stop the old writer at a frame boundary, then tell the old client it was replaced."""
        old.stopping = True
        self.changed.set()
        finished = old.writer.join(HANDOVER_TIMEOUT) is not None or old.writer.dead
        if not old.writer.dead:
            old.writer.kill(block=True, timeout=1)
        self.cursor = old.cursor if finished else old.first_unacknowledged()
        try:
            with gevent.Timeout(HANDOVER_TIMEOUT):
                old.ws.send(kernel_event("clientDisconnected", DISCONNECT_REASON))
        except (ConnectionClosed, gevent.Timeout):
            pass
        old.ws.close(1000, "replaced by another client")
        self._stop(old)

    def detach(self, client):
        """`client`'s connection ended (closed, dropped or timed out)."""
        if self.client is not client:
            return  # already replaced; the handover settled its cursor
        client.stopping = True
        self.changed.set()
        client.writer.kill(block=True, timeout=1)
        self.cursor = client.first_unacknowledged()
        client.ws.shutdown()
        self._stop(client)
        self.client = None
        if self.on_connect_change:
            self.on_connect_change(False)

    def _stop(self, client):
        if client.pinger is not None:
            client.pinger.kill(block=False)

    def close(self):
        """The session is going away: close any client."""
        client = self.client
        if client is not None:
            client.stopping = True
            self.changed.set()
            client.writer.join(HANDOVER_TIMEOUT)
            client.writer.kill(block=True, timeout=1)
            client.ws.close(1001, "session deleted")
            self._stop(client)
            self.client = None

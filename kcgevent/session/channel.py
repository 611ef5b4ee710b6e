"""The client side of a session: an ordered outbound log and at most one client.

Everything a session says (kernel messages and supervisor events) is appended
to one log with increasing sequence numbers. A writer greenlet per attached
client sends from its cursor, many frames per write. Because the log outlives
connections, nothing is lost or repeated when the client goes away:

- while no client is attached, frames wait in the log;
- what the client's side acknowledged before its connection ended counts as
  delivered; everything else goes to the next client. The measure is taken
  once the connection is really over, not when the client's EOF arrives
  (frames still in flight then are mostly read by the client): the writer
  stops at a frame boundary, the server half-closes, and waits until the peer
  has everything, is gone, or takes nothing for DRAIN_TIMEOUT (DRAIN_LIMIT in all);
  whatever is then still unacknowledged is discarded (TCP reset) and resent.
  See delivery.py for what "acknowledged" means on TCP and on Unix sockets;
- on handover (a second client connects) the old writer stops at a frame
  boundary, the old client gets `clientDisconnected` and a Close, its reader
  goes on delivering the frames it sent meanwhile, and the new client starts
  where the old one's delivery ended, measured the same way;
- a client that says where it is (`?after=N`, N = the last `seq` it
  processed) gets `seq` in every frame and resumes exactly after N;
- a client whose socket takes nothing for `MAX_UNANSWERED_PINGS` ping
  intervals, or that leaves more pings unanswered, is dropped (pings never
  wait for a blocked writer); what it did not acknowledge goes to the next.

Each client's end is settled once (`Client.end`): a drop, a handover and the
pinger may all ask, and all get the same resume point.

The log is bounded in frames and in bytes. Delivered frames are freed as soon
as acknowledged (beyond the newest KEEP_DELIVERED_BYTES, kept for `?after=`
clients that resume a little earlier than their socket acknowledged); then
sent frames go; if frames nobody received must go, the next client is told
with a `messagesDropped` event naming the sequence range.
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
import collections
import ctypes
import ctypes.util
import logging
import time
from array import array
from bisect import bisect_right
from contextlib import contextmanager

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from . import delivery, events
from .outbound_log import OutboundLog
from .wire import kernel_event
from ..websocket import MAX_UNANSWERED_PINGS, ConnectionClosed, frame_size

log = logging.getLogger(__name__)

PING_INTERVAL = 10.0
DRAIN_TIMEOUT = 2.0  # how long a dropped or replaced client may take nothing of what was already sent
DRAIN_LIMIT = 10.0  # how long it may take in all
CLOSE_TIMEOUT = 1.0  # how long a writer gets to finish its write when the session goes
POLL_INTERVAL = 0.005
IDLE_CHECK = 1.0  # an idle writer looks at the acknowledgements this often (to free delivered frames)
ACK_EVERY = 64  # writes between two looks at the acknowledgements when nothing needs freeing
KEEP_DELIVERED_BYTES = 8 << 20  # more than any socket buffer: what a `?after=` client can miss
DISCONNECT_REASON = "Another client is connecting to this session."


def release_memory():
    """Give freed heap memory back to the system (glibc keeps it otherwise)."""
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except (AttributeError, OSError):
            pass


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()


def gap_notice(first, last):
    return events.messages_dropped(first, last)


class Client:
    """One attached WebSocket, the greenlet that writes the log to it, and what it was given."""

    def __init__(self, channel, ws, cursor, with_seq):
        self.channel = channel
        self.ws = ws
        self.cursor = cursor  # next seq to write
        self.delivered = cursor  # frames before this seq are acknowledged by the peer
        self.with_seq = with_seq
        self._batches = collections.deque()  # (first seq, end offsets) of writes not yet acknowledged
        self._tcp = delivery.is_tcp(ws.sock)
        self.stopping = False
        self.ending = None  # how it ended: "dropped", "replaced", "unresponsive" or "closing"
        self.ended = Event()
        self.resume = None  # first seq the peer did not get, once ended
        self.reader_done = Event()  # the greenlet reading the client's frames has finished
        self.writer = None
        self.parked = False  # the writer waits for frames: a flush may write for it
        self.pinger = None

    # -- writing -------------------------------------------------------------

    def run_writer(self):
        """Write the log from the cursor on, many frames per write, whenever a flush
        (`write_now`) cannot: a backlog at attach, a socket that is full, a gap to announce."""
        channel = self.channel
        log_ = channel.log
        changed = channel.changed
        ws = self.ws
        try:
            while not self.stopping:
                if ws.has_tail:
                    ws.finish_write()
                if self.cursor < log_.first_seq:  # the bound forced out frames never sent to us
                    ws.send(gap_notice(self.cursor, log_.first_seq - 1))
                    self.cursor = log_.first_seq
                batch = log_.read(self.cursor)
                if not batch:
                    freeable = self._freeable()
                    if freeable:
                        self.note_delivery()
                        channel.forget_delivered(self)
                    changed.clear()
                    self.parked = True
                    try:
                        changed.wait(IDLE_CHECK if freeable else None)
                    finally:
                        self.parked = False
                    continue
                self._send(batch)
                self._after_write()
        except ConnectionClosed:
            if not self.stopping:  # the socket failed under the writer: settle the end now
                how = "unresponsive" if ws.stalled else "dropped"
                gevent.spawn(channel.detach, self, how)

    def write_now(self):
        """Write what the log holds from a flush (Channel._flush), without waiting (never raises).

        Only while the writer is parked (it owns every other write); True if everything went,
        False if the writer must be woken (a partial write, a full socket, a gap to announce)."""
        if not self.parked or self.stopping:
            return False
        log_ = self.channel.log
        try:
            while self.cursor >= log_.first_seq:
                batch = log_.read(self.cursor)
                if not batch:
                    return True
                payloads = self._payloads(batch)
                start = self.ws.send_frames_now(payloads)
                if start is None:
                    return False
                self._record(batch[0][0], start, payloads)
                self._after_write()
                if self.ws.has_tail:
                    return False
        except Exception:  # a bug here must not stop the hub: the writer takes over
            log.exception("session %s: writing from the hub failed", self.channel.session_id)
        return False

    def _freeable(self):
        """Whether asking what the peer acknowledged can free memory now."""
        return bool(self._batches) and self.channel.log.nbytes > KEEP_DELIVERED_BYTES

    def _after_write(self):
        """Ask what the peer acknowledged only when that can free memory, or every ACK_EVERY writes:
        asked after every write, on a round trip's path it cost more than the write itself."""
        log_ = self.channel.log
        if len(self._batches) >= ACK_EVERY or log_.over_limit() or log_.nbytes > KEEP_DELIVERED_BYTES:
            self.note_delivery()
            self.channel.on_progress(self)

    def _payloads(self, batch):
        if not self.with_seq:
            return [frame for _, frame in batch]
        return [frame[:-1] + b',"seq":%d}' % seq for seq, frame in batch]

    def _send(self, batch):
        payloads = self._payloads(batch)
        try:
            start = self.ws.send_frames(payloads)
        except ConnectionClosed as exc:
            if exc.start is not None:
                self._record(batch[0][0], exc.start, payloads)
            raise
        except BaseException:
            # Killed part-way (the pinger gave up on the peer): the peer may have taken whole frames
            # of this write, so they are recorded too, else they would go to the next client again.
            start = self.ws.data_start
            if start is not None and self.ws.bytes_written > start:
                self._record(batch[0][0], start, payloads)
            raise
        self._record(batch[0][0], start, payloads)

    def _record(self, first_seq, start, payloads):
        ends, pos = array("q"), start
        for payload in payloads:
            pos += frame_size(len(payload))
            ends.append(pos)
        self._batches.append((first_seq, ends))
        self.cursor = first_seq + len(payloads)

    # -- what the peer has -----------------------------------------------------

    def note_delivery(self):
        """Advance `delivered` to what the peer's side has acknowledged (see delivery.py)."""
        if not self._batches:
            return
        ws = self.ws
        pending = delivery.pending(ws.sock)
        if pending is None:  # nothing known (Windows, named pipes): what was written counts, as before
            acked = ws.bytes_written
        elif self._tcp:
            if ws.output_shut and pending > 0:
                pending -= 1  # our FIN
            acked = ws.bytes_written - pending
        else:  # Unix: zero means all read, unless the peer threw unread data away
            if pending != 0:
                return
            if ws.peer_reset or delivery.take_reset(ws.sock):
                ws.peer_reset = True
                return
            acked = ws.bytes_written
        batches = self._batches
        while batches:
            first, ends = batches[0]
            if ends[-1] <= acked:
                batches.popleft()
                self.delivered = first + len(ends)
                continue
            self.delivered = max(self.delivered, first + bisect_right(ends, acked))
            break

    def _peer_done(self):
        """Whether waiting longer can change what the peer gets."""
        ws = self.ws
        if self.delivered >= self.cursor or ws.broken or ws.peer_reset:
            return True
        return self._tcp and delivery.tcp_over(ws.sock)

    # -- the end -----------------------------------------------------------------

    def end(self, how):
        """Settle how this client's connection ends (once); returns the first seq it did not get.

        `how`: "dropped" (the peer left), "replaced" (another client takes over),
        "unresponsive" (the pinger gave up on it) or "closing" (the session goes).
        """
        if self.ending is not None:
            self.ended.wait()
            return self.resume
        self.ending = how
        try:
            self._finish(how)
        finally:
            self.note_delivery()
            self.resume = self.delivered
            if self.resume < self.cursor:
                delivery.abort(self.ws.sock)  # the peer must never read later what goes to the next client
            else:
                self.ws.shutdown()
            self.ws.closed = True
            self.ended.set()
        return self.resume

    def _finish(self, how):
        ws = self.ws
        self.stopping = True
        self.channel.changed.set()
        current = gevent.getcurrent()
        if self.pinger is not None and self.pinger is not current:
            self.pinger.kill(block=False)
        draining = how in ("dropped", "replaced")
        deadline = time.monotonic() + (DRAIN_TIMEOUT if draining else CLOSE_TIMEOUT)
        if self.writer is not None and self.writer is not current:
            if how == "unresponsive":
                self.writer.kill(block=True, timeout=1)
            else:  # let it finish the write under way: the peer gets whole frames
                self.writer.join(max(0.0, deadline - time.monotonic()))
                if not self.writer.dead:
                    self.writer.kill(block=True, timeout=1)
        if how == "replaced":
            ws.send_close(1000, "replaced by another client", timeout=max(0.1, deadline - time.monotonic()),
                          before=(events.client_disconnected(DISCONNECT_REASON),))
        elif how == "closing":
            ws.send_close(1001, "session deleted", timeout=max(0.1, deadline - time.monotonic()))
        if not draining:
            return
        if not ws.broken:
            ws.shutdown_output()
        # Wait while the peer keeps taking what was sent (however slowly: a loaded machine), but
        # give up after DRAIN_TIMEOUT without progress, and after DRAIN_LIMIT in any case.
        limit = time.monotonic() + DRAIN_LIMIT
        last_pending = None
        while True:
            self.note_delivery()
            if self._peer_done():
                break
            now = time.monotonic()
            pending = delivery.pending(ws.sock)
            if pending != last_pending:
                last_pending, deadline = pending, max(deadline, now + DRAIN_TIMEOUT)
            if now >= min(deadline, limit):
                break
            gevent.sleep(POLL_INTERVAL)
        if how == "replaced":
            # The reader delivers the frames already received, then sees EOF (SHUT_RD keeps them).
            ws.shutdown_input()
            self.reader_done.wait(CLOSE_TIMEOUT)

    # -- liveness ------------------------------------------------------------------

    def run_pinger(self):
        """Ping every interval; drop the client if its socket stays unwritable or pings go unanswered."""
        ws = self.ws
        interval = self.channel.ping_interval
        try:
            while self.ending is None:
                gevent.sleep(interval)
                if self.ending is not None:
                    return
                if ws.write_stalled_for() > interval * MAX_UNANSWERED_PINGS:
                    why = "its socket took nothing"
                elif not ws.ping():
                    why = "it stopped answering pings"
                else:
                    continue
                log.warning("session %s: dropping a client: %s for %.0f s", self.channel.session_id, why,
                            interval * MAX_UNANSWERED_PINGS)
                gevent.spawn(self.channel.detach, self, "unresponsive")
                return
        except ConnectionClosed:
            pass


class Channel:
    """The session's outbound log plus the currently attached client, if any."""

    def __init__(self, session_id, limit, ping_interval=PING_INTERVAL, byte_limit=None, log=None):
        self.session_id = session_id
        self.log = OutboundLog(limit, byte_limit) if log is None else log  # log: e.g. a FileLog
        self.changed = Event()  # set when frames are appended (wakes the writer)
        self._loop = gevent.get_hub().loop
        self._flush_scheduled = None  # the hub callback that will write what was published
        self.ping_interval = ping_interval
        self.client = None  # the attached client (until its end is settled)
        self.cursor = 1  # where the next client without `after` starts
        self.on_connect_change = None  # callback(connected: bool)
        self._attach_lock = Semaphore()  # one attach at a time: each waits for the previous client's end
        self._arriving = 0  # connections upgraded (or upgrading) and not yet attached

    @property
    def send_timeout(self):
        """How long a write may wait for the peer to take anything before the client is dropped."""
        return self.ping_interval * MAX_UNANSWERED_PINGS

    @property
    def connected(self):
        """A client is attached (or arriving), and it is not on its way out."""
        client = self.client
        return self._arriving > 0 or (client is not None and client.ending is None)

    @contextmanager
    def arriving(self):
        """Count a connection as connected from its upgrade on (before it can be attached)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def publish(self, frame):
        """Append `frame`; it is written once the current greenlet yields (see `_flush`)."""
        self.log.append(frame)
        if self.log.over_limit():
            self._trim()
        if self._flush_scheduled is None:
            self._flush_scheduled = self._loop.run_callback(self._flush)

    def _flush(self):
        """Runs in the hub once per loop iteration after a publish (or earlier: `flush_now`): all
        frames published meanwhile leave in one write, without a switch to the writer while it is
        parked (a greenlet switch less per write), else the writer is woken."""
        self._flush_scheduled = None
        client = self.client
        if client is None or not client.write_now():
            self.changed.set()

    def flush_now(self):
        """Write what was published now, not at the end of the hub's turn: the pump calls this
        after each pass over its sockets. Under load one turn of the hub serves many sessions,
        and a frame left for the end of it waited for all of them (100 paced sessions: p99 of
        up to 40 ms between a kernel's idle and its write). Never yields."""
        pending = self._flush_scheduled
        if pending is not None:
            pending.stop()
            self._flush()

    def event(self, name, payload):
        """(Prefer `publish(events.<name>(...))`: events.py builds each event as the schema says.)"""
        self.publish(kernel_event(name, payload))

    def on_progress(self, client):
        self.forget_delivered(client)
        if self.log.over_limit():
            self._trim()

    def forget_delivered(self, client):
        if client is self.client:
            self.log.forget_delivered(client.delivered, KEEP_DELIVERED_BYTES)

    def _trim(self):
        """Over a bound: sent frames go first, then the oldest unsent ones (a gap the next reader
        is told about, see Client.run_writer and attach)."""
        client = self.client
        lost = self.log.trim(client.cursor if client is not None and client.ending is None else self.cursor)
        if lost:
            log.debug("session %s: the buffer bound dropped frames %d..%d", self.session_id, *lost)

    def attach(self, ws, after=None):
        """Make `ws` the session's client, replacing (and notifying) any current one."""
        with self._attach_lock:
            old = self.client
            if old is not None:
                self._settle(old, "replaced")
            cursor = self.cursor if after is None else max(int(after) + 1, 1)
            cursor = min(cursor, self.log.next_seq)
            if cursor < self.log.first_seq:
                try:
                    ws.send(gap_notice(cursor, self.log.first_seq - 1))
                    cursor = self.log.first_seq
                except ConnectionClosed:
                    pass  # gone already: its end is settled as usual, and the next client is told
            client = Client(self, ws, cursor, with_seq=after is not None)
            self.client = client
            client.writer = gevent.spawn(client.run_writer)
            client.pinger = gevent.spawn(client.run_pinger)
        self._notify()
        return client

    def _settle(self, client, how):
        """End `client` (or wait for the end already under way) and keep its resume point."""
        resume = client.end(how)
        if self.client is client:
            self.cursor = resume
            self.client = None
            self.log.forget_delivered(resume, KEEP_DELIVERED_BYTES)
        return resume

    def detach(self, client, how="dropped"):
        """`client`'s connection ended (closed, dropped or unresponsive)."""
        self._settle(client, how)
        self._notify()

    def _notify(self):
        if self.on_connect_change:
            self.on_connect_change(self.connected)

    def close(self):
        """The session is going away: close any client, free the log."""
        client = self.client
        if client is not None:
            self._settle(client, "closing")
        self.log.clear()
        release_memory()

"""The outbound log: a session's frames, numbered from 1, bounded in frames and in bytes.

Pure bookkeeping (no I/O, no greenlets), so it is unit-tested on its own and a
file-backed log can offer the same interface (see the comment at the top of
channel.py for what the Channel relies on).

Frames are kept in a list with a moving head: forgetting only advances the
head, and the list is compacted once half of it is forgotten, so forgetting
is O(1) amortized. A parallel list of cumulative byte offsets gives the size
of any range in O(1), which the byte bound and `forget_delivered` need.
"""
from bisect import bisect_right

BATCH_FRAMES = 512
BATCH_BYTES = 1 << 20


class FrameIndex:
    """The bookkeeping both logs share: seqs and cumulative byte offsets of the kept frames, the
    bounds, and what to forget. A subclass sets `_ends` (cumulative byte offset after each frame),
    `_head` (index in `_ends` of first_seq), `_first_seq`, `_base` (offset before the frame at
    `_head`), `limit` and `byte_limit`, and implements `_forget(count)`."""

    def __len__(self):
        return len(self._ends) - self._head

    @property
    def first_seq(self):
        """The oldest seq still kept (== next_seq when the log is empty)."""
        return self._first_seq

    @property
    def next_seq(self):
        """The seq the next appended frame gets."""
        return self._first_seq + len(self)

    @property
    def nbytes(self):
        """Bytes of the frames kept."""
        return (self._ends[-1] - self._base) if len(self) else 0

    def over_limit(self):
        """True when the log holds more than `limit` frames or more than `byte_limit` bytes
        (a single frame never counts as too many bytes: the newest is always kept).
        (Asked for every frame published: spelled out rather than through len() and nbytes.)"""
        ends = self._ends
        n = len(ends) - self._head
        if n > self.limit:
            return True
        return self.byte_limit is not None and n > 1 and ends[-1] - self._base > self.byte_limit

    def forget_before(self, seq):
        """Forget every frame before `seq`; returns how many went."""
        count = max(0, min(seq, self.next_seq) - self._first_seq)
        self._forget(count)
        return count

    def forget_delivered(self, delivered_upto, keep_bytes):
        """Forget delivered frames (those before `delivered_upto`) except the newest `keep_bytes`
        of them; returns how many went. What a client acknowledged is not needed again, except by a
        `?after=N` client that resumes from a little before what its socket acknowledged."""
        end = self._head + max(0, min(delivered_upto, self.next_seq) - self._first_seq)
        if end <= self._head:
            return 0
        cut = bisect_right(self._ends, self._ends[end - 1] - keep_bytes, self._head, end)
        count = cut - self._head
        self._forget(count)
        return count

    def trim(self, keep_from):
        """Enforce the limits, forgetting frames before `keep_from` (already sent) first.

        Returns the (first, last) seqs of unsent frames that had to go, or None.
        """
        if not self.over_limit():
            return None
        while self._first_seq < keep_from and self.over_limit():
            self._forget(1)
        if not self.over_limit():
            return None
        first = self._first_seq
        while self.over_limit():
            self._forget(1)
        return first, self._first_seq - 1

    def clear(self):
        """Forget everything (the session is going away); seqs keep counting."""
        self._forget(len(self))


class OutboundLog(FrameIndex):
    """Frames with sequence numbers; past `limit` frames or `byte_limit` bytes the oldest go.

    The newest frame is always kept, even if it alone exceeds `byte_limit`
    (memory stays bounded by `byte_limit` plus one frame).
    """

    def __init__(self, limit, byte_limit=None):
        self.limit = max(1, int(limit))
        self.byte_limit = None if byte_limit is None else max(1, int(byte_limit))
        self._frames = []
        self._ends = []  # cumulative byte offset after each frame (since the log began)
        self._head = 0  # index in _frames of first_seq
        self._first_seq = 1
        self._base = 0  # cumulative offset before the frame at _head

    def append(self, frame):
        """Add `frame` (bytes) at the end; returns its seq. Does not enforce the limits (see trim)."""
        self._frames.append(frame)
        ends = self._ends
        ends.append((ends[-1] if ends else self._base) + len(frame))
        return self._first_seq + len(ends) - self._head - 1

    def read(self, seq, max_frames=BATCH_FRAMES, max_bytes=BATCH_BYTES):
        """Frames from `seq` on (at most `max_frames`, stopping once `max_bytes` is reached),
        as a list of (seq, frame). Frames already forgotten are skipped."""
        start = self._head + max(seq, self._first_seq) - self._first_seq
        out, size = [], 0
        frames = self._frames
        for i in range(start, min(len(frames), start + max_frames)):
            frame = frames[i]
            out.append((self._first_seq + i - self._head, frame))
            size += len(frame)
            if size >= max_bytes:
                break
        return out

    def _forget(self, count):
        if count <= 0:
            return
        self._head += count
        self._first_seq += count
        self._base = self._ends[self._head - 1]
        if self._head > len(self._frames) // 2:
            del self._frames[:self._head]
            del self._ends[:self._head]
            self._head = 0

    def clear(self):
        super().clear()
        self._frames, self._ends, self._head = [], [], 0

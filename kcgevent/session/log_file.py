"""The outbound log on disk: what `OutboundLog` keeps in memory, kept in append-only files instead.

Used with a state dir, so that a session's frames outlive the server process and memory stays bounded
however long a client is away: in memory there is only one 8-byte offset per frame kept (plus frames
appended since the hub last ran, not yet written). The bounds (`limit` frames, `byte_limit` bytes, i.e.
--buffer-limit and --buffer-bytes) then bound the files.

Layout: `DIR/<first seq, 16 digits>.seg`, each a run of records `<4-byte big-endian length><frame>`;
the record's seq is the segment's first seq plus its index. A new segment starts every SEGMENT_BYTES,
and a segment is deleted once all of its frames are forgotten. Appends are written in one `write()` per
hub loop iteration (and before any read, so a frame is on disk before a client can have it); there is no
fsync: this guards against the process dying, not the machine.

Opening a directory that holds segments recovers them: a record cut short at the end of a segment (the
process died mid-write) is truncated away and reported in `damage`; so is a segment that does not
continue its predecessor's seqs (everything before it is dropped).
"""
import os
import struct
from array import array
from bisect import bisect_left, bisect_right

import gevent

from .outbound_log import BATCH_BYTES, BATCH_FRAMES, FrameIndex

SEGMENT_BYTES = 8 << 20
_LEN = struct.Struct(">I")
_SUFFIX = ".seg"


class FileLog(FrameIndex):
    """Frames numbered from 1 in segment files; the interface of `OutboundLog` (see channel.py)."""

    def __init__(self, directory, limit, byte_limit=None):
        self.directory = directory
        self.limit = max(1, int(limit))
        self.byte_limit = None if byte_limit is None else max(1, int(byte_limit))
        self.damage = []  # what recovery had to drop, as sentences
        self._ends = array("q")  # cumulative payload bytes after each kept frame (since _base_seq)
        self._head = 0  # index in _ends of first_seq
        self._first_seq = 1
        self._base = 0  # cumulative payload bytes before the frame at _head
        self._segments = []  # [first_seq, path, fd, size, payload bytes before first_seq], oldest first
        self._segment_starts = []  # first_seq of each segment, for bisect
        self._pending = []  # frames appended but not yet written
        self._flush_scheduled = False
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._recover()

    # -- the interface -----------------------------------------------------------------------------

    def append(self, frame):
        seq = self.next_seq
        if not self._segments or self._segments[-1][3] + 4 + len(frame) > SEGMENT_BYTES and \
                seq > self._segments[-1][0]:
            self._flush()
            self._new_segment(seq)
        self._segments[-1][3] += 4 + len(frame)
        self._ends.append((self._ends[-1] if len(self._ends) else self._base) + len(frame))
        self._pending.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)
        return seq

    def read(self, seq, max_frames=BATCH_FRAMES, max_bytes=BATCH_BYTES):
        """Up to `max_frames` frames from `seq` on (stopping once `max_bytes` is reached, and at a
        segment's end), as [(seq, frame)]."""
        seq = max(seq, self._first_seq)
        if seq >= self.next_seq:
            return []
        self._flush()
        index = bisect_right(self._segment_starts, seq) - 1
        first, _, fd, _, base = self._segments[index]
        seg_end_seq = self._segment_starts[index + 1] if index + 1 < len(self._segments) else self.next_seq
        i0 = self._head + seq - self._first_seq
        ends = self._ends[i0:i0 + min(seg_end_seq - seq, max_frames)]
        prev = self._ends[i0 - 1] if i0 > 0 else self._base
        count = min(len(ends), bisect_left(ends, prev + max_bytes) + 1)  # the frame reaching max_bytes too
        # A record is 4 bytes of length, then the frame: frame i starts 4 * (its index) bytes further
        # into the segment than the payload bytes before it.
        data = os.pread(fd, ends[count - 1] - prev + 4 * count, prev - base + 4 * (seq - first))
        out, pos = [], 4
        for k in range(count):
            end = ends[k]
            size = end - prev
            out.append((seq + k, data[pos:pos + size]))
            pos += size + 4
            prev = end
        return out

    def skip_to(self, seq):
        """Forget everything and number the next frame `seq` (if later): after a recovery that lost
        frames clients may have seen, their seqs are never given to other frames."""
        self.clear()
        if seq > self._first_seq:
            self._first_seq = seq

    def flush(self):
        """Write what is pending now (before recording `next_seq` anywhere that outlives us)."""
        self._flush()

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self):
        """Write what is pending and close the files (they stay on disk)."""
        self._flush()
        for segment in self._segments:
            os.close(segment[2])
        self._segments, self._segment_starts = [], []

    def destroy(self):
        """Close and delete every file of this log."""
        self.close()
        for name in os.listdir(self.directory):
            if name.endswith(_SUFFIX):
                os.unlink(os.path.join(self.directory, name))

    # -- internals -------------------------------------------------------------------------------

    def _cum_before(self, seq):
        """Payload bytes of all frames before `seq` (since the log's base)."""
        i = self._head + seq - self._first_seq
        return self._ends[i - 1] if i > 0 else self._base

    def _new_segment(self, first_seq):
        path = os.path.join(self.directory, f"{first_seq:016d}{_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._segments.append([first_seq, path, fd, 0, self._cum_before(first_seq)])
        self._segment_starts.append(first_seq)

    def _flush(self):
        self._flush_scheduled = False
        if self._pending:
            frames, self._pending = self._pending, []
            parts = []
            for frame in frames:
                parts.append(_LEN.pack(len(frame)))
                parts.append(frame)
            os.write(self._segments[-1][2], b"".join(parts))

    def _forget(self, count):
        if count <= 0:
            return
        self._flush()  # what is forgotten is on disk first: the files' offsets stay simple
        self._head += count
        self._first_seq += count
        self._base = self._ends[self._head - 1]
        if self._head > len(self._ends) // 2:
            del self._ends[:self._head]
            self._head = 0
        # Segments whose frames are all forgotten go (the one being written stays).
        while len(self._segments) > 1 and self._segment_starts[1] <= self._first_seq:
            _, path, fd, _, _ = self._segments.pop(0)
            self._segment_starts.pop(0)
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
        if len(self) == 0 and self._segments:
            # Nothing kept: start afresh (the old segment's frames are all forgotten).
            _, path, fd, _, _ = self._segments.pop()
            self._segment_starts.pop()
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass

    def _recover(self):
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(_SUFFIX) and n[:-4].isdigit())
        expected = None
        for name in names:
            path = os.path.join(self.directory, name)
            first = int(name[:-4])
            with open(path, "rb") as f:
                data = f.read()
            sizes, pos = [], 0
            while pos + 4 <= len(data):
                (size,) = _LEN.unpack_from(data, pos)
                if pos + 4 + size > len(data):
                    break
                sizes.append(size)
                pos += 4 + size
            if pos < len(data):
                self.damage.append(f"log segment {name}: {len(data) - pos} bytes of an unfinished frame "
                                   f"after seq {first + len(sizes) - 1} dropped")
                with open(path, "r+b") as f:
                    f.truncate(pos)
            if expected is not None and first != expected:
                self.damage.append(f"log segment {name} starts at seq {first}, expected {expected}: "
                                   "earlier frames dropped")
                for segment in self._segments:
                    os.close(segment[2])
                    os.unlink(segment[1])
                self._segments, self._segment_starts = [], []
                self._ends, self._head, self._base = array("q"), 0, 0
            if not self._segments:
                self._first_seq = first
            if not sizes:
                os.unlink(path)
                expected = first if expected is None else expected
                if not self._segments:
                    self._first_seq = max(self._first_seq, first)
                continue
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            total = self._ends[-1] if len(self._ends) else self._base
            self._segments.append([first, path, fd, pos, total])
            self._segment_starts.append(first)
            for size in sizes:
                total += size
                self._ends.append(total)
            expected = first + len(sizes)
        if expected is not None and not self._segments:
            self._first_seq = expected

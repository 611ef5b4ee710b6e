"""What a kernel published while no supervisor listened, as kept by its guardian (state dir only).

The guardian subscribes to the kernel's iopub as soon as it sees the supervisor gone and keeps every
message in a file (see guardian.py). A supervisor that comes back subscribes itself, and once its own
subscription is live (it has received an iopub message) asks the guardian to stop; the guardian then
hands over the file. Both subscriptions see the same ordered stream, so the supervisor's stream starts
with a stretch the capture already holds: `CaptureMerge` relays the capture first, then the live stream
without that overlap (recognised by msg_id), and holds live iopub messages meanwhile so the order is
kept. What was published between the supervisor's death and the guardian's subscription is still lost
(milliseconds: the `outputGap` event marks the place).
"""
import logging
import os
import struct
import time

import gevent

from . import wire

log = logging.getLogger(__name__)

HANDOVER_TIMEOUT = 3.0  # seconds the guardian gets to hand the capture over once asked
_COUNT = struct.Struct(">I")


def read_capture(path):
    """The messages in a capture file, as lists of frames (a torn last record is ignored)."""
    with open(path, "rb") as f:
        data = f.read()
    messages, pos = [], 0
    while pos + 4 <= len(data):
        (count,) = _COUNT.unpack_from(data, pos)
        frames, cur = [], pos + 4
        for _ in range(count):
            if cur + 4 > len(data):
                return messages
            (size,) = _COUNT.unpack_from(data, cur)
            if cur + 4 + size > len(data):
                return messages
            frames.append(data[cur + 4:cur + 4 + size])
            cur += 4 + size
        messages.append(frames)
        pos = cur
    return messages


class CaptureClaim:
    """The supervisor's side of one guardian's capture, in the launcher's directory."""

    def __init__(self, directory):
        self.directory = directory

    def pending(self):
        return any(os.path.exists(os.path.join(self.directory, name)) for name in ("capture", "capture.done"))

    def stop(self):
        """We listen ourselves now: ask the guardian to hand the capture over."""
        fd = os.open(os.path.join(self.directory, "capture.stop"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def take(self, timeout=HANDOVER_TIMEOUT):
        """The captured messages (frames lists) once handed over; [] if none comes within `timeout`."""
        done = os.path.join(self.directory, "capture.done")
        deadline = time.monotonic() + timeout
        while not os.path.exists(done):
            if time.monotonic() > deadline:
                log.warning("the kernel guardian in %s did not hand its iopub capture over", self.directory)
                return []
            gevent.sleep(0.02)
        messages = read_capture(done)
        os.unlink(done)
        return messages


class CaptureMerge:
    """A kernel-message handler for a restored connection: the capture first, then the live stream."""

    def __init__(self, claim, relay, signer, session_id, is_internal=None):
        self.claim = claim
        self.relay = relay
        self.signer = signer
        self.session_id = session_id
        self.is_internal = is_internal  # msg -> whether it answers our own kernel_info (not relayed)
        self.state = "waiting"  # "waiting" for our iopub to be live, "merging", then "live"
        self.held = []
        self.skip = None  # msg_ids of captured messages our own stream may repeat
        self.relayed = 0

    def __call__(self, msg, header_raw):
        if self.state == "live":
            return self._live(msg, header_raw)
        if msg.channel != "iopub":
            return self.relay(msg, header_raw)
        self.held.append((msg, header_raw))
        self.iopub_live()

    def iopub_live(self):
        """Our subscription receives: the guardian may stop (once)."""
        if self.state == "waiting":
            self.state = "merging"
            self.claim.stop()
            gevent.spawn(self._merge)

    def _merge(self):
        captured = self.claim.take()
        ids = set()
        for frames in captured:
            try:
                msg, header_raw = wire.parse_kernel_frames("iopub", frames, self.signer)
            except wire.WireError as exc:
                log.warning("session %s: a captured iopub message is unusable: %s", self.session_id, exc)
                continue
            ids.add(msg.header["msg_id"])
            if self.is_internal is not None and self.is_internal(msg):
                # The guardian listens until our own subscription is live, so it also keeps the
                # busy/idle of the kernel_info we sent on reconnecting: relayed, a busy whose idle
                # came after the handover left the session "busy" for good.
                continue
            self.relay(msg, header_raw)
        self.relayed = len(ids)
        if captured:
            log.info("session %s: %d iopub message(s) kept by the guardian while no supervisor listened",
                     self.session_id, len(ids))
        self.skip = ids or None
        held, self.held = self.held, []
        self.state = "live"
        for msg, header_raw in held:
            self._live(msg, header_raw)

    def _live(self, msg, header_raw):
        skip = self.skip
        if skip is not None and msg.channel == "iopub":
            if msg.header["msg_id"] in skip:
                return  # the overlap: the guardian had it already
            self.skip = None  # past the overlap
        self.relay(msg, header_raw)

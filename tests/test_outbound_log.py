"""The outbound log on its own: no sockets, no greenlets, no server."""
import pytest

from kcgevent.session.outbound_log import OutboundLog


def frames(log):
    return log.read(log.first_seq, max_frames=10**9, max_bytes=10**12)


def fill(log, n, size=10, start=0):
    for i in range(start, start + n):
        log.append(b"%0*d" % (size, i))


def test_append_numbers_from_one_and_reads_in_order():
    log = OutboundLog(100)
    assert (log.first_seq, log.next_seq, len(log), log.nbytes) == (1, 1, 0, 0)
    assert [log.append(b"a"), log.append(b"bb"), log.append(b"ccc")] == [1, 2, 3]
    assert (log.first_seq, log.next_seq, len(log), log.nbytes) == (1, 4, 3, 6)
    assert log.read(2) == [(2, b"bb"), (3, b"ccc")]
    assert log.read(0) == [(1, b"a"), (2, b"bb"), (3, b"ccc")]
    assert log.read(4) == []


def test_read_stops_at_frame_and_byte_batch_bounds():
    log = OutboundLog(100)
    fill(log, 20, size=10)
    assert [s for s, _ in log.read(1, max_frames=5)] == [1, 2, 3, 4, 5]
    # stops once max_bytes is reached (the frame that crosses it is included)
    assert [s for s, _ in log.read(3, max_bytes=25)] == [3, 4, 5]


def test_frame_limit_forgets_sent_frames_first():
    log = OutboundLog(5)
    fill(log, 8)
    assert log.trim(keep_from=4) is None  # seqs 1..3 were sent: they go, nothing is lost
    assert (log.first_seq, len(log)) == (4, 5)


def test_frame_limit_reports_unsent_frames_it_had_to_drop():
    log = OutboundLog(5)
    fill(log, 8)
    assert log.trim(keep_from=2) == (2, 3)  # seq 1 was sent (it goes first); 2 and 3 never were
    assert [s for s, _ in frames(log)] == [4, 5, 6, 7, 8]
    assert log.first_seq == 4 and log.next_seq == 9


def test_byte_limit_bounds_memory_and_keeps_the_newest():
    log = OutboundLog(10**6, byte_limit=1000)
    fill(log, 500, size=100)  # 50,000 bytes
    lost = log.trim(keep_from=1)
    assert log.nbytes <= 1000 and len(log) == 10
    assert lost == (1, 490)
    assert [f for _, f in frames(log)] == [b"%0100d" % i for i in range(490, 500)]


def test_byte_limit_always_keeps_the_newest_frame():
    log = OutboundLog(100, byte_limit=10)
    log.append(b"x" * 5)
    log.append(b"y" * 50)
    assert log.trim(keep_from=1) == (1, 1)
    assert frames(log) == [(2, b"y" * 50)]
    assert not log.over_limit()


def test_forget_delivered_keeps_only_the_newest_bytes_of_what_was_delivered():
    log = OutboundLog(10**6)
    fill(log, 100, size=100)
    assert log.forget_delivered(delivered_upto=51, keep_bytes=1000) == 40  # 1..40 go, 41..50 stay
    assert log.first_seq == 41
    assert log.nbytes == 60 * 100
    assert log.forget_delivered(delivered_upto=51, keep_bytes=0) == 10
    assert log.first_seq == 51
    assert log.forget_delivered(delivered_upto=10, keep_bytes=0) == 0  # nothing before first_seq
    assert log.forget_delivered(delivered_upto=10**9, keep_bytes=0) == 50  # capped at next_seq
    assert (len(log), log.nbytes, log.next_seq) == (0, 0, 101)


def test_forgetting_compacts_storage_and_offsets_stay_right():
    log = OutboundLog(50)
    for round_ in range(40):
        fill(log, 30, size=7, start=round_ * 30)
        log.trim(keep_from=log.next_seq)
        assert len(log) == 50 or round_ == 0
        assert log.nbytes == 7 * len(log)
        assert len(log._frames) <= 2 * 50 + 30  # forgotten frames do not pile up
    assert frames(log)[-1] == (1200, b"%07d" % 1199)


def test_clear_frees_everything_and_numbering_continues():
    log = OutboundLog(100)
    fill(log, 30)
    log.clear()
    assert (len(log), log.nbytes, log.first_seq, log.next_seq) == (0, 0, 31, 31)
    assert log.append(b"after") == 31
    assert frames(log) == [(31, b"after")] and log.nbytes == 5


@pytest.mark.parametrize("limit", [0, -3])
def test_limits_are_at_least_one(limit):
    log = OutboundLog(limit, byte_limit=limit)
    assert log.limit == 1 and log.byte_limit == 1

"""The file-backed outbound log on its own: the in-memory log's behaviour, plus what files add
(reopening, recovery of a torn tail, segments deleted once forgotten). No sockets, no server."""
import inspect
import os

import pytest
import test_outbound_log as memory_tests

from kcgevent.session import log_file
from kcgevent.session.log_file import FileLog

CASES = [name for name, func in vars(memory_tests).items()
         if name.startswith("test_") and callable(func) and not inspect.signature(func).parameters
         and name != "test_forgetting_compacts_storage_and_offsets_stay_right"]  # looks at list internals


@pytest.mark.parametrize("name", CASES)
def test_behaves_like_the_memory_log(name, tmp_path, monkeypatch):
    made = []

    def file_log(limit, byte_limit=None):
        made.append(FileLog(str(tmp_path / f"log{len(made)}"), limit, byte_limit))
        return made[-1]

    monkeypatch.setattr(memory_tests, "OutboundLog", file_log)
    getattr(memory_tests, name)()
    for log in made:
        log.close()


def test_frames_survive_reopening(tmp_path):
    log = FileLog(str(tmp_path), 100)
    for i in range(10):
        log.append(b'{"n":%d}' % i)
    log.close()
    again = FileLog(str(tmp_path), 100)
    assert (again.first_seq, again.next_seq, again.damage) == (1, 11, [])
    assert again.read(4, max_frames=2) == [(4, b'{"n":3}'), (5, b'{"n":4}')]
    assert again.append(b'{"n":10}') == 11
    again.close()
    assert FileLog(str(tmp_path), 100).read(11) == [(11, b'{"n":10}')]


def test_appends_reach_the_file_before_a_read_returns_them(tmp_path):
    log = FileLog(str(tmp_path), 100)
    log.append(b"x" * 100)
    assert log.read(1) == [(1, b"x" * 100)]
    (segment,) = [n for n in os.listdir(tmp_path) if n.endswith(".seg")]
    assert os.path.getsize(tmp_path / segment) == 104  # written by the read, no close needed
    assert not log._pending


def test_a_torn_last_frame_is_dropped_and_reported(tmp_path):
    log = FileLog(str(tmp_path), 100)
    for i in range(5):
        log.append(b"frame%d" % i)
    log.close()
    (segment,) = [tmp_path / n for n in os.listdir(tmp_path)]
    with open(segment, "ab") as f:
        f.write(b"\x00\x00\x01\x00half a fra")  # a length saying 256 bytes, 10 written
    again = FileLog(str(tmp_path), 100)
    assert again.next_seq == 6 and len(again.damage) == 1 and "unfinished frame" in again.damage[0]
    assert again.append(b"next") == 6
    assert [f for _, f in again.read(1)] == [b"frame0", b"frame1", b"frame2", b"frame3", b"frame4", b"next"]


def test_segments_rotate_and_go_once_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(log_file, "SEGMENT_BYTES", 100)
    log = FileLog(str(tmp_path), 1000)
    for i in range(30):
        log.append(b"%016d" % i)  # 20 bytes a record: 5 per segment
    log.read(1)
    assert len(os.listdir(tmp_path)) == 6
    assert [s for s, _ in log.read(4, max_frames=100)] == [4, 5]  # a batch ends at its segment
    log.forget_before(12)
    assert sorted(os.listdir(tmp_path))[0] == f"{11:016d}.seg"
    assert [f for _, f in log.read(12, max_frames=2)] == [b"%016d" % 11, b"%016d" % 12]
    log.close()
    again = FileLog(str(tmp_path), 1000)
    assert (again.first_seq, again.next_seq) == (11, 31)


def test_a_missing_segment_drops_what_came_before(tmp_path, monkeypatch):
    monkeypatch.setattr(log_file, "SEGMENT_BYTES", 100)
    log = FileLog(str(tmp_path), 1000)
    for i in range(15):
        log.append(b"%016d" % i)
    log.close()
    os.unlink(tmp_path / f"{6:016d}.seg")
    again = FileLog(str(tmp_path), 1000)
    assert again.first_seq == 11 and again.next_seq == 16 and "expected 6" in again.damage[0]


def test_clear_deletes_the_files_and_numbering_continues(tmp_path):
    log = FileLog(str(tmp_path), 100)
    for i in range(5):
        log.append(b"f")
    log.read(1)
    log.clear()
    assert os.listdir(tmp_path) == []
    assert log.append(b"g") == 6 and log.read(1) == [(6, b"g")]


def test_forgetting_bounds_memory_and_disk_and_offsets_stay_right(tmp_path, monkeypatch):
    monkeypatch.setattr(log_file, "SEGMENT_BYTES", 1000)
    log = FileLog(str(tmp_path), 50)
    for round_ in range(40):
        for i in range(round_ * 30, round_ * 30 + 30):
            log.append(b"%07d" % i)
        log.trim(keep_from=log.next_seq)
        assert len(log) == 50 or round_ == 0
        assert log.nbytes == 7 * len(log)
        assert len(log._ends) <= 2 * 50 + 30  # one offset per kept frame, compacted
        on_disk = sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path))
        assert on_disk <= 50 * 11 + 1000 + 30 * 11  # the kept frames, plus at most a segment
    assert [f for _, f in log.read(log.first_seq, max_frames=3)] == [b"%07d" % i for i in range(1150, 1153)]

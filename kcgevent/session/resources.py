"""Resource usage of kernels' process trees (kallichore-behavior.md 4.12), sampled with psutil.

Only the given roots and their descendants are read. CPU is measured per process as CPU time used
since that process's previous sample, over the wall time between the two, so a kernel with many
busy threads may exceed 100 and the result does not depend on how many sessions are sampled.
"""

import collections
import os
import sys
import time

import psutil

IS_LINUX = sys.platform.startswith("linux")
if IS_LINUX:
    _CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_Reading = collections.namedtuple("_Reading", "pid create_time cpu_seconds rss threads")


class ResourceSampler:
    """Samples process trees; keeps each pid's previous CPU time between calls."""

    def __init__(self, sampling_period_ms=1000):
        self.sampling_period_ms = sampling_period_ms
        self._previous = {}  # pid -> (create_time, cpu_seconds, monotonic time)

    def sample(self, pids_by_key, between=None):
        """``{key: root_pid}`` -> ``{key: metrics}``; a key whose root is gone is left out.

        Metrics: cpu_percent (int; 0 for a pid's first sample), memory_bytes (sum of RSS),
        thread_count, sampling_period_ms, timestamp (Unix ms). Pids not seen are forgotten.
        `between()` is called after each key's tree: a server passes a yield there, so that
        sampling a hundred kernels does not hold up every session for the whole pass.
        """
        timestamp = int(time.time() * 1000)
        seen = {}
        result = {}
        for key, root in pids_by_key.items():
            now = time.monotonic()  # (per tree: `between` may let time pass)
            readings = _tree(root)
            if not readings:
                continue
            cpu = sum(self._cpu_rate(r, now) for r in readings)
            seen.update((r.pid, (r.create_time, r.cpu_seconds, now)) for r in readings)
            result[key] = {
                "cpu_percent": round(cpu * 100),
                "memory_bytes": sum(r.rss for r in readings),
                "thread_count": sum(r.threads for r in readings),
                "sampling_period_ms": self.sampling_period_ms,
                "timestamp": timestamp,
            }
            if between is not None:
                between()
        self._previous = seen
        return result

    def _cpu_rate(self, reading, now):
        """CPU seconds per wall second since the pid's previous sample; 0 if there was none."""
        previous = self._previous.get(reading.pid)
        if previous is None or previous[0] != reading.create_time:  # new pid, or a reused one
            return 0.0
        _, cpu_seconds, then = previous
        elapsed = now - then
        return max(reading.cpu_seconds - cpu_seconds, 0.0) / elapsed if elapsed > 0 else 0.0


def _tree(root_pid):
    """_Readings of the root and its descendants; empty if the root is gone.

    On Linux the tree is walked through /proc/<pid>/task/<tid>/children and each process is read
    from its /proc/<pid>/stat alone, which touches only our kernels' processes (psutil's
    children() scans the whole process table, which is what made Kallichore's sampling expensive
    on busy hosts) and costs one file per process (psutil's oneshot reads three, through a
    Process object: a pass over 100 kernels took 34 ms of the server's one core). Elsewhere
    psutil is used.
    """
    if IS_LINUX:
        root = _read_proc_stat(root_pid)
        if root is None:
            return []
        found, pending = [root], [root_pid]
        while pending:
            for child in _proc_children(pending.pop()):
                reading = _read_proc_stat(child)
                if reading is not None:
                    found.append(reading)
                    pending.append(child)
        return found
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    return [r for r in map(_read_psutil, procs) if r is not None]


def _proc_children(pid):
    """Direct children of `pid`, from the kernel's per-thread children lists."""
    children = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children.extend(map(int, f.read().split()))
        except OSError:
            pass
    return children


def _read_proc_stat(pid):
    """A _Reading from /proc/<pid>/stat (proc(5)), or None if the process is gone.

    create_time is the start time in clock ticks since boot: only compared, to tell a reused pid.
    RSS is the kernel's cached counter, which may lag /proc/<pid>/statm's by a few pages.
    Children's CPU times (of reaped children) are excluded: they would appear as a spike.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")"
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, num_threads 20, starttime 22, rss 24
    return _Reading(pid, int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
                    int(fields[21]) * _PAGE_SIZE, int(fields[17]))


def _read_psutil(proc):
    """A _Reading, or None if the process vanished or access is denied."""
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return _Reading(proc.pid, proc.create_time(), times.user + times.system,
                            proc.memory_info().rss, proc.num_threads())
    except psutil.Error:
        return None

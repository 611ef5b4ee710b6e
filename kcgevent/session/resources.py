"""Resource usage of kernels' process trees (kallichore-behavior.md 4.12), sampled with psutil.

Only the given roots and their descendants are read. CPU is measured per process as CPU time used
since that process's previous sample, over the wall time between the two, so a kernel with many
busy threads may exceed 100 and the result does not depend on how many sessions are sampled.
"""

import collections
import os
import time

import psutil

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
            readings = [r for r in map(_read, _tree(root)) if r is not None]
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
    """The root and its descendants; empty if the root is gone.

    On Linux the tree is walked through /proc/<pid>/task/<tid>/children, which
    touches only our kernels' processes; psutil's children() scans the whole
    process table, which is what made Kallichore's sampling expensive on busy
    hosts. Elsewhere psutil is used.
    """
    try:
        root = psutil.Process(root_pid)
    except psutil.Error:
        return []
    if not os.path.isdir(f"/proc/{root_pid}/task"):
        try:
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return [root]
    found, pending = [root], [root_pid]
    while pending:
        for child in _proc_children(pending.pop()):
            try:
                found.append(psutil.Process(child))
                pending.append(child)
            except psutil.Error:
                pass
    return found


def _proc_children(pid):
    """Direct children of `pid`, from the kernel's per-thread children lists."""
    children = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return children


def _read(proc):
    """A _Reading, or None if the process vanished or access is denied.

    Children's CPU times (of reaped children) are excluded: they would appear as a spike.
    """
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return _Reading(proc.pid, proc.create_time(), times.user + times.system,
                            proc.memory_info().rss, proc.num_threads())
    except psutil.Error:
        return None

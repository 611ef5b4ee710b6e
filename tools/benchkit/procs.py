"""Processes the benchmark starts (all killed at the end, by pid) and the CPU/RSS they use."""
import shutil
import signal
import subprocess
import sys
import time

import psutil


class BenchError(Exception):
    pass


def now():
    return time.perf_counter()


def remaining(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class Reaper:
    """Remembers every process we started or saw spawned (pid + create time) and kills them."""

    def __init__(self):
        self.popens = []  # (Popen, graceful_signal)
        self.known = {}  # pid -> create_time

    def track(self, popen, graceful=signal.SIGTERM):
        self.popens.append((popen, graceful))
        self.remember(popen.pid)
        return popen

    def remember(self, pid):
        try:
            proc = psutil.Process(pid)
            self.known[pid] = proc.create_time()
            for child in proc.children(recursive=True):
                try:
                    self.known[child.pid] = child.create_time()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def snapshot(self):
        for popen, _ in self.popens:
            if popen.poll() is None:
                self.remember(popen.pid)

    def _alive(self, pids=None):
        alive = []
        for pid, created in self.known.items():
            if pids is not None and pid not in pids:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        return alive

    def stop(self, popen, timeout=15):
        """End one process we started and everything seen below it (a server and its kernels)."""
        self.remember(popen.pid)
        tree = {popen.pid}
        try:
            tree |= {c.pid for c in psutil.Process(popen.pid).children(recursive=True)}
        except psutil.Error:
            pass
        graceful = next((sig for p, sig in self.popens if p is popen), signal.SIGTERM)
        if popen.poll() is None:
            try:
                popen.send_signal(graceful)
            except OSError:
                pass
        wait_or_kill(popen, timeout)
        left = self._alive(tree)  # kernels the server did not end: they get the same signal, then SIGKILL
        for proc in left:
            try:
                proc.send_signal(graceful)
            except psutil.Error:
                pass
        kill_survivors(left, 3)

    def cleanup(self, timeout=15):
        """Graceful signal to what we started, wait, then SIGKILL anything left. Returns leftovers."""
        self.snapshot()
        for popen, sig in self.popens:
            if popen.poll() is None:
                try:
                    popen.send_signal(sig)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for popen, _ in self.popens:
            wait_or_kill(popen, max(0.1, deadline - time.monotonic()))
        # Kernels live in their own process groups: give them a moment to follow their server.
        kill_survivors(self._alive(), 3)
        return [p.pid for p in self._alive()]


def wait_or_kill(popen, timeout):
    """Wait up to `timeout` for `popen` to end, then SIGKILL it (and wait 5 s more)."""
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def kill_survivors(procs, grace):
    """Give `procs` (psutil) `grace` seconds to end, then SIGKILL the rest (and wait 5 s more)."""
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


REAPER = Reaper()
SCRATCH_DIRS = []  # removed at exit (the Unix socket directories)


def remove_scratch(workdir, keep):
    """At exit: the work directory goes (kept, and named on stderr, with `keep`), and so do the socket
    directories."""
    if keep:
        print(f"work directory (logs): {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    for path in SCRATCH_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def cpu_seconds(pid):
    """CPU seconds of this one process (all its threads, also those that ended; none of its children).

    On Linux, the process's own CPU-time clock (what clock_getcpuclockid(3) returns for it: nanosecond
    precision); psutil's cpu_times count clock ticks (10 ms), too coarse for 0.3 ms per execute."""
    if sys.platform.startswith("linux"):
        try:
            return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        except OSError:
            return float("nan")  # gone
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def cpu_seconds_sum(pids):
    return sum(cpu_seconds(pid) for pid in pids) if pids else 0.0


class CpuMeter:
    """CPU seconds used by this process and by the given pids (or pid lists) between start() and stop()."""

    def __init__(self, **pids):
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}

    def _read(self, pid):
        return cpu_seconds_sum(pid) if isinstance(pid, (list, tuple, set)) else cpu_seconds(pid)

    def __enter__(self):
        self.wall = now()
        self.me = time.process_time()
        self.base = {name: self._read(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc):
        self.wall = now() - self.wall
        self.used = {"client": time.process_time() - self.me}
        for name, pid in self.pids.items():
            self.used[name] = self._read(pid) - self.base[name]
        return False

    def as_dict(self):
        return {"wall_s": round(self.wall, 4), **{f"cpu_{k}_s": round(v, 4) for k, v in self.used.items()}}


MIB = 1024 * 1024


def rss_mib(pid):
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return float("nan")


def helper_children(server_pid, kernel_pids):
    """The server's children that are not kernels (kcgevent's per-kernel guardians; none for kcserver)."""
    kernel_pids = set(kernel_pids)
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return []
    return [c.pid for c in children if c.pid not in kernel_pids]


def memory_of(pids):
    """(summed RSS, summed USS) in MiB of these processes; USS leaves out pages shared with others."""
    rss = uss = 0.0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
            rss += info.rss / MIB
            uss += info.uss / MIB
        except psutil.Error:
            pass
    return rss, uss

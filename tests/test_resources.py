from gevent import monkey; monkey.patch_all()  # noqa: E702  (before anything imports socket etc.)

import subprocess
import sys
import time

import gevent
import psutil
import pytest

from kcgevent.session.resources import ResourceSampler

PY = sys.executable
BURN = "while True: pass"


@pytest.fixture
def start():
    """Start python processes; kill them at the end."""
    procs = []

    def spawn(code):
        proc = subprocess.Popen([PY, "-c", code], stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait(5)


def cpu_seconds(*pids):
    """CPU time the OS has charged to these processes so far."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def sampled_between(sample_pair, *pids):
    """Runs ``sample_pair()`` (two samples with a pause between) and returns (its result, the lowest and
    highest CPU percent the OS's own figures allow for the window between the two samples).

    The sampler's window lies inside the outer bracket (before the first sample .. after the second) and
    contains the inner one (after the first .. before the second); CPU times tick in 10 ms. So the check
    holds whatever share of a core a loaded machine gives the process.
    """
    outer_start, outer_cpu_start = time.monotonic(), cpu_seconds(*pids)
    result = sample_pair(lambda: (time.monotonic(), cpu_seconds(*pids)))
    outer_cpu_end, outer_end = cpu_seconds(*pids), time.monotonic()
    (inner_start, inner_cpu_start), (inner_end, inner_cpu_end) = result.pop("inner")
    tick = 0.01 * len(pids)
    low = 100 * (inner_cpu_end - inner_cpu_start - tick) / (outer_end - outer_start)
    high = 100 * (outer_cpu_end - outer_cpu_start + tick) / (inner_end - inner_start)
    return result, low - 1, high + 1


def test_busy_process(start):
    """The CPU percent is the CPU time the OS charged to the process over the wall time between samples
    (not a fixed figure: on a loaded machine a busy loop gets less than a core)."""
    burner = start(BURN)
    sampler = ResourceSampler(sampling_period_ms=500)

    def sample_pair(mark):
        first = sampler.sample({"k": burner.pid})["k"]
        inner_start = mark()
        gevent.sleep(0.5)
        inner_end = mark()
        return {"first": first, "second": sampler.sample({"k": burner.pid})["k"], "inner": (inner_start, inner_end)}

    samples, low, high = sampled_between(sample_pair, burner.pid)
    assert samples["first"]["cpu_percent"] == 0
    second = samples["second"]
    assert low <= second["cpu_percent"] <= high
    assert second["cpu_percent"] > 0  # it was busy
    assert second["memory_bytes"] > 0
    assert second["thread_count"] >= 1
    assert second["sampling_period_ms"] == 500
    assert abs(second["timestamp"] - time.time() * 1000) < 5000


def test_descendants_are_counted(start):
    parent = start(f"import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, '-c', {BURN!r}])\n"
                   f"time.sleep(600)")
    alone = start("import time; time.sleep(600)")
    sampler = ResourceSampler()
    with gevent.Timeout(10):
        while sampler.sample({"p": parent.pid})["p"]["thread_count"] < 2:
            gevent.sleep(0.05)
    try:
        burner = psutil.Process(parent.pid).children()[0].pid

        def sample_pair(mark):
            sampler.sample({"p": parent.pid, "a": alone.pid})
            inner_start = mark()
            gevent.sleep(0.5)
            inner_end = mark()
            return {"usage": sampler.sample({"p": parent.pid, "a": alone.pid}), "inner": (inner_start, inner_end)}

        samples, low, high = sampled_between(sample_pair, parent.pid, burner)
        usage = samples["usage"]
        assert low <= usage["p"]["cpu_percent"] <= high  # the child's CPU counts for the parent
        assert usage["p"]["cpu_percent"] > 0
        assert usage["a"]["cpu_percent"] < 50
        assert usage["p"]["memory_bytes"] > usage["a"]["memory_bytes"]
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()


def test_vanished_pid_is_left_out(start):
    gone = subprocess.Popen([PY, "-c", "pass"])
    gone.wait(10)
    alive = start("import time; time.sleep(600)")
    usage = ResourceSampler().sample({"gone": gone.pid, "alive": alive.pid})
    assert list(usage) == ["alive"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_named_with_parentheses_and_spaces_reads_as_psutil_sees_it(start):
    """On Linux each process is read from /proc/<pid>/stat alone, whose second field is the command
    name in parentheses, which may hold ") (" itself: the fields after it must still be found."""
    named = start("import ctypes, threading, time\n"
                  "ctypes.CDLL(None).prctl(15, b'k) (x y', 0, 0, 0)\n"  # PR_SET_NAME
                  "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
                  "time.sleep(600)")
    proc = psutil.Process(named.pid)
    with gevent.Timeout(10):
        while proc.name() != "k) (x y" or proc.num_threads() < 2:
            gevent.sleep(0.05)
    usage = ResourceSampler().sample({"k": named.pid})["k"]
    assert usage["thread_count"] == proc.num_threads() == 2
    rss = proc.memory_info().rss
    assert 0.9 * rss <= usage["memory_bytes"] <= 1.1 * rss  # (the kernel's two RSS counters may differ a little)

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


def test_busy_process(start):
    burner = start(BURN)
    sampler = ResourceSampler(sampling_period_ms=500)
    first = sampler.sample({"k": burner.pid})["k"]
    assert first["cpu_percent"] == 0
    gevent.sleep(0.5)
    second = sampler.sample({"k": burner.pid})["k"]
    assert second["cpu_percent"] > 50
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
        gevent.sleep(0.5)
        usage = sampler.sample({"p": parent.pid, "a": alone.pid})
        assert usage["p"]["cpu_percent"] > 50
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

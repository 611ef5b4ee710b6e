"""Kernels that fail to start, through the fake kernel's fault flags.

Every failure must answer with a StartupError (HTTP 500) that says what went
wrong, leave no process behind, and leave the session usable: it can be
started again or deleted. Every process the server spawns is recorded while
the start runs, so that a leak is caught even when the kernel dies quickly.
"""
import os
import time

import gevent
import psutil
import pytest

from conftest import FAKE_KERNEL, fake_kernel_session, new_id


def pid_gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kernels_of(server):
    """The live fake-kernel processes among the server's descendants."""
    found = []
    for p in server.descendants():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(FAKE_KERNEL in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def start_watching(server, session_id, timeout=30):
    """POST start while recording every process the server spawns: (status, body, seconds, pids)."""
    request = gevent.spawn(server.client.request, "POST", f"/sessions/{session_id}/start", timeout=timeout)
    pids = set()
    began = time.monotonic()
    while not request.ready():
        pids.update(p.pid for p in server.descendants())
        request.join(0.02)
    status, body = request.get()
    return status, body, time.monotonic() - began, pids


def create(server, *flags, **overrides):
    session_id = new_id("fail")
    server.client.call("PUT", "/sessions", fake_kernel_session(session_id, *flags, **overrides))
    return session_id


def assert_startup_error(status, body, code, expected_status=500):
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body


def assert_nothing_left(server, pids):
    alive = [pid for pid in pids if not pid_gone(pid)]
    assert not alive, f"processes still running after the failed start: {alive}"
    assert not kernels_of(server)


def session(server, session_id):
    return server.client.call("GET", f"/sessions/{session_id}")


def test_exit_at_start(server):
    session_id = create(server, "--exit-at-start", "3")
    status, body, _, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-8")
    assert body["exit_code"] == 3
    assert "fake kernel starting" in body["output"]
    assert "fatal: exiting with 3" in body["output"]
    assert not body["output"].endswith("\n")
    assert body["error"]["details"] == "Kernel failed to start"
    assert "exit status: 3" in body["error"]["message"]
    assert_nothing_left(server, pids)
    state = session(server, session_id)
    assert state["status"] == "exited"
    assert "process_id" not in state

    # It can be started again (and fails the same way, not as "already started") ...
    status, body, _, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-8")
    assert body["exit_code"] == 3
    assert "fatal: exiting with 3" in body["output"]
    assert_nothing_left(server, pids)
    # ... and deleted.
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)
    assert server.client.request("GET", f"/sessions/{session_id}")[0] == 404


def test_exit_zero_before_connecting_is_still_a_failure(server):
    session_id = create(server, "--exit-at-start", "0")
    status, body, _, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-8")
    assert body["exit_code"] == 0
    assert_nothing_left(server, pids)


def test_hang_times_out_and_kills_the_kernel(server):
    session_id = create(server, "--hang", connection_timeout=2)
    status, body, seconds, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-7")
    assert 1.8 <= seconds <= 5, f"the start answered after {seconds:.1f} s (connection_timeout 2)"
    assert "2" in body["error"]["message"]
    assert body["error"].get("details") == "Kernel failed to connect to ZeroMQ sockets"
    assert pids, "the server never spawned the kernel"
    assert_nothing_left(server, pids)
    assert session(server, session_id)["status"] == "exited"
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)


def test_bad_hmac(server):
    session_id = create(server, "--bad-hmac", connection_timeout=10)
    status, body, seconds, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-6")
    assert seconds < 9, "a bad signature should fail the start at once, not time out"
    assert body["error"].get("details") == "Kernel failed to connect to ZeroMQ sockets"
    assert pids
    assert_nothing_left(server, pids)
    assert session(server, session_id)["status"] == "exited"
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)


def test_empty_argv(server):
    session_id = new_id("noargs")
    server.client.call("PUT", "/sessions", {**fake_kernel_session(session_id), "argv": []})
    status, body, _, pids = start_watching(server, session_id)
    # A session made to adopt into: starting it is the client's mistake (400), not a server error
    assert_startup_error(status, body, "KS-5", 400)
    assert "argv is empty" in body["error"]["message"]
    assert not pids
    assert session(server, session_id)["status"] in ("uninitialized", "exited")
    # Again the same way, then gone.
    status, body = server.client.request("POST", f"/sessions/{session_id}/start")
    assert_startup_error(status, body, "KS-5", 400)
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)


def test_spawn_failure(server, tmp_path):
    not_executable = tmp_path / "kernel-without-x-bit"
    not_executable.write_text("#!/bin/sh\necho never\n")
    os.chmod(not_executable, 0o644)
    session_id = new_id("noexec")
    server.client.call("PUT", "/sessions", {**fake_kernel_session(session_id),
                                            "argv": [str(not_executable), "{connection_file}"]})
    status, body, _, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-5")
    assert body["exit_code"] == 13, body  # EACCES
    assert "Failed to start process for session" in body["error"]["message"]
    assert_nothing_left(server, pids)
    assert session(server, session_id)["status"] == "exited"
    # It fails the same way again, and can be deleted.
    status, body = server.client.request("POST", f"/sessions/{session_id}/start")
    assert_startup_error(status, body, "KS-5")
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)


def test_argument_with_a_nul_byte(server):
    """No process can be given such an argument: a clear start error (KS-5), nothing spawned."""
    session_id = new_id("nul")
    body = fake_kernel_session(session_id)
    server.client.call("PUT", "/sessions", {**body, "argv": body["argv"] + ["a\u0000b"]})
    status, body, _, pids = start_watching(server, session_id)
    assert_startup_error(status, body, "KS-5")
    assert "embedded null byte" in body["error"]["message"]
    assert not pids
    assert session(server, session_id)["status"] == "exited"
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)


def test_second_start_of_a_running_session(server):
    session_id = create(server)
    status, info = server.client.request("POST", f"/sessions/{session_id}/start")
    assert status == 200 and info["implementation"] == "fake"
    pid = session(server, session_id)["process_id"]
    status, body = server.client.request("POST", f"/sessions/{session_id}/start")
    assert_startup_error(status, body, "KS-16", 409)
    kernels = kernels_of(server)
    assert [k.pid for k in kernels] == [pid], f"expected exactly one kernel ({pid}), found {kernels}"
    state = session(server, session_id)
    assert state["process_id"] == pid and state["status"] == "idle"
    server.client.call("POST", f"/sessions/{session_id}/kill")


def test_start_while_starting(server):
    session_id = create(server, "--startup-delay", "1.5")
    first = gevent.spawn(server.client.request, "POST", f"/sessions/{session_id}/start")
    deadline = time.monotonic() + 5
    while session(server, session_id)["status"] != "starting":
        assert time.monotonic() < deadline, "the session never reported starting"
        gevent.sleep(0.02)
    status, body = server.client.request("POST", f"/sessions/{session_id}/start")
    assert_startup_error(status, body, "KS-16", 409)  # a conflict with the start under way
    status, body = server.client.request("DELETE", f"/sessions/{session_id}")
    assert status == 400 and body["code"] == "KS-2", body
    status, info = first.get(timeout=20)
    assert status == 200 and info["implementation"] == "fake"
    assert len(kernels_of(server)) == 1
    server.client.call("POST", f"/sessions/{session_id}/kill")


@pytest.mark.parametrize("flags", [("--exit-at-start", "5"), ("--hang",)], ids=["exit", "hang"])
def test_failed_restart_reports_and_cleans_up(server, flags):
    """restart of a never-started session goes through the same start, with the same errors."""
    session_id = create(server, *flags, connection_timeout=1)
    request = gevent.spawn(server.client.request, "POST", f"/sessions/{session_id}/restart")
    pids = set()
    while not request.ready():
        pids.update(p.pid for p in server.descendants())
        request.join(0.02)
    status, body = request.get()
    assert status == 500, body
    assert body["error"]["code"] == ("KS-8" if flags[0] == "--exit-at-start" else "KS-7"), body
    assert_nothing_left(server, pids)
    assert server.client.request("DELETE", f"/sessions/{session_id}") == (200, None)

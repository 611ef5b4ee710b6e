"""Startup environments (none, shell, command, script) with a real ipykernel.

kallichore-behavior.md 4.3/4.4, with our deliberate differences: the shell
`exec`s the kernel (so the session's pid is the kernel itself and signals,
kill and resource sampling reach it), quoting is POSIX-correct, and a failed
start leaves no process behind. Every wait is bounded.
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
from conftest import launched_by, new_id, replies_to, stream_text, wait_gone  # noqa: E402

from kcgevent.client import execute_request, python_kernel_session  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="startup environments are POSIX only")

PYTHON = sys.executable


def py_body(session_id, working_directory, **overrides):
    return python_kernel_session(session_id, PYTHON, working_directory=str(working_directory), **overrides)


def start_watching(server, body):
    """PUT + POST start, recording every process the server spawns meanwhile: (status, answer, pids)."""
    server.client.call("PUT", "/sessions", body)
    pending = gevent.spawn(server.client.request, "POST", f"/sessions/{body['session_id']}/start")
    pids = set()
    deadline = time.monotonic() + 40
    while not pending.ready():
        assert time.monotonic() < deadline, "start did not answer within 40 s"
        pids.update(p.pid for p in server.descendants())
        gevent.sleep(0.02)
    status, answer = pending.get()
    return status, answer, pids


def start_ok(server, body):
    status, answer, _ = start_watching(server, body)
    assert status == 200, answer
    return answer


def run_code(channel, code, timeout=20):
    """Execute `code`; (stdout text, execute_reply content)."""
    request = channel.execute(code)
    frames = channel.until_idle(request, timeout)
    if not replies_to(frames, request, "execute_reply"):
        frames += channel.until(lambda f: bool(replies_to([f], request, "execute_reply")), timeout)
    reply = replies_to(frames, request, "execute_reply")[0]["content"]
    return stream_text(replies_to(frames, request)), reply


def env_in_kernel(server, open_channel, session_id, name):
    channel = open_channel(server, session_id)
    text, reply = run_code(channel, f"import os; print(repr(os.environ.get({name!r})))")
    assert reply["status"] == "ok", reply
    return text.strip()


def kernel_process(server, session_id):
    pid = server.client.call("GET", f"/sessions/{session_id}").get("process_id")
    assert pid, "no process_id"
    return psutil.Process(pid)


def is_ipykernel(proc):
    return any("ipykernel" in part for part in proc.cmdline())


def test_none_runs_the_kernel_directly_with_env_actions(server, open_channel, tmp_path):
    session_id = new_id("env")
    env = [{"action": "replace", "name": "KC_DIRECT", "value": "direct"}]
    start_ok(server, py_body(session_id, tmp_path, startup_environment="none", env=env))
    proc = kernel_process(server, session_id)
    assert is_ipykernel(proc), proc.cmdline()
    assert launched_by(proc, server.pid)
    assert env_in_kernel(server, open_channel, session_id, "KC_DIRECT") == "'direct'"


def test_shell_mode_execs_the_kernel(server, open_channel, tmp_path):
    session_id = new_id("env")
    env = [{"action": "replace", "name": "KC_VIA_SHELL", "value": "kept"}]
    start_ok(server, py_body(session_id, tmp_path, startup_environment="shell", env=env))
    proc = kernel_process(server, session_id)
    assert is_ipykernel(proc), f"process_id is not the kernel: {proc.cmdline()}"
    assert launched_by(proc, server.pid), "the shell did not exec the kernel"
    assert env_in_kernel(server, open_channel, session_id, "KC_VIA_SHELL") == "'kept'"


def test_command_mode_exports_reach_the_kernel(server, open_channel, tmp_path):
    session_id = new_id("env")
    start_ok(server, py_body(session_id, tmp_path, startup_environment="command",
                             startup_environment_arg="export KC_FROM_CMD=yes"))
    assert is_ipykernel(kernel_process(server, session_id))
    assert env_in_kernel(server, open_channel, session_id, "KC_FROM_CMD") == "'yes'"


def test_command_with_single_quote_is_quoted_correctly(server, open_channel, tmp_path):
    session_id = new_id("env")
    start_ok(server, py_body(session_id, tmp_path, startup_environment="command",
                             startup_environment_arg="export KC_Q=\"it's here\""))
    assert env_in_kernel(server, open_channel, session_id, "KC_Q") == repr("it's here")


def test_argv_with_quote_and_space_survives_the_shell(server, open_channel, tmp_path):
    odd = tmp_path / "it's a dir"
    odd.mkdir()
    session_id = new_id("env")
    body = py_body(session_id, odd, startup_environment="shell")
    body["argv"] = [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                    f"--HistoryManager.hist_file={odd / 'h s.sqlite'}"]
    start_ok(server, body)
    channel = open_channel(server, session_id)
    text, reply = run_code(channel, "import os; print(os.getcwd())")
    assert reply["status"] == "ok", reply
    assert text.strip() == os.path.realpath(str(odd))
    assert (odd / "h s.sqlite").exists(), "the argv element was split or mangled by the shell"


def test_script_mode_exports_reach_the_kernel(server, open_channel, tmp_path):
    script = tmp_path / "setup env.sh"
    script.write_text("export KC_FROM_SCRIPT=yes\n")
    session_id = new_id("env")
    start_ok(server, py_body(session_id, tmp_path, startup_environment="script",
                             startup_environment_arg=str(script)))
    assert is_ipykernel(kernel_process(server, session_id))
    assert env_in_kernel(server, open_channel, session_id, "KC_FROM_SCRIPT") == "'yes'"


def test_relative_script_is_resolved_against_working_directory(server, open_channel, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "setup.sh").write_text("export KC_FROM_REL=relative\n")
    session_id = new_id("env")
    # The server's own cwd has no setup.sh: only the working directory does.
    assert not os.path.exists("setup.sh")
    start_ok(server, py_body(session_id, workdir, startup_environment="script",
                             startup_environment_arg="setup.sh"))
    assert env_in_kernel(server, open_channel, session_id, "KC_FROM_REL") == "'relative'"


def test_failing_startup_command(server, tmp_path):
    session_id = new_id("env")
    body = py_body(session_id, tmp_path, startup_environment="command", startup_environment_arg="false")
    status, answer, pids = start_watching(server, body)
    assert status == 500, answer
    error = answer["error"]
    assert error["code"] == "KS-8", answer
    details = error.get("details", "")
    assert details.startswith("Shell: "), details
    assert "Startup command: false" in details, details
    assert "Startup command failed" in details, details
    assert answer.get("exit_code") == 1, answer
    assert "KALLICHORE_STARTUP" not in answer.get("output", "")
    wait_gone(pids, timeout=5)
    assert not server.descendants()
    assert server.client.call("GET", f"/sessions/{session_id}")["status"] == "exited"


def test_missing_startup_script(server, tmp_path):
    session_id = new_id("env")
    missing = tmp_path / "nope.sh"
    body = py_body(session_id, tmp_path, startup_environment="script", startup_environment_arg=str(missing))
    status, answer, pids = start_watching(server, body)
    assert status == 500, answer
    assert answer["error"]["code"] == "KS-5", answer
    assert answer["error"]["message"].startswith("Startup script not found or cannot be read"), answer
    assert str(missing) in answer["error"]["message"]
    assert not pids, "nothing should be spawned for a missing script"


def test_signal_interrupt_and_kill_reach_the_kernel_under_shell(server, open_channel, tmp_path):
    session_id = new_id("env")
    start_ok(server, py_body(session_id, tmp_path, startup_environment="shell", interrupt_mode="signal"))
    proc = kernel_process(server, session_id)
    assert is_ipykernel(proc), proc.cmdline()
    channel = open_channel(server, session_id)
    request = channel.send(execute_request("import time; time.sleep(30)"))
    channel.until(lambda f: bool(replies_to([f], request, "execute_input")), timeout=10)
    time.sleep(0.3)
    started = time.monotonic()
    server.client.call("POST", f"/sessions/{session_id}/interrupt")
    frames = channel.until(lambda f: bool(replies_to([f], request, "execute_reply")), timeout=10)
    assert time.monotonic() - started < 10
    reply = replies_to(frames, request, "execute_reply")[0]["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert proc.is_running()

    server.client.call("POST", f"/sessions/{session_id}/kill")
    wait_gone([proc.pid], timeout=5)
    deadline = time.monotonic() + 5
    while server.client.call("GET", f"/sessions/{session_id}")["status"] != "exited":
        assert time.monotonic() < deadline, "session not exited after kill"
        time.sleep(0.05)

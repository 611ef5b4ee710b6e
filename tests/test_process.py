from gevent import monkey; monkey.patch_all()  # noqa: E702  (before anything imports socket etc.)

import json
import os
import signal
import subprocess
import sys
import textwrap

import gevent
import psutil
import pytest

from kcgevent.session.process import (
    IS_LINUX, IS_WINDOWS, KernelProcess, SpawnError, StartupScriptError, pid_alive, plan_startup,
    resolve_env, substitute_argv)

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
posix_only = pytest.mark.skipif(IS_WINDOWS, reason="startup environments are POSIX only")


class Collector:
    """An on_output callback that remembers what it got, line by line."""

    def __init__(self):
        self.lines = []

    def __call__(self, stream, text):
        self.lines.extend((stream, line) for line in text.splitlines(keepends=True))

    def text(self, stream="stdout"):
        return "".join(line for s, line in self.lines if s == stream)

    def wait_for(self, needle, timeout=10):
        with gevent.Timeout(timeout):
            while needle not in self.text():
                gevent.sleep(0.02)


def kill_pids(*pids):
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.fixture
def run():
    """Spawn kernels through plan_startup; kill every tree left at the end."""
    spawned = []

    def start(argv, mode="none", arg=None, cwd=None, env=None, on_exit=None):
        plan = plan_startup(argv, env if env is not None else resolve_env([]), cwd, mode, arg)
        output = Collector()
        kernel = KernelProcess.spawn(plan, output, on_exit)
        spawned.append(kernel)
        return kernel, output

    yield start
    for kernel in spawned:
        kernel.kill_tree(timeout=5)


def python(code):
    return [PY, "-c", textwrap.dedent(code)]


# -- environment and argv ----------------------------------------------------------------------

def test_resolve_env_applies_actions_in_order():
    base = {"A": "1", "P": "/usr/bin"}
    env = resolve_env([
        {"action": "replace", "name": "A", "value": "2"},
        {"action": "append", "name": "A", "value": "3"},
        {"action": "prepend", "name": "P", "value": "/opt/bin:"},
        {"action": "append", "name": "NEW", "value": "x"},
        {"action": "prepend", "name": "NEW", "value": "w"},
    ], base)
    assert env == {"A": "23", "P": "/opt/bin:/usr/bin", "NEW": "wx"}
    assert base == {"A": "1", "P": "/usr/bin"}


def test_resolve_env_copies_server_environment():
    env = resolve_env([{"action": "replace", "name": "KCG_ONLY_IN_COPY", "value": "1"}])
    assert env["PATH"] == os.environ["PATH"]
    assert "KCG_ONLY_IN_COPY" not in os.environ


def test_resolve_env_rejects_unknown_action():
    with pytest.raises(ValueError):
        resolve_env([{"action": "remove", "name": "A", "value": ""}], {})


def test_substitute_argv_replaces_every_occurrence():
    argv = ["k", "-f", "{connection_file}", "--x={connection_file},{connection_file}"]
    assert substitute_argv(argv, "/tmp/c.json") == [
        "k", "-f", "/tmp/c.json", "--x=/tmp/c.json,/tmp/c.json"]


# -- planning ----------------------------------------------------------------------------------

def test_plan_none_runs_argv_directly(tmp_path):
    plan = plan_startup(["k", "a b"], {"SHELL": "/bin/sh"}, str(tmp_path), "none", "ignored")
    assert (plan.command, plan.cwd, plan.shell, plan.mode) == (["k", "a b"], str(tmp_path), None,
                                                                "none")


def test_plan_missing_working_directory_inherits(tmp_path):
    assert plan_startup(["k"], {}, str(tmp_path / "nope"), "none").cwd is None
    assert plan_startup(["k"], {}, "", "none").cwd is None


@posix_only
def test_plan_shell_execs_quoted_kernel():
    plan = plan_startup(["python", "it's here"], {"SHELL": "/bin/bash"}, None, "shell", "ignored")
    assert plan.command == ["/bin/bash", "--login", "-c", "exec python 'it'\"'\"'s here'"]
    assert (plan.shell, plan.mode, plan.arg) == ("/bin/bash", "shell", None)


@posix_only
def test_plan_prefers_session_shell_then_server_shell(monkeypatch):
    assert plan_startup(["k"], {"SHELL": "/bin/dash"}, None, "shell").command[:2] == [
        "/bin/dash", "-l"]
    monkeypatch.setenv("SHELL", "/bin/sh")
    assert plan_startup(["k"], {"SHELL": "/no/such/shell"}, None, "shell").shell == "/bin/sh"
    monkeypatch.delenv("SHELL")
    assert plan_startup(["k"], {}, None, "shell").shell in ("/bin/bash", "/bin/sh")


@posix_only
def test_plan_command_wraps_with_markers():
    plan = plan_startup(["k"], {"SHELL": "/bin/bash"}, None, "command", "export X=1 # note")
    assert plan.command[3] == ("echo KALLICHORE_STARTUP_BEGIN && { export X=1 # note\n} && "
                               "echo KALLICHORE_STARTUP_SUCCESS && exec k")
    assert (plan.mode, plan.arg) == ("command", "export X=1 # note")


@posix_only
def test_plan_command_without_arg_runs_as_shell():
    plan = plan_startup(["k"], {"SHELL": "/bin/bash"}, None, "command", "")
    assert (plan.mode, plan.command[3]) == ("shell", "exec k")


@posix_only
def test_plan_script_resolves_relative_path(tmp_path):
    (tmp_path / "my setup.sh").write_text("true\n")
    plan = plan_startup(["k"], {"SHELL": "/bin/bash"}, str(tmp_path), "script", "my setup.sh")
    path = str(tmp_path / "my setup.sh")
    assert plan.arg == path
    assert f"{{ . '{path}'\n}}" in plan.command[3]


@posix_only
def test_plan_script_errors(tmp_path):
    missing = str(tmp_path / "missing.sh")
    with pytest.raises(StartupScriptError) as err:
        plan_startup(["k"], {}, str(tmp_path), "script", "missing.sh")
    assert str(err.value) == (
        f"Startup script not found or cannot be read: '{missing}' (No such file or directory)")
    with pytest.raises(StartupScriptError) as err:
        plan_startup(["k"], {}, None, "script", str(tmp_path))
    assert str(err.value) == f"Startup script '{tmp_path}' exists but is not a file"


# -- running -----------------------------------------------------------------------------------

def test_output_lines_exit_code_and_ordering(run):
    delivered_at_exit = []
    kernel, output = run(python("""
        import sys
        for i in range(300):
            print("line", i)
        sys.stdout.flush()
        sys.stderr.write("oops\\n")
        sys.stdout.write("tail")
        sys.exit(3)
    """), on_exit=lambda code: delivered_at_exit.append((code, len(output.lines))))
    assert kernel.wait(10) == 3
    assert delivered_at_exit == [(3, 302)]
    assert kernel.exited.is_set() and kernel.exit_code == 3
    assert output.text("stdout") == "".join(f"line {i}\n" for i in range(300)) + "tail"
    assert output.text("stderr") == "oops\n"
    assert kernel.output_lines() == output.lines
    assert kernel.startup_output() == "\n".join(line.rstrip("\n") for _, line in output.lines)
    assert kernel.describe_failure("exit") == "Kernel failed to start"
    assert kernel.describe_failure("connect") == "Kernel failed to connect to ZeroMQ sockets"


def test_exit_not_held_up_by_descendant_keeping_pipes(run):
    kernel, output = run(python("""
        import subprocess
        print(subprocess.Popen(["sleep", "600"], start_new_session=True).pid, flush=True)
    """))
    output.wait_for("\n")
    holder = int(output.text())
    try:
        assert kernel.wait(5) == 0
    finally:
        kill_pids(holder)


def test_stdin_is_not_inherited(run):
    kernel, output = run(python("import sys; print(repr(sys.stdin.read()))"))
    assert kernel.wait(10) == 0
    assert output.text() == "''\n"


def test_spawn_error_carries_errno(tmp_path):
    plan = plan_startup([str(tmp_path / "no-such-kernel")], {}, None, "none")
    with pytest.raises(SpawnError) as err:
        KernelProcess.spawn(plan, Collector())
    assert err.value.errno == 2
    assert err.value.message == "No such file or directory (os error 2)"


@posix_only
def test_shell_quoting_round_trips(run):
    args = ["it's a test", "\"double\" $HOME `echo hi` *?[x] {a,b} ; & | < > \\ !", "",
            "tab\there", "new\nline"]
    kernel, output = run(python("import json, sys; print(json.dumps(sys.argv[1:]))") + args,
                         mode="shell")
    assert kernel.wait(10) == 0
    assert json.loads(output.text().splitlines()[-1]) == args


@posix_only
def test_command_markers_stripped_and_env_exported(run):
    command = "export KCG_TEST_VAR=from_command"
    kernel, output = run(python("import os; print(os.environ['KCG_TEST_VAR'])"),
                         mode="command", arg=command)
    assert kernel.wait(10) == 0
    assert output.text().splitlines()[-1] == "from_command"
    assert not any("KALLICHORE" in line for _, line in output.lines)
    assert kernel.startup_begin_seen and kernel.startup_success_seen
    assert kernel.describe_failure("exit") == (
        f"Shell: {kernel.plan.shell}\nStartup command: {command}\nKernel failed to start")


@posix_only
def test_script_env_exported_and_cwd(run, tmp_path):
    (tmp_path / "setup.sh").write_text("export KCG_TEST_VAR=from_script\n")
    kernel, output = run(python("import os; print(os.environ['KCG_TEST_VAR'], os.getcwd())"),
                         mode="script", arg="setup.sh", cwd=str(tmp_path))
    assert kernel.wait(10) == 0
    assert output.text().splitlines()[-1] == f"from_script {os.path.realpath(tmp_path)}"
    assert kernel.describe_failure("connect") == (
        f"Shell: {kernel.plan.shell}\nStartup script: {tmp_path / 'setup.sh'}\n"
        "Kernel failed to connect to ZeroMQ sockets")


@posix_only
@pytest.mark.parametrize("command, exit_detail, connect_detail", [
    ("echo before; false", "Startup command failed", "Startup command failed to execute"),
    ("if then fi (", "Startup command could not be executed",
     "Startup command failed before execution"),
])
def test_failing_startup_command(run, command, exit_detail, connect_detail):
    kernel, output = run(python("print('kernel ran')"), mode="command", arg=command)
    assert kernel.wait(10) not in (0, None)
    assert "kernel ran" not in output.text()
    prefix = f"Shell: {kernel.plan.shell}\nStartup command: {command}\n"
    assert kernel.describe_failure("exit") == prefix + exit_detail
    assert kernel.describe_failure("connect") == prefix + connect_detail


@posix_only
def test_interrupt_reaches_kernel_under_shell(run):
    kernel, output = run(python("""
        import time
        try:
            print("ready", flush=True)
            time.sleep(30)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """), mode="shell")
    output.wait_for("ready")
    assert psutil.Process(kernel.pid).cmdline()[:2] == [PY, "-c"]  # the shell exec'd the kernel
    assert kernel.wait(0.1) is None
    kernel.interrupt()
    assert kernel.wait(10) == 0
    assert output.text().endswith("interrupted\n")


@posix_only
def test_kill_tree_kills_descendants(run):
    kernel, output = run(python("""
        import subprocess, time
        in_group = subprocess.Popen(["sleep", "600"])
        escaped = subprocess.Popen(["sleep", "600"], start_new_session=True)
        print(in_group.pid, escaped.pid, flush=True)
        time.sleep(600)
    """), mode="shell")
    output.wait_for("\n")
    children = [int(pid) for pid in output.text().split()]
    try:
        assert all(pid_alive(pid) for pid in children)
        assert kernel.kill_tree(timeout=5)
        assert kernel.exit_code == -1
        assert not any(pid_alive(pid) for pid in [kernel.pid, *children])
        assert kernel.kill_tree(timeout=1)  # already dead: no error
    finally:
        kill_pids(*children)


@posix_only
def test_terminate_tree_escalates_to_kill(run):
    kernel, output = run(python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """))
    output.wait_for("ready")
    assert kernel.terminate_tree(timeout=0.5)
    assert kernel.exit_code == -1


INTERMEDIATE = """
from gevent import monkey; monkey.patch_all()
import sys, time
from kcgevent.session.process import KernelProcess, plan_startup, resolve_env
plan = plan_startup([sys.executable, "-c", "import time; time.sleep(600)"], resolve_env([]),
                    None, "shell")
kernel = KernelProcess.spawn(plan, lambda stream, line: None)
print(kernel.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not IS_LINUX, reason="PR_SET_PDEATHSIG is Linux only")
def test_kernel_dies_with_server():
    env = resolve_env([{"action": "prepend", "name": "PYTHONPATH", "value": REPO + os.pathsep}])
    server = subprocess.Popen([PY, "-c", INTERMEDIATE], env=env, stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    kernel_pid = None
    try:
        with gevent.Timeout(10):
            kernel_pid = int(server.stdout.readline())
        assert pid_alive(kernel_pid)
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        with gevent.Timeout(10):
            while pid_alive(kernel_pid):
                gevent.sleep(0.05)
    finally:
        server.kill()
        server.wait(5)
        server.stdout.close()
        if kernel_pid:
            kill_pids(kernel_pid)


@pytest.mark.skipif(not IS_LINUX, reason="posix_spawn is used on Linux")
def test_a_program_that_guards_itself_is_spawned_without_a_fork(tmp_path):
    """StartupPlan.guards_itself (the guardian's plan): posix_spawn, no Python-level fork of the server
    (no fork hook runs), the same pipes, exit codes, signals and errors as the Popen path."""
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))

    def spawn(argv):
        plan = plan_startup(argv, resolve_env([]), None, "none")
        plan.guards_itself = True
        output = Collector()
        return KernelProcess.spawn(plan, output), output
    kernel, output = spawn(python("""
        import os, sys
        print("out", os.getpgid(0) == os.getsid(0) == os.getpid(), flush=True)
        sys.stderr.write("err\\n")
        sys.exit(3)
    """))
    assert kernel.wait(10) == 3
    assert (output.text("stdout"), output.text("stderr")) == ("out True\n", "err\n")
    sleeper, _ = spawn(["sleep", "600"])  # (looked up in PATH)
    assert sleeper.wait(0.1) is None
    assert sleeper.kill_tree(timeout=5) and sleeper.exit_code == -1
    with pytest.raises(SpawnError) as err:
        spawn([str(tmp_path / "no-such-program")])
    assert err.value.errno == 2 and err.value.message == "No such file or directory (os error 2)"
    assert forks == []


def test_pid_alive():
    assert pid_alive(os.getpid())
    done = subprocess.Popen([PY, "-c", "pass"])
    done.wait(10)
    assert not pid_alive(done.pid)

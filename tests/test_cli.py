"""The command line: `python -m kcgevent` flags, the connection file, signals, and the `run` command.

Every server here is a real child process run with a timeout and killed by pid in `finally`.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from conftest import fake_kernel_session, new_id, pid_gone, remove_sockets_of_a_killed_server

from kcgevent.client import Client

PYTHON = sys.executable
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def run_cli(*args, timeout=20, env=None):
    return subprocess.run([PYTHON, "-m", "kcgevent", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class CliServer:
    """`python -m kcgevent ARGS --connection-file F`; stdout/stderr go to files."""

    def __init__(self, tmp_path, *args, connection_file=None):
        self.dir = tmp_path
        self.connection_file = connection_file or str(tmp_path / f"conn-{uuid.uuid4().hex[:6]}.json")
        self.stdout_path = tmp_path / f"stdout-{uuid.uuid4().hex[:6]}.txt"
        self.stderr_path = tmp_path / f"stderr-{uuid.uuid4().hex[:6]}.txt"
        self._out = open(self.stdout_path, "w")
        self._err = open(self.stderr_path, "w")
        self.process = subprocess.Popen([PYTHON, "-m", "kcgevent", "--connection-file", self.connection_file,
                                         *args], stdout=self._out, stderr=self._err)
        self.info = None

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.connection_file):
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no connection file within {timeout} s")
            time.sleep(0.02)
        with open(self.connection_file) as f:
            self.text = f.read()
        self.info = json.loads(self.text)
        self.client = Client(self.info)
        self.client.wait_ready(timeout)
        return self

    def stdout(self):
        return self.stdout_path.read_text()

    def stderr(self):
        return self.stderr_path.read_text()

    def kernels(self):
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def close(self):
        """SIGTERM (the server removes its sockets and stops its kernels), SIGKILL if it lingers."""
        kids = self.kernels()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        remove_sockets_of_a_killed_server(self.info, self.process)
        for kid in kids:
            try:
                kid.kill()
            except psutil.NoSuchProcess:
                pass
        self._out.close()
        self._err.close()


@pytest.fixture
def cli_server(tmp_path):
    servers = []

    def start(*args, **kwargs):
        server = CliServer(tmp_path, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def assert_one_line_error(result):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- validation ---------------------------------------------------------------------------------------


def test_invalid_transport(tmp_path):
    connection_file = tmp_path / "conn.json"
    result = run_cli("--transport", "carrier-pigeon", "--connection-file", str(connection_file))
    line = assert_one_line_error(result)
    assert "carrier-pigeon" in line
    assert not connection_file.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--heartbeat-interval", "--heartbeat-timeout", "--ping-interval"])
def test_intervals_must_be_positive(tmp_path, flag):
    connection_file = tmp_path / "conn.json"
    result = run_cli(flag, "0", "--connection-file", str(connection_file))
    assert flag in assert_one_line_error(result)
    assert not connection_file.exists()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_idle_probe_delay_must_not_be_negative(tmp_path, value):
    connection_file = tmp_path / "conn.json"
    result = run_cli("--idle-probe-delay", value, "--connection-file", str(connection_file))
    assert "--idle-probe-delay" in assert_one_line_error(result)
    assert not connection_file.exists()


def test_port_needs_tcp(tmp_path):
    connection_file = tmp_path / "conn.json"
    result = run_cli("--port", "5000", "--transport", "socket", "--connection-file", str(connection_file))
    assert "--port" in assert_one_line_error(result)
    assert not connection_file.exists()


def test_unix_socket_needs_socket_transport(tmp_path):
    connection_file = tmp_path / "conn.json"
    result = run_cli("--unix-socket", str(tmp_path / "k.sock"), "--transport", "tcp",
                     "--connection-file", str(connection_file))
    assert "--unix-socket" in assert_one_line_error(result)
    assert not connection_file.exists()
    assert not (tmp_path / "k.sock").exists()


def test_token_too_long(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("x" * 65)
    connection_file = tmp_path / "conn.json"
    result = run_cli("--transport", "tcp", "--token", str(token_file), "--connection-file", str(connection_file))
    assert_one_line_error(result)
    assert not connection_file.exists()


# -- tokens and the connection file --------------------------------------------------------------


def test_token_file_is_deleted_and_announced(tmp_path, cli_server):
    token = "t0k-" + uuid.uuid4().hex  # 36 chars
    token_file = tmp_path / "token"
    token_file.write_text(f"  {token}\n")
    server = cli_server("--transport", "tcp", "--token", str(token_file)).wait_ready()
    assert server.info["bearer_token"] == token
    assert not token_file.exists()
    assert server.client.call("GET", "/sessions")["total"] == 0
    assert server.client.request("GET", "/sessions", token=False)[0] == 401
    assert token not in server.stdout() + server.stderr()


def test_token_of_64_chars_is_fine(tmp_path, cli_server):
    token_file = tmp_path / "token"
    token_file.write_text("y" * 64)
    server = cli_server("--transport", "tcp", "--token", str(token_file)).wait_ready()
    assert server.info["bearer_token"] == "y" * 64


def test_token_none(cli_server):
    server = cli_server("--transport", "tcp", "--token", "none").wait_ready()
    assert server.info["bearer_token"] is None
    assert server.client.request("PUT", "/sessions", fake_kernel_session(new_id()))[0] == 200


def test_generated_token(cli_server):
    server = cli_server("--transport", "tcp").wait_ready()
    assert re.fullmatch(r"[0-9a-f]{16}", server.info["bearer_token"] or ""), server.info
    assert server.client.call("GET", "/sessions")["total"] == 0
    assert server.client.request("GET", "/sessions", token=False)[0] == 401


def test_tcp_connection_file(tmp_path, cli_server):
    log_file = tmp_path / "server.log"
    server = cli_server("--transport", "tcp", "--token", "none", "--log-file", str(log_file)).wait_ready()
    assert list(server.info) == ["port", "base_path", "transport", "server_path", "server_pid", "bearer_token",
                                 "log_path", "server_id"]
    info = server.info
    assert isinstance(info["port"], int) and info["port"] > 0
    assert info["base_path"] == f"http://127.0.0.1:{info['port']}"
    assert info["transport"] == "tcp"
    assert os.path.isabs(info["server_path"])
    assert info["server_pid"] == server.process.pid
    assert info["bearer_token"] is None
    assert info["log_path"] == str(log_file)
    assert UUID_RE.match(info["server_id"])
    # Pretty-printed with 2 spaces, no trailing newline.
    assert server.text == json.dumps(info, indent=2) or server.text == json.dumps(info, indent=2,
                                                                                  ensure_ascii=False)
    assert not server.text.endswith("\n")
    status = server.client.call("GET", "/status")
    assert status["server_id"] == info["server_id"] and status["process_id"] == server.process.pid
    assert f"Listening at 127.0.0.1:{info['port']}" in server.stdout()


def test_explicit_port(cli_server):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = cli_server("--transport", "tcp", "--token", "none", "--port", str(port)).wait_ready()
    assert server.info["port"] == port


def test_log_file_gets_log_lines(tmp_path, cli_server):
    log_file = tmp_path / "server.log"
    server = cli_server("--transport", "tcp", "--token", "none", "--log-file", str(log_file),
                        "--log-level", "debug").wait_ready()
    server.client.call("PUT", "/sessions", fake_kernel_session(new_id()))
    deadline = time.monotonic() + 5
    while "Wrote connection details" not in log_file.read_text():
        assert time.monotonic() < deadline, log_file.read_text()
        time.sleep(0.05)
    text = log_file.read_text()
    assert server.connection_file in text
    assert "Authentication is disabled" in text  # warnings go to the file too


def test_bogus_log_level(cli_server):
    server = cli_server("--transport", "tcp", "--token", "none", "--log-level", "bogus").wait_ready()
    assert "Invalid log level 'bogus'; using 'info'" in server.stdout()
    assert server.client.call("GET", "/status")["process_id"] == server.process.pid


# -- signals ---------------------------------------------------------------------------------------


def test_sigterm_stops_server_and_kernel(cli_server):
    server = cli_server("--transport", "tcp", "--token", "none").wait_ready()
    session_id = new_id("term")
    server.client.call("PUT", "/sessions", fake_kernel_session(session_id))
    server.client.call("POST", f"/sessions/{session_id}/start")
    kernel_pid = server.client.call("GET", f"/sessions/{session_id}")["process_id"]
    assert psutil.pid_exists(kernel_pid)
    spawned = [p.pid for p in server.kernels()]
    assert kernel_pid in spawned
    os.kill(server.process.pid, signal.SIGTERM)
    try:
        code = server.process.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 15 s of SIGTERM")
    assert code == 0, server.stderr()
    deadline = time.monotonic() + 5
    while not all(pid_gone(pid) for pid in spawned):
        assert time.monotonic() < deadline, f"left behind: {[p for p in spawned if not pid_gone(p)]}"
        time.sleep(0.05)


# -- the `run` client command ------------------------------------------------------------------------


def processes_with_marker(marker):
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if ("ipykernel" in cmdline or "kcgevent" in cmdline) and p.environ().get("KCG_TEST_MARKER") == marker:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def run_command(*args, timeout=60):
    marker = uuid.uuid4().hex
    before = {p.pid for p in psutil.process_iter()}
    result = run_cli("run", *args, timeout=timeout, env={"KCG_TEST_MARKER": marker})
    deadline = time.monotonic() + 3  # the private server's children may take a moment to be reaped
    while True:
        left = [p for p in processes_with_marker(marker) if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"`run` left processes behind: {[(p.pid, p.cmdline()) for p in left]}"
    return result


def test_run_prints_the_output(tmp_path):
    result = run_command("-c", "print(1+1)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2", result.stdout


def test_run_reports_an_error(tmp_path):
    result = run_command("-c", "raise ValueError(7)")
    assert result.returncode == 1, (result.stdout, result.stderr)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)
    assert "Traceback" in plain and "ValueError" in plain and "7" in plain, result.stderr


def test_run_over_the_socket_transport(tmp_path):
    result = run_command("--transport", "socket", "-c", "print(3)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3", result.stdout


# -- one-line errors (issue "Nothing breaks it", item 14) -----------------------------------------

def test_run_with_a_stale_connection_file(tmp_path):
    stale = tmp_path / "stale.json"
    from kcgevent.session.session import free_ports
    stale.write_text(json.dumps({"port": free_ports(1)[0], "bearer_token": "x"}))
    line = assert_one_line_error(run_cli("run", "-c", "1", "--connection-file", str(stale)))
    assert "connection refused" in line and "stale connection file" in line, line
    line = assert_one_line_error(run_cli("sessions", "--connection-file", str(stale)))
    assert "connection refused" in line, line
    line = assert_one_line_error(run_cli("sessions", "--connection-file", str(tmp_path / "missing.json")))
    assert "cannot read the connection file" in line, line
    stale.write_text("{not json")
    line = assert_one_line_error(run_cli("sessions", "--connection-file", str(stale)))
    assert "not JSON" in line, line


def test_sessions_reports_a_server_error_in_one_line(tmp_path, cli_server):
    token_file = tmp_path / "token"
    token_file.write_text("right-token")
    server = cli_server("--token", str(token_file)).wait_ready()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**server.info, "bearer_token": "wrong-token"}))
    line = assert_one_line_error(run_cli("sessions", "--connection-file", str(wrong)))
    assert "401" in line and "bearer token" in line, line
    result = run_cli("sessions", "--connection-file", server.connection_file)
    assert result.returncode == 0 and result.stdout == "", result


def test_run_interrupted_with_ctrl_c(tmp_path):
    """SIGINT while the kernel runs: one line, exit 130, the private server and kernel gone."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([PYTHON, "-m", "kcgevent", "run", "-c", "import time; print('go', flush=True); "
                             "time.sleep(120)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KCG_TEST_MARKER": marker})
    try:
        assert proc.stdout.readline().strip() == "go"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 130, (proc.returncode, err)
        assert err.strip().splitlines() == ["Interrupted"], err
        deadline = time.monotonic() + 20
        while processes_with_marker(marker):
            assert time.monotonic() < deadline, f"left behind: {processes_with_marker(marker)}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for p in processes_with_marker(marker):
            p.kill()


def test_start_without_connection_file_placeholder_fails_fast(cli_server):
    server = cli_server("--token", "none").wait_ready()
    session_id = new_id("noph")
    body = fake_kernel_session(session_id)
    body["argv"] = [body["argv"][0], body["argv"][1]]  # python fake_kernel.py, no {connection_file}
    server.client.call("PUT", "/sessions", body)
    status, answer = server.client.request("POST", f"/sessions/{session_id}/start", timeout=10)
    assert status == 400 and answer["error"]["code"] == "KS-5", answer
    assert "{connection_file}" in answer["error"]["message"], answer
    assert not server.kernels()


def test_version_is_kcgevents_own():
    import kcgevent
    from kcgevent.config import VERSION
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kcgevent {kcgevent.__version__} (Kallichore API {VERSION})"
    assert kcgevent.__version__ != VERSION

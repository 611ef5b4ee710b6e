"""kcgevent mounted inside another Flask app (tests/apps/embedded_app.py), end to end.

The host app has a route of its own (/hello) and mounts the API with
`KernelSupervisor(app, url_prefix="/kernels")`; it is served by gevent's
WSGIServer in a child process. The test drives it from outside: HTTP under the
prefix, a WebSocket channel under the prefix, the OpenAPI rendering, and a
SIGTERM that must take the kernels down with the host.
"""
import http.client
import json
import os
import select
import signal
import subprocess
import time

import psutil
import pytest
import websocket
from conftest import (PYTHON, fake_kernel_session, is_idle_for, launched_by, new_id, pid_gone, replies_to,
                      stream_text, summary)

from kcgevent.client import Client, execute_request

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "apps", "embedded_app.py")
ROOT = os.path.dirname(HERE)


def read_announcement(proc, timeout=20):
    """The {"port", "token"} the app prints on its first stdout line (bounded wait)."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"embedded app gave no port (exit {proc.poll()}): "
                                 f"{line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                continue
            line += chunk
    return json.loads(line)


def recv_until(ws, predicate, timeout=15):
    deadline = time.monotonic() + timeout
    frames = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching frame within {timeout} s; got {[summary(f) for f in frames][-20:]}")
        ws.settimeout(remaining)
        frame = json.loads(ws.recv())
        frames.append(frame)
        if predicate(frame):
            return frames


def kill_host(proc, spawned):
    """SIGKILL a host app, give what it spawned (`spawned` pids, and its children now) a moment to end
    on its own (a guardian that sees its supervisor gone ends the kernel and removes the session's
    files), then SIGKILL what is left."""
    try:
        spawned = set(spawned) | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    procs = []
    for pid in spawned:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class HostApp:
    """tests/apps/embedded_app.py in a child process; `stop()` kills what is left and reports it."""

    def __init__(self, **env):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               **{k: str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([PYTHON, APP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     cwd=ROOT)
        self.spawned = set()
        try:
            announced = read_announcement(self.proc)
        except BaseException:
            self.stop()
            raise
        self.port, self.token = announced["port"], announced["token"]
        self.client = Client({"port": self.port, "bearer_token": self.token}, timeout=30)

    def stop(self):
        kill_host(self.proc, self.spawned)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def host_app():
    apps = []

    def start(**env):
        app = HostApp(**env)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def test_auth_is_on_by_default_with_a_generated_token(host_app):
    app = host_app()
    assert app.token and len(app.token) >= 32
    assert app.client.request("GET", "/kernels/sessions", token=False)[0] == 401
    assert app.client.call("GET", "/kernels/sessions") == {"total": 0, "sessions": []}
    assert app.client.call("GET", "/kernels/status", token=False)["sessions"] == 0  # as standalone: no token


def test_no_auth_only_when_asked(host_app):
    app = host_app(EMBED_NO_AUTH=1)
    assert app.token is None
    assert app.client.call("GET", "/kernels/sessions", token=False)["total"] == 0


def test_json_errors_under_the_prefix_only(host_app):
    app = host_app()
    status, body = app.client.request("GET", "/kernels/no/such/thing")
    assert status == 404 and body["code"] == "404", body
    status, body = app.client.request("PATCH", "/kernels/sessions")
    assert status == 405 and body["code"] == "405", body
    status, body = app.client.request("PUT", "/kernels/sessions", raw_body=b"{not json")
    assert status == 400 and body["code"] == "400", body
    status, body = app.client.request("GET", "/elsewhere")
    assert status == 404 and isinstance(body, str) and "<" in body, body  # the host's own (HTML) page


def test_settings_from_app_config_and_idle_shutdown_when_mounted(host_app):
    """Background duties run when mounted: idle shutdown (from app.config) ends the supervisor, the
    callback runs, and the host keeps serving JSON 503s for the API."""
    app = host_app(KCGEVENT_IDLE_SHUTDOWN_SECONDS=1, KCGEVENT_RESOURCE_SAMPLE_INTERVAL_MS=100)
    assert app.client.call("GET", "/kernels/server_configuration")["resource_sample_interval_ms"] == 100
    deadline = time.monotonic() + 30
    while True:
        status, body = app.client.request("GET", "/kernels/sessions")
        if status == 503:
            break
        assert status == 200 and time.monotonic() < deadline, "no idle shutdown within 30 s"
        time.sleep(0.2)
    assert body["code"] == "503", body
    assert app.client.request("PUT", "/kernels/sessions", fake_kernel_session(new_id("late")))[0] == 503
    assert app.client.call("GET", "/hello") == {"hello": "from the host app"}
    assert app.proc.poll() is None
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(15) == 0
    assert b"supervisor shut down" in app.proc.stderr.read()


def test_post_shutdown_then_503(host_app):
    app = host_app()
    session_id = new_id("emb")
    app.client.call("PUT", "/kernels/sessions", fake_kernel_session(session_id))
    app.client.call("POST", f"/kernels/sessions/{session_id}/start")
    kernel_pid = app.client.call("GET", f"/kernels/sessions/{session_id}")["process_id"]
    app.spawned.add(kernel_pid)
    app.client.call("POST", "/kernels/shutdown")
    deadline = time.monotonic() + 15
    while not pid_gone(kernel_pid):
        assert time.monotonic() < deadline, "the kernel outlived the supervisor's shutdown"
        time.sleep(0.05)
    status, body = app.client.request("POST", f"/kernels/sessions/{session_id}/start")
    assert status == 503 and body["code"] == "503", body
    assert app.client.call("GET", "/hello") == {"hello": "from the host app"}


def test_resource_usage_sampled_when_mounted(host_app):
    app = host_app(KCGEVENT_RESOURCE_SAMPLE_INTERVAL_MS=100)
    session_id = new_id("emb")
    app.client.call("PUT", "/kernels/sessions", fake_kernel_session(session_id))
    app.client.call("POST", f"/kernels/sessions/{session_id}/start")
    ws = websocket.create_connection(f"ws://127.0.0.1:{app.port}/kernels/sessions/{session_id}/channels",
                                     timeout=15, header=[f"Authorization: Bearer {app.token}"])
    try:
        recv_until(ws, lambda f: f.get("kind") == "kernel" and "resourceUsage" in f)
    finally:
        ws.close()


def test_blueprint_mounted_in_another_app():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([PYTHON, APP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    spawned = set()
    ws = None
    try:
        announced = read_announcement(proc)
        port = announced["port"]
        client = Client({"port": port, "bearer_token": announced["token"]}, timeout=30)

        # The host's own route still works
        assert client.call("GET", "/hello") == {"hello": "from the host app"}
        # The API lives under the prefix only
        status = client.call("GET", "/kernels/status")
        assert status["sessions"] == 0
        assert client.request("GET", "/status")[0] == 404

        # A fake-kernel session under /kernels/sessions
        session_id = new_id("emb")
        client.call("PUT", "/kernels/sessions", fake_kernel_session(session_id))
        client.call("POST", f"/kernels/sessions/{session_id}/start")
        info = client.call("GET", f"/kernels/sessions/{session_id}")
        kernel_pid = info["process_id"]
        spawned.add(kernel_pid)
        assert launched_by(psutil.Process(kernel_pid), proc.pid)

        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/kernels/sessions/{session_id}/channels",
                                         timeout=15, header=[f"Authorization: Bearer {announced['token']}"])
        request = execute_request("print embedded")
        ws.send(json.dumps(request))
        frames = recv_until(ws, lambda f: is_idle_for(f, request))
        assert stream_text(replies_to(frames, request, "stream")) == "embedded\n"
        assert client.call("GET", f"/kernels/sessions/{session_id}")["connected"] is True

        # The OpenAPI rendering: paths relative to the mount point
        doc = client.call("GET", "/kernels/openapi.json")
        assert doc["openapi"].startswith("3.")
        paths = set(doc["paths"])
        assert {"/sessions", "/sessions/{session_id}", "/sessions/{session_id}/start", "/status"} <= paths, paths
        assert not [p for p in paths if p.startswith("/kernels")], paths
        assert "/hello" not in paths

        # SIGTERM: the host shuts the supervisor down, kernels first, and exits 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
        deadline = time.monotonic() + 5
        while not pid_gone(kernel_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(kernel_pid), f"kernel {kernel_pid} outlived the host app"
    finally:
        if ws is not None:
            ws.close()
        kill_host(proc, spawned)
        proc.stdout.close()
        proc.stderr.close()


def test_channel_under_gunicorns_gevent_worker(tmp_path):
    """`gunicorn -k gevent` (not only gevent_pywsgi): the channel upgrade works and a session runs
    code over it; stopping gunicorn ends the kernel (the worker_exit hook calls shutdown())."""
    pytest.importorskip("gunicorn")
    from kcgevent.session.session import free_ports
    port = free_ports(1)[0]
    token = "gunicorn-" + new_id()
    env = {**os.environ, "KCGEVENT_TOKEN": token,
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "gunicorn", "-c", os.path.join(HERE, "apps", "gunicorn_conf.py"),
                                 "--pythonpath", os.path.join(HERE, "apps"), "--bind", f"127.0.0.1:{port}",
                                 "gunicorn_app:app"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    spawned = set()
    ws = None
    try:
        client = Client({"port": port, "bearer_token": token}, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.call("GET", "/hello", timeout=2) == {"hello": "from gunicorn"}
                break
            except (OSError, http.client.HTTPException):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        session_id = new_id("guni")
        client.call("PUT", "/kernels/sessions", fake_kernel_session(session_id))
        client.call("POST", f"/kernels/sessions/{session_id}/start")
        kernel_pid = client.call("GET", f"/kernels/sessions/{session_id}")["process_id"]
        spawned.add(kernel_pid)
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/kernels/sessions/{session_id}/channels",
                                         timeout=15, header=[f"Authorization: Bearer {token}"])
        for text in ("first", "second"):
            request = execute_request(f"print {text}")
            ws.send(json.dumps(request))
            frames = recv_until(ws, lambda f: is_idle_for(f, request))
            assert stream_text(replies_to(frames, request, "stream")) == f"{text}\n"
        assert client.call("GET", f"/kernels/sessions/{session_id}")["connected"] is True
        ws.close()
        ws = None
        # The connection after the channel is usable again (gunicorn wrote nothing after the upgrade)
        assert client.call("GET", f"/kernels/sessions/{session_id}")["status"] == "idle"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while not pid_gone(kernel_pid):
            assert time.monotonic() < deadline, f"kernel {kernel_pid} outlived gunicorn"
            time.sleep(0.05)
        assert "supervisor shut down" in log_path.read_text()
    finally:
        if ws is not None:
            ws.close()
        kill_host(proc, spawned)

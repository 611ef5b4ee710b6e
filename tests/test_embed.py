"""kcgevent mounted inside another Flask app (tests/apps/embedded_app.py), end to end.

The host app has a route of its own (/hello) and mounts the API with
`KernelSupervisor(app, url_prefix="/kernels")`; it is served by gevent's
WSGIServer in a child process. The test drives it from outside: HTTP under the
prefix, a WebSocket channel under the prefix, the OpenAPI rendering, and a
SIGTERM that must take the kernels down with the host.
"""
import json
import os
import select
import signal
import subprocess
import time

import psutil
import websocket
from conftest import (PYTHON, fake_kernel_session, is_idle_for, launched_by, new_id, pid_gone, replies_to,
                      stream_text, summary)

from kcgevent.client import Client, execute_request

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "apps", "embedded_app.py")
ROOT = os.path.dirname(HERE)


def read_port(proc, timeout=20):
    """The port the app prints on its first stdout line (bounded wait)."""
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
    return int(line.strip())


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


def test_blueprint_mounted_in_another_app():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([PYTHON, APP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    spawned = set()
    ws = None
    try:
        port = read_port(proc)
        client = Client({"port": port}, timeout=30)

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
                                         timeout=15)
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
        try:
            spawned.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in spawned:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        proc.stdout.close()
        proc.stderr.close()

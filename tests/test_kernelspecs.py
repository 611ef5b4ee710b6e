"""Kernelspecs: discovery (a temporary JUPYTER_PATH), `kernel_name` in NewSession, the CLI, and
kernels that are told protocol 5.5 but never register (JEP 66)."""
import json
import os
import subprocess
import sys

import psutil
import pytest
from conftest import FAKE_KERNEL, PYTHON, get_session, kernel_events, new_id, replies_to, stream_text, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_kernelspec(jupyter_path, name, **spec):
    """A kernelspec directory <jupyter_path>/kernels/<name>/kernel.json."""
    directory = jupyter_path / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(spec))
    return directory


@pytest.fixture
def jupyter_path(tmp_path):
    """A private JUPYTER_PATH with a few kernelspecs: ipykernel told 5.5, the fake kernel, and one
    whose provisioner nobody registered."""
    path = tmp_path / "jupyter"
    write_kernelspec(path, "py55", argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                     display_name="Python told 5.5", language="python", kernel_protocol_version="5.5",
                     env={"KCG_FROM_SPEC": "spec-${HOME}", "KCG_OVERRIDDEN": "spec"})
    write_kernelspec(path, "fake", argv=[PYTHON, FAKE_KERNEL, "{connection_file}"], display_name="Fake",
                     language="fake", interrupt_mode="message", metadata={"note": "{resource_dir}"})
    write_kernelspec(path, "fake-silent55", argv=[PYTHON, FAKE_KERNEL, "--handshake-never", "{connection_file}"],
                     display_name="Fake, told 5.5, never registers", language="fake",
                     kernel_protocol_version="5.5")
    write_kernelspec(path, "nowhere", argv=["{resource_dir}/launch", "{connection_file}"], display_name="Nowhere",
                     language="python", metadata={"kernel_provisioner": {"provisioner_name": "no-such-provisioner"}})
    return path


@pytest.fixture
def spec_server(start_server, jupyter_path):
    return start_server("--transport", "tcp", env={"JUPYTER_PATH": str(jupyter_path)})


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "kcgevent", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def test_kernelspecs_command_lists_the_temporary_jupyter_path(jupyter_path):
    result = run_cli("kernelspecs", "--as-json", env={"JUPYTER_PATH": str(jupyter_path)})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert {"py55", "fake", "fake-silent55", "nowhere"} <= set(found)
    assert found["py55"]["kernel_protocol_version"] == "5.5"
    assert found["py55"]["interrupt_mode"] == "signal"  # the kernelspec default
    assert found["fake"]["interrupt_mode"] == "message"
    assert found["fake"]["resource_dir"] == str(jupyter_path / "kernels" / "fake")
    assert found["nowhere"]["provisioner"] == {"name": "no-such-provisioner", "config": {}}
    assert found["fake"]["provisioner"] is None
    table = run_cli("kernelspecs", env={"JUPYTER_PATH": str(jupyter_path)})
    assert table.returncode == 0, table.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in table.stdout.splitlines()}
    assert rows["nowhere"][3] == "no-such-provisioner" and rows["fake"][1] == "fake", table.stdout


def test_unknown_kernel_name_is_a_400_naming_it(spec_server):
    status, body = spec_server.client.request("PUT", "/sessions", {"session_id": new_id(), "kernel_name": "cobol"})
    assert status == 400, body
    assert "'cobol'" in body["message"] and body["code"] == "400", body


def test_unregistered_provisioner_is_a_400_naming_it(spec_server):
    status, body = spec_server.client.request("PUT", "/sessions", {"session_id": new_id(), "kernel_name": "nowhere"})
    assert status == 400, body
    assert "no-such-provisioner" in body["message"] and "not registered" in body["message"], body


def test_a_kernelspec_fills_the_session_and_reports_the_argv_run(spec_server, open_channel):
    session_id = new_id("py55")
    spec_server.client.call("PUT", "/sessions", {
        "session_id": session_id, "kernel_name": "py55",
        "env": [{"action": "replace", "name": "KCG_OVERRIDDEN", "value": "request"}]})
    described = get_session(spec_server, session_id)
    # `python` in a kernelspec means the server's interpreter (as jupyter_client runs it)
    assert described["argv"] == [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert described["display_name"] == "Python told 5.5" and described["language"] == "python"
    assert described["interrupt_mode"] == "signal"
    # told 5.5, ipykernel never registers: the start must not wait out the connection timeout
    # (it would fail after 25 s; this client gives up after 20)
    info = spec_server.client.call("POST", f"/sessions/{session_id}/start", timeout=20)
    assert info["language_info"]["name"] == "python"
    channel = open_channel(spec_server, session_id)
    request = channel.execute("import os; print(os.environ['KCG_FROM_SPEC'], os.environ['KCG_OVERRIDDEN'])")
    frames = channel.until_idle(request, timeout=30)
    assert stream_text(replies_to(frames, request)).split() == [f"spec-{os.environ['HOME']}", "request"]
    assert not kernel_events(channel.frames, "handshakeCompleted")  # no handshake took place
    assert get_session(spec_server, session_id)["initial_env"]["KCG_FROM_SPEC"] == f"spec-{os.environ['HOME']}"


def test_argv_in_the_body_wins_over_the_kernelspec(spec_server, open_channel):
    session_id = new_id("fake")
    argv = [PYTHON, FAKE_KERNEL, "-f", "{connection_file}"]
    spec_server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "fake", "argv": argv,
                                                 "language": "told-otherwise"})
    described = get_session(spec_server, session_id)
    assert described["argv"] == argv
    assert described["language"] == "told-otherwise"
    assert described["interrupt_mode"] == "message"  # the rest still comes from the kernelspec
    spec_server.client.call("POST", f"/sessions/{session_id}/start", timeout=30)
    channel = open_channel(spec_server, session_id)
    request = channel.execute("print from the body's argv")
    assert stream_text(replies_to(channel.until_idle(request), request)) == "from the body's argv\n"


def test_a_kernel_told_5_5_that_only_listens_is_restarted_with_a_connection_file(spec_server, open_channel):
    """The fake kernel binds its ports but never registers and does not write them anywhere:
    it is noticed by its listening sockets and started again the 5.3 way."""
    session_id = new_id("silent")
    spec_server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "fake-silent55",
                                                 "connection_timeout": 25})
    spec_server.client.call("POST", f"/sessions/{session_id}/start", timeout=20)
    described = get_session(spec_server, session_id)
    assert described["status"] == "idle", described
    channel = open_channel(spec_server, session_id)
    request = channel.execute("print registered or not")
    assert stream_text(replies_to(channel.until_idle(request), request)) == "registered or not\n"
    # the first kernel (the silent one) is gone; only the second runs
    def fake_kernels():
        found = []
        for proc in spec_server.descendants():
            try:
                if FAKE_KERNEL in " ".join(proc.cmdline()) and proc.status() != "zombie":
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found
    wait_for(lambda: fake_kernels() == [described["process_id"]], 10, "only the second kernel to run")
    with open(spec_server.log_file) as f:
        assert "sent no JEP 66 handshake" in f.read()


def test_run_with_a_kernel_name(jupyter_path):
    result = run_cli("run", "--kernel", "fake", "-c", "print hello from a kernelspec",
                     env={"JUPYTER_PATH": str(jupyter_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from a kernelspec"


def test_run_with_an_unknown_kernel_says_so(jupyter_path):
    result = run_cli("run", "--kernel", "cobol", "-c", "1", env={"JUPYTER_PATH": str(jupyter_path)})
    assert result.returncode == 2
    assert "No kernelspec named 'cobol'" in result.stderr and "Traceback" not in result.stderr


def test_kernel_name_is_in_the_contract():
    with open(os.path.join(ROOT, "kallichore.json")) as f:
        props = json.load(f)["components"]["schemas"]["newSession"]["properties"]
    assert props["kernel_name"]["type"] == "string"


def test_a_bad_kernel_name_type_is_a_400(spec_server):
    status, body = spec_server.client.request("PUT", "/sessions", {"session_id": new_id(), "kernel_name": 7})
    assert status == 400 and "kernel_name" in body["message"], body


def test_the_probe_reads_ports_only_from_a_complete_file(tmp_path):
    from kcgevent.session.handshake import PORT_KEYS, SilentKernelProbe
    path = tmp_path / "registration.json"
    probe = SilentKernelProbe(str(path), pid=2 ** 22 + 12345)  # no such process: never "listening"
    for content in ("", "{not json", json.dumps({"registration_port": 5}),
                    json.dumps({k: 0 for k in PORT_KEYS})):
        path.write_text(content)
        probe._next = 0
        assert probe() is None and not probe.found_in_file, content
    ports = {k: 40000 + i for i, k in enumerate(PORT_KEYS)}
    path.write_text(json.dumps({"registration_port": 5, "key": "k", **ports}))
    probe._next = 0
    assert probe() == ports and probe.found_in_file

"""Kernelspecs naming a kernel provisioner: launched through jupyter_client's registry in the
provisioner host (jupyter_client's local-provisioner; gateway_provisioners' Kubernetes one without a
cluster)."""
import json
import os
import signal

import psutil
import pytest
from conftest import PYTHON, get_session, kernel_events, new_id, pid_gone, replies_to, stream_text, wait_for

pytest.importorskip("jupyter_client")


def write_kernelspec(jupyter_path, name, **spec):
    directory = jupyter_path / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(spec))
    return directory


@pytest.fixture
def jupyter_path(tmp_path):
    path = tmp_path / "jupyter"
    write_kernelspec(path, "py-local", argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                     display_name="Python via local-provisioner", language="python",
                     env={"KCG_SPEC_VAR": "from the kernelspec"},
                     metadata={"kernel_provisioner": {"provisioner_name": "local-provisioner"}})
    write_kernelspec(path, "k8s-python", argv=[PYTHON, "-m", "gateway_provisioners.kernel-launchers.k8s",
                                                "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                                                "--response-address", "{response_address}",
                                                "--public-key", "{public_key}"],
                     display_name="Python on Kubernetes", language="python",
                     metadata={"kernel_provisioner": {"provisioner_name": "kubernetes-provisioner",
                                                      "config": {"image_name": "elyra/kernel-py:3.2.3"}}})
    for name, provisioner in (("docker-python", "docker-provisioner"), ("yarn-spark", "yarn-provisioner")):
        write_kernelspec(path, name, argv=[PYTHON, "-c", "raise SystemExit('the launcher must not run')",
                                           "{kernel_id}", "{response_address}"],
                         display_name=name, language="python",
                         metadata={"kernel_provisioner": {"provisioner_name": provisioner, "config": {}}})
    return path


@pytest.fixture
def prov_server(start_server, jupyter_path):
    return start_server("--transport", "tcp", "--resource-sample-interval", "200",
                        env={"JUPYTER_PATH": str(jupyter_path)})


def run_code(channel, code, timeout=30):
    request = channel.execute(code)
    frames = replies_to(channel.until_idle(request, timeout=timeout), request)
    return request, frames


def test_local_provisioner_kernel_runs_restarts_and_dies(prov_server, open_channel):
    client = prov_server.client
    session_id = new_id("prov")
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "py-local"})
    client.call("POST", f"/sessions/{session_id}/start", timeout=60)
    described = get_session(prov_server, session_id)
    assert described["interrupt_mode"] == "signal"
    # the argv reported is what the provisioner ran: this interpreter, the provisioner's connection file
    assert described["argv"][:3] == [PYTHON, "-m", "ipykernel_launcher"] and "{" not in " ".join(described["argv"])
    first_pid = described["process_id"]
    # the kernel is the provisioner host's child, not the server's
    parent = psutil.Process(first_pid).parent()
    assert "kcgevent.provisioning.host" in " ".join(parent.cmdline()), parent.cmdline()

    channel = open_channel(prov_server, session_id)
    _, frames = run_code(channel, "import os; print(os.environ['KCG_SPEC_VAR'], os.getpid())")
    text, pid = stream_text(frames).rsplit(" ", 1)
    assert text == "from the kernelspec" and int(pid) == first_pid
    # what the kernel process itself writes (not through iopub) arrives as output events
    run_code(channel, "import os; os.write(2, b'straight to fd 2\\n')")
    expected = ["stderr", "straight to fd 2\n"]
    if expected not in kernel_events(channel.frames, "output"):  # it may come after the idle
        channel.until(lambda f: expected in kernel_events([f], "output"), timeout=10)

    # a local kernel: its resource usage is measured
    wait_for(lambda: get_session(prov_server, session_id).get("resource_usage"), 15, "resource usage")

    # interrupt (signal mode, through the provisioner's send_signal)
    request = channel.execute("import time; print('sleeping', flush=True); time.sleep(30)")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"
                  and (f.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"], timeout=15)
    client.call("POST", f"/sessions/{session_id}/interrupt")
    frames = channel.until_idle(request, timeout=20)
    errors = [f for f in replies_to(frames, request) if f["header"]["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", frames

    # restart with the same provisioner: a new kernel process, state gone
    run_code(channel, "marker = 42")
    client.call("POST", f"/sessions/{session_id}/restart", timeout=60)
    wait_for(lambda: pid_gone(first_pid), 15, "the first kernel to exit")
    second_pid = get_session(prov_server, session_id)["process_id"]
    assert second_pid != first_pid
    _, frames = run_code(channel, "print('marker' in globals())")
    assert stream_text(frames) == "False\n"

    # a kernel that ends by itself is noticed through the provisioner's poll(), with its exit code
    channel.execute("import os; os._exit(7)")
    wait_for(lambda: get_session(prov_server, session_id)["status"] == "exited", 15, "the exit to be noticed")
    assert 7 in kernel_events(channel.until(lambda f: 7 in kernel_events([f], "exited"), timeout=10), "exited")
    assert pid_gone(second_pid)
    client.call("POST", f"/sessions/{session_id}/restart", timeout=60)  # the same provisioner, once more
    second_pid = get_session(prov_server, session_id)["process_id"]

    # kill: the kernel is gone and the session says so
    client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: pid_gone(second_pid), 15, "the killed kernel to exit")
    wait_for(lambda: get_session(prov_server, session_id)["status"] == "exited", 15, "status exited")
    assert "process_id" not in get_session(prov_server, session_id)
    assert kernel_events(channel.frames, "exited")
    client.call("DELETE", f"/sessions/{session_id}")


def test_kubernetes_without_a_cluster_fails_fast_saying_so(prov_server):
    pytest.importorskip("kubernetes", reason="gateway_provisioners[k8s] (kcgevent[remote]) is not installed")
    client = prov_server.client
    session_id = new_id("k8s")
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "k8s-python"})
    # well within 90 s: the client gives up after 60
    status, body = client.request("POST", f"/sessions/{session_id}/start", timeout=60)
    assert status == 500, body
    message = body["error"]["message"]
    assert "kubernetes-provisioner" in message and "cluster or its configuration could not be reached" in message, body
    assert get_session(prov_server, session_id)["status"] == "exited"
    client.call("DELETE", f"/sessions/{session_id}")


def test_provisioner_host_ends_with_the_server(start_server, jupyter_path):
    server = start_server("--transport", "tcp", env={"JUPYTER_PATH": str(jupyter_path)})
    session_id = new_id("prov")
    server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "py-local"})
    server.client.call("POST", f"/sessions/{session_id}/start", timeout=60)
    kernel_pid = get_session(server, session_id)["process_id"]
    hosts = [p.pid for p in server.descendants() if "kcgevent.provisioning.host" in " ".join(p.cmdline())]
    assert len(hosts) == 1, hosts
    assert not server.stop()
    assert pid_gone(kernel_pid) and pid_gone(hosts[0])
    assert os.path.isdir(str(jupyter_path))


@pytest.mark.parametrize("kernel_name, provisioner", [("docker-python", "docker-provisioner"),
                                                      ("yarn-spark", "yarn-provisioner")])
def test_docker_and_yarn_without_their_cluster_fail_fast_naming_the_provisioner(prov_server, kernel_name,
                                                                                provisioner):
    """No Docker daemon, no YARN ResourceManager (and maybe not their client packages): the provisioner
    named by the kernelspec is the one that runs, and it fails the start with a StartupError."""
    client = prov_server.client
    session_id = new_id("nocluster")
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": kernel_name,
                                     "env": [{"action": "replace", "name": "GP_YARN_ENDPOINT",
                                              "value": "http://127.0.0.1:9/ws/v1/cluster"}]})
    status, body = client.request("POST", f"/sessions/{session_id}/start", timeout=60)
    assert status == 500, body
    assert f"'{provisioner}' could not start the kernel" in body["error"]["message"], body
    assert get_session(prov_server, session_id)["status"] == "exited"


def test_idle_shutdown_ends_a_provisioned_kernel(start_server, jupyter_path):
    server = start_server("--transport", "tcp", "--idle-shutdown-seconds", "2",
                          env={"JUPYTER_PATH": str(jupyter_path)})
    session_id = new_id("prov")
    server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "py-local"})
    server.client.call("POST", f"/sessions/{session_id}/start", timeout=60)
    kernel_pid = get_session(server, session_id)["process_id"]
    server.descendants()  # remember the host and the kernel, for the leftover check at teardown
    wait_for(lambda: server.process.poll() is not None, 30, "the idle server to shut itself down")
    wait_for(lambda: pid_gone(kernel_pid), 10, "the provisioned kernel to end with it")


def test_a_killed_server_leaves_no_provisioned_kernel_behind(start_server, jupyter_path):
    """Without a state dir nothing outlives the server: SIGKILL it, and its provisioner host (told by the
    end of its input) ends the kernel and itself."""
    server = start_server("--transport", "tcp", env={"JUPYTER_PATH": str(jupyter_path)})
    session_id = new_id("prov")
    server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "py-local"})
    server.client.call("POST", f"/sessions/{session_id}/start", timeout=60)
    kernel_pid = get_session(server, session_id)["process_id"]
    hosts = [p.pid for p in server.descendants() if "kcgevent.provisioning.host" in " ".join(p.cmdline())]
    argv = psutil.Process(kernel_pid).cmdline()
    kernel_dir = os.path.dirname(argv[argv.index("-f") + 1])  # the server's private dir
    assert os.path.basename(kernel_dir).startswith("kcgevent-") and os.path.isdir(kernel_dir)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    wait_for(lambda: pid_gone(kernel_pid) and all(pid_gone(pid) for pid in hosts), 20,
             "the kernel and the provisioner host to end")
    assert not os.path.exists(kernel_dir), "nobody removed the dead server's private dir"

"""A remote kernel for real: gateway_provisioners' DistributedProvisioner over SSH to a real sshd.

The sshd runs for this test only: on a non-default port, with host and client keys made in a temp
dir, listening on 127.0.0.1 and 127.0.0.2. The kernelspec names 127.0.0.2 as its remote host:
the provisioner skips SSH for addresses it considers this machine's own (127.0.0.1 is one), and
127.0.0.2 is loopback too but not on that list, so the launch really goes through sshd. The
server runs with HOME in the temp dir, where paramiko finds the client key and known_hosts.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import get_session, new_id, pid_gone, replies_to, stream_text, wait_for
from test_state_dir import manager, run_code  # noqa: F401 (a fixture)

from kcgevent.session.session import free_ports

pytest.importorskip("gateway_provisioners", reason="gateway_provisioners (kcgevent[remote]) is not installed")

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
REMOTE_HOST = "127.0.0.2"


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def sshd(tmp_path):
    """A private sshd: (port, home) where home/.ssh holds the client key and known_hosts."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd is not installed (.ci/run installs openssh-server when it can)")
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen is not installed")
    conf = tmp_path / "sshd"
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    conf.mkdir()
    for key, target in ((conf / "host_key", None), (home / ".ssh" / "id_ed25519", None)):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    (conf / "authorized_keys").write_text((home / ".ssh" / "id_ed25519.pub").read_text())
    port = free_ports(1)[0]
    host_pub = (conf / "host_key.pub").read_text().split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"[{REMOTE_HOST}]:{port} {' '.join(host_pub)}\n")
    (conf / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
ListenAddress {REMOTE_HOST}
HostKey {conf / 'host_key'}
AuthorizedKeysFile {conf / 'authorized_keys'}
PidFile {conf / 'sshd.pid'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel ERROR
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not _port_open(REMOTE_HOST, port):
            if proc.poll() is not None:
                pytest.skip(f"sshd could not start: {proc.stderr.read().decode(errors='replace').strip()}")
            if time.monotonic() > deadline:
                pytest.skip("sshd did not listen within 15 s")
            time.sleep(0.05)
        yield port, home
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def remote_kernels(marker):
    """Processes on the "remote" side started from our kernelspec (found by its unique directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def ssh_kernelspec(tmp_path):
    """`jupyter-ssh-spec`'s kernelspec for 127.0.0.2, with this interpreter as the remote Python."""
    prefix = tmp_path / "prefix"
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "jupyter-ssh-spec"), "install",
                             "--prefix", str(prefix), "--kernel-name", "ssh_python", "--remote-hosts", REMOTE_HOST],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kernels = prefix / "share" / "jupyter" / "kernels"
    spec_file = kernels / "ssh_python" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["argv"][0] = sys.executable  # the remote host's Python (ssh's PATH has no `python` here)
    spec_file.write_text(json.dumps(spec))
    yield prefix / "share" / "jupyter", str(kernels / "ssh_python")
    for proc in remote_kernels(str(kernels / "ssh_python")):  # whatever a failure left behind
        try:
            proc.kill()
        except psutil.Error:
            pass


def test_ssh_provisioner_round_trip(start_server, sshd, ssh_kernelspec, tmp_path, open_channel):
    port, home = sshd
    jupyter_path, marker = ssh_kernelspec
    log_dir = tmp_path / "remote-logs"
    log_dir.mkdir()
    server = start_server("--transport", "tcp", env={
        "JUPYTER_PATH": str(jupyter_path), "HOME": str(home), "GP_SSH_PORT": str(port),
        "GP_REMOTE_USER": psutil.Process().username(), "GP_RESPONSE_IP": "127.0.0.1",
        "GP_RESPONSE_PORT": str(free_ports(1)[0]), "GP_KERNEL_LOG_DIR": str(log_dir),
        "GP_UNAUTHORIZED_USERS": "nobody"})  # the default refuses root, which CI runs as
    client = server.client
    session_id = new_id("ssh")
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "ssh_python"})
    client.call("POST", f"/sessions/{session_id}/start", timeout=90)
    described = get_session(server, session_id)
    assert described["interrupt_mode"] == "signal"
    assert "process_id" not in described and "resource_usage" not in described  # remote: not measured here
    assert "{response_address}" not in " ".join(described["argv"])  # the argv the provisioner ran

    # the kernel runs "remotely": started by sshd (SSH_CONNECTION in its environment), not by the server
    remote = wait_for(lambda: remote_kernels(marker), 10, "the remote kernel process")
    assert all(p.pid not in {d.pid for d in server.descendants()} for p in remote)
    assert any("SSH_CONNECTION" in p.environ() for p in remote), [p.cmdline() for p in remote]

    channel = open_channel(server, session_id)
    request = channel.execute("import os; print('remote', os.environ.get('KERNEL_ID') is not None)")
    assert stream_text(replies_to(channel.until_idle(request, timeout=30), request)) == "remote True\n"

    # interrupt: the provisioner signals the kernel where it runs
    request = channel.execute("import time; print('sleeping', flush=True); time.sleep(30)")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "stream"
                  and (f.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"], timeout=15)
    client.call("POST", f"/sessions/{session_id}/interrupt")
    frames = channel.until_idle(request, timeout=20)
    errors = [f for f in replies_to(frames, request) if f["header"]["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", [f["header"]["msg_type"] for f in frames]

    # restart with the same provisioner: a new remote kernel, the old one gone
    before = {p.pid for p in remote_kernels(marker)}
    client.call("POST", f"/sessions/{session_id}/restart", timeout=90)
    wait_for(lambda: all(pid_gone(pid) for pid in before), 20, "the first remote kernel to exit")
    assert remote_kernels(marker)
    request = channel.execute("print('after restart')")
    assert stream_text(replies_to(channel.until_idle(request, timeout=30), request)) == "after restart\n"

    # kill: gone on the remote side, and the session knows
    client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: not remote_kernels(marker), 20, "the remote kernel to be gone")
    wait_for(lambda: get_session(server, session_id)["status"] == "exited", 15, "status exited")
    client.call("DELETE", f"/sessions/{session_id}")

    # graceful shutdown ends a remote kernel too
    session_id = new_id("ssh")
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "ssh_python"})
    client.call("POST", f"/sessions/{session_id}/start", timeout=90)
    assert remote_kernels(marker)
    assert not server.stop()
    wait_for(lambda: not remote_kernels(marker), 20, "the remote kernel to end with the server")


def test_sshd_listens_on_both_loopback_addresses(sshd):
    port, _ = sshd
    assert _port_open("127.0.0.1", port) and _port_open(REMOTE_HOST, port)


def test_a_remote_kernel_survives_a_supervisor_restart(manager, sshd, ssh_kernelspec, tmp_path, monkeypatch):  # noqa: F811
    """With a state dir, the provisioner info is what finds the remote kernel again: SIGKILL the server,
    start it again, and the same kernel (same memory) answers; a clean stop then ends it."""
    port, home = sshd
    jupyter_path, marker = ssh_kernelspec
    for name, value in {"JUPYTER_PATH": str(jupyter_path), "HOME": str(home), "GP_SSH_PORT": str(port),
                        "GP_REMOTE_USER": psutil.Process().username(), "GP_RESPONSE_IP": "127.0.0.1",
                        "GP_RESPONSE_PORT": str(free_ports(1)[0]), "GP_KERNEL_LOG_DIR": str(tmp_path),
                        "GP_UNAUTHORIZED_USERS": "nobody"}.items():
        monkeypatch.setenv(name, value)  # the managed server inherits our environment
    server = manager("--restart-grace", "30", "--transport", "tcp").start()
    session_id = new_id("ssh")
    server.client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "ssh_python"})
    server.client.call("POST", f"/sessions/{session_id}/start", timeout=90)
    assert run_code(server, session_id, "x = 42; print('set')").strip() == "set"
    kernels = {p.pid for p in remote_kernels(marker)}
    assert kernels

    server.sigkill()
    server.start()
    assert {p.pid for p in remote_kernels(marker)} == kernels  # nothing was restarted
    wait_for(lambda: server.client.call("GET", f"/sessions/{session_id}")["status"] == "idle", 30,
             "the restored session to be idle")
    assert run_code(server, session_id, "print(x)").strip() == "42"

    assert server.stop() == 0
    wait_for(lambda: not remote_kernels(marker), 20, "the remote kernel to end with the clean stop")

"""The provisioner host on its own: its JSON-lines protocol, errors, and its end."""
import os
import signal

import gevent
import pytest
from conftest import pid_gone, wait_for

from kcgevent.provisioning.client import HostError, ProvisionerHost


@pytest.fixture
def host():
    host = ProvisionerHost()
    yield host
    host.stop()


def test_ping_and_concurrent_calls(host):
    answers = [g.get(timeout=30) for g in [gevent.spawn(host.call, "ping", 30) for _ in range(20)]]
    assert {a["pid"] for a in answers} == {host.pid}


def test_unknown_operation_and_unknown_kernel_are_named_errors(host):
    with pytest.raises(HostError) as info:
        host.call("frobnicate", 30)
    assert info.value.kind == "ValueError" and "frobnicate" in info.value.message
    with pytest.raises(HostError) as info:
        host.call("poll", 30, kernel_id="nobody")
    assert info.value.kind == "LookupError" and "nobody" in info.value.message


def test_a_provisioner_that_cannot_load_is_an_error_naming_it(host, tmp_path):
    spec = {"argv": ["x"], "metadata": {"kernel_provisioner": {"provisioner_name": "no-such-provisioner"}}}
    with pytest.raises(HostError) as info:
        host.call("launch", 30, kernel_id="k1", kernelspec=spec, connection_file=str(tmp_path / "c.json"))
    assert "no-such-provisioner" in info.value.message


def test_a_dead_host_is_replaced_and_knows_no_kernels(host):
    """A host that died takes its provisioners with it: the next call starts a fresh host, which
    answers for the old kernels that it does not know them (their launchers then count them lost)."""
    pid = host.call("ping", 30)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid), 10, "the host to die")
    assert host.call("ping", 30)["pid"] != pid
    with pytest.raises(HostError) as info:
        host.call("poll", 30, kernel_id="launched-by-the-dead-host")
    assert info.value.kind == "LookupError"

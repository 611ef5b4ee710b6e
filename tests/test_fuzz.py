"""Schemathesis against a real server serving our kallichore.json: no 5xx but the documented ones.

A bounded run (about 1,000 generated requests, positive and negative, over every operation but
POST /shutdown) with the token. The only 500s the contract allows are a StartupError body from
start/restart and an error body from adopt/connection_info when a kernel cannot be reached; any
other 5xx, or a 500 that is not JSON in those shapes, fails.
"""
import json
import uuid

import pytest
from conftest import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from test_contract import ROOT  # noqa: E402

EXAMPLES_PER_OPERATION = 60  # x 17 operations: ~1,000 cases
DOCUMENTED_500 = {"start-session": "startupError", "restart-session": "startupError",
                  "adopt-session": "error", "connection-info": "error"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    token_file = directory / "token"
    token_file.write_text(uuid.uuid4().hex)
    server = ServerProcess(directory, ["--transport", "tcp", "--max-body-bytes", "65536"], token=str(token_file))
    server.client.wait_ready()
    yield server
    leaked = server.stop()
    assert not leaked, f"processes left behind: {[p.pid for p in leaked]}"


schema = schemathesis.openapi.from_path(ROOT / "kallichore.json").exclude(path="/shutdown")
schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES_PER_OPERATION)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
def test_no_undocumented_server_errors(case, fuzz_server):
    response = case.call(base_url=f"http://127.0.0.1:{fuzz_server.info['port']}", timeout=60,
                         headers={"Authorization": f"Bearer {fuzz_server.info['bearer_token']}"})
    operation_id = case.operation.definition.raw.get("operationId")
    if operation_id == "set-server-configuration":
        # an idle_shutdown_hours of 0 would end the server half-way through the run
        fuzz_server.client.call("POST", "/server_configuration", {"idle_shutdown_hours": -1})
    check_status(case, response)


def check_status(case, response):
    """Below 500, or one of the documented 500s with its documented JSON body."""
    if response.status_code < 500:
        return
    operation_id = case.operation.definition.raw.get("operationId")
    assert response.status_code == 500 and operation_id in DOCUMENTED_500, \
        (case.method, case.formatted_path, response.status_code, response.text[:500])
    body = json.loads(response.text)
    if DOCUMENTED_500[operation_id] == "startupError":
        assert body["error"]["code"].startswith("KS-"), body
    else:
        assert body["code"].startswith("KS-"), body


@pytest.fixture(scope="module")
def live_session(fuzz_server):
    """A started fake-kernel session for the operations on one session to work on."""
    from conftest import fake_kernel_session
    session_id = "fuzz-live"
    fuzz_server.client.call("PUT", "/sessions", fake_kernel_session(session_id, connection_timeout=3))
    fuzz_server.client.call("POST", f"/sessions/{session_id}/start")
    return session_id


@schema.include(path_regex="session_id").parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_no_undocumented_server_errors_on_a_live_session(case, fuzz_server, live_session):
    """The same, with the path's session id that of a real session (start, restart, kill, adopt...)."""
    case.path_parameters["session_id"] = live_session
    response = case.call(base_url=f"http://127.0.0.1:{fuzz_server.info['port']}", timeout=60,
                         headers={"Authorization": f"Bearer {fuzz_server.info['bearer_token']}"})
    check_status(case, response)


def test_the_server_serves_the_shipped_contract(fuzz_server):
    """What the fuzzing (and any client generator) reads is what the server serves, byte for byte in JSON."""
    served = fuzz_server.client.call("GET", "/openapi.json")
    assert served == json.loads((ROOT / "kallichore.json").read_text(encoding="utf-8"))

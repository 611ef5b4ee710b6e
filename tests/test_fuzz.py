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
    if response.status_code < 500:
        return
    assert response.status_code == 500 and operation_id in DOCUMENTED_500, \
        (case.method, case.formatted_path, response.status_code, response.text[:500])
    body = json.loads(response.text)
    if DOCUMENTED_500[operation_id] == "startupError":
        assert body["error"]["code"].startswith("KS-"), body
    else:
        assert body["code"].startswith("KS-"), body

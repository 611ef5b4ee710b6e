"""`kcgevent mcp-stdio`, driven by the official MCP client's stdio transport."""
import json
import os

import subprocess

import mcp_types as types
import pytest

from agents import AGENT, structured
from conftest import HERE, PYTHON, new_id, start_session
from kcgevent.client import python_kernel_session

ROOT = os.path.dirname(HERE)
AGENT_SCRIPT = os.path.join(HERE, "apps", "stdio_agent.py")
SIX_TOOLS = {"list_sessions", "execute_code", "evaluate_code", "interrupt_session", "list_positron_commands",
             "run_positron_command"}


def bridge(*args, env=None, cwd=None):
    return {"command": PYTHON, "args": ["-m", "kcgevent", "mcp-stdio", *args],
            "env": {"PYTHONPATH": ROOT, **(env or {})}, "cwd": cwd or ROOT}


def run_agent_runs(*runs):
    """Run the stdio agent (one child process) against bridges; per run (server info, tools, results)."""
    spec = {"runs": [{"server": server, "calls": calls} for server, calls in runs],
            "agent": AGENT.model_dump(exclude_none=True)}
    done = subprocess.run([PYTHON, AGENT_SCRIPT], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return [(types.Implementation.model_validate(out["server_info"]), out["tools"],
             [types.CallToolResult.model_validate(r) for r in out["results"]]) for out in json.loads(done.stdout)]


def run_calls(server, *calls):
    return run_agent_runs((server, calls))[0]


@pytest.fixture
def workspace_session(start_server):
    server = start_server("--transport", "tcp")
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Stdio"})
    session_id = new_id("py")
    body = python_kernel_session(session_id, PYTHON, working_directory=str(HERE))
    body["workspace_id"] = workspace["workspace_id"]
    start_session(server.client, body)
    return server, workspace, session_id


def test_bridge_relays_to_the_workspace_named_by_the_environment(workspace_session):
    server, workspace, session_id = workspace_session
    env = {"POSITRON_MCP_URL": workspace["url"], "POSITRON_MCP_TOKEN": workspace["token"]}
    info, tools, (executed, listed) = run_calls(bridge(env=env), ("execute_code", {"code": "print('via stdio'); 3"}),
                                                ("list_sessions", {}))
    assert info.name == "positron"
    assert set(tools) == SIX_TOOLS
    out = structured(executed)
    assert out["stdout"] == "via stdio\n" and out["result"] == {"text/plain": "3"}
    assert structured(listed)["sessions"][0]["session_id"] == session_id
    entry = server.client.call("GET", f"/sessions/{session_id}/history")[-1]
    assert entry["agent"] == AGENT.name  # the client's initialize was replayed upstream
    status = server.client.call("GET", "/status")["mcp"]
    assert status["request_count"] == 2 and status["workspaces"][0]["clients"] == []  # ended on exit


def test_bridge_finds_the_workspace_in_the_connections_directory(workspace_session, tmp_path):
    server, workspace, session_id = workspace_session
    workspace_id = workspace["workspace_id"]
    (tmp_path / "workspaces").mkdir()
    descriptor = tmp_path / "workspaces" / f"{workspace_id}.json"
    descriptor.write_text(json.dumps({"version": 1, "workspaceId": workspace_id, "url": workspace["url"],
                                      "token": workspace["token"], "port": workspace["port"]}))
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (tmp_path / "connections.json").write_text(json.dumps({"version": 1, "workspaces": {workspace_id: {
        "displayName": "Stdio", "port": workspace["port"], "url": workspace["url"], "descriptor": str(descriptor),
        "folders": [str(folder)]}}}))
    moved = {"POSITRON_MCP_URL": f"http://127.0.0.1:9/mcp/w/{workspace_id}", "POSITRON_MCP_TOKEN": "0" * 64}
    (_, _, (by_id,)), (_, _, (by_folder,)), (_, _, (by_env,)) = run_agent_runs(
        (bridge("--connections", str(tmp_path), "--workspace", workspace_id), [("evaluate_code", {"code": "'id'"})]),
        (bridge("--connections", str(tmp_path), cwd=str(folder / "src")), [("evaluate_code", {"code": "'dir'"})]),
        # the environment names a port that no longer answers: re-resolved from the directory
        (bridge("--connections", str(tmp_path), env=moved), [("evaluate_code", {"code": "'moved'"})]))
    assert structured(by_id)["result"] == {"text/plain": "'id'"}
    assert structured(by_folder)["result"] == {"text/plain": "'dir'"}
    assert structured(by_env)["result"] == {"text/plain": "'moved'"}


def test_bridge_without_positron_answers_itself(tmp_path):
    unnamed = bridge("--connections", str(tmp_path), cwd=str(tmp_path))
    named = bridge("--connections", str(tmp_path), "--workspace", "gone-123456",
                   env={"POSITRON_MCP_URL": "http://127.0.0.1:9/mcp/w/gone-123456", "POSITRON_MCP_TOKEN": "0" * 64})
    (info, tools, (call,)), (_, _, (named,)) = run_agent_runs((unnamed, [("execute_code", {"code": "1"})]),
                                                              (named, [("list_sessions", {})]))
    assert info.name == "positron"
    assert set(tools) == SIX_TOOLS
    assert call.is_error and call.content[0].text.startswith("NO_WORKSPACE")
    assert named.is_error and named.content[0].text.startswith("POSITRON_NOT_RUNNING")


def test_bridge_shows_its_pid_and_directory_and_leaves_with_stdin(workspace_session, tmp_path):
    """Driven by hand (JSON lines): while the bridge runs, the workspace lists it; it ends with its stdin."""
    server, workspace, session_id = workspace_session
    env = {**os.environ, "PYTHONPATH": ROOT, "POSITRON_MCP_URL": workspace["url"],
           "POSITRON_MCP_TOKEN": workspace["token"]}
    bridge_process = subprocess.Popen([PYTHON, "-m", "kcgevent", "mcp-stdio"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(tmp_path))
    try:
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "by-hand", "version": "1"}}}
        bridge_process.stdin.write((json.dumps(initialize) + "\n").encode())
        bridge_process.stdin.flush()
        reply = json.loads(bridge_process.stdout.readline())
        assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "positron"
        clients = server.client.call("GET", "/status")["mcp"]["workspaces"][0]["clients"]
        assert [(c["name"], c["pid"], c["working_directory"]) for c in clients] == \
            [("by-hand", bridge_process.pid, str(tmp_path))]
        bridge_process.stdin.close()
        assert bridge_process.wait(30) == 0
        assert server.client.call("GET", "/status")["mcp"]["workspaces"][0]["clients"] == []
    finally:
        if bridge_process.poll() is None:
            bridge_process.kill()
            bridge_process.wait(10)
        bridge_process.stdout.close()

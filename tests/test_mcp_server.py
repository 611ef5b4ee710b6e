"""The agents' MCP endpoint, driven by the official MCP client over Streamable HTTP.

A real kcgevent server, a real ipykernel session owned by a registered
workspace, and `mcp.Client` as the agent.
"""
import base64
import time

import anyio
import pytest

from agents import AGENT, agent, png_display_code, run_agent, structured, tiny_png
from conftest import HERE, PYTHON, get_session, new_id, start_session, wait_for
from kcgevent.client import python_kernel_session

SIX_TOOLS = ["list_sessions", "execute_code", "evaluate_code", "interrupt_session", "list_positron_commands",
             "run_positron_command"]


@pytest.fixture
def workspace_session(start_server):
    """(server, workspace, session_id): an ipykernel session belonging to a registered workspace."""
    server = start_server("--transport", "tcp")
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Data Project"})
    session_id = new_id("py")
    body = python_kernel_session(session_id, PYTHON, working_directory=str(HERE))
    body["workspace_id"] = workspace["workspace_id"]
    start_session(server.client, body)
    return server, workspace, session_id


def test_agent_initializes_and_lists_the_six_tools(workspace_session):
    server, workspace, session_id = workspace_session

    async def scenario():
        async with agent(workspace) as client:
            tools = await client.list_tools()
            sessions = structured(await client.call_tool("list_sessions", {}))
            return client.server_info, client.instructions, tools, sessions

    info, instructions, tools, sessions = run_agent(scenario)
    assert info.name == "positron" and info.title == "Positron"
    assert "list_sessions" in instructions and "evaluate_code" in instructions
    assert [t.name for t in tools.tools] == SIX_TOOLS
    assert next(t for t in tools.tools if t.name == "list_sessions").annotations.read_only_hint
    assert [s["session_id"] for s in sessions["sessions"]] == [session_id]
    assert sessions["workspace"] == {"id": workspace["workspace_id"], "name": "Data Project"}
    assert sessions["sessions_in_other_workspaces"] == 0
    assert sessions["positron_connected"] is False


def test_execute_code_returns_every_kind_of_output(workspace_session):
    server, workspace, session_id = workspace_session
    png = tiny_png()

    async def scenario():
        async with agent(workspace) as client:
            plain = await client.call_tool("execute_code", {
                "code": "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n6 * 7"})
            failing = await client.call_tool("execute_code", {"code": "def f():\n    1 / 0\nf()"})
            picture = await client.call_tool("execute_code", {"code": png_display_code(png)})
            big = await client.call_tool("execute_code", {"code": "print('y' * 40000)\n'z' * 100"})
            own_env = await client.call_tool("evaluate_code", {
                "code": "import os\nos.environ.get('POSITRON_MCP_URL'), bool(os.environ.get('POSITRON_MCP_TOKEN'))"})
            return plain, failing, picture, big, own_env

    plain, failing, picture, big, own_env = run_agent(scenario)
    out = structured(plain)
    assert not plain.is_error
    assert out["status"] == "ok" and out["stdout"] == "to stdout\n" and out["stderr"] == "to stderr\n"
    assert out["result"] == {"text/plain": "42"} and out["images"] == 0 and out["session_id"] == session_id
    assert out["execution_count"] >= 1 and out["truncated"] is False

    err = structured(failing)
    assert err["status"] == "error" and err["error"]["name"] == "ZeroDivisionError"
    assert len(err["error"]["traceback"]) > 1 and "ZeroDivisionError" in "".join(err["error"]["traceback"])

    images = [block for block in picture.content if block.type == "image"]
    assert structured(picture)["images"] == 1 and len(images) == 1
    assert images[0].mime_type == "image/png" and base64.b64decode(images[0].data) == png

    clipped = structured(big)  # stdout, stderr and the result share 32 KiB of text
    assert clipped["truncated"] is True and clipped["stdout"].startswith("y" * 32768)
    assert clipped["stdout"].endswith(f"\n[... {40001 - 32768} bytes omitted ...]")
    assert clipped["result"]["text/plain"].startswith("\n[... 102 bytes omitted ...]")

    url_and_token = structured(own_env)["result"]["text/plain"]
    assert f"/mcp/w/{workspace['workspace_id']}/s/{session_id}" in url_and_token and "True" in url_and_token

    history = server.client.call("GET", f"/sessions/{session_id}/history")
    agent_entries = [e for e in history if e.get("source") == "agent"]
    assert [e["agent"] for e in agent_entries] == [AGENT.name] * 4  # evaluate_code leaves no entry
    assert agent_entries[1]["error"]["name"] == "ZeroDivisionError"


def test_evaluate_code_refused_while_busy_unless_it_waits(workspace_session):
    server, workspace, session_id = workspace_session

    async def scenario():
        async with agent(workspace) as client:
            before = structured(await client.call_tool("execute_code", {"code": "1"}))["execution_count"]
            async with anyio.create_task_group() as tasks:
                results = {}

                async def slow():
                    results["slow"] = await client.call_tool("execute_code",
                                                             {"code": "import time; time.sleep(2); 'slept'"})

                tasks.start_soon(slow)
                while True:  # until the kernel is busy with it
                    listed = structured(await client.call_tool("list_sessions", {}))
                    if listed["sessions"][0]["queue_length"] > 0:
                        break
                    await anyio.sleep(0.05)
                results["refused"] = await client.call_tool("evaluate_code", {"code": "1 + 1"})
                results["waited"] = await client.call_tool("evaluate_code", {"code": "1 + 1", "wait": True})
            after = structured(await client.call_tool("execute_code", {"code": "2"}))["execution_count"]
            return before, results, after

    before, results, after = run_agent(scenario)
    assert results["refused"].is_error and "RUNTIME_BUSY" in results["refused"].content[0].text
    waited = structured(results["waited"])
    assert not results["waited"].is_error and waited["result"] == {"text/plain": "2"}
    assert structured(results["slow"])["result"] == {"text/plain": "'slept'"}
    assert after == before + 2  # the slow execute and this one; evaluate_code left the counter alone


def test_interrupt_session_stops_a_sleeping_kernel(workspace_session):
    server, workspace, session_id = workspace_session

    async def scenario():
        async with agent(workspace) as client:
            async with anyio.create_task_group() as tasks:
                results = {}

                async def sleeper():
                    results["sleep"] = await client.call_tool("execute_code",
                                                              {"code": "import time; time.sleep(60)", "timeout_s": 90})

                tasks.start_soon(sleeper)
                while structured(await client.call_tool("list_sessions", {}))["sessions"][0]["status"] != "busy":
                    await anyio.sleep(0.05)
                results["interrupt"] = await client.call_tool("interrupt_session", {"session_id": session_id})
            results["after"] = await client.call_tool("execute_code", {"code": "'still alive'"})
            return results

    started = time.monotonic()
    results = run_agent(scenario)
    assert time.monotonic() - started < 55  # the 60 s sleep did not run out
    assert structured(results["interrupt"])["status"] == "ok"
    assert structured(results["interrupt"])["session_id"] == session_id
    slept = structured(results["sleep"])
    assert slept["status"] == "error" and slept["error"]["name"] == "KeyboardInterrupt"
    assert structured(results["after"])["result"] == {"text/plain": "'still alive'"}


def test_tool_errors_name_their_code(workspace_session, start_server):
    server, workspace, session_id = workspace_session
    other = server.client.call("POST", "/mcp/workspaces", {"display_name": "Other"})

    async def scenario():
        async with agent(workspace) as client:
            unknown = await client.call_tool("execute_code", {"code": "1", "session_id": "nope"})
            timed_out = await client.call_tool("execute_code", {"code": "import time; time.sleep(30)", "timeout_s": 1})
            again = await client.call_tool("execute_code", {"code": "'usable'"})
        async with agent(other) as client:
            hidden = await client.call_tool("execute_code", {"code": "1", "session_id": session_id})
            none = await client.call_tool("execute_code", {"code": "1"})
        async with agent(workspace, path_suffix=f"/s/{session_id}") as client:
            own = await client.call_tool("execute_code", {"code": "1"})
            listed = await client.call_tool("list_sessions", {})
        return unknown, timed_out, again, hidden, none, own, listed

    unknown, timed_out, again, hidden, none, own, listed = run_agent(scenario)
    for result, code in ((unknown, "SESSION_NOT_FOUND"), (timed_out, "timed_out"), (hidden, "SESSION_NOT_VISIBLE"),
                         (none, "NO_SESSION_SELECTED"), (own, "SESSION_IS_CALLER")):
        assert result.is_error and code in result.content[0].text, (code, result.content[0].text)
        assert structured(result)["error"]["code"] == code
    assert structured(again)["result"] == {"text/plain": "'usable'"}  # the kernel was interrupted, not stuck
    assert structured(listed)["sessions"][0]["is_your_own_session"] is True
    status = server.client.call("GET", "/status")["mcp"]
    assert status["active"] and status["request_count"] == 7  # one per tool call
    assert wait_for(lambda: get_session(server, session_id)["status"] == "idle", 10)


def test_newest_protocol_without_initialize(workspace_session):
    """The SDK client's default: `server/discover`, then 2026-07-28 per-request envelopes (no initialize)."""
    server, workspace, session_id = workspace_session

    async def scenario():
        async with agent(workspace, mode="auto") as client:
            return client.protocol_version, await client.call_tool("execute_code", {"code": "'modern'"})

    version, result = run_agent(scenario)
    assert version == "2026-07-28"
    assert structured(result)["result"] == {"text/plain": "'modern'"}
    entry = server.client.call("GET", f"/sessions/{session_id}/history")[-1]
    assert (entry["input"], entry["agent"]) == ("'modern'", AGENT.name)  # clientInfo from the envelope

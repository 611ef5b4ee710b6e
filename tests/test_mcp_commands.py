"""Positron commands brokered from an agent to a window over the workspace channel."""
import pytest
import websocket

from agents import AGENT, Window, agent, run_agent, schema_validator, spawn_agent, structured
from conftest import wait_for

CATALOG = [
    {"id": "workbench.action.files.save", "description": "Save the active file", "args": []},
    {"id": "positron.openDataExplorer", "description": "Open a data frame in the Data Explorer",
     "args": [{"name": "variable", "description": "the variable", "required": True, "schema": {"type": "string"}}]},
]


@pytest.fixture
def setup(start_server):
    """(server, workspace, open_window): a server whose command replies are due within 2 s."""
    server = start_server("--transport", "tcp", "--mcp-command-timeout", "2")
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Commands"})
    windows = []

    def open_window(**hello):
        window = Window(server, workspace["workspace_id"])
        windows.append(window)
        window.hello(CATALOG, **hello)
        return window

    yield server, workspace, open_window
    for window in windows:
        window.close()


def call(workspace, *calls):
    """Run tool calls in order in one agent session; return their results."""
    async def scenario():
        async with agent(workspace) as client:
            return [await client.call_tool(name, args) for name, args in calls]
    return run_agent(scenario)


def test_window_answers_and_catalog_is_searchable(setup):
    server, workspace, open_window = setup
    window = open_window(focused=True)
    assert window.recv()["kind"] == "clients_changed"  # sent on open
    pending = spawn_agent(lambda: _one(workspace, "run_positron_command",
                                       {"command_id": "positron.openDataExplorer", "args": ["df"]}))
    request = window.next_request()
    assert request["command_id"] == "positron.openDataExplorer" and request["args"] == ["df"]
    assert request["agent"] == {"name": AGENT.name, "version": AGENT.version}
    assert 0 < request["deadline_ms"] <= 2000
    window.reply(request, result={"opened": "df"})
    result = pending.get(timeout=60)
    out = structured(result)
    assert not result.is_error and out["status"] == "ok" and out["result"] == {"opened": "df"}
    assert out["command_id"] == "positron.openDataExplorer" and out["positron_connected"] is True
    assert out["positron_version"] == "2026.11.0"
    assert any(f["kind"] == "clients_changed" and f["clients"] for f in window.frames)  # the agent connected
    frames = schema_validator("mcp-workspace-channel.json")
    assert all(frames.is_valid(f) for f in window.frames), window.frames

    failed = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "nope"}))
    window.reply(window.next_request(), ok=False, reason="not-found", message="No such command")
    failed = failed.get(timeout=60)
    assert failed.is_error and structured(failed)["reason"] == "not-found"

    window.close()  # the catalog outlives the window
    found, everything = call(workspace, ("list_positron_commands", {"query": "DATA EXPLORER"}),
                             ("list_positron_commands", {"limit": 1}))
    assert [c["id"] for c in structured(found)["commands"]] == ["positron.openDataExplorer"]
    assert structured(found)["matched"] == 1 and structured(found)["total"] == 2
    assert structured(everything)["truncated"] is True and len(structured(everything)["commands"]) == 1
    assert structured(everything)["positron_connected"] is False


def test_window_that_never_answers_times_out_and_keeps_serving(setup):
    server, workspace, open_window = setup
    window = open_window(focused=True)
    pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "slow.command"}))
    late = window.next_request()
    result = pending.get(timeout=60)
    assert result.is_error and "timeout" in result.content[0].text
    assert structured(result)["reason"] == "timeout"
    window.reply(late, result="too late")  # ignored: nobody waits for it any more

    pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "fast.command"}))
    request = window.next_request()
    assert request["command_id"] == "fast.command"
    window.reply(request, result=42)
    assert structured(pending.get(timeout=60))["result"] == 42


def test_detached_window_hands_the_call_to_a_sibling(setup):
    server, workspace, open_window = setup
    sibling = open_window()
    focused = open_window()
    focused.send({"kind": "focused"})
    sibling.recv()  # its clients_changed: the sibling is attached
    pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "positron.doIt"}))
    first = focused.next_request()
    focused.close()  # the serving window goes away mid-call
    again = sibling.next_request()
    assert again["id"] == first["id"] and again["command_id"] == "positron.doIt"
    sibling.reply(again, result="done by the sibling")
    result = pending.get(timeout=60)
    assert not result.is_error and structured(result)["result"] == "done by the sibling"


def test_last_window_leaving_mid_call_reports_disconnected(setup):
    server, workspace, open_window = setup
    window = open_window(focused=True)
    pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "positron.doIt"}))
    window.next_request()
    window.close()
    result = pending.get(timeout=60)
    assert result.is_error and "POSITRON_DISCONNECTED" in result.content[0].text
    assert "positron_disconnected_since" in structured(result)


async def _one(workspace, name, args):
    async with agent(workspace) as client:
        return await client.call_tool(name, args)


def test_call_waits_for_a_window_to_attach(setup):
    server, workspace, open_window = setup
    pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "positron.later"}))
    wait_for(lambda: server.client.call("GET", "/status")["mcp"]["request_count"] == 1, 30, "the call to arrive")
    window = open_window()  # attaches while the call waits (up to 15 s)
    request = window.next_request()
    window.reply(request, result="served once attached")
    assert structured(pending.get(timeout=60))["result"] == "served once attached"


def test_workspace_channel_over_the_unix_socket_transport(start_server):
    """Positron's default transport on Linux and macOS: the channel is an upgrade on the server's socket."""
    server = start_server("--transport", "socket", token=None)  # a generated token, as Positron runs it
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Socket"})
    window = Window(server, workspace["workspace_id"])
    try:
        window.hello(CATALOG, focused=True)
        pending = spawn_agent(lambda: _one(workspace, "run_positron_command", {"command_id": "x.y"}))
        window.reply(window.next_request(), result="over the socket")
        assert structured(pending.get(timeout=60))["result"] == "over the socket"
        assert server.client.call("GET", "/status")["mcp"]["workspaces"][0]["connected"] is True
    finally:
        window.close()
    server.client.token = "wrong"  # the upgrade needs the supervisor's token like every endpoint
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        Window(server, workspace["workspace_id"])
    assert refused.value.status_code == 401


def test_window_that_stops_answering_pings_is_detached(start_server):
    server = start_server("--transport", "tcp", "--ping-interval", "0.2")
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Pings"})
    window = Window(server, workspace["workspace_id"])  # never reads again: pings go unanswered
    try:
        window.hello(CATALOG, focused=True)
        wait_for(lambda: not server.client.call("GET", "/status")["mcp"]["workspaces"][0]["connected"], 30,
                 "the silent window to be detached")
    finally:
        window.close()

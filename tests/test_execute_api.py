"""`POST /sessions/{id}/execute`, `GET /sessions/{id}/history`, and `executionRequested` on the channel."""
import json

import pytest

from agents import AGENT, agent, png_display_code, run_agent, schema_validator, structured, tiny_png
from conftest import HERE, PYTHON, get_session, kernel_events, new_id, start_session
from kcgevent.client import python_kernel_session


def execute(server, session_id, code, **options):
    return server.client.request("POST", f"/sessions/{session_id}/execute", {"code": code, **options})


def test_execute_returns_each_output_kind(python_session):
    server, session_id = python_session
    png = tiny_png()
    status, reply = execute(server, session_id, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
                                                f"{png_display_code(png)}\n{{'answer': 42}}")
    assert status == 200, reply
    assert reply["status"] == "ok" and reply["execution_count"] >= 1
    kinds = [(o["type"], o.get("stream_name")) for o in reply["output"]]
    # stdout and stderr are flushed independently (either may come first); display() flushes both before it
    assert sorted(kinds[:2]) == [("stream", "stderr"), ("stream", "stdout")] and kinds[2:] == [("display_data", None)]
    assert {o["stream_name"]: o["text"] for o in reply["output"][:2]} == {"stdout": "out\n", "stderr": "err\n"}
    display = reply["output"][2]
    assert display["data"]["image/png"].strip() == __import__("base64").b64encode(png).decode()
    assert isinstance(display["metadata"], dict)
    assert reply["data"] == {"text/plain": "{'answer': 42}"}  # the execute_result, hoisted

    status, failed = execute(server, session_id, "raise ValueError('bad value')")
    assert status == 200 and failed["status"] == "error"
    assert failed["error_name"] == "ValueError" and failed["error_message"] == "bad value"
    assert failed["error_traceback"] and failed["output"][-1]["type"] == "error"
    assert failed["output"][-1]["error_name"] == "ValueError"

    status, silent = execute(server, session_id, "print('quiet'); 1", silent=True)
    assert status == 200 and "data" not in silent  # no execute_result (ipykernel still relays print)
    assert all(o["type"] == "stream" for o in silent["output"])


def test_execute_timeout_interrupts_and_the_kernel_stays_usable(python_session):
    server, session_id = python_session
    status, body = execute(server, session_id, "import time; time.sleep(60)", timeout_seconds=1)
    assert status == 408 and body["code"] == "timeout" and "interrupted" in body["message"]
    status, reply = execute(server, session_id, "'usable'", timeout_seconds=30)
    assert status == 200 and reply["data"] == {"text/plain": "'usable'"}


def test_execute_bad_requests(python_session):
    server, session_id = python_session
    assert execute(server, "no-such-session", "1")[0] == 404
    status, body = server.client.request("POST", f"/sessions/{session_id}/execute", {"silent": True})
    assert status == 400 and "code" in body["message"]
    status, body = server.client.request("POST", f"/sessions/{session_id}/execute", {"code": "1",
                                                                                    "timeout_seconds": "soon"})
    assert status == 400
    server.client.call("PUT", "/sessions", python_kernel_session("never-started", PYTHON))
    assert server.client.request("GET", "/sessions/never-started/history") == (200, [])
    assert server.client.request("GET", "/sessions/no-such-session/history")[0] == 404


def test_history_records_and_clips(python_session):
    server, session_id = python_session
    execute(server, session_id, "print('x' * 100_000)")
    execute(server, session_id, "1 / 0")
    execute(server, session_id, "'not recorded'", silent=True)
    execute(server, session_id, "'no kernel history, but recorded'", store_history=False)
    execute(server, session_id, "'last'")
    history = server.client.call("GET", f"/sessions/{session_id}/history")
    assert [e["input"] for e in history] == ["print('x' * 100_000)", "1 / 0", "'no kernel history, but recorded'",
                                             "'last'"]
    big = history[0]
    assert big["truncated"] is True
    omitted = 100_001 - 4096  # 100 000 x and a newline, less the two kept 2 KiB halves
    assert big["output"] == "x" * 2048 + f"\n[... {omitted} bytes omitted ...]\n" + "x" * 2047 + "\n"
    assert history[1]["error"]["name"] == "ZeroDivisionError" and history[1]["truncated"] is False
    assert history[3]["output"] == "'last'\n" and "source" not in history[3]
    assert all(isinstance(e["timestamp"], int) for e in history)
    assert get_session(server, session_id)["history"] == history[1:]  # the last 3 in ActiveSession


def test_history_keeps_the_last_hundred(python_session):
    server, session_id = python_session
    for i in range(104):
        assert execute(server, session_id, f"{i}")[0] == 200
    history = server.client.call("GET", f"/sessions/{session_id}/history")
    assert len(history) == 100 and history[0]["input"] == "4" and history[-1]["input"] == "103"
    assert [e["input"] for e in get_session(server, session_id)["history"]] == ["101", "102", "103"]


@pytest.fixture
def workspace_session(start_server):
    server = start_server("--transport", "tcp")
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Events"})
    session_id = new_id("py")
    body = python_kernel_session(session_id, PYTHON, working_directory=str(HERE))
    body["workspace_id"] = workspace["workspace_id"]
    start_session(server.client, body)
    return server, workspace, session_id


def test_execution_requested_is_kept_for_an_absent_client_and_precedes_output(workspace_session, open_channel):
    server, workspace, session_id = workspace_session
    code = ("import json\nprint(json.dumps(get_ipython().kernel.get_parent()['metadata']['attribution']))")

    async def scenario():
        async with agent(workspace) as client:
            return await client.call_tool("execute_code", {"code": code})

    result = structured(run_agent(scenario))  # no client is attached to the session meanwhile
    channel = open_channel(server, session_id)
    frames = channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "status"
                           and f["content"]["execution_state"] == "idle"
                           and (f.get("parent_header") or {}).get("msg_type") == "execute_request")
    requested = kernel_events(frames, "executionRequested")
    assert len(requested) == 1
    event = requested[0]
    assert event["code"] == code and event["requested_at"].endswith("Z")
    assert event["attribution"] == {"source": "agent", "agent_name": AGENT.name, "agent_version": AGENT.version,
                                    "workspace_id": workspace["workspace_id"], "tool": "execute_code"}
    assert json.loads(result["stdout"]) == event["attribution"]  # what the kernel got in metadata.attribution
    server_frames = schema_validator("channel-server-message.json")
    assert all(server_frames.is_valid({k: v for k, v in f.items() if k != "seq"}) for f in frames)
    position = frames.index(next(f for f in frames if "executionRequested" in f))
    related = [i for i, f in enumerate(frames) if f.get("kind") == "jupyter"
               and (f.get("parent_header") or {}).get("msg_id") == event["msg_id"]]
    assert related and position < min(related)
    entry = server.client.call("GET", f"/sessions/{session_id}/history")[-1]
    assert (entry["source"], entry["agent"]) == ("agent", AGENT.name)
    channel.until_idle(channel.execute("print('from the console')"))  # a WebSocket client's execution
    entry = server.client.call("GET", f"/sessions/{session_id}/history")[-1]
    assert entry["input"] == "print('from the console')" and entry["output"] == "from the console\n"
    assert "source" not in entry and "agent" not in entry
    assert get_session(server, session_id)["workspace_id"] == workspace["workspace_id"]

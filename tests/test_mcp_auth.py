"""Workspace registration, `/status.mcp`, the server card, and the agents' auth matrix (raw HTTP)."""
import http.client
import json

import pytest

from agents import agent, run_agent
from kcgevent.session.session import free_ports

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw-agent", "version": "1"}}}
INACTIVE = {"active": False, "port": 0, "request_count": 0, "workspaces": []}


def post(workspace, path=None, headers=None, body=INITIALIZE, method="POST"):
    """(status, headers, body text) of one request to the MCP listener."""
    conn = http.client.HTTPConnection("127.0.0.1", workspace["port"], timeout=30)
    base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    try:
        conn.request(method, path or f"/mcp/w/{workspace['workspace_id']}",
                     body=json.dumps(body) if body is not None else None, headers={**base, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def bearer(workspace, scheme="Bearer"):
    return {"Authorization": f"{scheme} {workspace['token']}"}


@pytest.fixture
def server(start_server):
    return start_server("--transport", "tcp")


def test_registration_lifecycle_and_status(server):
    client = server.client
    assert client.call("GET", "/status")["mcp"] == INACTIVE
    first = client.call("POST", "/mcp/workspaces", {"display_name": "My Data / Project!!",
                                                    "capabilities": {"commands": True}})
    assert first["workspace_id"].startswith("my-data-project-") and len(first["workspace_id"]) == 22
    assert len(first["token"]) == 64 and first["url"] == f"http://127.0.0.1:{first['port']}/mcp/w/" \
                                                         f"{first['workspace_id']}"
    assert client.call("DELETE", f"/mcp/workspaces/{first['workspace_id']}") is None
    first = client.call("POST", "/mcp/workspaces", {"display_name": "P", "preferred_port": 70000,  # not a port
                                                    "workspace_id": first["workspace_id"], "token": first["token"]})
    again = client.call("POST", "/mcp/workspaces", {"display_name": "Renamed", "workspace_id": first["workspace_id"],
                                                    "preferred_port": 1})
    assert again == first  # same token and port; a later preferred_port is ignored
    # a restarted supervisor honours the id and token Positron kept; an unsafe id is replaced
    kept = client.call("POST", "/mcp/workspaces", {"display_name": "Kept", "workspace_id": "kept-1",
                                                   "token": "ab" * 32})
    assert (kept["workspace_id"], kept["token"]) == ("kept-1", "ab" * 32)
    unsafe = client.call("POST", "/mcp/workspaces", {"display_name": "x", "workspace_id": "../../evil"})
    assert unsafe["workspace_id"].startswith("x-") and "/" not in unsafe["workspace_id"]

    status = client.call("GET", "/status")["mcp"]
    assert status["active"] and status["port"] == first["port"] and status["request_count"] == 0
    assert [w["id"] for w in status["workspaces"]] == sorted([first["workspace_id"], "kept-1",
                                                             unsafe["workspace_id"]])
    assert {w["id"]: w["display_name"] for w in status["workspaces"]}[first["workspace_id"]] == "Renamed"
    assert all(w["connected"] is False and w["clients"] == [] for w in status["workspaces"])

    status_code, _ = client.request("POST", "/mcp/workspaces", {"workspace_id": "no-name"})
    assert status_code == 400
    for workspace in (first, kept, unsafe):
        assert client.request("DELETE", f"/mcp/workspaces/{workspace['workspace_id']}")[0] == 200
        assert client.request("DELETE", f"/mcp/workspaces/{workspace['workspace_id']}")[0] == 404
    assert client.call("GET", "/status")["mcp"] == INACTIVE
    with pytest.raises(OSError):  # the listener is gone and its port released
        post(first, headers=bearer(first))
    port = free_ports(1)[0]
    assert client.call("POST", "/mcp/workspaces", {"display_name": "P", "preferred_port": port})["port"] == port


def test_auth_matrix(server):
    mine = server.client.call("POST", "/mcp/workspaces", {"display_name": "Mine"})
    theirs = server.client.call("POST", "/mcp/workspaces", {"display_name": "Theirs"})
    cases = [
        ({"Host": "evil.example"}, 403),
        ({"Host": "127.0.0.1.evil.example"}, 403),
        ({"Host": f"127.0.0.1.evil.example:{mine['port']}"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": f"http://127.0.0.1.evil.example:{mine['port']}"}, 403),
        ({}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Basic " + mine["token"]}, 401),
        ({"Authorization": "Bearer " + "0" * 64}, 401),
        (bearer(theirs), 403),
        ({"Host": "evil.example", **bearer(mine)}, 403),  # the rebinding guard comes first
    ]
    for headers, expected in cases:
        status, response_headers, text = post(mine, headers=headers)
        assert status == expected, (headers, status, text)
        assert "www-authenticate" not in {k.lower() for k in response_headers}
        if headers == bearer(theirs):
            assert "same Positron window" in text
    for headers in (bearer(mine), bearer(mine, "bEaReR"), {"Host": f"localhost:{mine['port']}", **bearer(mine)},
                    {"Origin": f"http://127.0.0.1:{mine['port']}", **bearer(mine)},
                    {"Origin": "https://localhost", **bearer(mine)}):
        status, response_headers, text = post(mine, headers=headers)
        assert status == 200, (headers, status, text)
        assert json.loads(text)["result"]["serverInfo"]["name"] == "positron"
        assert response_headers.get("mcp-session-id")
    assert post(mine, path="/elsewhere", headers=bearer(mine))[0] == 404
    assert "/mcp/w/<workspace-id>" in post(mine, path="/mcp", headers=bearer(mine))[2]

    # after deregistration, its token is refused (the listener still serves the other workspace)
    server.client.call("DELETE", f"/mcp/workspaces/{theirs['workspace_id']}")
    assert post(theirs, headers=bearer(theirs))[0] == 401
    assert post(mine, path=f"/mcp/w/{theirs['workspace_id']}", headers=bearer(mine))[0] == 403


def test_server_card_needs_no_token(server):
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Card"})
    path = f"/mcp/w/{workspace['workspace_id']}/server-card"
    status, headers, text = post(workspace, path=path, method="GET", body=None)
    assert status == 200 and headers["content-type"] == "application/mcp-server-card+json"
    assert headers["cache-control"] == "no-cache"
    card = json.loads(text)
    assert card["name"] == "co.posit/positron" and card["remotes"][0]["url"] == workspace["url"]
    assert card["remotes"][0]["type"] == "streamable-http"
    assert "2025-06-18" in card["remotes"][0]["supportedProtocolVersions"]
    assert card["_meta"]["co.posit.positron/workspace"] == {"id": workspace["workspace_id"], "displayName": "Card"}
    assert post(workspace, path=path, method="GET", body=None, headers={"If-None-Match": headers["etag"]})[0] == 304
    assert post(workspace, path=path)[0] == 405
    assert post(workspace, path="/mcp/w/nobody/server-card", method="GET", body=None)[0] == 404


def test_agents_show_in_status_and_reach_windows(server):
    workspace = server.client.call("POST", "/mcp/workspaces", {"display_name": "Clients"})

    async def scenario():
        async with agent(workspace, path_suffix="/s/some-kernel") as client:
            await client.list_tools()
            return server.client.call("GET", "/status")["mcp"]

    during = run_agent(scenario)
    clients = during["workspaces"][0]["clients"]
    assert len(clients) == 1 and clients[0]["name"] == "test-agent" and clients[0]["version"] == "9.8.7"
    assert clients[0]["session_id"] == "some-kernel" and clients[0]["connected_at"].endswith("Z")
    assert server.client.call("GET", "/status")["mcp"]["workspaces"][0]["clients"] == []  # DELETE on close

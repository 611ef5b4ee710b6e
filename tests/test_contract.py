"""The HTTP contract: kallichore.json, the generated marshmallow schemas and the Flask views agree.

kallichore.json is the source of truth. The generated module must be fresh,
and the OpenAPI document rendered from the app (views + `operation` metadata +
schemas) must match it once both are reduced to a comparable form.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Blueprint, Flask
from marshmallow import ValidationError

from kcgevent.api.contract import operation
from openapi_render import render_openapi
from kcgevent.api.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
SPEC = json.loads((ROOT / "kallichore.json").read_text(encoding="utf-8"))
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}

S = "/sessions/<session_id>"
# What the real blueprint must declare: endpoint, rule, method, operation(...) arguments.
ROUTES = [
    ("list_sessions", "/sessions", "GET",
     dict(operation_id="list-sessions", summary="List sessions",
          responses={200: "sessionList", 401: None})),
    ("new_session", "/sessions", "PUT",
     dict(operation_id="new-session", summary="Create a session",
          responses={200: "object", 400: "error", 401: None}, body="newSession", body_required=True)),
    ("get_session", S, "GET",
     dict(operation_id="get-session", summary="Get a session",
          responses={200: "activeSession", 400: "error", 401: None, 404: "error"})),
    ("delete_session", S, "DELETE",
     dict(operation_id="delete-session", summary="Delete a session",
          responses={200: "any", 400: "error", 401: None, 404: "error"})),
    ("start_session", S + "/start", "POST",
     dict(operation_id="start-session", summary="Start a session",
          responses={200: "object", 400: "startupError", 401: None, 404: "error", 409: "startupError",
                     500: "startupError"})),
    ("restart_session", S + "/restart", "POST",
     dict(operation_id="restart-session", summary="Restart a session",
          responses={200: "any", 401: None, 404: "error", 409: "startupError", 500: "startupError"},
          body="restartSession")),
    ("kill_session", S + "/kill", "POST",
     dict(operation_id="kill-session", summary="Force quit a session",
          responses={200: "any", 400: "error", 401: None, 404: "error"})),
    ("adopt_session", S + "/adopt", "PUT",
     dict(operation_id="adopt-session", summary="Adopt a running kernel",
          responses={200: "object", 400: "error", 401: None, 404: "error", 500: "error"},
          body="connectionInfo", body_required=True)),
    ("connection_info", S + "/connection_info", "GET",
     dict(operation_id="connection-info", summary="Get connection details",
          responses={200: "connectionInfo", 401: None, 404: "error", 500: "error"})),
    ("interrupt_session", S + "/interrupt", "POST",
     dict(operation_id="interrupt-session", summary="Interrupt a session",
          responses={200: "any", 400: "error", 401: None, 404: "error"})),
    ("channels_upgrade", S + "/channels", "GET",
     dict(operation_id="channels-upgrade", summary="Open the session's channel",
          responses={200: "string", 400: "error", 401: None, 404: "error"})),
    ("shutdown_server", "/shutdown", "POST",
     dict(operation_id="shutdown-server", summary="Shut down the server",
          responses={200: "any", 400: "error", 401: None})),
    ("server_status", "/status", "GET",
     dict(operation_id="server-status", summary="Get server status",
          responses={200: "serverStatus", 400: "error"}, auth=False)),
    ("client_heartbeat", "/client_heartbeat", "POST",
     dict(operation_id="client-heartbeat", summary="Report that a client is alive",
          responses={200: "any", 400: "error", 401: None}, body="clientHeartbeat", body_required=True)),
    ("get_server_configuration", "/server_configuration", "GET",
     dict(operation_id="get-server-configuration", summary="Get server configuration",
          responses={200: "serverConfiguration", 400: "error", 401: None})),
    ("set_server_configuration", "/server_configuration", "POST",
     dict(operation_id="set-server-configuration", summary="Change server configuration",
          responses={200: "any", 400: "error", 401: None}, body="serverConfiguration",
          body_required=True)),
    ("execute_code", S + "/execute", "POST",
     dict(operation_id="execute-code", summary="Execute code",
          responses={200: "executeReply", 400: "error", 401: None, 404: "error", 408: "error", 409: "error"},
          body="executeRequest", body_required=True)),
    ("session_history", S + "/history", "GET",
     dict(operation_id="get-session-history", summary="Get history",
          responses={200: "executionHistoryEntry[]", 401: None, 404: "error"})),
    ("register_workspace", "/mcp/workspaces", "POST",
     dict(operation_id="register-mcp-workspace", summary="Register",
          responses={200: "mcpWorkspace", 400: "error", 401: None},
          body="mcpWorkspaceRegistration", body_required=True)),
    ("deregister_workspace", "/mcp/workspaces/<workspace_id>", "DELETE",
     dict(operation_id="deregister-mcp-workspace", summary="Deregister",
          responses={200: "any", 401: None, 404: "error"})),
    ("workspace_channel", "/mcp/workspaces/<workspace_id>/channel", "GET",
     dict(operation_id="mcp-workspace-channel", summary="Workspace channel",
          responses={200: "string", 400: "error", 401: None, 404: "error"})),
]


def fixture_blueprint():
    """A stand-in for the real blueprint: same name, endpoints, rules and metadata, no behaviour."""
    bp = Blueprint("kallichore", __name__)
    for endpoint, rule, method, args in ROUTES:
        def view(**_):
            return "null"

        view.__name__ = endpoint
        bp.add_url_rule(rule, endpoint, operation(**args)(view), methods=[method])
    bp.add_url_rule("/openapi.json", "openapi", lambda: "{}")  # no `.operation`: not rendered
    return bp


def fixture_app(url_prefix=None):
    app = Flask(__name__)
    app.register_blueprint(fixture_blueprint(), url_prefix=url_prefix)
    return app


# ---------------------------------------------------------------- normalization

def _ref_name(schema):
    return schema["$ref"].rsplit("/", 1)[-1]


def _unwrap(schema):
    """`{allOf: [X], default: ...}` -> X merged with its siblings (how a $ref gets a default)."""
    if "allOf" in schema and len(schema["allOf"]) == 1:
        siblings = {k: v for k, v in schema.items() if k != "allOf"}
        return {**schema["allOf"][0], **siblings}
    return schema


def _is_object(schema):
    return schema.get("type") == "object" and "properties" in schema


def _kind(schema):
    """What a body/response carries: a component name, an inline JSON type, or "any"."""
    schema = _unwrap(schema)
    if "$ref" in schema:
        return _ref_name(schema)
    return schema.get("type", "any")


def _property(schema, components):
    """A property reduced to type/format/enum/default; object $refs stay names, others are inlined."""
    schema = _unwrap(schema)
    if "$ref" in schema:
        name = _ref_name(schema)
        target = components.get(name, {})
        if _is_object(target):
            return {"ref": name, "default": schema.get("default")}
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return _property({**target, **rest}, components)
    out = {
        "type": schema.get("type"),
        "format": schema.get("format"),
        "enum": schema.get("enum"),
        "default": schema.get("default"),
    }
    if "items" in schema:
        out["items"] = _property(schema["items"], components)
    if schema.get("additionalProperties"):  # `{}` (any value) is the same as absent
        out["values"] = _property(schema["additionalProperties"], components)
    return out


def normalize(doc):
    """Reduce an OpenAPI document to what both sides must agree on."""
    components = doc.get("components", {}).get("schemas", {})
    operations = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            body = op.get("requestBody")
            operations[(path, method)] = {
                "operationId": op["operationId"],
                "path_params": sorted(p["name"] for p in op.get("parameters", []) if p["in"] == "path"),
                "body": None if body is None else (
                    _kind(body["content"]["application/json"]["schema"]), body.get("required", False)),
                "responses": {
                    str(code): _kind(r["content"]["application/json"]["schema"]) if "content" in r else None
                    for code, r in op["responses"].items()
                },
                "secured": bool(op.get("security", doc.get("security"))),
            }
    schemas = {
        name: {
            "properties": list(schema["properties"]),
            "required": set(schema.get("required", [])),
            "fields": {p: _property(s, components) for p, s in schema["properties"].items()},
        }
        for name, schema in components.items()
        if _is_object(schema)
    }
    return {"operations": operations, "schemas": schemas}


def assert_matches_spec(rendered):
    got, want = normalize(rendered), normalize(SPEC)
    assert sorted(got["operations"]) == sorted(want["operations"])
    for key, expected in want["operations"].items():
        assert got["operations"][key] == expected, key
    assert sorted(got["schemas"]) == sorted(want["schemas"])
    for name, expected in want["schemas"].items():
        assert got["schemas"][name] == expected, name
    assert rendered["components"]["securitySchemes"] == SPEC["components"]["securitySchemes"]
    assert rendered["info"]["title"] == SPEC["info"]["title"]
    assert rendered["info"]["version"] == SPEC["info"]["version"]


# ---------------------------------------------------------------- (a) generated module is fresh

def test_generated_schemas_are_fresh():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_schemas.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_stale_module(tmp_path):
    """--check must notice drift, and a plain run must repair it."""
    for rel in ("tools/gen_schemas.py", "kallichore.json", "kcgevent/api/schemas.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    module = tmp_path / "kcgevent/api/schemas.py"
    module.write_text(module.read_text(encoding="utf-8") + "# hand edit\n", encoding="utf-8")

    def run(*args):
        script = tmp_path / "tools/gen_schemas.py"
        return subprocess.run([sys.executable, str(script), *args], capture_output=True).returncode

    assert run("--check") == 1
    assert run() == 0
    assert run("--check") == 0
    assert module.read_text(encoding="utf-8") == (ROOT / "kcgevent/api/schemas.py").read_text(encoding="utf-8")


def test_every_object_component_has_a_schema():
    objects = {n for n, s in SPEC["components"]["schemas"].items() if _is_object(s)}
    assert set(SCHEMAS) == objects
    assert SCHEMAS["newSession"].__name__ == "NewSessionSchema"


# ---------------------------------------------------------------- (b) rendered API == kallichore.json

def test_kallichore_json_is_valid_openapi():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(SPEC)


def test_fixture_app_renders_the_contract():
    assert_matches_spec(render_openapi(fixture_app()))


def test_mounted_blueprint_renders_the_same_paths():
    rendered = render_openapi(fixture_app(url_prefix="/api/kernels"))
    assert rendered["servers"] == [{"url": "/api/kernels"}]
    assert_matches_spec(rendered)


def test_rendered_document_is_valid_openapi():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(render_openapi(fixture_app()))


def test_normalization_catches_drift():
    """The comparison is not vacuous: a wrong response, body or enum is noticed."""
    broken = json.loads(json.dumps(SPEC))
    broken["paths"]["/status"]["get"]["security"] = [{"bearerAuth": []}]
    broken["components"]["schemas"]["status"]["enum"].append("zombie")
    got, want = normalize(broken), normalize(SPEC)
    assert got["operations"][("/status", "get")] != want["operations"][("/status", "get")]
    assert got["schemas"]["activeSession"] != want["schemas"]["activeSession"]


def _real_app():
    try:
        from kcgevent.app import create_app
    except ModuleNotFoundError as exc:
        if exc.name != "kcgevent.app":
            raise
        pytest.skip("kcgevent.app is not written yet")
    return create_app()


def test_real_app_renders_the_contract():
    assert_matches_spec(render_openapi(_real_app()))


# ---------------------------------------------------------------- (c) the generated schemas

NEWEST_BODY = {  # what Positron sends today (PUT /sessions)
    "session_id": "python-1a2b3c4d",
    "display_name": "Python 3.12",
    "language": "python",
    "username": "ada",
    "input_prompt": "",
    "continuation_prompt": "",
    "argv": ["python", "-m", "ipykernel", "-f", "{connection_file}"],
    "session_mode": "notebook",
    "notebook_uri": "file:///home/ada/analysis.ipynb",
    "working_directory": "/home/ada",
    "env": [
        {"action": "replace", "name": "POSITRON", "value": "1"},
        {"action": "prepend", "name": "LD_LIBRARY_PATH", "value": "/opt/lib:"},
    ],
    "startup_environment": "command",
    "startup_environment_arg": "source ~/.venv/bin/activate",
    "connection_timeout": 45,
    "interrupt_mode": "message",
    "protocol_version": "5.5",
    "workspace_id": "ws-1",
}

LEGACY_BODY = {  # 2025 clients: no session_mode / startup_environment*, a run_in_shell flag instead
    key: NEWEST_BODY[key]
    for key in ("session_id", "display_name", "language", "username", "input_prompt",
                "continuation_prompt", "argv", "working_directory", "env", "interrupt_mode")
} | {"run_in_shell": True}


def load_new_session(body):
    return SCHEMAS["newSession"]().load(body)


def test_newest_positron_body_loads():
    loaded = load_new_session(NEWEST_BODY)
    assert loaded == NEWEST_BODY


def test_legacy_body_gets_defaults():
    loaded = load_new_session(LEGACY_BODY)
    assert loaded["session_mode"] == "console"
    assert loaded["startup_environment"] == "none"
    assert loaded["run_in_shell"] is True
    assert loaded["connection_timeout"] == 30
    assert loaded["protocol_version"] == "5.3"
    assert "startup_environment_arg" not in loaded


@pytest.mark.parametrize("change, field, message", [
    ({"session_id": None}, "session_id", "Field may not be null."),
    ({"interrupt_mode": "politely"}, "interrupt_mode", "Must be one of: signal, message."),
    ({"session_mode": "repl"}, "session_mode", "Must be one of: console, notebook, background."),
    ({"connection_timeout": "30"}, "connection_timeout", "Not a valid integer."),
    ({"connection_timeout": True}, "connection_timeout", "Not a valid integer."),
    ({"display_name": 7}, "display_name", "Not a valid string."),
    ({"argv": "python"}, "argv", "Not a valid list."),
])
def test_bad_body_is_rejected_with_a_clear_message(change, field, message):
    with pytest.raises(ValidationError) as info:
        load_new_session(NEWEST_BODY | change)
    assert info.value.messages == {field: [message]}


def test_missing_required_field_is_named():
    body = {k: v for k, v in NEWEST_BODY.items() if k != "argv"}
    with pytest.raises(ValidationError) as info:
        load_new_session(body)
    assert info.value.messages == {"argv": ["Missing data for required field."]}


def test_bad_env_action_points_at_the_item():
    body = NEWEST_BODY | {"env": [{"action": "remove", "name": "X", "value": ""}]}
    with pytest.raises(ValidationError) as info:
        load_new_session(body)
    assert info.value.messages == {
        "env": {0: {"action": ["Must be one of: replace, append, prepend."]}}
    }


def test_unknown_fields_are_ignored():
    body = NEWEST_BODY | {"future_field": 1}
    body["env"] = [{"action": "append", "name": "PATH", "value": "/x", "comment": "ignored"}]
    loaded = load_new_session(body)
    assert "future_field" not in loaded
    assert loaded["env"] == [{"action": "append", "name": "PATH", "value": "/x"}]


def test_small_bodies():
    assert SCHEMAS["clientHeartbeat"]().load({}) == {}
    assert SCHEMAS["clientHeartbeat"]().load({"process_id": 4242}) == {"process_id": 4242}
    assert SCHEMAS["restartSession"]().load({}) == {}
    assert SCHEMAS["serverConfiguration"]().load({"idle_shutdown_hours": -1}) == {"idle_shutdown_hours": -1}
    with pytest.raises(ValidationError):
        SCHEMAS["serverConfiguration"]().load({"log_level": "verbose"})
    info = {"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, "iopub_port": 5,
            "signature_scheme": "hmac-sha256", "key": "k", "transport": "tcp", "ip": "127.0.0.1"}
    assert SCHEMAS["connectionInfo"]().load(info) == info
    with pytest.raises(ValidationError):
        SCHEMAS["connectionInfo"]().load(info | {"hb_port": "4"})


def test_dump_omits_absent_optional_fields_in_spec_order():
    session = {
        "busy_seconds": 0, "idle_seconds": 3, "kernel_info": {}, "status": "uninitialized",
        "execution_queue": {"length": 0, "pending": []}, "continuation_prompt": "+",
        "input_prompt": ">", "working_directory": "/", "session_mode": "console",
        "started": "2025-01-01T12:00:00.000000000Z", "connected": False, "initial_env": {},
        "interrupt_mode": "signal", "language": "python", "display_name": "P", "username": "u",
        "argv": [], "session_id": "s",
    }
    dumped = SCHEMAS["activeSession"]().dump(session)
    assert "process_id" not in dumped and "resource_usage" not in dumped
    assert list(dumped) == [p for p in SPEC["components"]["schemas"]["activeSession"]["properties"]
                            if p in session]
    assert dumped["execution_queue"] == {"length": 0, "pending": []}


# ---------------------------------------------------------------- schemas/ (JSON Schema contracts)

def _validator(name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_client_frames():
    v = _validator("channel-client-message.json")
    frame = {"header": {"msg_id": "a1", "msg_type": "execute_request", "session": "s", "version": "5.3"},
             "parent_header": None, "channel": "shell", "content": {"code": "1"},
             "metadata": {}, "buffers": ["AAE="]}
    assert v.is_valid(frame)
    assert v.is_valid(frame | {"kind": "jupyter", "parent_header": {}})
    assert not v.is_valid(frame | {"channel": "iopub"})
    assert not v.is_valid(frame | {"header": {"msg_id": "a1"}})
    assert not v.is_valid(frame | {"buffers": ["not base64!"]})


def test_server_frames():
    v = _validator("channel-server-message.json")
    header = {"msg_id": "b2", "msg_type": "status", "session": "k", "date": "2025-01-01T00:00:00Z"}
    assert v.is_valid({"kind": "jupyter", "header": header, "parent_header": None, "channel": "iopub",
                       "content": {"execution_state": "idle"}, "metadata": {}, "buffers": []})
    info = {"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, "iopub_port": 5,
            "signature_scheme": "hmac-sha256", "key": "k", "transport": "tcp", "ip": "127.0.0.1"}
    for event in [
        {"status": {"status": "idle", "reason": None}},
        {"output": ["stdout", "hello\n"]},
        {"exited": -1},
        {"executionQueued": "b2"},
        {"workingDirChanged": "/tmp"},
        {"resourceUsage": {"cpu_percent": 3, "memory_bytes": 1, "thread_count": 2,
                           "sampling_period_ms": 1000, "timestamp": 1700000000000}},
        {"clientDisconnected": "Another client is connecting to this session."},
        {"handshakeCompleted": ["s", info]},
        {"messagesDropped": {"count": 2, "first_seq": 10, "last_seq": 11}},
        {"executionRequested": {"msg_id": "m1", "code": "1", "requested_at": "2026-01-01T00:00:00.000Z",
                                "attribution": {"source": "agent", "agent_name": "claude-code",
                                                "workspace_id": "w-abc123", "tool": "execute_code"}}},
        {"outputGap": {"reason": "The supervisor restarted"}},
        {"error": {"code": "bad_frame", "message": "not JSON"}},
    ]:
        assert v.is_valid({"kind": "kernel"} | event), event
    assert not v.is_valid({"kind": "kernel", "exited": 0, "executionQueued": "x"})
    assert not v.is_valid({"kind": "kernel", "output": ["stdout"]})
    assert not v.is_valid({"header": header})


def test_mcp_workspace_channel_frames():
    v = _validator("mcp-workspace-channel.json")
    command = {"id": "positron.openDataExplorer", "description": "Open",
               "args": [{"name": "variable", "required": True, "schema": {"type": "string"}}]}
    for frame in [
        {"kind": "hello"},
        {"kind": "hello", "positron_version": "2026.11.0", "commands": [command], "session_ids": ["s"],
         "foreground_session_id": None, "focused": True},
        {"kind": "commands_changed", "commands": []},
        {"kind": "foreground_changed", "session_id": "s"},
        {"kind": "sessions_changed", "session_ids": []},
        {"kind": "focused"},
        {"kind": "command_reply", "id": "r", "ok": False, "reason": "not-found", "message": "no"},
        {"kind": "command_request", "id": "r", "command_id": "c", "args": [], "agent": {"name": "a"},
         "deadline_ms": 45000},
        {"kind": "clients_changed", "clients": [{"id": 1, "name": "a", "connected_at": "2026-01-01T00:00:00Z"}]},
    ]:
        assert v.is_valid(frame), frame
    assert not v.is_valid({"kind": "command_reply", "id": "r"})
    assert not v.is_valid({"kind": "command_reply", "id": "r", "ok": False, "reason": "bored"})


def test_connection_file_and_handshake_payload():
    file_v, handshake_v = _validator("connection-file.json"), _validator("handshake-payload.json")
    tcp = {"port": 54321, "base_path": "http://127.0.0.1:54321", "transport": "tcp",
           "server_path": "/usr/bin/kcgevent", "server_pid": 12345, "bearer_token": "4dea37b8a3b3e09f",
           "log_path": None}
    sock = {"socket_path": "/run/user/1000/kc-1.sock", "transport": "socket", "server_path": "/x",
            "server_pid": 1, "bearer_token": None, "log_path": "/tmp/log"}
    assert file_v.is_valid(tcp) and file_v.is_valid(sock)
    assert not file_v.is_valid({k: v for k, v in tcp.items() if k != "port"})
    assert not file_v.is_valid(sock | {"transport": "named-pipe"})
    assert not handshake_v.is_valid(tcp)
    assert handshake_v.is_valid(tcp | {"server_id": "0b7c6c53-2f0e-4a3b-9a51-6c1b6f2b7d11"})

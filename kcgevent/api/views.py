"""The Kallichore HTTP API as a Flask blueprint.

Each view declares its contract with `@operation` (see contract.py); the
`before_request` hook enforces auth from it, and `load_body` validates bodies
with the generated marshmallow schemas. Views only translate between HTTP
and the Supervisor / KernelSession verbs.
"""
import uuid

from flask import Blueprint, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .. import kernelspecs
from ..errors import ApiError, StartupError
from .auth import CHALLENGE, authorized
from .channels import serve_channel
from .contract import operation
from .openapi import shipped_openapi
from . import validation
from .validation import header_safe

bp = Blueprint("kallichore", __name__)

ERROR = "error"


def supervisor():
    return current_app.extensions["kcgevent"]


@bp.before_request
def check_request():
    """Auth, then the body's size (a body over the limit is refused before it is read)."""
    view = current_app.view_functions.get(request.endpoint)
    op = getattr(view, "operation", None)
    needs_auth = op.auth if op is not None else True
    if needs_auth and not authorized(request.headers.get("Authorization"), supervisor().config.token,
                                     f"{request.method} {request.path}"):
        raise ApiError(401, "401", CHALLENGE)
    limit = request.max_content_length = supervisor().config.max_body_bytes  # (also bounds chunked bodies)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "413", f"The request body ({request.content_length} bytes) exceeds the limit of "
                       f"{limit} bytes")


@bp.after_request
def add_span_id(response):
    response.headers["x-span-id"] = header_safe(request.headers.get("X-Span-ID") or str(uuid.uuid4()))
    if getattr(g, "ignored_fields", None):
        response.headers["warning"] = header_safe(f"Ignoring unknown fields in body: {sorted(g.ignored_fields)}")
    return response


@bp.errorhandler(ApiError)
def api_error(exc):
    response = jsonify(exc.body())
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@bp.errorhandler(HTTPException)
def http_error(exc):
    """Werkzeug's errors (400 bad JSON, 405, 413...) in the API's JSON shape."""
    response = jsonify({"code": str(exc.code), "message": exc.description or exc.name})
    response.status_code = exc.code
    return response


@bp.errorhandler(Exception)
def internal_error(exc):
    current_app.logger.exception("unhandled error in %s %s", request.method, request.path)
    response = jsonify({"code": "500", "message": f"Internal server error: {type(exc).__name__}: {exc}"})
    response.status_code = 500
    return response


@bp.errorhandler(StartupError)
def startup_error(exc):
    response = jsonify(exc.body())
    response.status_code = exc.status
    return response


def load_body(name, required=True, prepare=None):
    """Validate the JSON body against schema `name`; a clear 400 when it doesn't fit.

    `prepare(data)` may complete the raw body first (a NewSession naming a kernelspec).
    marshmallow and the schemas are imported by the first request with a body, not at start."""
    from marshmallow import ValidationError
    from .schemas import SCHEMAS
    schema = SCHEMAS[name]()
    raw = request.get_data(cache=True)  # bounded: a body over max_body_bytes is a 413 before it is read
    if not raw.strip():
        if required:
            raise ApiError(400, "400", f"Missing required body parameter {name}")
        return {}
    try:
        data = validation.parse_json(raw)
    except ApiError as exc:
        raise ApiError(400, "400", f"Couldn't parse body parameter {name}: {exc.message}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "400", f"Couldn't parse body parameter {name}: expected a JSON object")
    try:
        loaded = schema.load(prepare(data) if prepare else data)
    except ValidationError as exc:
        raise ApiError(400, "400", f"Couldn't parse body parameter {name} - doesn't match schema: "
                       f"{_describe(exc.messages)}") from None
    g.ignored_fields = set(data) - set(schema.fields)
    return loaded


def json_body_or_none():
    """The body as JSON if it is usable JSON (load_body reports what is wrong otherwise)."""
    raw = request.get_data(cache=True)
    try:
        return validation.parse_json(raw) if raw.strip() else None
    except ApiError:
        return None


def _describe(messages):
    parts = []
    for field, problem in sorted(messages.items(), key=lambda kv: str(kv[0])):
        if isinstance(problem, dict):
            problem = _describe(problem)
        elif isinstance(problem, list):
            problem = " ".join(str(p) for p in problem)
        parts.append(f"{field}: {problem}")
    return "; ".join(parts)


def null():
    return jsonify(None)


# -- sessions -----------------------------------------------------------------------


@bp.get("/sessions")
@operation("list-sessions", "List the sessions", responses={200: "sessionList", 401: None})
def list_sessions():
    sessions = [s.to_json() for s in supervisor().sessions.values()]
    return jsonify({"total": len(sessions), "sessions": sessions})


@bp.put("/sessions")
@operation("new-session", "Create a session (it is not started)", body="newSession", body_required=True,
           responses={200: "object", 400: ERROR, 401: None})
def new_session():
    kspec = kernelspecs.resolve_for(json_body_or_none())
    spec = kernelspecs.attach(load_body("newSession", prepare=lambda body: kernelspecs.fill_new_session(body, kspec)),
                              kspec)
    validation.check_session_id(spec["session_id"])
    validation.check_working_directory(spec.get("working_directory"))
    if spec.pop("run_in_shell", False) and spec["startup_environment"] == "none":
        spec["startup_environment"] = "shell"  # the 2025 client's way of asking for a shell
    session = supervisor().create(spec)
    return jsonify({"session_id": session.session_id})


@bp.get("/sessions/<session_id>")
@operation("get-session", "Describe one session", responses={200: "activeSession", 400: ERROR, 401: None, 404: ERROR})
def get_session(session_id):
    return jsonify(supervisor().get(session_id).to_json())


@bp.delete("/sessions/<session_id>")
@operation("delete-session", "Forget a session that is not running",
           responses={200: "any", 400: ERROR, 401: None, 404: ERROR})
def delete_session(session_id):
    supervisor().delete(session_id)
    return null()


@bp.post("/sessions/<session_id>/start")
@operation("start-session", "Start the kernel; answers with its kernel_info content",
           responses={200: "object", 400: "startupError", 401: None, 404: ERROR, 409: "startupError",
                      500: "startupError"})
def start_session(session_id):
    return jsonify(supervisor().get(session_id).start())


@bp.post("/sessions/<session_id>/restart")
@operation("restart-session", "Restart the kernel, optionally in a new directory or environment",
           body="restartSession", responses={200: "any", 401: None, 404: ERROR, 409: "startupError",
                                             500: "startupError"})
def restart_session(session_id):
    session = supervisor().get(session_id)
    try:
        options = load_body("restartSession", required=False)
    except ApiError:
        options = {}  # as Kallichore: an unusable restart body means "no options"
    session.restart(options.get("working_directory") or None, options.get("env") or None)
    return null()


@bp.post("/sessions/<session_id>/kill")
@operation("kill-session", "Kill the kernel's whole process tree",
           responses={200: "any", 400: ERROR, 401: None, 404: ERROR})
def kill_session(session_id):
    supervisor().get(session_id).kill()
    return null()


@bp.put("/sessions/<session_id>/adopt")
@operation("adopt-session", "Take over a kernel started elsewhere", body="connectionInfo", body_required=True,
           responses={200: "object", 400: ERROR, 401: None, 404: ERROR, 500: ERROR})
def adopt_session(session_id):
    session = supervisor().get(session_id)
    info = load_body("connectionInfo")
    validation.check_connection_info(info)
    return jsonify(session.adopt(info))


@bp.get("/sessions/<session_id>/connection_info")
@operation("connection-info", "The kernel's ZeroMQ connection info",
           responses={200: "connectionInfo", 401: None, 404: ERROR, 500: ERROR})
def connection_info(session_id):
    return jsonify(supervisor().get(session_id).connection_info())


@bp.post("/sessions/<session_id>/interrupt")
@operation("interrupt-session", "Interrupt the kernel", responses={200: "any", 400: ERROR, 401: None,
                                                                   404: ERROR})
def interrupt_session(session_id):
    supervisor().get(session_id).interrupt()
    return null()


@bp.get("/sessions/<session_id>/channels", websocket=True)  # the upgrade (werkzeug routes it apart)
@bp.get("/sessions/<session_id>/channels")
@operation("channels-upgrade", "Open the session's channel (WebSocket upgrade, or the path of its socket)",
           responses={200: "string", 400: ERROR, 401: None, 404: ERROR})
def channels_upgrade(session_id):
    sup = supervisor()
    session = sup.get(session_id)
    endpoint = sup.channel_endpoint(session)
    if endpoint is not None:
        return jsonify(endpoint)
    return serve_channel(sup, session, request.environ)


# -- server -----------------------------------------------------------------------------


@bp.post("/shutdown")
@operation("shutdown-server", "Shut the server down (kernels first)", responses={200: "any", 400: ERROR,
                                                                                 401: None})
def shutdown_server():
    supervisor().request_shutdown()
    return null()


@bp.get("/status")
@operation("server-status", "Server status (no token needed)", responses={200: "serverStatus", 400: ERROR},
           auth=False)
def server_status():
    return jsonify(supervisor().status())


@bp.post("/client_heartbeat")
@operation("client-heartbeat", "A client says it is alive", body="clientHeartbeat", body_required=True,
           responses={200: "any", 400: ERROR, 401: None})
def client_heartbeat():
    body = load_body("clientHeartbeat")
    validation.check_process_id(body.get("process_id"))
    supervisor().heartbeat(body.get("process_id"))
    return null()


@bp.get("/server_configuration")
@operation("get-server-configuration", "Current server configuration",
           responses={200: "serverConfiguration", 400: ERROR, 401: None})
def get_server_configuration():
    return jsonify(supervisor().get_configuration())


@bp.post("/server_configuration")
@operation("set-server-configuration", "Change parts of the server configuration",
           body="serverConfiguration", body_required=True, responses={200: "any", 400: ERROR, 401: None})
def set_server_configuration():
    supervisor().set_configuration(load_body("serverConfiguration"))
    return null()


@bp.get("/openapi.json")
def openapi():
    prefix = request.path[:-len("/openapi.json")]
    return jsonify(shipped_openapi(prefix))


from . import execute, mcp  # noqa: E402,F401  (their routes join the blueprint)

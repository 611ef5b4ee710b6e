"""`POST /sessions/{id}/execute` and `GET /sessions/{id}/history` (registered on the blueprint)."""
from flask import jsonify

from ..session import execute as execute_mod
from .contract import operation
from .views import ERROR, bp, load_body, supervisor


@bp.post("/sessions/<session_id>/execute")
@operation("execute-code", "Run code through the session's queue and answer with everything it produced",
           body="executeRequest", body_required=True,
           responses={200: "executeReply", 400: ERROR, 401: None, 404: ERROR, 408: ERROR, 409: ERROR})
def execute_code(session_id):
    session = supervisor().get(session_id)
    body = load_body("executeRequest")
    timeout = body.get("timeout_seconds")
    reply = execute_mod.execute(session, body["code"], silent=body["silent"], store_history=body["store_history"],
                                stop_on_error=body["stop_on_error"], timeout=timeout)
    if body["silent"]:
        reply.pop("data", None)
    return jsonify(reply)


@bp.get("/sessions/<session_id>/history")
@operation("get-session-history", "The session's last 100 executions, oldest first",
           responses={200: "executionHistoryEntry[]", 401: None, 404: ERROR})
def session_history(session_id):
    return jsonify(supervisor().get(session_id).history.to_json())

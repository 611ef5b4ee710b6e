"""MCP workspace registration and the workspace channel (registered on the blueprint)."""
from flask import jsonify, request

from ..errors import ApiError
from .channels import AlreadyHandled
from .contract import operation
from .views import ERROR, bp, load_body, supervisor


@bp.post("/mcp/workspaces")
@operation("register-mcp-workspace", "Register a workspace for AI agents (starts the MCP listener)",
           body="mcpWorkspaceRegistration", body_required=True,
           responses={200: "mcpWorkspace", 400: ERROR, 401: None})
def register_workspace():
    described, _created = supervisor().mcp.register(load_body("mcpWorkspaceRegistration"))
    return jsonify(described)


@bp.delete("/mcp/workspaces/<workspace_id>")
@operation("deregister-mcp-workspace", "Forget a workspace and invalidate its token",
           responses={200: "any", 401: None, 404: ERROR})
def deregister_workspace(workspace_id):
    if not supervisor().mcp.deregister(workspace_id):
        raise ApiError(404, "404", f"MCP workspace {workspace_id} not found")
    return jsonify(None)


@bp.get("/mcp/workspaces/<workspace_id>/channel", websocket=True)
@bp.get("/mcp/workspaces/<workspace_id>/channel")
@operation("mcp-workspace-channel", "Open the workspace's channel to a Positron window (WebSocket upgrade)",
           responses={200: "string", 400: ERROR, 401: None, 404: ERROR})
def workspace_channel(workspace_id):
    from ..mcp.channel import serve_workspace_channel
    from ..websocket import HandshakeError, is_upgrade_request
    registry = supervisor().mcp
    workspace = registry.get(workspace_id)
    if workspace is None:
        raise ApiError(404, "404", f"MCP workspace {workspace_id} not found")
    if not is_upgrade_request(request.environ):
        raise ApiError(400, "400", "This endpoint needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    try:
        serve_workspace_channel(registry, workspace, request.environ)
    except HandshakeError as exc:
        raise ApiError(400, "400", str(exc)) from None
    return AlreadyHandled()

"""The workspace channel: a WebSocket from each Positron window of a workspace.

Windows send JSON text frames tagged by `kind` (hello, commands_changed,
foreground_changed, sessions_changed, focused, command_reply); the server
sends command_request and clients_changed. Unknown kinds are ignored both
ways, so older and newer Positrons can talk to us.
"""
import json
import logging

from ..websocket import ConnectionClosed, WebSocket

log = logging.getLogger(__name__)


def serve_workspace_channel(registry, workspace, environ):
    """Accept the upgrade and read the window's frames until the connection ends."""
    ws = WebSocket.accept(environ)
    window = registry.attach(workspace, ws)
    try:
        while not workspace.removed:
            text = ws.receive()
            if text is None:
                continue
            if text == "":
                break
            try:
                frame = json.loads(text)
            except ValueError:
                log.warning("MCP workspace %s: a frame that is not JSON was ignored", workspace.id)
                continue
            if isinstance(frame, dict):
                registry.on_frame(window, frame)
    except ConnectionClosed:
        pass
    finally:
        registry.detach(window)
        ws.shutdown()

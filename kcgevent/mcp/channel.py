"""The workspace channel: a WebSocket from each Positron window of a workspace.

Windows send JSON text frames tagged by `kind` (hello, commands_changed,
foreground_changed, sessions_changed, focused, command_reply); the server
sends command_request and clients_changed. Unknown kinds are ignored both
ways, so older and newer Positrons can talk to us. Pings watch the window
(as on session channels): one that stops answering is detached, so commands
go to a live sibling instead of waiting for a dead one.
"""
import json
import logging

import gevent

from ..websocket import ConnectionClosed, WebSocket

log = logging.getLogger(__name__)


def serve_workspace_channel(registry, workspace, environ):
    """Accept the upgrade and read the window's frames until the connection ends."""
    config = registry.supervisor.config
    ws = WebSocket.accept(environ, max_message_bytes=config.max_message_bytes)
    window = registry.attach(workspace, ws)
    pinger = gevent.spawn(ping_until_silent, ws, config.ping_interval, workspace.id)
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
        pinger.kill(block=False)
        registry.detach(window)
        ws.shutdown()


def ping_until_silent(ws, interval, workspace_id):
    try:
        while True:
            gevent.sleep(interval)
            if not ws.ping():
                log.warning("MCP workspace %s: a window stopped answering pings; detaching it", workspace_id)
                ws.shutdown()  # the reader sees the end and detaches the window
                return
    except ConnectionClosed:
        pass

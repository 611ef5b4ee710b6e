"""Serving a session's channel over a WebSocket.

Used by the blueprint's `/sessions/<id>/channels` view (TCP) and by the
per-session socket listeners (Unix sockets, named pipes), which accept an
upgrade on any path. After the upgrade the connection belongs to the
session's channel; this greenlet just reads client frames until it ends.
"""
import logging
from urllib.parse import parse_qs

from flask import Response

from ..errors import ApiError
from .auth import authorized

log = logging.getLogger(__name__)


class AlreadyHandled(Response):
    """What a view returns once it has taken the socket over: nothing more is written."""

    def __call__(self, environ, start_response):
        if "gunicorn.socket" in environ:
            raise StopIteration  # gunicorn's async workers: the connection is done, write nothing
        return []


def resume_position(environ):
    """`?after=N` (the last `seq` the client processed), or None."""
    values = parse_qs(environ.get("QUERY_STRING", "")).get("after")
    if not values:
        return None
    try:
        after = int(values[0])
    except ValueError:
        raise ApiError(400, "400", "'after' must be the integer seq of the last frame the client processed") from None
    if after < 0:
        raise ApiError(400, "400", "'after' must not be negative")
    return after


def serve_channel(supervisor, session, environ):
    """Upgrade to a WebSocket and relay between the client and `session`."""
    from ..websocket import ConnectionClosed, HandshakeError, WebSocket, is_upgrade_request  # (first use)
    if not is_upgrade_request(environ):
        raise ApiError(400, "400", "This endpoint needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    after = resume_position(environ)
    channel = session.channel
    with channel.arriving():
        try:
            ws = WebSocket.accept(environ, send_timeout=channel.send_timeout,
                                  max_message_bytes=supervisor.config.max_message_bytes)
        except HandshakeError as exc:
            raise ApiError(400, "400", str(exc)) from None
        supervisor.nudge()
        if channel.client is not None and channel.client.ending is None:
            log.info("session %s: a new client takes the channel over from the connected one", session.session_id)
        client = channel.attach(ws, after)
    try:
        # Every complete frame the client sent is delivered, also after a takeover began: the
        # old connection is read until the client answers our Close (or the handover bound).
        while True:
            text = ws.receive()
            if text == "":
                break  # as in Kallichore, an empty text frame ends the connection
            reply = session.handle_client_frame(text)
            if reply is not None:
                try:
                    ws.send(reply)
                except ConnectionClosed:
                    pass  # closing: the reply has nowhere to go, but the next frames are still read
    except ConnectionClosed:
        pass
    finally:
        client.reader_done.set()
        channel.detach(client)
    return AlreadyHandled()


def session_channel_app(supervisor, session_id):
    """A WSGI app serving one session's channel on any path (per-session sockets)."""
    def app(environ, start_response):
        def fail(status, message):
            body = ('{"code":"%s","message":"%s"}' % (status.split()[0], message)).encode()
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

        if not authorized(environ.get("HTTP_AUTHORIZATION"), supervisor.config.token,
                          f"channel upgrade of session {session_id}"):
            return fail("401 Unauthorized", "Missing or invalid bearer token")
        session = supervisor.sessions.get(session_id)
        if session is None:
            return fail("404 Not Found", f"Session {session_id} not found")
        try:
            return serve_channel(supervisor, session, environ)(environ, start_response)
        except ApiError as exc:
            return fail(f"{exc.status} Error", exc.message.replace('"', "'"))

    return app


class SocketEndpoints:
    """Per-session channel listeners (Unix sockets, named pipes) as the Supervisor's `channel_endpoints`."""

    def __init__(self, sockets):
        self.sockets = sockets

    def open(self, supervisor, session):
        path = self.sockets.open(session.session_id, session_channel_app(supervisor, session.session_id))
        session.socket_path = path
        return path

    def close(self, session_id):
        self.sockets.close(session_id)

    def close_all(self):
        self.sockets.close_all()

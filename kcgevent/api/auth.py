"""The one bearer-token check, for HTTP views and channel upgrades alike.

Both the blueprint's `before_request` hook and the per-session socket apps
call `token_matches`; an answer of 401 is logged here, once, at info.
"""
import logging
import secrets

log = logging.getLogger("kcgevent.auth")

CHALLENGE = "Missing or invalid bearer token (send 'Authorization: Bearer <token>')"


def token_matches(header, token):
    """Constant-time comparison of an `Authorization: Bearer` header with the token (None: auth off)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())


def authorized(header, token, what):
    """`token_matches`, logging a refusal of `what` (e.g. "GET /sessions") at info."""
    if token_matches(header, token):
        return True
    log.info("401 %s: %s bearer token", what, "no" if not header else "wrong")
    return False

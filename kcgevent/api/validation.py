"""Checks on request values that the OpenAPI types alone cannot express.

The generated marshmallow schemas check types; these check what a value must
be for the server to use it safely (a session id that can be addressed again,
a pid the OS can hold, an endpoint ZeroMQ can connect to). Each raises an
ApiError 400 with a message that says what is wrong.
"""
import json
import os
import re

from ..errors import ApiError, KsError
from ..session.wire import json_depth_exceeds

# Positron's ids look like "python-1a2b3c4d". Safe in a URL path, a file name and a ZeroMQ identity.
SESSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=~-]*")
SESSION_ID_MAX = 128
PID_MAX = 2**31 - 1  # pid_t
TRANSPORTS = ("tcp", "ipc")
SIGNATURE_SCHEMES = ("hmac-sha256",)
MAX_JSON_DEPTH = 64


def bad(message):
    return ApiError(400, "400", message)


def check_session_id(session_id):
    if not session_id:
        raise bad("session_id must not be empty")
    if len(session_id) > SESSION_ID_MAX:
        raise bad(f"session_id is too long ({len(session_id)} characters; at most {SESSION_ID_MAX})")
    if not SESSION_ID.fullmatch(session_id):
        raise bad("session_id may only contain letters, digits and _ . : @ + = ~ - (and must not start with "
                  f"one of . : @ + = ~ -): got {session_id!r}")


def check_process_id(pid):
    if pid is not None and not 0 <= pid <= PID_MAX:
        raise bad(f"process_id must be a process id between 0 and {PID_MAX} (got {pid})")


def check_connection_info(info):
    """What adopt connects to: a transport ZeroMQ supports, real ports, a scheme we can sign with."""
    if info["transport"] not in TRANSPORTS:
        raise bad(f"transport must be one of {', '.join(TRANSPORTS)} (got {info['transport']!r})")
    if info["signature_scheme"] not in SIGNATURE_SCHEMES:
        raise bad(f"signature_scheme must be one of {', '.join(SIGNATURE_SCHEMES)} "
                  f"(got {info['signature_scheme']!r})")
    if not info["ip"] or any(c in info["ip"] for c in "\0\n") or len(info["ip"]) > 1024:
        raise bad("ip must be an address (tcp) or a path prefix (ipc)")
    low = 1 if info["transport"] == "tcp" else 0
    for name in ("control_port", "shell_port", "stdin_port", "hb_port", "iopub_port"):
        if not low <= info[name] <= 65535:
            raise bad(f"{name} must be between {low} and 65535 (got {info[name]})")


def parse_json(raw):
    """The JSON document in `raw` (bytes), or raise ApiError 400 (not JSON, or nested too deep)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise bad(f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:
        raise bad(f"the body is not valid JSON: {exc}") from None
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise bad(f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return data


MAX_HEADER_CHARS = 1000


def header_safe(text):
    """`text` as an HTTP header value: Latin-1 only (gevent refuses anything else, escaped here), no
    line breaks, at most MAX_HEADER_CHARS long."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= MAX_HEADER_CHARS else text[:MAX_HEADER_CHARS - 3] + "..."


def check_working_directory(path):
    """A session's directory must exist when given ("" means: the server's own)."""
    if path and not os.path.isdir(path):
        raise KsError("SessionCreateFailed", f"working_directory {path!r} does not exist or is not a directory")

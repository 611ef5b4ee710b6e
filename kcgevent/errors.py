"""Errors the API reports, with Kallichore's stable `KS-<n>` codes.

Sessions and the supervisor raise these; the blueprint turns them into
`{code, message, details}` JSON (or a StartupError body) with their HTTP status.
"""

# Kallichore's error variants, in declaration order: the index is the code.
KS_CODES = {
    "SessionExists": 0,
    "SessionNotFound": 1,
    "SessionRunning": 2,
    "SessionNotRunning": 3,
    "ProcessNotFound": 4,
    "ProcessStartFailed": 5,
    "SessionConnectionFailed": 6,
    "SessionConnectionTimeout": 7,
    "ProcessAbnormalExit": 8,
    "SessionCreateFailed": 9,
    "SessionInterruptFailed": 10,
    "ZmqProxyError": 11,
    "NoProcess": 12,
    "RestartFailed": 13,
    "ExitedBeforeConnection": 14,
    "NoKernelInfo": 15,
    "StartFailed": 16,
    "HandshakeFailed": 17,
    "NoConnectionInfo": 18,
    "KernelPathNotFound": 19,
}


class ApiError(Exception):
    """An error with an HTTP status and a `{code, message, details}` body."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self):
        body = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class KsError(ApiError):
    """One of Kallichore's numbered errors."""

    def __init__(self, variant, message, details=None, status=400):
        super().__init__(status, f"KS-{KS_CODES[variant]}", message, details)
        self.variant = variant


OUTPUT_TAIL_CHARS = 64 * 1024  # a StartupError keeps the end of the kernel's output, where the error is


class StartupError(Exception):
    """A failed start/restart: HTTP 500 (409 for a start racing another) with `{exit_code?, output?, error}`."""

    def __init__(self, error, exit_code=None, output=None, status=500):
        super().__init__(error.message)
        self.error = error
        self.exit_code = exit_code
        if output is not None and len(output) > OUTPUT_TAIL_CHARS:
            output = "[... earlier output omitted ...]\n" + output[-OUTPUT_TAIL_CHARS:]
        self.output = output
        self.status = status

    def body(self):
        body = {}
        if self.exit_code is not None:
            body["exit_code"] = self.exit_code
        if self.output is not None:
            body["output"] = self.output
        body["error"] = self.error.body()
        return body


def not_found(session_id):
    return KsError("SessionNotFound", f"Session {session_id} not found", status=404)

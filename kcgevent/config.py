"""Server settings, shared by the CLI, the app factory and the supervisor."""
import os
from dataclasses import dataclass

VERSION = "0.1.64"  # what GET /status reports: the Kallichore release we are compatible with


@dataclass
class ServerConfig:
    """Everything a supervisor needs to know; defaults suit an embedded use."""

    token: str | None = None  # None: auth off
    idle_shutdown_hours: int | None = None  # None: never; 0: 30 seconds
    resource_sample_interval_ms: int = 1000
    log_level: str | None = None
    buffer_limit: int = 100_000  # frames kept per session for clients
    buffer_bytes: int = 64 << 20  # bytes of frames kept per session for clients (the newest frame always)
    shutdown_timeout: float = 5.0  # seconds kernels get to exit before their trees are killed
    ping_interval: float = 10.0
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 5.0
    idle_probe_delay: float = 3.0  # seconds after an execute_reply without its idle before the kernel is asked
    idle_shutdown_seconds: float | None = None  # overrides the hours (tests, embedding)
    mcp_attach_timeout: float = 15.0  # seconds a brokered Positron command waits for a window to attach
    mcp_command_timeout: float = 45.0  # seconds it waits for the window's reply
    max_body_bytes: int = 16 * 1024 * 1024  # a larger HTTP body is refused with 413 before it is read
    max_message_bytes: int = 64 * 1024 * 1024  # a larger channel message closes the WebSocket with 1009
    http_timeout: float = 60.0  # seconds an HTTP connection may sit idle (or half-sent) before it is closed
    access_log: bool = False  # log every HTTP request (standalone server)
    # How kernels we start (connection-file kernels) listen: "ipc" (Unix sockets in our private directory,
    # unreachable for other local users) or "tcp" (127.0.0.1 ports). Windows has no ipc transport.
    kernel_transport: str = "tcp" if os.name == "nt" else "ipc"
    state_dir: str | None = None  # where sessions survive the server (None: they end with it)
    restart_grace: float = 60.0  # seconds kernels wait for a server to come back to the state dir

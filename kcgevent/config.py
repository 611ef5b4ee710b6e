"""Server settings, shared by the CLI, the app factory and the supervisor."""
from dataclasses import dataclass

VERSION = "0.1.64"  # what GET /status reports: the Kallichore release we are compatible with


@dataclass
class ServerConfig:
    """Everything a supervisor needs to know; defaults suit an embedded use."""

    token: str | None = None  # None: auth off
    transport: str = "tcp"
    idle_shutdown_hours: int | None = None  # None: never; 0: 30 seconds
    resource_sample_interval_ms: int = 1000
    log_level: str | None = None
    buffer_limit: int = 100_000  # frames kept per session for clients
    buffer_bytes: int = 64 << 20  # bytes of frames kept per session for clients (the newest frame always)
    shutdown_timeout: float = 5.0  # seconds kernels get to exit before their trees are killed
    socket_dir: str | None = None
    ping_interval: float = 10.0
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 5.0
    idle_shutdown_seconds: float | None = None  # overrides the hours (tests, embedding)
    mcp_attach_timeout: float = 15.0  # seconds a brokered Positron command waits for a window to attach
    mcp_command_timeout: float = 45.0  # seconds it waits for the window's reply
    state_dir: str | None = None  # where sessions survive the server (None: they end with it)
    restart_grace: float = 60.0  # seconds kernels wait for a server to come back to the state dir

"""The Supervisor: the registry of sessions and the server-wide duties.

It is the one object the HTTP blueprint talks to (kept in `app.extensions`),
and it owns what outlives any single session: the ZeroMQ context, the private
directory for kernel connection files, the resource sampler, idle shutdown
and graceful shutdown.
"""
import json
import logging
import os
import hashlib
import re
import shutil
import tempfile
import time
import uuid

import gevent
import psutil
import zmq.green as zmq

from .config import VERSION, ServerConfig
from .errors import ApiError, KsError, not_found
from .mcp.workspaces import Workspaces
from .session import win_interrupt
from .session.resources import ResourceSampler
from .session.session import KernelSession, rfc3339

log = logging.getLogger(__name__)
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}


class Supervisor:
    def __init__(self, config=None):
        self.config = config or ServerConfig()
        self.server_id = str(uuid.uuid4())
        self.started = time.time()
        self._started_mono = time.monotonic()
        self.sessions = {}  # insertion order = creation order
        self.zmq_context = zmq.Context()
        self._kernel_dir = None  # made when the first kernel file is written
        self.session_sockets = None  # set by the server in socket mode: opens per-session listeners
        self.channel_endpoint = None  # callable(session) -> where its channel is, for non-TCP transports
        self.on_shutdown = []  # callables run once the kernels are gone
        self.client_pid = None
        self.last_nudge = time.monotonic()
        self.shutting_down = False
        self._sampler = None
        self._idle_watch = None
        self.mcp = Workspaces(self)  # MCP workspaces and the agents' listener

    # -- registry -------------------------------------------------------------

    def get(self, session_id):
        try:
            return self.sessions[session_id]
        except KeyError:
            raise not_found(session_id) from None

    def create(self, spec):
        session_id = spec["session_id"]
        argv = spec.get("argv") or []
        if argv:
            self._check_kernel_path(argv[0], spec)
        if session_id in self.sessions:
            raise KsError("SessionExists", f"Session {session_id} already exists")
        session = KernelSession(spec, self)
        self.sessions[session_id] = session
        return session

    def _check_kernel_path(self, program, spec):
        """argv[0] must be an executable we can find (on the session's own PATH first)."""
        if os.path.isabs(program) or os.sep in program:
            found = os.path.isfile(program)
        else:
            path = os.environ.get("PATH", "")
            for action in spec.get("env") or []:
                if action.get("name") == "PATH" and action.get("action") == "replace":
                    path = action.get("value", "")
            found = shutil.which(program, path=path) is not None
        if not found:
            raise KsError("KernelPathNotFound", f"Kernel path not found: {program}")

    def delete(self, session_id):
        session = self.get(session_id)
        if session.status not in ("exited", "uninitialized") or session._busy_verb:
            raise KsError("SessionRunning", f"Session {session_id} is running")
        session.terminate()
        self.close_channel_endpoint(session)
        self.remove_kernel_files(session_id)
        del self.sessions[session_id]

    # -- kernel files ---------------------------------------------------------

    @property
    def kernel_dir(self):
        """Our private (0700) directory for kernel connection files."""
        if self._kernel_dir is None:
            self._kernel_dir = tempfile.mkdtemp(prefix="kcgevent-")
        return self._kernel_dir

    def _kernel_file(self, session_id, kind):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
        digest = hashlib.sha256(session_id.encode()).hexdigest()[:10]
        return os.path.join(self.kernel_dir, f"{kind}_{safe}-{digest}.json")

    def write_kernel_file(self, session_id, kind, content):
        """Write a connection/registration file (0600, in our private dir); return its path."""
        path = self._kernel_file(session_id, kind)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
        return path

    def remove_kernel_files(self, session_id):
        if self._kernel_dir is None:
            return
        for kind in ("connection", "registration"):
            try:
                os.unlink(self._kernel_file(session_id, kind))
            except FileNotFoundError:
                pass

    # -- status -----------------------------------------------------------------

    def on_session_status(self, session, status):
        if status in ("idle", "ready", "exited"):
            self.nudge()

    def nudge(self):
        """Something happened: the idle-shutdown clock starts again."""
        self.last_nudge = time.monotonic()

    def status(self):
        now = time.monotonic()
        sessions = list(self.sessions.values())
        busy = [s for s in sessions if s.status == "busy"]
        if not sessions:
            idle_seconds = int(now - self._started_mono)
        elif busy:
            idle_seconds = 0
        else:
            idles = [s.idle_since for s in sessions if s.idle_since is not None]
            idle_seconds = int(now - max(idles)) if idles else 0
        busy_since = [s.busy_since for s in busy if s.busy_since is not None]
        return {
            "sessions": len(sessions),
            "active": sum(1 for s in sessions if s.status not in ("exited", "uninitialized")),
            "busy": bool(busy),
            "idle_seconds": idle_seconds,
            "busy_seconds": int(now - min(busy_since)) if busy_since else 0,
            "uptime_seconds": int(now - self._started_mono),
            "version": VERSION,
            "process_id": os.getpid(),
            "started": rfc3339(self.started),
            "server_id": self.server_id,
            "mcp": self.mcp.status(),
        }

    def heartbeat(self, process_id=None):
        self.nudge()
        if process_id:
            if process_id != self.client_pid:
                log.info("Heartbeat now tracking client: %s", process_id)
            self.client_pid = process_id

    # -- channels ----------------------------------------------------------------

    def close_channel_endpoint(self, session):
        if self.session_sockets is not None:
            self.session_sockets.close(session.session_id)

    # -- signals -------------------------------------------------------------------

    def interrupt_process(self, session):
        if os.name == "nt":
            win_interrupt.interrupt(session.session_id)
        else:
            session.process.interrupt()

    def windows_kernel_env(self, session):
        return win_interrupt.kernel_env(session.session_id)

    # -- configuration ---------------------------------------------------------------

    def get_configuration(self):
        hours = self.config.idle_shutdown_hours
        data = {"idle_shutdown_hours": -1 if hours is None else hours,
                "resource_sample_interval_ms": self.config.resource_sample_interval_ms}
        if self.config.log_level:
            data["log_level"] = self.config.log_level
        return data

    def set_configuration(self, changes):
        """Apply a partial configuration; each field is checked before any is applied."""
        hours = changes.get("idle_shutdown_hours")
        interval = changes.get("resource_sample_interval_ms")
        if hours is not None and hours > 65535:
            raise ApiError(400, "400", "idle_shutdown_hours is too large (at most 65535; -1 disables)")
        if interval is not None and interval < 0:
            raise ApiError(400, "400", "resource_sample_interval_ms must be non-negative (0 turns sampling off)")
        if hours is not None:
            self.config.idle_shutdown_hours = None if hours < 0 else hours
            self.config.idle_shutdown_seconds = None
            self.nudge()
        if interval is not None:
            self.config.resource_sample_interval_ms = 0 if interval == 0 else max(100, interval)
        if changes.get("log_level"):
            self.config.log_level = changes["log_level"]
            logging.getLogger().setLevel(LOG_LEVELS[changes["log_level"]])

    # -- background duties ---------------------------------------------------------

    def start_background(self):
        """Resource sampling and the idle-shutdown watch (call once the server runs)."""
        self._sampler = gevent.spawn(self._run_sampler)
        self._idle_watch = gevent.spawn(self._run_idle_watch)

    def _run_sampler(self):
        sampler = ResourceSampler()
        while True:
            interval = self.config.resource_sample_interval_ms
            if interval <= 0:
                gevent.sleep(0.5)
                continue
            gevent.sleep(interval / 1000)
            targets = {s.session_id: s.process.pid for s in self.sessions.values()
                       if s.channel.connected and s.process is not None and not s.process.exited.is_set()}
            if not targets:
                continue
            sampler.sampling_period_ms = interval
            for session_id, sample in sampler.sample(targets).items():
                session = self.sessions.get(session_id)
                if session is not None:
                    session.record_resource_usage(sample)

    def idle_limit(self):
        """Seconds of idleness before the server shuts itself down, or None."""
        if self.config.idle_shutdown_seconds is not None:
            return self.config.idle_shutdown_seconds
        hours = self.config.idle_shutdown_hours
        if hours is None:
            return None
        return 30.0 if hours == 0 else hours * 3600.0

    def _run_idle_watch(self):
        while not self.shutting_down:
            gevent.sleep(min(1.0, (self.idle_limit() or 1.0) / 4))
            limit = self.idle_limit()
            if limit is None or time.monotonic() - self.last_nudge < limit:
                continue
            if self.client_pid and psutil.pid_exists(self.client_pid):
                continue
            self.client_pid = None
            if any(s.status == "busy" or s.channel.connected for s in self.sessions.values()):
                continue
            log.info("Idle for %.0f seconds; shutting down", limit)
            self.request_shutdown()
            return

    # -- shutdown ----------------------------------------------------------------

    def request_shutdown(self):
        """Shut down in the background (the HTTP answer goes out first)."""
        if not self.shutting_down:
            gevent.spawn_later(0.05, self.shutdown)

    def shutdown(self, timeout=None):
        """Ask every kernel to exit, wait (bounded), then kill what is left."""
        if self.shutting_down:
            return
        self.shutting_down = True
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        sessions = list(self.sessions.values())
        waiting = [s for s in sessions if s.request_shutdown() and s.process is not None]
        deadline = time.monotonic() + timeout
        for session in waiting:
            session.process.exited.wait(max(0.0, deadline - time.monotonic()))
        for session in sessions:
            session.terminate()
        self.mcp.shutdown()
        if self.session_sockets is not None:
            self.session_sockets.close_all()
        for greenlet in (self._sampler, self._idle_watch):
            if greenlet is not None:
                greenlet.kill(block=False)
        if self._kernel_dir is not None:
            shutil.rmtree(self._kernel_dir, ignore_errors=True)
        for callback in self.on_shutdown:
            callback()

"""The Supervisor: the registry of sessions and the server-wide duties.

It is the one object the HTTP blueprint talks to (kept in `app.extensions`),
and it owns what outlives any single session: the ZeroMQ context, the private
directory for kernel connection files, the resource sampler, idle shutdown
and graceful shutdown.

The session machinery (KernelSession, launchers, ZeroMQ, psutil) is imported
when the first session needs it, not at start: a server nobody has asked for
a kernel yet stays small.
"""
import json
import logging
import os
import shutil
import time
import uuid

import gevent

from .config import VERSION, ServerConfig
from .errors import ApiError, KsError, not_found
from .kernel_files import KernelFiles
from .mcp.workspaces import Workspaces
from .session.wire import rfc3339

log = logging.getLogger(__name__)
SAVE_DELAY = 0.1  # seconds a busy/idle change may wait before the session's record is saved
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}
SAMPLER_PAUSE = 0.0002  # seconds: a timer, so the loop polls IO between two kernels' samples


class Supervisor:
    """Given its collaborators at construction:

    - `kernel_files`: where connection files go (KernelFiles);
    - `launchers`: makes (and restores) each kernel's launcher (LauncherFactory or alike);
    - `state`: the state dir (state.StateStore), or None: nothing outlives the server;
    - `channel_endpoints`: per-session channel listeners for non-TCP transports (open(supervisor,
      session) -> path, close(session_id), close_all()), or None: channels are WebSocket upgrades.
    """

    def __init__(self, config=None, *, kernel_files=None, launchers=None, state=None, channel_endpoints=None,
                 server_id=None):
        self.config = config or ServerConfig()
        self.kernel_files = kernel_files or KernelFiles()
        self._launchers = launchers
        self.state = state
        self.channel_endpoints = channel_endpoints
        self.server_id = server_id or str(uuid.uuid4())
        self.started = time.time()
        self._started_mono = time.monotonic()
        self.sessions = {}  # insertion order = creation order
        self._zmq_context = None
        self.on_shutdown = []  # callables run once the kernels are gone
        self.client_pid = None
        self.last_nudge = time.monotonic()
        self.shutting_down = False
        self._sampler = None
        self._resources = None  # the ResourceSampler, made for the first sample
        self._idle_watch = None
        self._checkpoint = None
        self._dirty = set()  # sessions whose record must be saved
        self._save_scheduled = False
        self._save_timer = None
        self.mcp = Workspaces(self)  # MCP workspaces and the agents' listener

    @property
    def launchers(self):
        if self._launchers is None:
            from .session.launcher import LauncherFactory
            self._launchers = LauncherFactory(self.kernel_files.launcher_dir)
        return self._launchers

    @property
    def zmq_context(self):
        """The ZeroMQ context every kernel connection shares, made for the first one."""
        if self._zmq_context is None:
            import zmq.green
            self._zmq_context = zmq.green.Context()
        return self._zmq_context

    # -- registry -------------------------------------------------------------

    def get(self, session_id):
        try:
            return self.sessions[session_id]
        except KeyError:
            raise not_found(session_id) from None

    def create(self, spec):
        session_id = spec["session_id"]
        argv = spec.get("argv") or []
        provisioned = (spec.get("kernelspec") or {}).get("provisioner") is not None
        if argv and not provisioned:  # a provisioner may run argv elsewhere: it judges it
            self._check_kernel_path(argv[0], spec)
        if session_id in self.sessions:
            raise KsError("SessionExists", f"Session {session_id} already exists")
        log_store = None
        if self.state is not None:
            self.state.add_session(session_id)
            log_store = self.state.open_log(session_id, self.config.buffer_limit, self.config.buffer_bytes)
        from .session.session import KernelSession
        session = KernelSession(spec, self, log=log_store)
        self.sessions[session_id] = session
        self.session_changed(session)
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
        self.kernel_files.remove_launcher_dir(session_id)
        del self.sessions[session_id]
        self._dirty.discard(session)
        if self.state is not None:
            session.channel.log.destroy()
            self.state.remove_session(session_id)

    # -- kernel files ---------------------------------------------------------

    def write_kernel_file(self, session_id, kind, content):
        """Write a connection/registration file (0600, in our private dir); return its path."""
        return self.kernel_files.write(session_id, kind, content)

    def remove_kernel_files(self, session_id):
        self.kernel_files.remove(session_id)

    # -- the state dir -------------------------------------------------------

    def session_changed(self, session, soon=False):
        """`session`'s record must be saved: at the end of this hub turn, or with `soon` within
        SAVE_DELAY (however many changes meanwhile)."""
        if self.state is None or self.shutting_down:
            return
        self._dirty.add(session)
        if soon:
            if self._save_timer is None:
                self._save_timer = gevent.spawn_later(SAVE_DELAY, self._save_dirty)
        elif not self._save_scheduled:
            self._save_scheduled = True
            gevent.get_hub().loop.run_callback(self._save_dirty)

    def _save_dirty(self):
        self._save_scheduled = False
        if self._save_timer is not None and self._save_timer is not gevent.getcurrent():
            self._save_timer.kill(block=False)
        self._save_timer = None
        dirty, self._dirty = self._dirty, set()
        for session in dirty:
            if self.sessions.get(session.session_id) is session and not self.shutting_down:
                try:
                    self.state.save_session(session.session_id, session.to_record())
                except OSError as exc:
                    log.error("State dir: cannot save session %s: %s", session.session_id, exc)

    def _run_checkpoint(self):
        """Save what moves without a status change (client cursors, output offsets) every second."""
        saved = {}
        while not self.shutting_down:
            gevent.sleep(1.0)
            for session in list(self.sessions.values()):
                mark = session.progress_mark()
                if saved.get(session.session_id) != mark:
                    saved[session.session_id] = mark
                    self.session_changed(session)

    def restore(self):
        """Bring back every session saved in the state dir; returns {session_id: problem} for those
        that could not be restored whole (they are listed anyway, mostly `exited`)."""
        from .session.session import KernelSession
        problems = {}
        for saved in self.state.load_sessions():
            spec = (saved.record or {}).get("spec") or {"session_id": saved.session_id}
            spec = {**spec, "session_id": saved.session_id}
            try:
                log_store = self.state.open_log(saved.session_id, self.config.buffer_limit, self.config.buffer_bytes)
            except OSError as exc:
                log_store = None
                problems[saved.session_id] = f"its output log is unusable ({exc})"
            session = KernelSession(spec, self, log=log_store)
            self.sessions[saved.session_id] = session
            if saved.record is None:
                session.set_status("exited", f"not restored: {saved.problem}")  # (a client sees why)
                problems[saved.session_id] = saved.problem
            else:
                problem = session.restore(saved.record)
                if problem:
                    problems[saved.session_id] = problem
            if not session.running:
                self._end_unknown_kernel(saved)  # e.g. one the dead server was still starting
            self.session_changed(session)
        for session_id, problem in problems.items():
            log.warning("State dir: session %s: %s", session_id, problem)
        log.info("Restored %d session(s) from %s", len(self.sessions), self.state.path)
        return problems

    def _end_unknown_kernel(self, saved):
        """A session whose record is lost may still have a kernel: end it (its guardian says where)."""
        import psutil
        try:
            with open(os.path.join(self.state.launcher_dir(saved.session_id), "status.json")) as f:
                pid = json.load(f).get("guardian_pid")
            proc = psutil.Process(pid)
            if any(self.state.launcher_dir(saved.session_id) in part for part in proc.cmdline()):
                victims = proc.children(recursive=True) + [proc]
                for victim in victims:
                    victim.kill()
                psutil.wait_procs(victims, timeout=5)
        except (OSError, ValueError, TypeError, AttributeError, psutil.Error):
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

    def channel_endpoint(self, session):
        """Where `session`'s channel listens (non-TCP transports), or None: a WebSocket upgrade here."""
        if self.channel_endpoints is None:
            return None
        return self.channel_endpoints.open(self, session)

    def close_channel_endpoint(self, session):
        if self.channel_endpoints is not None:
            self.channel_endpoints.close(session.session_id)

    # -- signals -------------------------------------------------------------------

    def interrupt_process(self, session):
        if os.name == "nt":
            from .session import win_interrupt
            win_interrupt.interrupt(session.session_id)
        else:
            session.launcher.interrupt()

    def windows_kernel_env(self, session):
        from .session import win_interrupt
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
        """Resource sampling and the idle-shutdown watch (call once the server runs; idempotent)."""
        if self._sampler is not None:
            return
        self._sampler = gevent.spawn(self._run_sampler)
        self._idle_watch = gevent.spawn(self._run_idle_watch)
        if self.state is not None:
            self._checkpoint = gevent.spawn(self._run_checkpoint)

    def _run_sampler(self):
        while True:
            interval = self.config.resource_sample_interval_ms
            if interval <= 0:
                gevent.sleep(0.5)
                continue
            due = time.monotonic() + interval / 1000
            while time.monotonic() < due and self.config.resource_sample_interval_ms == interval:
                gevent.sleep(min(0.5, due - time.monotonic()))  # (a new interval takes effect at once)
            if self.config.resource_sample_interval_ms != interval:
                continue
            try:  # one bad sample must not end sampling for good
                self._sample_once(interval)
            except Exception:
                log.exception("resource sampling failed; trying again next interval")

    def _sample_once(self, interval):
        targets = {s.session_id: s.launcher.pid for s in self.sessions.values()
                   if s.channel.connected and s.launcher is not None and s.launcher.pid is not None}
        if not targets:
            return
        if self._resources is None:
            from .session.resources import ResourceSampler
            self._resources = ResourceSampler()
        self._resources.sampling_period_ms = interval
        for session_id, sample in self._resources.sample(targets, between=_let_io_run).items():
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
            try:  # one bad value (a client pid, a session) must not end the watch for good
                if self._idle_too_long():
                    self.request_shutdown()
                    return
            except Exception:
                log.exception("idle-shutdown check failed; checking again shortly")

    def _idle_too_long(self):
        limit = self.idle_limit()
        if limit is None or time.monotonic() - self.last_nudge < limit:
            return False
        if self.client_pid:
            import psutil
            if psutil.pid_exists(self.client_pid):
                return False
        self.client_pid = None
        if any(s.status == "busy" or s.channel.connected for s in self.sessions.values()):
            return False
        log.info("Idle for %.0f seconds; shutting down", limit)
        return True

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
        waiting = [s for s in sessions if s.request_shutdown() and s.launcher is not None]
        deadline = time.monotonic() + timeout
        for session in waiting:
            session.launcher.wait(max(0.0, deadline - time.monotonic()))
        for session in sessions:
            session.terminate()
        self.mcp.shutdown()
        if self.channel_endpoints is not None:
            self.channel_endpoints.close_all()
        for greenlet in (self._sampler, self._idle_watch, self._checkpoint):
            if greenlet is not None:
                greenlet.kill(block=False)
        close = getattr(self._launchers, "close", None)
        if close is not None:
            close()
        self.kernel_files.remove_all()
        if self.state is not None:
            for session in sessions:
                if session.channel.log is not None and hasattr(session.channel.log, "destroy"):
                    session.channel.log.destroy()
            self.state.clear_sessions()
        for callback in self.on_shutdown:
            callback()


def _let_io_run():
    """Yield to the loop between two kernels' samples, IO included. (Not gevent.sleep(0): a callback
    queued while the hub runs callbacks runs in the same pass, before any IO is polled, for up to
    the 5 ms switch interval, so a pass over 100 kernels held every session up for tens of ms.)"""
    gevent.sleep(SAMPLER_PAUSE)

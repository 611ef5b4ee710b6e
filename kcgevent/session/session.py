"""KernelSession: one kernel's lifecycle, and the relay between it and its client.

Verbs (start, restart, interrupt, kill, adopt) are called from HTTP request
greenlets; kernel messages arrive on the connection's pump greenlet; client
frames on the client's reader greenlet. All of them share this object, and
since greenlets only switch at I/O, each handler runs to its next I/O
without interference.
"""
import logging
import os
import secrets
import socket
import time

import gevent

from ..errors import KsError, StartupError
from ..limits import OUT_OF_RESOURCES
from . import process as proc_mod
from . import events, ipc, wire
from .channel import Channel
from . import execute as execute_mod
from .execution_queue import ExecutionQueue
from .handshake import HandshakeFailed, NoHandshake, Registration, SilentKernelProbe, wants_handshake
from .iopub_capture import CaptureMerge
from .history import RECENT_ENTRIES, ExecutionHistory
from .idle_probe import IdleProbe
from .kernel import KernelConnectError, KernelConnection
from .launcher import LaunchError, LaunchRequest

log = logging.getLogger(__name__)

CONNECTION_FILE = "{connection_file}"  # replaced in argv by the path of the connection (or registration) file
LOGGED_OUTPUT_CHARS = 2000  # of a failed start's output, in the server log
RUNNING = ("starting", "ready", "idle", "busy", "offline")


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1 (bound, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class KernelSession:
    """A session as created by `PUT /sessions`, and the kernel it runs."""

    def __init__(self, spec, supervisor, log=None):
        self.spec = spec
        self.session_id = spec["session_id"]
        self.supervisor = supervisor
        config = supervisor.config
        self.key = secrets.token_hex(16)
        self.env_actions = list(spec.get("env") or [])
        self.working_directory = spec.get("working_directory", "")
        self.input_prompt = spec.get("input_prompt", "")
        self.continuation_prompt = spec.get("continuation_prompt", "")
        self.protocol_version = spec.get("protocol_version") or "5.3"
        self.created = time.time()
        self.status = "uninitialized"
        self.status_reason = None
        self.idle_since = time.monotonic()
        self.busy_since = None
        self.kernel_info = {}
        self.initial_env = {}
        self.connection_info_ = None
        self.launcher = None  # the KernelLauncher of the current (or last) kernel instance
        self.connection = None
        self.resource_usage = None
        self.channel = Channel(self.session_id, config.buffer_limit, config.ping_interval, config.buffer_bytes,
                               log=log)
        self.channel.on_connect_change = self._on_connect_change
        self.queue = ExecutionQueue()
        self.history = ExecutionHistory()
        self.collectors = {}  # msg_id -> execute.Collector of callers waiting for a result
        self.idle_probe = IdleProbe(self, config.idle_probe_delay)  # when the kernel's idle is lost
        self.socket_path = None
        self._busy_verb = None  # "start" / "restart" while one is under way
        self._held = []  # client messages that arrived while a start was under way
        self._exit_token = None
        self._known_cwd = None  # realpath of working_directory, as last compared

    # -- status -------------------------------------------------------------

    def set_status(self, status, reason=None):
        if status == self.status:
            return
        self.status = status
        self.status_reason = reason
        now = time.monotonic()
        self.idle_since = now if status in ("idle", "ready", "exited", "uninitialized") else None
        self.busy_since = now if status == "busy" else None
        if status != "busy":
            self.idle_probe.not_busy()
        if status == "exited":
            self.queue.clear()
        self.channel.publish(events.status(status, reason))
        self.supervisor.on_session_status(self, status)
        # busy/idle change with every execute: saved within SAVE_DELAY rather than at once
        self.supervisor.session_changed(self, soon=status in ("busy", "idle"))

    @property
    def running(self):
        return self.status in RUNNING

    def _on_connect_change(self, connected):
        log.info("session %s: client %s", self.session_id, "connected" if connected else "disconnected")
        self.supervisor.nudge()

    # -- start ----------------------------------------------------------------

    def start(self):
        """Spawn the kernel and return its kernel_info reply content."""
        if self._busy_verb or self.running:
            raise StartupError(KsError("StartFailed", f"Failed to start kernel: session {self.session_id} is "
                                       f"already {self._busy_verb + 'ing' if self._busy_verb else self.status}",
                                       status=409), status=409)
        self._busy_verb = "start"
        try:
            return self._start()
        except StartupError as exc:
            log.info("session %s: start failed: %s%s", self.session_id, exc.error.message,
                     f"; output (end):\n{exc.output[-LOGGED_OUTPUT_CHARS:]}" if exc.output else "")
            raise
        except Exception as exc:  # anything unforeseen (fd limit, ZeroMQ...): clean up, answer a KS error
            raise self._unexpected_failure("StartFailed", "Failed to start kernel", exc) from None
        finally:
            self._end_verb()

    def _unexpected_failure(self, variant, prefix, exc):
        """Kill what a failed start spawned, mark the session exited; the StartupError to answer."""
        if getattr(exc, "errno", None) in OUT_OF_RESOURCES:  # (OSError, ZMQError) the machine's limit: no bug
            log.error("session %s: %s: %s", self.session_id, prefix.lower(), exc)
        else:
            log.exception("session %s: %s", self.session_id, prefix.lower())
        launcher, connection, self.connection = self.launcher, self.connection, None
        output = code = None
        if connection is not None:
            connection.close()
        if launcher is not None:
            try:
                launcher.kill()
                launcher.wait(5)
                output, code = launcher.startup_output(), launcher.poll()
            except Exception:
                log.exception("session %s: could not end the kernel of a failed start", self.session_id)
        self.supervisor.remove_kernel_files(self.session_id)
        self.set_status("exited", "start failed")
        return StartupError(KsError(variant, f"{prefix}: {type(exc).__name__}: {exc}", status=500),
                            exit_code=code, output=output)

    def _end_verb(self):
        """A start/restart/adopt is over; messages held for it go nowhere if it failed."""
        self._busy_verb = None
        if self.connection is None:
            for msg in self._held:
                self.channel.publish(events.error("kernel_not_running", f"Message {msg.msg_id} ({msg.msg_type}) "
                                                  "was not delivered: the kernel did not start"))
            self._held = []

    def _start(self, handshake=True):
        argv = list(self.spec.get("argv") or [])
        if not argv:  # a session made to adopt a kernel into: nothing to start (a client error)
            raise StartupError(KsError("ProcessStartFailed", "Failed to start process for session: "
                                       "No arguments provided (argv is empty: this session can only adopt a "
                                       "kernel)", status=400), status=400)
        provisioned = (self.spec.get("kernelspec") or {}).get("provisioner") is not None
        if not provisioned and not any(CONNECTION_FILE in arg for arg in argv):  # it could never find its ports
            raise StartupError(KsError("ProcessStartFailed", "Failed to start process for session: argv has no "
                                       f"{CONNECTION_FILE} placeholder, so the kernel cannot be told where to "
                                       "connect", status=400), status=400)
        self.set_status("starting", "start API called")
        registration = None
        if provisioned:  # the provisioner writes (and keeps across restarts) its own connection file
            self.connection_info_ = None
            conn_file = self.supervisor.kernel_files.path(self.session_id, "provisioned")
        elif handshake and wants_handshake(self.protocol_version):
            registration = Registration(self.supervisor.zmq_context, self.key)
            conn_file = self.supervisor.write_kernel_file(self.session_id, "registration",
                                                          registration.file_content())
        else:
            self.connection_info_ = self._new_connection_info(self.supervisor.config.kernel_transport)
            conn_file = self.supervisor.write_kernel_file(self.session_id, "connection", self.connection_info_)
        try:
            launcher = self._launch(proc_mod.substitute_argv(argv, conn_file), conn_file)
        except BaseException:
            if registration is not None:
                registration.socket.close(0)
            raise
        self.launcher = launcher
        try:
            return self._connect_started(launcher, registration, conn_file)
        except NoHandshake as exc:
            log.warning("session %s: %s; starting it again with a connection file", self.session_id, exc)
            self._exit_token = None  # this exit is ours, not news for the client
            launcher.kill()
            launcher.wait(5)
            launcher.cleanup()
            return self._start(handshake=False)

    def _launch(self, argv, conn_file):
        """Start the kernel through a new launcher (StartupError if it cannot be started)."""
        env = proc_mod.resolve_env(self.env_actions)
        if os.name == "nt":
            env.update(self.supervisor.windows_kernel_env(self))
        env.update(self.supervisor.mcp.kernel_env(self))
        self.initial_env = env
        token = self._exit_token = object()
        launcher = self.supervisor.launchers.new(self, self._on_output, lambda code: self._on_exit(token, code))
        request = LaunchRequest(argv, env, self.working_directory, conn_file, self.connection_info_,
                                self.spec.get("startup_environment", "none"),
                                self.spec.get("startup_environment_arg"), self.session_id)
        try:
            launcher.start(request)
        except LaunchError as exc:
            self.set_status("exited", exc.reason)
            raise StartupError(KsError("ProcessStartFailed", exc.message, status=500), exit_code=exc.errno) from None
        log.info("session %s: started kernel pid %s: %s", self.session_id, launcher.pid, argv)
        if launcher.connection_info is not None:
            self.connection_info_ = dict(launcher.connection_info)
        return launcher

    def _new_connection_info(self, transport="tcp"):
        """Fresh endpoints: TCP ports on 127.0.0.1, or (transport "ipc") sockets in our private 0700
        directory, which no other local user can reach (a TCP port is open to all of them)."""
        if transport == "ipc":
            prefix = ipc.endpoint_prefix(self.supervisor.kernel_files.directory, self.session_id)
            if prefix is not None:
                ipc.remove_endpoints(prefix)  # (a killed kernel's files: not to be mistaken for the new one's)
                return {"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, "iopub_port": 5,
                        "signature_scheme": "hmac-sha256", "key": self.key, "transport": "ipc", "ip": prefix}
        ports = free_ports(5)
        return {"control_port": ports[0], "shell_port": ports[1], "stdin_port": ports[2], "hb_port": ports[3],
                "iopub_port": ports[4], "signature_scheme": "hmac-sha256", "key": self.key,
                "transport": "tcp", "ip": "127.0.0.1"}

    def _connect_started(self, launcher, registration, conn_file):
        """Handshake (JEP 66), connect and kernel_info; on failure kill what we spawned.

        A kernel told to register that does not is noticed by SilentKernelProbe: its ports are
        used if it wrote them into the file, else NoHandshake goes up to _start."""
        timeout = float(self.spec.get("connection_timeout") or 30)

        def exited():
            return ("The kernel exited before a connection could be established"
                    if launcher.poll() is not None else None)

        phase = "handshake" if registration else "connect"
        try:
            if registration is not None:
                probe = SilentKernelProbe(conn_file, launcher.pid)
                ports = registration.wait(timeout, exited, probe)
                self.connection_info_ = {**ports, "signature_scheme": "hmac-sha256", "key": self.key,
                                         "transport": "tcp", "ip": "127.0.0.1"}
                if not probe.found_in_file:  # only a real registration is a completed handshake
                    self.channel.publish(events.handshake_completed(self.session_id, self.connection_info_))
                phase = "connect"
            info = self.connection_info_
            if info is not None and info.get("transport") == "ipc" and not info.get("ipc_separator"):
                # which file name did the kernel bind? (it binds at once; see session/ipc.py)
                sep = ipc.wait_for_socket(info["ip"], info["iopub_port"], timeout, exited)
                ipc.restrict(info["ip"], sep)
                if sep != "-":
                    self.connection_info_ = info = dict(info, ipc_separator=sep)
            reply = self._connect(info, timeout, exited)
            if info is not None and info.get("transport") == "ipc":  # the sockets bound after iopub's too
                ipc.restrict(info["ip"], info.get("ipc_separator", "-"))
            return reply
        except (HandshakeFailed, KernelConnectError, ipc.SocketWaitFailed) as exc:
            raise self._startup_failure(launcher, phase, exc) from None

    def _startup_failure(self, launcher, phase, exc):
        launcher.kill()
        launcher.wait(5)
        output = launcher.startup_output()
        if exc.kind == "aborted":
            code = launcher.poll()
            if phase == "handshake":
                error = KsError("ExitedBeforeConnection", str(exc), details=launcher.describe_failure("exit"))
            else:
                error = KsError("ProcessAbnormalExit", f"The launcher exited abnormally (exit status: {code})",
                                details=launcher.describe_failure("exit"))
            return StartupError(error, exit_code=code, output=output)
        if phase == "handshake":
            error = KsError("HandshakeFailed", f"JEP 66 handshake failed for session {self.session_id}: {exc}",
                            details=launcher.describe_failure("connect"))
        elif exc.kind == "timeout":
            error = KsError("SessionConnectionTimeout", str(exc), details=launcher.describe_failure("connect"))
        else:
            error = KsError("SessionConnectionFailed", f"Failed to connect to session's ZeroMQ sockets: {exc}",
                            details=launcher.describe_failure("connect"))
        return StartupError(error, exit_code=launcher.poll(), output=output)

    def _connect(self, info, timeout, should_abort):
        """Connect ZeroMQ, wait for kernel_info with a live iopub, then start relaying."""
        conn = KernelConnection(self.supervisor.zmq_context, info, self.session_id,
                                self.spec.get("username", ""), self.protocol_version)
        early = []
        try:
            conn.connect()
            reply = conn.kernel_info(timeout, should_abort, lambda msg, raw: early.append((msg, raw)))
        except BaseException:
            conn.close()
            raise
        self.connection = conn
        if self.launcher is not None:
            self.launcher.kernel_connected(info)
        self.kernel_info = reply or {}
        self._adopt_prompts(self.kernel_info)
        for msg, raw in early:
            self._on_kernel_message(msg, raw)
        conn.start_pump(self._on_kernel_message, self.channel.flush_now)
        config = self.supervisor.config
        conn.start_heartbeat(self._on_heartbeat, config.heartbeat_interval, config.heartbeat_timeout)
        self.set_status("idle", "kernel_info_reply")
        self.supervisor.session_changed(self)
        self._flush_held()
        return self.kernel_info

    def _adopt_prompts(self, info):
        positron = (info.get("language_info") or {}).get("positron") or {}
        self.input_prompt = positron.get("input_prompt", self.input_prompt)
        self.continuation_prompt = positron.get("continuation_prompt", self.continuation_prompt)

    # -- process events -------------------------------------------------------------

    def _on_output(self, stream, line):
        self.channel.publish(events.output(stream, line))

    def _on_exit(self, token, code):
        """The kernel process exited (called once per process, after its output)."""
        if token is not self._exit_token:
            return  # an earlier kernel of this session
        # All bookkeeping before the first yield: a restart waiting for this exit
        # must find the old kernel fully retired before it writes the new one's files.
        connection, self.connection = self.connection, None
        execute_mod.abandon_all(self, f"the kernel exited with code {code}")
        log.info("session %s: kernel exited with code %s", self.session_id, code)
        self.set_status("exited", "child process exited")
        self.channel.publish(events.exited(code))
        self.supervisor.remove_kernel_files(self.session_id)
        self._remove_ipc_endpoints()
        if connection is not None:
            connection.close()

    def _remove_ipc_endpoints(self):
        """The socket files of a kernel of ours that exited (it may have been killed)."""
        info = self.connection_info_ or {}
        if info.get("transport") == "ipc" and os.path.dirname(info.get("ip", "")) == \
                self.supervisor.kernel_files.directory:
            ipc.remove_endpoints(info["ip"])

    def _on_heartbeat(self, alive):
        if not alive and self.status != "exited":
            self.set_status("offline", "lost heartbeat")
        elif alive and self.status == "offline":
            self.set_status("idle", "heartbeat detected after offline")

    # -- the relay ------------------------------------------------------------------

    def _on_kernel_message(self, msg, header_raw):
        if self.collectors or self.history.open:
            execute_mod.observe(self, msg)
        if msg.channel == "iopub" and msg.msg_type == "status":
            state = msg.content.get("execution_state")
            if state == "idle":
                parent_type = msg.parent_msg_type
                self.went_idle(msg.parent_msg_id, parent_type, parent_type == "execute_request",
                               msg.envelope(header_raw))
                return
            if state == "busy":
                self.set_status(state, msg.parent_msg_type)
            self.channel.publish(msg.envelope(header_raw))
            return
        self.channel.publish(msg.envelope(header_raw))
        if msg.msg_type == "execute_reply":
            self.idle_probe.reply_arrived(msg.parent_msg_id)
            if msg.content.get("status") == "ok":
                # (After an error the next waits for the idle: ipykernel, stop_on_error, aborts what
                # reaches it before it has finished with the failed request, which the idle tells.)
                self._release_next(msg.parent_msg_id)

    def went_idle(self, msg_id, reason, after_execute, envelope=None):
        """The kernel is idle after request `msg_id`: its iopub idle (`envelope`, relayed here), or the
        idle probe's answer in place of a lost one. In this order: the status, the working directory
        after an execute (one readlink; clients see it before the idle), the idle, the next request."""
        self.set_status("idle", reason)
        if after_execute:
            self._check_working_directory()
        if envelope is not None:
            self.channel.publish(envelope)
        self._release_next(msg_id)  # (after an error reply the queue waits for the idle)

    def _release_next(self, finished_msg_id):
        nxt = self.queue.finished(finished_msg_id)
        if nxt is not None:
            self._send(nxt)

    def handle_client_frame(self, text):
        """One frame from the client; returns an error frame for the client, or None."""
        try:
            msg = wire.parse_client_frame(text)
        except wire.WireError as exc:
            return events.error("invalid_message", str(exc))
        if self.connection is None:
            if self._busy_verb:
                self._held.append(msg)  # delivered once the kernel is connected
                return None
            return events.error("kernel_not_running", f"Message {msg.msg_id} ({msg.msg_type}) was not "
                                f"delivered: the kernel is {self.status}")
        try:
            self._deliver(msg)
        except Exception as exc:  # one message we cannot send must not end the client's connection
            log.exception("session %s: could not deliver %s %s", self.session_id, msg.msg_type, msg.msg_id)
            return events.error("delivery_failed", f"Message {msg.msg_id} ({msg.msg_type}) was not delivered: "
                                f"{type(exc).__name__}: {exc}")
        return None

    def _deliver(self, msg):
        """Send a client message, through the execution queue when it is code."""
        if msg.msg_type == "execute_request" and isinstance(msg.content.get("code"), str):
            if not self.queue.submit(msg):
                self.channel.publish(events.execution_queued(msg.msg_id))
                return
        elif msg.msg_type in ("interrupt_request", "shutdown_request"):
            self.queue.clear_pending()
        self._send(msg)

    def _send(self, msg):
        conn = self.connection
        if conn is None:
            return
        if msg.msg_type == "execute_request":
            self.history.started(msg.msg_id, msg.content, msg.metadata)
        conn.send(msg.channel, msg.msg_type, msg.content, msg_id=msg.msg_id, parent=msg.parent_header,
                  metadata=msg.metadata, buffers=msg.buffers)

    def _flush_held(self):
        held, self._held = self._held, []
        for msg in held:
            self._deliver(msg)

    def _check_working_directory(self):
        """Emit workingDirChanged when the kernel's cwd moved (after an execute)."""
        cwd = self.launcher.cwd() if self.launcher is not None else None
        if not cwd:
            return
        if self._known_cwd is None:
            self._known_cwd = os.path.realpath(self.working_directory) if self.working_directory else ""
        if cwd != self._known_cwd:
            self._known_cwd = self.working_directory = cwd
            self.channel.publish(events.working_dir_changed(cwd))
            self.supervisor.session_changed(self)

    # -- verbs ----------------------------------------------------------------------

    def interrupt(self):
        log.info("session %s: interrupt (%s)", self.session_id, self.spec.get("interrupt_mode", "message"))
        if self.spec.get("interrupt_mode", "message") == "signal":
            if self.launcher is None or self.launcher.poll() is not None:
                raise KsError("SessionInterruptFailed",
                              f"Failed to interrupt session {self.session_id}: No process ID to interrupt")
            self.supervisor.interrupt_process(self)
        else:
            if self.connection is None:
                raise KsError("SessionInterruptFailed",
                              f"Failed to interrupt session {self.session_id}: the kernel is {self.status}")
            self.connection.send("control", "interrupt_request", {})
        self.queue.clear_pending()

    def kill(self):
        if not self.running:
            raise KsError("SessionNotRunning", f"Session {self.session_id} is not running")
        self.queue.clear()
        launcher = self.launcher
        if launcher is None or launcher.poll() is not None:
            raise KsError("NoProcess", f"There is no process associated with session {self.session_id} "
                          "(has it exited?)")
        pid = launcher.pid
        log.info("session %s: killing kernel pid %s and its process tree", self.session_id, pid)
        if not launcher.kill() and launcher.wait(5) is None:
            raise KsError("ProcessNotFound", f"Can't find process {pid} for session {self.session_id}",
                          details="the process did not exit after SIGKILL")

    def restart(self, working_directory=None, env=None):
        if self._busy_verb:
            raise StartupError(KsError("RestartFailed", "Failed to restart kernel: Kernel is already "
                                       f"{self._busy_verb}ing", status=409), status=409)
        self._busy_verb = "restart"
        log.info("session %s: restarting", self.session_id)
        try:
            self._choose_working_directory(working_directory)
            if env:
                self.env_actions = list(env)
            self._stop_for_restart()
            self._start()
        except StartupError as exc:
            log.info("session %s: restart failed: %s", self.session_id, exc.error.message)
            raise
        except Exception as exc:
            raise self._unexpected_failure("RestartFailed", "Failed to restart kernel", exc) from None
        finally:
            self._end_verb()

    def _choose_working_directory(self, requested):
        self._known_cwd = None
        if requested:
            path = os.path.realpath(os.path.expanduser(requested))
            if os.path.isdir(path):
                self.working_directory = path
                return
            log.warning("session %s: restart directory %r is not a directory; ignored", self.session_id, requested)
        if self.launcher is not None and self.launcher.poll() is None:
            cwd = self.launcher.cwd()
            if cwd and cwd != self.working_directory:
                self.working_directory = cwd
                self.channel.publish(events.working_dir_changed(cwd))

    def _stop_for_restart(self):
        """Ask the kernel to shut down for a restart; kill it if it won't."""
        self.queue.clear()
        launcher = self.launcher
        if launcher is not None and launcher.poll() is None:
            launcher.shutdown_requested(restart=True)
            if self.connection is not None:
                self.connection.send("control", "shutdown_request", {"restart": True})
            if launcher.wait(self.supervisor.config.shutdown_timeout) is None:
                launcher.kill()
                launcher.wait(5)
        elif self.connection is not None:  # an adopted kernel: we can only let go of it
            self.connection.close()
            self.connection = None

    def request_shutdown(self):
        """Ask a running kernel to exit (server shutdown); True if one was asked."""
        if self.connection is not None:
            if self.launcher is not None and self.launcher.poll() is None:
                self.launcher.shutdown_requested(restart=False)
            try:
                self.connection.send("control", "shutdown_request", {"restart": False})
            except Exception:  # the socket may already be gone
                log.debug("session %s: shutdown_request not sent", self.session_id, exc_info=True)
            return True
        return False

    def terminate(self):
        """Make sure nothing of this session outlives the server."""
        if self.launcher is not None:
            if self.launcher.poll() is None:
                self.launcher.kill()
            self.launcher.cleanup()
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.channel.close()

    def adopt(self, info):
        """Take over a kernel someone else started (signing with *its* key)."""
        if self.running or self._busy_verb:
            raise KsError("SessionRunning", f"Session {self.session_id} is running")
        self._busy_verb = "adopt"
        timeout = float(self.spec.get("connection_timeout") or 30)
        self.set_status("starting", "adopt API called")
        self.launcher = None  # (a kernel we did not start: no launcher)
        try:
            reply = self._connect(dict(info), timeout, lambda: None)
        except KernelConnectError as exc:
            self.set_status("exited", "adopt failed")
            variant = "SessionConnectionTimeout" if exc.kind == "timeout" else "SessionConnectionFailed"
            message = str(exc) if exc.kind == "timeout" else f"Failed to connect to session's ZeroMQ sockets: {exc}"
            raise KsError(variant, message, status=500) from None
        finally:
            self._end_verb()
        self.connection_info_ = dict(info)
        self.launcher = None
        return reply

    def connection_info(self):
        if self.connection_info_ is None:
            self.connection_info_ = self._new_connection_info()
        return {k: v for k, v in self.connection_info_.items() if k != "ipc_separator"}  # (ours, internal)

    def record_resource_usage(self, sample):
        self.resource_usage = sample
        self.channel.publish(events.resource_usage(sample))

    # -- surviving the supervisor (state dir) -----------------------------------------------------

    def to_record(self):
        """What a restarted server needs to serve this session again (JSON-able)."""
        channel = self.channel
        if hasattr(channel.log, "flush"):
            channel.log.flush()  # the seqs recorded here are on disk
        client = channel.client
        cursor = channel.cursor
        if client is not None and not client.with_seq:
            client.note_delivery()
            cursor = client.delivered  # what its side acknowledged: it does not get that again
        return {"session_id": self.session_id, "spec": self.spec, "key": self.key, "status": self.status,
                "status_reason": self.status_reason, "working_directory": self.working_directory,
                "connection_info": self.connection_info_, "kernel_info": self.kernel_info,
                "created": self.created, "initial_env": self.initial_env, "env_actions": self.env_actions,
                "input_prompt": self.input_prompt, "continuation_prompt": self.continuation_prompt,
                "launcher": self.launcher.to_state() if self.launcher is not None else None,
                "cursor": cursor, "log_first_seq": channel.log.first_seq, "log_next_seq": channel.log.next_seq}

    def progress_mark(self):
        """What changes without a status change (output delivered, clients' positions): the state dir's
        checkpoint saves the record when this differs from last time."""
        log_ = self.channel.log
        client = self.channel.client
        offsets = self.launcher.to_state().get("offsets") if self.launcher is not None else None
        return (self.status, log_.first_seq, log_.next_seq, self.channel.cursor, getattr(client, "delivered", None),
                repr(offsets))

    def restore(self, record):
        """Take up where a server that died left this session (`record` from to_record()).

        A kernel that still runs is reached again through its launcher and ZeroMQ; one that died
        meanwhile leaves the session `exited`. Returns a problem to report, or None.
        """
        self.key = record.get("key") or self.key
        self.env_actions = list(record.get("env_actions") or [])
        self.working_directory = record.get("working_directory", self.working_directory)
        self.input_prompt = record.get("input_prompt", self.input_prompt)
        self.continuation_prompt = record.get("continuation_prompt", self.continuation_prompt)
        self.created = record.get("created", self.created)
        self.kernel_info = record.get("kernel_info") or {}
        self.initial_env = record.get("initial_env") or {}
        self.connection_info_ = record.get("connection_info")
        log_ = self.channel.log
        problem = "; ".join(getattr(log_, "damage", []) or []) or None
        if log_.next_seq < record.get("log_next_seq", 0):
            log_.skip_to(record["log_next_seq"])  # frames clients may have seen were lost: never reuse seqs
        log_.forget_before(record.get("log_first_seq", 1))
        self.channel.cursor = max(log_.first_seq, min(int(record.get("cursor") or 1), log_.next_seq))
        status = record.get("status", "exited")
        self.status, self.status_reason = status, record.get("status_reason")
        if status not in RUNNING:
            return problem
        self.channel.publish(events.output_gap("The supervisor restarted: what the kernel published on iopub "
                                               "between the supervisor's end and its guardian's first listening "
                                               "may be lost"))
        launcher_state = record.get("launcher")
        if launcher_state is not None:
            token = self._exit_token = object()
            try:
                self.launcher = self.supervisor.launchers.restore(
                    launcher_state, self._on_output, lambda code: self._on_exit(token, code))
            except (ValueError, KeyError, TypeError) as exc:
                self.set_status("exited", f"the kernel cannot be found again: {exc}")
                return f"the kernel cannot be found again ({exc})"
            code = self.launcher.poll()
            if code is not None:
                self.set_status("exited", "the kernel exited while no supervisor ran")
                self.channel.publish(events.exited(code))
                self.supervisor.remove_kernel_files(self.session_id)
                self._remove_ipc_endpoints()
                return problem
        if status == "starting" or not self.connection_info_:
            if self.launcher is not None:
                self.launcher.kill()
            self.set_status("exited", "the supervisor died while the kernel was starting")
            return problem
        self._reconnect()
        return problem

    def _reconnect(self):
        """Connect ZeroMQ to the running kernel again; relay at once, learn its state in the background."""
        conn = KernelConnection(self.supervisor.zmq_context, self.connection_info_, self.session_id,
                                self.spec.get("username", ""), self.protocol_version)
        conn.connect()
        self.connection = conn
        now = time.monotonic()
        self.idle_since = now if self.status in ("idle", "ready") else None
        self.busy_since = now if self.status == "busy" else None
        gevent.spawn(self._resume_relay, conn)

    def _resume_relay(self, conn):
        timeout = float(self.spec.get("connection_timeout") or 30)
        launcher = self.launcher

        def exited():
            return "the kernel exited" if launcher is not None and launcher.poll() is not None else None

        relay = self._on_kernel_message
        capture = launcher.iopub_capture() if launcher is not None else None
        if capture is not None:
            relay = CaptureMerge(capture, relay, conn.signer, self.session_id, conn.is_internal)
        reply = None
        try:
            reply = conn.kernel_info(timeout, exited, relay)
            if capture is not None:
                relay.iopub_live()  # kernel_info saw our own subscription deliver
        except KernelConnectError as exc:
            log.warning("session %s: no kernel_info from the kernel after the restart (%s); relaying anyway",
                        self.session_id, exc)
        if conn is not self.connection:
            return  # exited or replaced meanwhile
        if reply:
            self.kernel_info = reply
            if self.status in ("busy", "offline"):
                self.set_status("idle", "kernel_info_reply after a supervisor restart")
        conn.start_pump(relay, self.channel.flush_now)
        config = self.supervisor.config
        conn.start_heartbeat(self._on_heartbeat, config.heartbeat_interval, config.heartbeat_timeout)

    # -- views ------------------------------------------------------------------------

    def to_json(self):
        now = time.monotonic()
        data = {
            "session_id": self.session_id,
            "argv": list(getattr(self.launcher, "cmd", None) or self.spec.get("argv") or []),  # a provisioner's own
        }
        pid = self.launcher.pid if self.launcher is not None and self.launcher.poll() is None else None
        if pid is not None:
            data["process_id"] = pid
        data.update({
            "username": self.spec.get("username", ""),
            "display_name": self.spec.get("display_name", ""),
            "language": self.spec.get("language", ""),
            "interrupt_mode": self.spec.get("interrupt_mode", "message"),
            "initial_env": self.initial_env,
            "connected": self.channel.connected,
            "started": wire.rfc3339(self.created),
            "session_mode": self.spec.get("session_mode", "console"),
            "working_directory": self.working_directory,
        })
        if self.spec.get("workspace_id"):
            data["workspace_id"] = self.spec["workspace_id"]
        if self.spec.get("notebook_uri"):
            data["notebook_uri"] = self.spec["notebook_uri"]
        data.update({
            "input_prompt": self.input_prompt,
            "continuation_prompt": self.continuation_prompt,
            "execution_queue": self.queue.to_json(),
            "status": self.status,
            "kernel_info": self.kernel_info,
        })
        if self.resource_usage is not None:
            data["resource_usage"] = self.resource_usage
        data["idle_seconds"] = int(now - self.idle_since) if self.idle_since is not None else 0
        data["busy_seconds"] = int(now - self.busy_since) if self.busy_since is not None else 0
        data["history"] = self.history.to_json(RECENT_ENTRIES)
        if self.socket_path and self.channel.connected:
            data["socket_path"] = self.socket_path
        return data

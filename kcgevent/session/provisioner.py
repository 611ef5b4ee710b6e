"""ProvisionerLauncher: a kernel started by a jupyter_client kernel provisioner.

A kernelspec whose ``metadata.kernel_provisioner`` names a provisioner (jupyter_client's
``local-provisioner``, or gateway_provisioners' Kubernetes, Docker, YARN, SSH "distributed", ...)
is launched through it instead of as our own child. The provisioner runs in the provisioner host
(kcgevent/provisioning/host.py); this launcher drives it through the host's client:

- start: pre_launch + launch_kernel + post_launch; the connection info it returns is what the
  session connects ZeroMQ to (as for an adopted kernel, signing with the kernel's own key);
- liveness and exit: the provisioner's ``poll()`` every POLL_INTERVAL seconds (cluster provisioners
  answer from an API call), besides the session's ZeroMQ heartbeat;
- signals and interrupts: ``send_signal`` (a remote kernel is signalled where it runs);
- kill: ``kill()``, then polled until gone; after an exit ``cleanup(restart=True)``, so a restart
  launches again with the same provisioner instance (the host keeps it by kernel id);
- finding the kernel again: ``to_state()`` holds ``get_provisioner_info()``; a restarted supervisor
  calls ``load_provisioner_info`` + ``poll()`` in a new host.

There is no local pid for a remote kernel: ``pid`` is None, so resource usage is not sampled and
reported as absent (the local provisioner's kernel does have one, and is sampled).
"""
import logging
import os
import signal
import uuid

import gevent
from gevent.event import Event

from ..provisioning.client import HostError
from .launcher import KernelLauncher, LaunchError, register

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between provisioner polls while the kernel runs
CALL_TIMEOUT = 60.0  # seconds for one provisioner call (kill, signal, poll, cleanup)
LAUNCH_TIMEOUT = 120.0  # seconds for a launch (the provisioner applies its own, shorter, launch timeout)
KILL_WAIT = 10.0
STARTUP_LINES_KEPT = 1000

LOCAL_PROVISIONERS = ("local-provisioner",)

# What a provisioner's failure means, by exception class name, for the StartupError's message.
FAILURE_CAUSES = {
    "ConfigException": "the cluster or its configuration could not be reached",
    "ApiException": "the cluster API could not be reached or refused the request",
    "MaxRetryError": "the cluster could not be reached",
    "NewConnectionError": "the cluster could not be reached",
    "ConnectionError": "the cluster could not be reached",
    "ConnectionRefusedError": "the cluster could not be reached",
    "DockerException": "the Docker daemon could not be reached",
    "ModuleNotFoundError": "a package the provisioner needs is not installed (pip install kcgevent[remote])",
    "ImportError": "a package the provisioner needs is not installed (pip install kcgevent[remote])",
    "Timeout": "the provisioner did not answer in time",
}


def provisioner_name(kernelspec):
    return ((kernelspec or {}).get("provisioner") or {}).get("name")


def host_kernelspec(kernelspec, env):
    """The kernelspec as the host's provisioner gets it: argv unsubstituted (provisioners fill in their
    own placeholders), the provisioner in metadata, and the spec's env with the values the session's
    env actions gave them (so the request's own actions still win)."""
    metadata = dict(kernelspec.get("metadata") or {})
    provisioner = kernelspec.get("provisioner") or {}
    metadata["kernel_provisioner"] = {"provisioner_name": provisioner.get("name"),
                                      "config": dict(provisioner.get("config") or {})}
    return {"argv": list(kernelspec["argv"]), "resource_dir": kernelspec.get("resource_dir", ""),
            "display_name": kernelspec.get("display_name", ""), "language": kernelspec.get("language", ""),
            "interrupt_mode": kernelspec.get("interrupt_mode", "signal"), "metadata": metadata,
            "env": {name: env.get(name, value) for name, value in (kernelspec.get("env") or {}).items()}}


@register
class ProvisionerLauncher(KernelLauncher):
    kind = "provisioner"

    def __init__(self, on_output, on_exit, host, kernel_id, kernelspec):
        super().__init__(on_output, on_exit)
        self.host = host
        self.kernel_id = kernel_id
        self.kernelspec = kernelspec  # the session's resolved kernelspec (kernelspecs.py)
        self.provisioner = provisioner_name(kernelspec)
        self.host_spec = None
        self.connection_file = None
        self.provisioner_info = None
        self.cmd = None
        self._connection_info = None
        self._exit_code = None
        self._exited = Event()
        self._watch = None
        self._cleaned = False
        self._output = []  # the last lines a local kernel printed (for a StartupError)

    # -- start ----------------------------------------------------------------------------------

    def start(self, request):
        self.host_spec = host_kernelspec(self.kernelspec, request.env)
        self.connection_file = request.connection_file
        self.host.subscribe(self.kernel_id, self._on_kernel_output)
        try:
            result = self.host.call("launch", LAUNCH_TIMEOUT, kernel_id=self.kernel_id, kernelspec=self.host_spec,
                                    connection_file=request.connection_file, env=request.env,
                                    cwd=request.working_directory)
        except HostError as exc:
            self._release_after_failed_start()
            raise LaunchError(self._failure_message(exc), reason=f"provisioner {self.provisioner} failed") from None
        self.cmd = result["cmd"]
        self._connection_info = result["connection_info"]
        self.provisioner_info = result["provisioner_info"]
        log.info("kernel %s started by %s: %s", self.kernel_id, self.provisioner, self.cmd)
        self._watch = gevent.spawn(self._run_watch)

    def _on_kernel_output(self, stream, line):
        self._output.append(line)
        del self._output[:-STARTUP_LINES_KEPT]
        if not self._exited.is_set():
            self.on_output(stream, line)

    def startup_output(self):
        return "\n".join(line.rstrip("\r\n") for line in self._output)

    def _failure_message(self, exc):
        cause = FAILURE_CAUSES.get(exc.kind)
        text = f"The kernel provisioner '{self.provisioner}' could not start the kernel"
        if cause:
            text += f": {cause}"
        return f"{text} ({exc.kind}: {exc.message})"

    def _release_after_failed_start(self):
        try:
            self.host.call("cleanup", CALL_TIMEOUT, kernel_id=self.kernel_id)
        except HostError:
            pass  # the provisioner may not even exist (it failed to load)

    # -- liveness -------------------------------------------------------------------------------

    def _run_watch(self):
        """Poll the provisioner until the kernel is gone."""
        while not self._exited.is_set():
            gevent.sleep(POLL_INTERVAL)
            if self._exited.is_set():
                return
            self._check()

    def _check(self):
        """Ask the provisioner whether the kernel still runs; finish if it does not."""
        try:
            code = self.host.call("poll", CALL_TIMEOUT, kernel_id=self.kernel_id)
        except HostError as exc:
            if exc.kind in ("HostGone", "LookupError"):  # the host died, and its provisioner with it
                log.warning("kernel %s: its provisioner is gone (%s); the kernel is considered lost",
                            self.kernel_id, exc.message)
                self._end_orphan()
                self._finish(-1)
            else:
                log.warning("kernel %s: poll failed: %s", self.kernel_id, exc)
            return
        if code is not None:
            self._finish(code)

    def _end_orphan(self):
        """The provisioner died with its host: a local kernel we can still end ourselves (a remote one
        cannot be reached without its provisioner and is left to its cluster)."""
        info = self.provisioner_info or {}
        if self.provisioner not in LOCAL_PROVISIONERS or not info.get("pid"):
            return
        pgid = info.get("pgid") or info["pid"]
        try:
            if os.getpgid(info["pid"]) == pgid:  # still that kernel's group, not a reused pid's
                os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass

    def _finish(self, code):
        if self._exited.is_set():
            return
        self._exit_code = -1 if code is None else int(code)
        try:  # release ports/tunnels, keeping the provisioner for a restart
            self.host.call("cleanup", CALL_TIMEOUT, kernel_id=self.kernel_id, restart=True)
        except HostError as exc:
            log.debug("kernel %s: cleanup after exit: %s", self.kernel_id, exc)
        self._exited.set()
        if self._watch is not None and self._watch is not gevent.getcurrent():
            self._watch.kill(block=False)
        try:
            self.on_exit(self._exit_code)
        except Exception:
            log.exception("kernel %s: exit callback failed", self.kernel_id)

    # -- the interface --------------------------------------------------------------------------

    @property
    def pid(self):
        """The local provisioner's kernel pid; None for a remote kernel (not ours to sample)."""
        if self._exited.is_set() or self.provisioner not in LOCAL_PROVISIONERS:
            return None
        return (self.provisioner_info or {}).get("pid")

    @property
    def connection_info(self):
        return self._connection_info

    def poll(self):
        return self._exit_code if self._exited.is_set() else None

    def wait(self, timeout=None):
        self._exited.wait(timeout)
        return self.poll()

    def send_signal(self, sig):
        if self._exited.is_set():
            return
        try:
            self.host.call("signal", CALL_TIMEOUT, kernel_id=self.kernel_id, signum=int(sig))
        except HostError as exc:
            log.warning("kernel %s: signal %s not delivered: %s", self.kernel_id, sig, exc)

    def interrupt(self):
        self.send_signal(signal.SIGINT)

    def shutdown_requested(self, restart=False):
        """The kernel is about to get a shutdown_request: tell the provisioner.

        A remote kernel also gets SIGTERM (through its launcher's listener) first, as Enterprise
        Gateway does (enterprise_gateway#707). Measured with gateway_provisioners 0.5 and ipykernel
        7.4: after the kernel has handled a shutdown_request its launcher process stays alive, while
        the listener is gone (ipykernel ends its child processes when it shuts down), so poll() says
        it exited and nothing can signal it any more; jupyter_client's own KernelManager leaves such
        a process behind at every restart and shutdown. Hence the SIGTERM goes before the request,
        while the listener is still there to deliver it."""
        if self._exited.is_set():
            return
        if self.provisioner not in LOCAL_PROVISIONERS:
            self.send_signal(signal.SIGTERM)
        try:
            self.host.call("shutdown_requested", CALL_TIMEOUT, kernel_id=self.kernel_id, restart=restart)
        except HostError as exc:
            log.debug("kernel %s: shutdown_requested: %s", self.kernel_id, exc)

    def kill(self, timeout=KILL_WAIT):
        if not self._exited.is_set():
            try:
                self.host.call("kill", CALL_TIMEOUT, kernel_id=self.kernel_id)
            except HostError as exc:
                log.warning("kernel %s: kill failed: %s", self.kernel_id, exc)
            deadline = gevent.Timeout(timeout)
            deadline.start()
            try:
                while not self._exited.is_set():
                    self._check()
                    self._exited.wait(0.1)
            except gevent.Timeout as exc:
                if exc is not deadline:
                    raise
            finally:
                deadline.close()
        return self._exited.is_set()

    def cleanup(self):
        """The session is done with this kernel: the host forgets the provisioner."""
        if self._watch is not None:
            self._watch.kill(block=False)
        if self._cleaned:
            return
        self._cleaned = True
        if self.host is not None:
            self.host.unsubscribe(self.kernel_id, self._on_kernel_output)
        try:
            self.host.call("cleanup", CALL_TIMEOUT, kernel_id=self.kernel_id)
        except HostError as exc:
            log.debug("kernel %s: cleanup: %s", self.kernel_id, exc)

    def describe_failure(self, kind):
        where = "" if self.provisioner in LOCAL_PROVISIONERS else " (see the provisioner's log for the remote side)"
        base = super().describe_failure(kind)
        return f"{base}; started by the kernel provisioner '{self.provisioner}'{where}"

    def cwd(self):
        return super().cwd() if self.pid is not None else None

    # -- finding the kernel again -------------------------------------------------------------------

    def to_state(self):
        return {"kind": self.kind, "kernel_id": self.kernel_id, "kernelspec": self.kernelspec,
                "host_spec": self.host_spec, "connection_file": self.connection_file,
                "provisioner_info": self.provisioner_info, "cmd": self.cmd}

    @classmethod
    def from_state(cls, state, on_output, on_exit, provisioner_host=None, **context):
        launcher = cls(on_output, on_exit, provisioner_host, state["kernel_id"], state["kernelspec"])
        launcher.host_spec = state.get("host_spec")
        launcher.connection_file = state.get("connection_file")
        launcher.provisioner_info = state.get("provisioner_info")
        launcher.cmd = state.get("cmd")
        try:
            found = provisioner_host.call("load", LAUNCH_TIMEOUT, kernel_id=launcher.kernel_id,
                                          kernelspec=launcher.host_spec, connection_file=launcher.connection_file,
                                          provisioner_info=launcher.provisioner_info)
        except (HostError, AttributeError) as exc:
            log.warning("kernel %s: its provisioner could not be restored: %s", launcher.kernel_id, exc)
            found = {"poll": -1}
        if found.get("poll") is None:
            launcher._connection_info = found.get("connection_info") or (launcher.provisioner_info or {}).get(
                "connection_info")
            launcher._watch = gevent.spawn(launcher._run_watch)
        else:
            launcher._exit_code = int(found["poll"])
            launcher._exited.set()
        return launcher


def new_kernel_id():
    return str(uuid.uuid4())

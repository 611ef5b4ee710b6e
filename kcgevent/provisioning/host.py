"""The provisioner host: a plain asyncio program (no gevent, no monkey-patching) that runs
jupyter_client kernel provisioners on behalf of a kcgevent server.

Provisioners are asyncio code that call blocking libraries (paramiko, kubernetes, docker, YARN
REST) and keep state on one long-lived loop (gateway_provisioners' ResponseManager). Running them
inside the gevent process means either a greenlet-driven loop (gevent issue 2026: "This event loop
is already running") or a native thread whose paramiko/subprocess/socket calls still go through
gevent's patched modules. Here they run unpatched, in their own process; see
kcgevent/provisioning/client.py for the other side and the measurements behind the choice.

Protocol: one JSON object per line. Requests on stdin: ``{"id", "op", ...arguments}``; answers on
the *original* stdout: ``{"id", "ok": result}`` or ``{"id", "error": {"type", "message"}}``, and
events ``{"id": null, "event": "output", "kernel_id", "stream", "line"}`` (a local kernel's output). File
descriptor 1 is pointed at stderr as soon as we start, so nothing a library or a locally launched
kernel prints can corrupt the protocol. Requests run concurrently; each kernel's are serialized.
On end of input (the server is gone, normally or not) the host ends the kernels it still knows
and exits. With ``--lock FILE --grace S`` (a server with a state dir) it does what the kernel
guardian does instead: while nobody holds the state dir's lock, a countdown of S seconds runs; a
server that takes the lock again (and finds the kernels from their saved provisioner info, in a
host of its own) makes this host exit leaving them alone; at the end of the countdown they are ended.

    python -m kcgevent.provisioning.host [--lock FILE --grace S]
"""
import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import traceback

log = logging.getLogger("kcgevent.provisioning.host")


def _json_safe(value):
    """provisioner info as JSON (the key may be bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Kernel:
    """One kernel: its provisioner instance (kept across restarts) and, for the local provisioner,
    the KernelManager it needs as parent."""

    def __init__(self, kernel_id, spec, connection_file):
        from jupyter_client.kernelspec import KernelSpec
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_client.provisioning import KernelProvisionerFactory

        self.kernel_id = kernel_id
        self.lock = asyncio.Lock()
        self.kernel_spec = KernelSpec(resource_dir=spec.get("resource_dir", ""), argv=spec["argv"],
                                      env=spec.get("env") or {}, display_name=spec.get("display_name", ""),
                                      language=spec.get("language", ""),
                                      interrupt_mode=spec.get("interrupt_mode", "signal"),
                                      metadata=spec.get("metadata") or {})
        # LocalProvisioner writes the connection file and picks ports through its parent manager;
        # remote provisioners ignore the parent.
        self.manager = AsyncKernelManager(kernel_name="", connection_file=connection_file)
        self.manager._kernel_spec = self.kernel_spec  # the spec as resolved by the server, not re-read
        self.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            kernel_id, self.kernel_spec, parent=self.manager)
        self.manager.provisioner = self.provisioner

    async def launch(self, env, cwd, on_output):
        from jupyter_client.provisioning import LocalProvisioner
        kwargs = await self.provisioner.pre_launch(env=env, cwd=cwd or None)
        cmd = kwargs.pop("cmd")
        local = isinstance(self.provisioner, LocalProvisioner)
        if local:  # a local kernel's output goes to the server as the session's output events
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        info = await self.provisioner.launch_kernel(cmd, **kwargs)
        if local:
            process = self.provisioner.process
            for stream, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
                asyncio.ensure_future(forward_output(pipe, lambda line, stream=stream: on_output(stream, line)))
        await self.provisioner.post_launch(**kwargs)
        return {"cmd": list(cmd), "connection_info": _json_safe(dict(info)),
                "provisioner_info": _json_safe(await self.provisioner.get_provisioner_info()),
                "stable_start_time": self.provisioner.get_stable_start_time(),
                "shutdown_wait_time": self.provisioner.get_shutdown_wait_time()}

    def remove_connection_file(self):
        try:
            os.unlink(self.manager.connection_file)
        except (OSError, TypeError):
            pass


async def forward_output(pipe, deliver, limit=64 * 1024):
    """Deliver each line of a kernel's pipe (cut at `limit` bytes) until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit * 2)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line longer than the buffer: take what is there
                line = await reader.read(limit)
            if not line:
                return
            deliver(line.decode("utf-8", "replace"))
    finally:
        transport.close()


class Host:
    def __init__(self, out):
        self.out = out
        self.kernels = {}
        self.tasks = set()
        self.kernel_dirs = set()  # where our kernels' connection files are (the server's private dir)

    def answer(self, message):
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    async def serve(self, reader):
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                request = json.loads(line)
            except ValueError:
                log.error("unreadable request: %r", line[:200])
                continue
            task = asyncio.ensure_future(self.handle(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle(self, request):
        rid = request.get("id")
        try:
            op = getattr(self, "op_" + str(request.get("op")), None)
            if op is None:
                raise ValueError(f"unknown operation {request.get('op')!r}")
            result = await op(request)
            self.answer({"id": rid, "ok": result})
        except BaseException as exc:  # everything goes back to the caller, named
            if not isinstance(exc, Exception):
                raise
            log.debug("%s failed:\n%s", request.get("op"), traceback.format_exc())
            self.answer({"id": rid, "error": {"type": type(exc).__name__, "message": str(exc) or repr(exc)}})

    def add(self, kernel):
        self.kernels[kernel.kernel_id] = kernel
        self.kernel_dirs.add(os.path.dirname(kernel.manager.connection_file))
        return kernel

    def remove_kernel_dirs(self, server_pid):
        """A server that died without a state dir cannot remove its private kernel directory
        (kcgevent-*): once our kernels' files are gone, remove it if it is empty (the kernels'
        guardians do the same for theirs: whoever is last removes it). Not while the server lives."""
        from kcgevent.session.guardian import supervisor_gone
        dirs = [d for d in self.kernel_dirs if os.path.basename(d).startswith("kcgevent-")]
        if not dirs or not supervisor_gone(server_pid, 0):
            return
        for directory in dirs:
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty (other sessions' files), or gone already

    def kernel(self, request):
        try:
            return self.kernels[request["kernel_id"]]
        except KeyError:
            raise LookupError(f"no kernel {request.get('kernel_id')!r} in this provisioner host") from None

    # -- operations ---------------------------------------------------------------------------

    async def op_ping(self, request):
        return {"pid": os.getpid()}

    async def op_launch(self, request):
        """Start (or, for a known kernel, start again with the same provisioner instance)."""
        kernel = self.kernels.get(request["kernel_id"])
        if kernel is None:
            kernel = self.add(Kernel(request["kernel_id"], request["kernelspec"], request["connection_file"]))
        kernel_id = kernel.kernel_id

        def on_output(stream, line):
            self.answer({"id": None, "event": "output", "kernel_id": kernel_id, "stream": stream, "line": line})

        async with kernel.lock:
            return await kernel.launch(request.get("env") or dict(os.environ), request.get("cwd"), on_output)

    async def op_load(self, request):
        """Re-create a provisioner from saved provisioner info (a restarted server finding its kernel)."""
        kernel = Kernel(request["kernel_id"], request["kernelspec"], request["connection_file"])
        await kernel.provisioner.load_provisioner_info(request["provisioner_info"])
        self.add(kernel)
        return {"poll": await kernel.provisioner.poll(),
                "connection_info": _json_safe(dict(kernel.provisioner.connection_info))}

    async def op_poll(self, request):
        kernel = self.kernel(request)
        return await kernel.provisioner.poll()

    async def op_info(self, request):
        return _json_safe(await self.kernel(request).provisioner.get_provisioner_info())

    async def op_signal(self, request):
        kernel = self.kernel(request)
        async with kernel.lock:
            await kernel.provisioner.send_signal(int(request["signum"]))

    async def op_shutdown_requested(self, request):
        await self.kernel(request).provisioner.shutdown_requested(restart=bool(request.get("restart")))

    async def op_terminate(self, request):
        kernel = self.kernel(request)
        async with kernel.lock:
            await kernel.provisioner.terminate(restart=bool(request.get("restart")))

    async def op_kill(self, request):
        kernel = self.kernel(request)
        async with kernel.lock:
            await kernel.provisioner.kill(restart=bool(request.get("restart")))

    async def op_wait(self, request):
        return await self.kernel(request).provisioner.wait()

    async def op_cleanup(self, request):
        """Release what the provisioner holds; without `restart` the kernel is forgotten too."""
        kernel = self.kernel(request)
        restart = bool(request.get("restart"))
        async with kernel.lock:
            await kernel.provisioner.cleanup(restart=restart)
        if not restart:
            kernel.remove_connection_file()
            self.kernels.pop(kernel.kernel_id, None)

    async def end_all(self, only_local=False):
        """The server is gone without ending these kernels: end them (no orphans)."""
        from jupyter_client.provisioning import LocalProvisioner
        for kernel in list(self.kernels.values()):
            if only_local and not isinstance(kernel.provisioner, LocalProvisioner):
                continue
            try:
                if await kernel.provisioner.poll() is None:
                    await kernel.provisioner.kill()
                await kernel.provisioner.cleanup(restart=False)
            except Exception:
                log.exception("kernel %s could not be ended", kernel.kernel_id)
            kernel.remove_connection_file()
            self.kernels.pop(kernel.kernel_id, None)

    async def op_forget(self, request):
        """Drop a kernel without touching it (the server keeps it for a later supervisor)."""
        self.kernels.pop(request["kernel_id"], None)


def main():
    parser = argparse.ArgumentParser(description="Run jupyter_client kernel provisioners for a kcgevent server.")
    parser.add_argument("--lock", help="the state dir's lock file (kernels wait for a server to hold it again)")
    parser.add_argument("--grace", type=float, default=0.0, help="seconds to wait for that")
    options = parser.parse_args()
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # from now on, whatever prints (libraries, local kernels) goes to stderr
    sys.stdout = sys.stderr
    level = os.environ.get("KCGEVENT_PROVISIONER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level, logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    host = Host(protocol_out)
    server_pid = os.getppid()

    async def run():
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        protocol_out.write(json.dumps({"id": None, "ok": {"ready": True, "pid": os.getpid()}}) + "\n")
        protocol_out.flush()
        await host.serve(reader)
        if host.tasks:
            await asyncio.wait(list(host.tasks), timeout=30)
        if await server_came_back(options.lock, options.grace):
            # jupyter_client's LocalProvisioner cannot poll a process it did not start, so another
            # host could never find these again: end them rather than leave orphans
            await host.end_all(only_local=True)
            log.info("a server holds the state dir again: leaving %d kernel(s) to it", len(host.kernels))
            return
        await host.end_all()
        if not options.lock:
            host.remove_kernel_dirs(server_pid)

    asyncio.run(run())


async def server_came_back(lock, grace):
    """After our server went away: True if one holds `lock` again within `grace` seconds."""
    if not lock:
        return False
    from kcgevent.session.guardian import lock_held
    deadline = asyncio.get_running_loop().time() + grace
    while True:
        if lock_held(lock):
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    main()

"""Client commands for people and scripts: `run` code in a fresh kernel, list `sessions`.

`kcgevent run -c 'print(1+1)'` starts a private server (unless given one),
starts a Python kernel through it, runs the code, prints what the kernel
printed and shuts everything down again: a one-line check that all works.
"""
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import quote

import argh
import gevent
import websocket

from .client import ApiResponseError, Client, execute_request, python_kernel_session


class PrivateServer:
    """A kcgevent server in a child process, for the duration of one command."""

    def __init__(self, transport, timeout):
        self.dir = tempfile.mkdtemp(prefix="kcgevent-run-")
        self.connection_file = os.path.join(self.dir, "connection.json")
        cmd = [sys.executable, "-m", "kcgevent", "--connection-file", self.connection_file,
               "--transport", transport, "--log-level", "warn", "--socket-dir", self.dir]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.connection_file):
            if self.process.poll() is not None:
                raise CommandError(f"the server exited with code {self.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.close()
                raise CommandError(f"the server did not start within {timeout} s")
            time.sleep(0.05)
        with open(self.connection_file) as f:
            self.info = json.load(f)

    def close(self, client=None):
        if client is not None and self.process.poll() is None:
            try:
                client.request("POST", "/shutdown", timeout=5)
            except OSError:
                pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def print_output(frame):
    """Print one relayed kernel message the way a console would; True if it was an error."""
    msg_type = frame["header"]["msg_type"]
    content = frame["content"]
    if msg_type == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif msg_type in ("execute_result", "display_data"):
        print(content.get("data", {}).get("text/plain", ""))
    elif msg_type == "error":
        print("\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]),
              file=sys.stderr)
        return True
    return False


def new_session_body(session_id, python, kernel):
    """A Python kernel run by `python`, or the kernelspec named `kernel` (the server resolves it)."""
    if kernel:
        return {"session_id": session_id, "kernel_name": kernel, "username": "kcgevent",
                "working_directory": os.getcwd()}
    return python_kernel_session(session_id, python, working_directory=os.getcwd())


def run_code(client, code, python, timeout, kernel=None):
    """Run `code` in a new session of `client`'s server; the process exit status."""
    session_id = f"run-{uuid.uuid4().hex[:8]}"
    path = f"/sessions/{quote(session_id, safe='')}"
    try:
        client.call("PUT", "/sessions", new_session_body(session_id, python, kernel))
    except ApiResponseError as exc:
        message = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
        print(f"Error: {message}", file=sys.stderr)
        return 2
    try:
        try:
            client.call("POST", f"{path}/start", timeout=timeout)
        except ApiResponseError as exc:
            error = exc.body.get("error", {}) if isinstance(exc.body, dict) else {}
            print(f"Error: the kernel did not start: {error.get('message', exc.body)}", file=sys.stderr)
            return 1
        ws = client.open_channel(session_id, timeout=timeout)
        try:
            request = execute_request(code)
            ws.send(json.dumps(request))
            failed, replied, idle = False, False, False
            deadline = time.monotonic() + timeout
            while not (replied and idle):
                if time.monotonic() > deadline:
                    print(f"no reply within {timeout} s", file=sys.stderr)
                    return 1
                frame = json.loads(ws.recv())
                if frame.get("kind") != "jupyter" or (frame.get("parent_header") or {}).get("msg_id") != \
                        request["header"]["msg_id"]:
                    continue
                failed |= print_output(frame)
                msg_type = frame["header"]["msg_type"]
                replied |= msg_type == "execute_reply"
                idle |= msg_type == "status" and frame["content"].get("execution_state") == "idle"
            return 1 if failed else 0
        finally:
            ws.close()
    finally:
        try:
            client.request("POST", f"{path}/kill")
            client.request("DELETE", path)
        except OSError:
            pass  # the server is gone; the error that got us here is the one to report


class CommandError(Exception):
    """What went wrong, in one line for the user (printed as "Error: ..." with exit status 1)."""


def load_connection_file(path):
    try:
        with open(path) as f:
            info = json.load(f)
    except OSError as exc:
        raise CommandError(f"cannot read the connection file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CommandError(f"the connection file {path} is not JSON: {exc}") from None
    if not isinstance(info, dict) or not (info.get("port") or info.get("socket_path")):
        raise CommandError(f"the connection file {path} says neither a port nor a socket_path")
    return info


def describe_api_error(exc):
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # a StartupError
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return f"the server answered {exc.status} ({body.get('code')}): {body['message']}"
    return f"the server answered {exc.status}: {str(body)[:200]}"


def one_line_errors(command):
    """Run `command`, turning the failures a user can meet into one line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)  # Ctrl-C: no traceback from the hub either
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            print("Interrupted", file=sys.stderr)
            sys.exit(130)
        except CommandError as exc:
            message = str(exc)
        except ApiResponseError as exc:
            message = describe_api_error(exc)
        except ConnectionRefusedError:
            message = "cannot reach the server (connection refused): is it still running? (a stale connection file?)"
        except FileNotFoundError as exc:
            message = f"cannot reach the server: {exc.filename or exc} does not exist (a stale connection file?)"
        except (OSError, http.client.HTTPException, websocket.WebSocketException) as exc:
            message = f"lost the server: {type(exc).__name__}: {exc}"
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)

    return wrapper


@argh.arg("-c", "--code", help="the code to run", required=True)
@one_line_errors
@argh.arg("--connection-file", help="use the server described by this file (default: start a private one)")
@argh.arg("--transport", help="transport of the private server: tcp or socket")
@argh.arg("--python", help="the Python that runs the kernel (needs ipykernel)")
@argh.arg("-k", "--kernel", help="run this installed kernelspec instead (see `kcgevent kernelspecs`)")
@argh.arg("--timeout", type=float, help="seconds to wait for each step")
def run(code=None, connection_file=None, transport="tcp", python=sys.executable, kernel=None, timeout=60.0):
    """Run code in a fresh kernel (Python, or --kernel NAME) and print its output."""
    if connection_file:
        sys.exit(run_code(Client(load_connection_file(connection_file)), code, python, timeout, kernel))
    server = PrivateServer(transport, timeout)
    client = Client(server.info)
    try:
        client.wait_ready(timeout)
        status = run_code(client, code, python, timeout, kernel)
    finally:
        server.close(client)
    sys.exit(status)


@argh.arg("--connection-file", help="the server's connection file", required=True)
@one_line_errors
def sessions(connection_file=None):
    """List a server's sessions: id, status, language, connected."""
    listing = Client(load_connection_file(connection_file)).call("GET", "/sessions")
    for s in listing["sessions"]:
        print(f"{s['session_id']}\t{s['status']}\t{s['language']}\t{'connected' if s['connected'] else '-'}")


@argh.arg("--as-json", help="print the full descriptions as JSON")
def kernelspecs(as_json=False):
    """List the installed kernelspecs: name, language, interrupt mode, provisioner, directory."""
    from . import kernelspecs as specs
    found = specs.find_all()
    if as_json:
        print(json.dumps(found, indent=2))
        return
    for name, spec in found.items():
        provisioner = (spec["provisioner"] or {}).get("name", "-")
        print(f"{name}\t{spec['language'] or '-'}\t{spec['interrupt_mode']}\t{provisioner}\t{spec['resource_dir']}")

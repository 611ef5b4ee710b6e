"""Another local user cannot reach the kernels we start (issue "Nothing breaks it", item 7).

Kernels listen on ipc:// sockets inside the supervisor's private 0700 directory. The test runs a
ZeroMQ subscriber as another user (uid 65534, "nobody", via setuid in a forked child) and checks that it
cannot open the kernel's sockets, nor receive any iopub message while code runs; the same subscriber
against a server started with `--kernel-transport tcp` receives the output (so the probe can fail).
Those two need root (to switch users) and are skipped otherwise. A kernel that names its ipc
sockets `<ip>:<port>` (as ark does) rather than `<ip>-<port>` is reached too.
"""
import json
import os

import pytest
from conftest import fake_kernel_session, new_id, start_session

needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="switching to another local user needs root")

OTHER_UID = 65534  # nobody: needs no entry of its own, nothing is created on the system

def other_user_probe(info, window, report_fd):
    """In a forked child: become another user, try the kernel's iopub; write a JSON report, exit.

    (Forked, not exec'd: the other user may not be allowed to run our Python at all.) Only the C
    socket module and plain pyzmq are used: no gevent in the child.
    """
    try:
        import _socket

        import zmq
        os.setgroups([])
        os.setgid(OTHER_UID)
        os.setuid(OTHER_UID)
        report = {"uid": os.getuid()}
        path = "%s-%d" % (info["ip"], info["iopub_port"])
        if info["transport"] == "ipc":
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                s.connect(path)
                report["unix_connect"] = "connected"
            except OSError as exc:
                report["unix_connect"] = type(exc).__name__
            s.close()
            url = "ipc://" + path
        else:
            url = "tcp://%s:%d" % (info["ip"], info["iopub_port"])
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(url)
        os.write(report_fd, b"ready\n")
        got = 0
        while got < 3 and sub.poll(window * 1000):
            sub.recv_multipart()
            got += 1
        report["messages"] = got
        sub.close()
        context.term()
        os.write(report_fd, json.dumps(report).encode() + b"\n")
    finally:
        os._exit(0)


def probe(server, session_id, window):
    """Subscribe as another user while the kernel prints; the probe's report."""
    info = server.client.call("GET", f"/sessions/{session_id}/connection_info")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        other_user_probe(info, window, write_fd)
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    try:
        assert reader.readline().strip() == "ready"
        channel = server.client.open_channel(session_id)
        try:
            for i in range(5):
                channel.send(json.dumps({"header": {"msg_id": f"m{i}", "msg_type": "execute_request"},
                                         "parent_header": None, "channel": "shell", "metadata": {},
                                         "content": {"code": f"print secret-{i}"}, "buffers": []}))
            line = reader.readline()
        finally:
            channel.close()
    finally:
        reader.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    assert line, "the probe died without a report"
    return info, json.loads(line)


@needs_root
def test_another_user_cannot_subscribe_to_our_kernels(start_server):
    server = start_server("--transport", "tcp")
    session_id = new_id("private")
    start_session(server.client, fake_kernel_session(session_id))
    info, report = probe(server, session_id, window=3)
    assert info["transport"] == "ipc", info
    assert report["uid"] == OTHER_UID
    assert report["unix_connect"] == "PermissionError", report
    assert report["messages"] == 0, report
    kernel_dir = os.path.dirname(info["ip"])
    assert os.stat(kernel_dir).st_mode & 0o777 == 0o700


@needs_root
def test_the_probe_does_see_a_tcp_kernel(start_server):
    """The control: with --kernel-transport tcp the same probe receives the kernel's iopub."""
    server = start_server("--transport", "tcp", "--kernel-transport", "tcp")
    session_id = new_id("open")
    start_session(server.client, fake_kernel_session(session_id))
    info, report = probe(server, session_id, window=15)
    assert info["transport"] == "tcp", info
    assert report["messages"] > 0, report


COLON_KERNEL = """
import sys
sys.path.insert(0, {kernels!r})
import fake_kernel as fk
def bind_one(sock, transport, ip, port):  # as ark's amalthea does: "<transport>://<ip>:<port>" for all
    sock.bind("%s://%s:%d" % (transport, ip, port))
    return port
fk.bind_one = bind_one
fk.main(sys.argv[1:])
"""


def test_a_kernel_binding_ip_colon_port_still_connects_over_ipc(start_server, open_channel):
    """Not every kernel follows jupyter_client's `<ip>-<port>` for ipc: ark binds `<ip>:<port>`."""
    from conftest import HERE, PYTHON, is_idle_for, replies_to, stream_text
    server = start_server("--transport", "tcp")
    session_id = new_id("colon")
    body = fake_kernel_session(session_id, connection_timeout=15)
    body["argv"] = [PYTHON, "-c", COLON_KERNEL.format(kernels=os.path.join(HERE, "kernels")), "{connection_file}"]
    start_session(server.client, body)
    info = server.client.call("GET", f"/sessions/{session_id}/connection_info")
    assert info["transport"] == "ipc" and os.path.exists(f"{info['ip']}:{info['iopub_port']}")
    channel = open_channel(server, session_id)
    request = channel.execute("print colon")
    frames = channel.until(lambda f: is_idle_for(f, request))
    assert stream_text(replies_to(frames, request, "stream")) == "colon\n"

"""A kernel's lost iopub `idle` does not leave the session `busy` for good (session/idle_probe.py).

The fake kernel's `lose_idle` plays ipykernel dropping its idle (a full PUB queue drops silently):
busy and execute_reply come, the idle does not. The server then asks the kernel (a kernel_info of
its own on shell, counted by the fake kernel's `kernel_infos`) and takes the idle of that request as
the kernel's word; clients see the supervisor's `status` event, never a Jupyter message made up or
one answering the server's own request. With ipykernel the loss is real: a server that cannot read
for a moment (here: frozen with SIGSTOP) while the kernel prints loses all but about 1,000 messages,
the idle among them.
"""
import os
import re
import signal
import time

from conftest import (HERE, PYTHON, fake_kernel_session, get_session, is_idle_for, new_id, replies_to,
                      start_session, stream_text, wait_for)
from kcgevent.client import python_kernel_session

PROBE_DELAY = "1"  # seconds (--idle-probe-delay); the default is 3
REASON = "kernel_info_reply after a lost idle"


def kernel_info_requests(channel):
    """How many kernel_info requests the fake kernel has served (its `kernel_infos` command)."""
    request = channel.execute("kernel_infos")
    frames = channel.until_idle(request)
    return int(re.fullmatch(r"kernel_info_requests (\d+)\n", stream_text(replies_to(frames, request))).group(1))


def status_event(frame, state):
    return frame.get("kind") == "kernel" and (frame.get("status") or {}).get("status") == state


def fake_server(start_server, *extra):
    server = start_server("--transport", "tcp", "--idle-probe-delay", PROBE_DELAY, *extra)
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    return server, session_id


def no_answers_to_the_servers_requests(frames):
    """The client sent no kernel_info: it must see nothing answering the server's own."""
    strays = [f for f in frames if f.get("kind") == "jupyter" and (
        f["header"]["msg_type"] == "kernel_info_reply"
        or (f.get("parent_header") or {}).get("msg_type") == "kernel_info_request")]
    assert strays == [], f"frames answering requests the client never sent: {strays[:3]}"


def test_a_lost_idle_is_recovered_by_asking_the_kernel(start_server, open_channel):
    server, session_id = fake_server(start_server)
    channel = open_channel(server, session_id)
    before = kernel_info_requests(channel)
    request = channel.execute("print lost\nlose_idle")
    frames = channel.until(lambda f: status_event(f, "idle"), timeout=60)
    assert frames[-1]["status"] == {"status": "idle", "reason": REASON}
    assert replies_to(frames, request, "execute_reply")
    assert not [f for f in frames if is_idle_for(f, request)]  # the lost idle is not made up
    assert get_session(server, session_id)["status"] == "idle"
    # The session works on, and the kernel served exactly one request of ours meanwhile.
    assert kernel_info_requests(channel) == before + 1
    no_answers_to_the_servers_requests(channel.frames)
    log = open(server.log_file).read()
    assert f"the kernel's iopub idle for {request['header']['msg_id']} was lost" in log


def test_the_kernel_is_asked_again_when_the_answers_idle_is_lost_too(start_server, open_channel):
    server, session_id = fake_server(start_server)
    channel = open_channel(server, session_id)
    before = kernel_info_requests(channel)
    channel.execute("lose_idle 2")  # this execution's idle and that of the server's first kernel_info
    frames = channel.until(lambda f: status_event(f, "idle"), timeout=60)
    assert frames[-1]["status"]["reason"] == REASON
    assert kernel_info_requests(channel) == before + 2
    no_answers_to_the_servers_requests(channel.frames)


def test_a_lost_idle_after_an_error_does_not_hold_the_queue(start_server, open_channel):
    """After an error reply the queue waits for the idle before it sends the next request: a lost idle
    there would hold every later execution too."""
    server, session_id = fake_server(start_server)
    channel = open_channel(server, session_id)
    failed = channel.execute("lose_idle\nerror")
    queued = channel.execute("print after")
    frames = channel.until_idle(queued, timeout=60)
    assert replies_to(frames, failed, "execute_reply")[0]["content"]["status"] == "error"
    assert {"status": "idle", "reason": REASON} in [f["status"] for f in frames if status_event(f, "idle")]
    assert stream_text(replies_to(frames, queued)) == "after\n"
    assert not [f for f in frames if is_idle_for(f, failed)]
    no_answers_to_the_servers_requests(frames)


def test_a_rest_execute_whose_idle_is_lost_returns(start_server):
    server, session_id = fake_server(start_server)
    status, reply = server.client.request("POST", f"/sessions/{session_id}/execute",
                                          {"code": "print out\nlose_idle", "timeout": 60})
    assert status == 200, reply
    assert reply["status"] == "ok" and reply["output"] == [{"type": "stream", "stream_name": "stdout",
                                                           "text": "out\n"}]
    assert get_session(server, session_id)["status"] == "idle"
    status, history = server.client.request("GET", f"/sessions/{session_id}/history")
    assert status == 200 and history[-1]["input"] == "print out\nlose_idle"


def test_normal_executes_never_ask_the_kernel(start_server, open_channel):
    """An execute whose idle comes (after its reply, as usual) arms nothing that fires: no kernel_info
    goes to the kernel, however many executes run (queued ones too), even long after."""
    server, session_id = fake_server(start_server)
    channel = open_channel(server, session_id)
    before = kernel_info_requests(channel)
    requests = [channel.execute(code) for code in ["print a", "flood 2000", "sleep 0.2", "error", "x"] * 4]
    answers = {request["header"]["msg_id"]: set() for request in requests}

    def all_answered(frame):
        # (not until_idle per request: the queue releases the next request on an idle that may come
        # before the reply, so one request's idle can arrive before the previous one's reply)
        if frame.get("kind") == "jupyter" and (frame.get("parent_header") or {}).get("msg_id") in answers:
            kind = frame["header"]["msg_type"]
            if kind == "execute_reply" or (kind == "status" and frame["content"]["execution_state"] == "idle"):
                answers[frame["parent_header"]["msg_id"]].add(kind)
        return all(len(seen) == 2 for seen in answers.values())

    channel.until(all_answered, timeout=120)
    # Longer than the probe delay after the last reply, and a round trip behind it: any probe sent
    # has been served by the time `kernel_infos` runs (shell is served in order).
    channel.execute("sleep 2.5")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "execute_reply", timeout=60)
    assert kernel_info_requests(channel) == before
    assert get_session(server, session_id)["status"] == "idle"


def test_zero_turns_the_probe_off(start_server, open_channel):
    """What the probe is for: without it a lost idle leaves the session busy until the kernel's next
    status (here, the next execute)."""
    server = start_server("--transport", "tcp", "--idle-probe-delay", "0")
    session_id = new_id("fake")
    start_session(server.client, fake_kernel_session(session_id))
    channel = open_channel(server, session_id)
    before = kernel_info_requests(channel)
    channel.execute("lose_idle")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "execute_reply", timeout=60)
    time.sleep(2.5)  # (more than twice the delay the other tests use)
    assert get_session(server, session_id)["status"] == "busy"
    assert kernel_info_requests(channel) == before
    assert get_session(server, session_id)["status"] == "idle"


def test_ipykernel_drops_its_idle_while_the_server_cannot_read(start_server, open_channel, tmp_path):
    """ipykernel's iopub keeps ZeroMQ's default send limit (1,000 messages to a subscriber, then
    silent drops). Freeze the server while the kernel prints 10,000 flushed lines and ends the cell:
    most lines and the idle are gone for good, the execute_reply (shell: never dropped) is not. The
    session still gets back to `idle`, through the server's own kernel_info."""
    server = start_server("--transport", "tcp", "--idle-probe-delay", PROBE_DELAY)
    session_id = new_id("py")
    start_session(server.client, python_kernel_session(session_id, PYTHON, working_directory=HERE))
    channel = open_channel(server, session_id)
    printed = tmp_path / "printed"
    request = channel.execute(f"import time\ntime.sleep(1)\nfor i in range(10000):\n    print(i, flush=True)\n"
                              f"open({str(printed)!r}, 'w').close()")
    channel.until(lambda f: f.get("kind") == "jupyter" and f["header"]["msg_type"] == "execute_input", timeout=30)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_for(printed.exists, 60, "the cell to end")
        time.sleep(2)  # (ipykernel publishes the idle as the cell returns)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    frames = channel.until(lambda f: status_event(f, "idle"), timeout=60)
    assert frames[-1]["status"] == {"status": "idle", "reason": REASON}
    assert replies_to(channel.frames, request, "execute_reply")
    assert not [f for f in channel.frames if is_idle_for(f, request)]
    lines = stream_text(replies_to(channel.frames, request)).split()
    assert len(lines) < 5000, "the kernel dropped nothing: the scenario did not happen"
    assert get_session(server, session_id)["status"] == "idle"
    no_answers_to_the_servers_requests(channel.frames)
    log = open(server.log_file).read()
    assert f"the kernel's iopub idle for {request['header']['msg_id']} was lost" in log

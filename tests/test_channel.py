"""End to end: the session channel (WebSocket), against real servers and real kernels.

Each test starts a `python -m kcgevent --transport tcp` server (conftest `server`), starts a kernel in
it (ipykernel where the kernel's nature matters, the fake kernel where it does not) and talks to
the session's channel with websocket-client, the way Positron does: bare Jupyter messages in,
`kind`-tagged frames out. Every wait is bounded (Channel.until has a deadline).
"""
import json
import os
import time

import gevent
import psutil
import pytest
import websocket
from conftest import (
    PYTHON,
    fake_kernel_session,
    get_session,
    is_idle_for,
    kernel_events,
    new_id,
    pid_gone,
    replies_to,
    start_session,
    stream_text,
    summary,
    wait_for,
)

from kcgevent.client import execute_request, jupyter_message, python_kernel_session

HERE = os.path.dirname(os.path.abspath(__file__))


# -- helpers -------------------------------------------------------------------------------------


def is_jupyter(frame, msg_type, request=None):
    return (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == msg_type
            and (request is None
                 or (frame.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"]))


def is_event(frame, name):
    return frame.get("kind") == "kernel" and name in frame


def stream_lines(frames, request=None):
    """The texts of stdout stream messages (one per message), optionally only those for `request`."""
    return [f["content"]["text"] for f in frames
            if is_jupyter(f, "stream", request) and f["content"].get("name") == "stdout"]


def read_until_closed(ws, timeout=10):
    """Frames (decoded) until the server closes the connection; raise if it stays open."""
    deadline = time.monotonic() + timeout
    frames = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout} s; got {[summary(f) for f in frames]}")
        ws.settimeout(remaining)
        try:
            text = ws.recv()
        except websocket.WebSocketConnectionClosedException:
            return frames
        except websocket.WebSocketTimeoutException:
            continue
        if text == "" or text is None:  # a Close frame
            return frames
        frames.append(json.loads(text))


def until(channel, predicate, timeout=15):
    """Channel.until, but a timeout reports the frames read so far (to judge what went wrong)."""
    mark = len(channel.frames)
    try:
        return channel.until(predicate, timeout)
    except (TimeoutError, websocket.WebSocketTimeoutException):
        raise AssertionError(f"no matching frame within {timeout} s; read meanwhile: "
                             f"{[summary(f) for f in channel.frames[mark:]]}") from None


def reply_for(channel, request, msg_type="execute_reply", timeout=10):
    """The reply to `request`, from the frames read so far or read now (it may trail the idle)."""
    replies = replies_to(channel.frames, request, msg_type)
    if not replies:
        channel.until(lambda f: is_jupyter(f, msg_type, request), timeout=timeout)
        replies = replies_to(channel.frames, request, msg_type)
    return replies[0]


def python_session_with(server, **overrides):
    session_id = new_id("py")
    body = python_kernel_session(session_id, PYTHON, working_directory=HERE)
    body.update(overrides)
    start_session(server.client, body)
    return session_id


# -- ipykernel ---------------------------------------------------------------------------------


def test_execute_print_relays_stream_reply_and_status(python_session, open_channel):
    server, session_id = python_session
    channel = open_channel(server, session_id)
    request = channel.execute('print("hello from kc")')
    frames = channel.until_idle(request)

    assert stream_text(replies_to(frames, request, "stream")) == "hello from kc\n"
    stream = replies_to(frames, request, "stream")[0]
    assert stream["channel"] == "iopub" and stream["content"]["name"] == "stdout"
    reply = reply_for(channel, request)
    assert reply["channel"] == "shell"
    assert reply["content"]["status"] == "ok"
    # full headers are relayed (Kallichore reduces them to msg_id and msg_type)
    assert {"msg_id", "msg_type", "session", "date"} <= set(reply["header"]), reply["header"]

    # iopub busy ... idle, both with our request as parent
    states = [f["content"]["execution_state"] for f in replies_to(frames, request, "status")]
    assert states[0] == "busy" and states[-1] == "idle", states
    busy_at = next(i for i, f in enumerate(frames) if is_jupyter(f, "status", request)
                   and f["content"]["execution_state"] == "busy")
    idle_at = len(frames) - 1
    assert busy_at < idle_at

    # The kernel status events precede the Jupyter status messages that caused them
    def last_status_event_before(index):
        events = [f["status"] for f in frames[:index] if is_event(f, "status")]
        return events[-1] if events else None

    assert last_status_event_before(busy_at) == {"status": "busy", "reason": "execute_request"}
    assert last_status_event_before(idle_at) == {"status": "idle", "reason": "execute_request"}
    assert get_session(server, session_id)["status"] == "idle"


def test_first_execute_right_after_start_is_not_lost(server, open_channel):
    """Connect and execute straight after POST start: iopub must already be live."""
    session_id = python_session_with(server)
    channel = open_channel(server, session_id)
    request = channel.execute('print("first words")')
    frames = channel.until_idle(request, timeout=20)
    assert stream_text(replies_to(frames, request, "stream")) == "first words\n", [summary(f) for f in frames]
    assert [f["content"]["execution_state"] for f in replies_to(frames, request, "status")] == ["busy", "idle"]


def test_execute_sent_while_starting_is_delivered(server, open_channel):
    """A client attached before the kernel is up: its execute waits for the start, then runs."""
    session_id = new_id("py")
    server.client.call("PUT", "/sessions", python_kernel_session(session_id, PYTHON, working_directory=HERE))
    channel = open_channel(server, session_id)
    starter = gevent.spawn(server.client.call, "POST", f"/sessions/{session_id}/start")
    try:
        wait_for(lambda: starter.ready() or get_session(server, session_id)["status"] == "starting", 10,
                 "the start to be under way")
        assert not starter.ready(), "the kernel started too fast to test this"
        request = channel.execute('print("early bird")')
        frames = channel.until_idle(request, timeout=30)
        assert stream_text(replies_to(frames, request, "stream")) == "early bird\n", [summary(f) for f in frames]
        assert not kernel_events(frames, "error"), kernel_events(frames, "error")
    finally:
        starter.join(30)
    assert starter.successful(), starter.exception
    assert get_session(server, session_id)["status"] == "idle"


def test_execution_queue_holds_requests_in_fifo_order(python_session, open_channel):
    server, session_id = python_session
    channel = open_channel(server, session_id)
    first = channel.execute('import time; print("A", flush=True); time.sleep(2); print("A done")')
    held = [channel.execute(f'print("{letter}")') for letter in "BCD"]
    held_ids = [r["header"]["msg_id"] for r in held]

    seen = channel.until(lambda f: sorted(kernel_events(channel.frames, "executionQueued")) == sorted(held_ids)
                         and "A\n" in stream_lines(channel.frames, first), timeout=15)
    assert kernel_events(channel.frames, "executionQueued") == held_ids  # in the order they were sent

    # During the sleep, the queue is visible over HTTP
    info = get_session(server, session_id)
    queue = info["execution_queue"]
    assert queue["length"] == 3, queue
    assert queue["active"]["header"]["msg_id"] == first["header"]["msg_id"]
    assert [m["header"]["msg_id"] for m in queue["pending"]] == held_ids
    assert info["status"] == "busy"
    assert "A done\n" not in stream_lines(seen)

    channel.until_idle(held[-1], timeout=20)
    outputs = [t for t in stream_lines(channel.frames) if t.strip() in ("A", "A done", "B", "C", "D")]
    assert outputs == ["A\n", "A done\n", "B\n", "C\n", "D\n"]
    for request in [first, *held]:
        assert reply_for(channel, request)["content"]["status"] == "ok"
    queue = get_session(server, session_id)["execution_queue"]
    assert queue["length"] == 0 and "active" not in queue, queue


def test_input_request_and_reply(python_session, open_channel):
    server, session_id = python_session
    channel = open_channel(server, session_id)
    # Give the stdin socket time to connect: input() straight after start is
    # test_input_right_after_start's business.
    time.sleep(0.5)
    request = channel.execute('x = input("name? "); print("hello", x)')
    assert request["content"]["allow_stdin"] is True
    frames = until(channel, lambda f: is_jupyter(f, "input_request", request))
    input_request = frames[-1]
    assert input_request["channel"] == "stdin"
    assert input_request["content"]["prompt"] == "name? "
    channel.send(jupyter_message("input_reply", {"value": "kc"}, channel="stdin",
                                 parent=input_request["header"]))
    frames = channel.until_idle(request)
    assert stream_text(replies_to(frames, request, "stream")) == "hello kc\n"


# A fake kernel whose stdin socket becomes reachable 1 s after its shell: the
# exaggerated form of a race every kernel start runs (the supervisor's DEALERs
# reconnect independently, every 100-200 ms, to a kernel still binding). A
# ROUTER drops what it cannot route, so an input_request sent before the
# supervisor's stdin socket is connected is lost and the execution hangs.
LATE_STDIN_KERNEL = """
import json, signal, sys
sys.path.insert(0, {kernels!r})
import fake_kernel as fk
info = json.load(open(sys.argv[-1]))
stdin_port = info["stdin_port"]
if info["transport"] == "ipc":
    endpoint = "ipc://%s-%d" % (info["ip"], stdin_port)
else:
    endpoint = "tcp://%s:%d" % (info["ip"], stdin_port)
bind = fk.FakeKernel.bind
def late_bind(self, ports):
    actual = bind(self, dict(ports, stdin_port=0))  # a random port (ipc: a stand-in path) at first
    signal.signal(signal.SIGALRM, lambda *_: self.stdin.bind(endpoint))
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # runs in the main thread, between polls
    return actual
fk.FakeKernel.bind = late_bind
fk.main(sys.argv[1:])
"""


def test_input_right_after_start(server, open_channel):
    """input() as the very first code: the start must not be over before stdin is connected."""
    session_id = new_id("late")
    body = fake_kernel_session(session_id, connection_timeout=10)
    body["argv"] = [PYTHON, "-c", LATE_STDIN_KERNEL.format(kernels=os.path.join(HERE, "kernels")),
                    "{connection_file}"]
    start_session(server.client, body)
    channel = open_channel(server, session_id)
    request = channel.execute("input name?")
    frames = until(channel, lambda f: is_jupyter(f, "input_request", request), timeout=5)
    assert frames[-1]["content"]["prompt"] == "name?"
    channel.send(jupyter_message("input_reply", {"value": "kc"}, channel="stdin", parent=frames[-1]["header"]))
    frames = channel.until_idle(request)
    assert stream_text(replies_to(frames, request, "stream")) == "got: kc\n"


@pytest.mark.parametrize("mode", ["message", "signal"])
def test_interrupt_stops_a_running_execution(server, open_channel, mode):
    session_id = python_session_with(server, interrupt_mode=mode)
    assert get_session(server, session_id)["interrupt_mode"] == mode
    channel = open_channel(server, session_id)
    request = channel.execute('import time\nprint("looping", flush=True)\nfor i in range(300):\n    time.sleep(0.1)')
    channel.until(lambda f: is_jupyter(f, "stream", request))  # the loop is running
    started = time.monotonic()
    server.client.call("POST", f"/sessions/{session_id}/interrupt")
    frames = channel.until(lambda f: is_jupyter(f, "execute_reply", request), timeout=10)
    assert time.monotonic() - started < 10
    reply = frames[-1]["content"]
    assert reply["status"] == "error", reply
    assert reply["ename"] == "KeyboardInterrupt", reply
    if not any(is_idle_for(f, request) for f in channel.frames):
        channel.until_idle(request)

    # The kernel is still usable afterwards. (ipykernel aborts requests that reach it just after
    # an error with stop_on_error: such a request is answered "aborted" and may be tried again.)
    for _attempt in range(3):
        after = channel.execute('print("still here")')
        frames = channel.until_idle(after)
        if reply_for(channel, after)["content"]["status"] != "aborted":
            break
        time.sleep(0.2)
    assert reply_for(channel, after)["content"]["status"] == "ok"
    assert stream_text(replies_to(frames, after, "stream")) == "still here\n", [summary(f) for f in frames]


def test_restart_with_env_and_working_directory(server, open_channel, tmp_path):
    session_id = python_session_with(server, env=[{"action": "replace", "name": "KC_TEST", "value": "before"}],
                                     connection_timeout=10)
    channel = open_channel(server, session_id)
    check = 'import os; print(os.environ["KC_TEST"], os.getcwd())'
    request = channel.execute(check)
    frames = channel.until_idle(request)
    assert stream_text(replies_to(frames, request, "stream")) == f"before {os.path.realpath(HERE)}\n"
    old_pid = get_session(server, session_id)["process_id"]

    new_dir = tmp_path / "restart-here"
    new_dir.mkdir()
    mark = len(channel.frames)
    server.client.call("POST", f"/sessions/{session_id}/restart", {
        "working_directory": str(new_dir),
        "env": [{"action": "replace", "name": "KC_TEST", "value": "after"}]})

    # The same WebSocket sees the old kernel exit and the new one start
    def restarted(_frame):
        since = channel.frames[mark:]
        return kernel_events(since, "exited") and {"status": "starting", "reason": "start API called"} \
            in kernel_events(since, "status")

    channel.until(restarted, timeout=20)
    statuses = [s["status"] for s in kernel_events(channel.frames[mark:], "status")]
    assert "exited" in statuses, statuses

    request = channel.execute(check)
    frames = channel.until_idle(request, timeout=20)
    assert stream_text(replies_to(frames, request, "stream")) == f"after {os.path.realpath(new_dir)}\n"
    info = get_session(server, session_id)
    assert info["process_id"] != old_pid
    assert pid_gone(old_pid)
    assert info["status"] == "idle"


def test_working_dir_changed_event(python_session, open_channel):
    server, session_id = python_session
    channel = open_channel(server, session_id)
    request = channel.execute('import os; os.chdir("/tmp")')
    # The event follows the kernel's idle (kcgevent checks the cwd once the idle is on its way,
    # not before it as Kallichore does; clients ignore this event's position)
    until(channel, lambda f: is_event(f, "workingDirChanged"), timeout=10)
    frames = channel.frames
    assert kernel_events(frames, "workingDirChanged") == [os.path.realpath("/tmp")], \
        [summary(f) for f in frames]
    at = next(i for i, f in enumerate(frames) if is_event(f, "workingDirChanged"))
    events_before = [f["status"] for f in frames[:at] if is_event(f, "status")]
    assert events_before[-1] == {"status": "idle", "reason": "execute_request"}
    assert replies_to(frames[:at], request, "execute_input"), "the event came before the execution"
    assert get_session(server, session_id)["working_directory"] == os.path.realpath("/tmp")

    # No event when the directory does not change
    for code in ("x = 1", "y = 2"):
        channel.until_idle(channel.execute(code))
    assert kernel_events(channel.frames, "workingDirChanged") == [os.path.realpath("/tmp")]
    # ... and one when it changes again
    channel.execute(f'os.chdir({HERE!r})')
    until(channel, lambda f: is_event(f, "workingDirChanged") and f["workingDirChanged"] != os.path.realpath("/tmp"),
          timeout=10)
    assert kernel_events(channel.frames, "workingDirChanged")[-1] == os.path.realpath(HERE)


def test_shutdown_request_over_control(python_session, open_channel):
    """Positron shuts a kernel down with a shutdown_request on control, through the channel."""
    server, session_id = python_session
    channel = open_channel(server, session_id)
    request = channel.send(jupyter_message("shutdown_request", {"restart": False}, channel="control"))
    frames = channel.until(lambda f: is_event(f, "exited"), timeout=20)
    # ipykernel answers on control (and also publishes a copy on iopub)
    replies = [f for f in replies_to(frames, request, "shutdown_reply") if f["channel"] == "control"]
    assert replies, [summary(f) for f in frames]
    assert replies[0]["content"]["restart"] is False
    reply_at = frames.index(replies[0])
    exited_at = next(i for i, f in enumerate(frames) if is_event(f, "exited"))
    assert reply_at < exited_at
    assert kernel_events(frames, "exited") == [0]
    assert {"status": "exited", "reason": "child process exited"} in kernel_events(frames, "status")
    wait_for(lambda: get_session(server, session_id)["status"] == "exited", 5, "status exited")
    server.client.call("DELETE", f"/sessions/{session_id}")
    status, _ = server.client.request("GET", f"/sessions/{session_id}")
    assert status == 404


# -- fake kernel -----------------------------------------------------------------------------------


def test_kill_ends_the_kernel_and_its_children(fake_session, open_channel):
    server, session_id = fake_session
    channel = open_channel(server, session_id)
    kernel_pid = get_session(server, session_id)["process_id"]
    request = channel.execute("spawn_child")
    frames = channel.until_idle(request)
    text = stream_text(replies_to(frames, request, "stream"))
    assert text.startswith("child "), text
    child_pid = int(text.split()[1])
    assert psutil.pid_exists(child_pid) and not pid_gone(child_pid)
    assert psutil.Process(child_pid).ppid() == kernel_pid

    server.client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: pid_gone(kernel_pid) and pid_gone(child_pid), 5, "kernel and child to be gone")
    frames = channel.until(lambda f: is_event(f, "exited"), timeout=10)
    assert kernel_events(frames, "exited") == [-1]  # killed by a signal
    wait_for(lambda: get_session(server, session_id)["status"] == "exited", 5, "status exited")
    assert "process_id" not in get_session(server, session_id)


def test_second_client_takes_over(fake_session, open_channel):
    server, session_id = fake_session
    a = open_channel(server, session_id)
    warm = a.execute("print one")
    a.until_idle(warm)
    reply_for(a, warm)  # A has read everything about `warm`
    b = open_channel(server, session_id)

    frames = read_until_closed(a.ws, timeout=10)
    assert frames and frames[-1] == {"kind": "kernel", "clientDisconnected":
                                     "Another client is connecting to this session."}, \
        [summary(f) for f in frames]

    request = b.execute("print two")
    frames = b.until_idle(request)
    assert stream_text(replies_to(frames, request, "stream")) == "two\n"
    assert not replies_to(frames, warm), "B got frames A had already received"
    assert get_session(server, session_id)["connected"] is True


def test_invalid_frames_get_an_error_event(fake_session, open_channel):
    server, session_id = fake_session
    channel = open_channel(server, session_id)
    channel.ws.send("not json")
    error = channel.until(lambda f: is_event(f, "error"))[-1]["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]

    bogus = execute_request("print nope")
    bogus["channel"] = "bogus"
    channel.send(bogus)
    frames = channel.until(lambda f: is_event(f, "error"))
    assert "bogus" in frames[-1]["error"]["message"]
    assert not replies_to(frames, bogus)

    request = channel.execute("print still works")
    frames = channel.until_idle(request)
    assert stream_text(replies_to(frames, request, "stream")) == "still works\n"
    assert not replies_to(channel.frames, bogus)
    assert get_session(server, session_id)["connected"] is True


def test_output_produced_while_detached_reaches_the_next_client(fake_session, open_channel):
    server, session_id = fake_session
    a = open_channel(server, session_id)
    request = a.execute("sleep 1\nflood 300")
    a.close()
    time.sleep(3)
    wait_for(lambda: not get_session(server, session_id)["connected"], 5, "A to be detached")

    b = open_channel(server, session_id)
    frames = b.until_idle(request, timeout=15)
    assert stream_lines(frames, request) == [f"{i}\n" for i in range(300)]


def test_resume_after_seq_is_exactly_once(fake_session, open_channel):
    server, session_id = fake_session
    total = 5000
    a = open_channel(server, session_id, after=0)
    request = a.execute(f"flood {total}")
    texts_a = []
    last_seq = None
    while len(texts_a) < 100:
        frame = a.recv(timeout=15)
        assert "seq" in frame, frame
        assert last_seq is None or frame["seq"] == last_seq + 1, (last_seq, frame["seq"])
        last_seq = frame["seq"]
        if is_jupyter(frame, "stream", request):
            texts_a.append(frame["content"]["text"])
    a.ws.shutdown()  # abrupt: no Close frame

    b = open_channel(server, session_id, after=last_seq)
    frames = b.until_idle(request, timeout=30)
    assert frames[0]["seq"] == last_seq + 1, summary(frames[0])
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(last_seq + 1, last_seq + 1 + len(frames)))
    texts_b = stream_lines(frames, request)
    combined = texts_a + texts_b
    assert len(combined) == total, (len(texts_a), len(texts_b))
    assert combined == [f"{i}\n" for i in range(total)]

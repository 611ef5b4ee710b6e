"""R through its kernelspec (Debian's r-cran-irkernel): execute, an error, interrupt, restart, kill.

IRkernel's kernelspec says nothing about interrupts, so the kernelspec default applies: signal mode
(IRkernel ignores interrupt_request messages)."""
import shutil

import pytest
from conftest import get_session, new_id, pid_gone, replies_to, stream_text, wait_for

from kcgevent import kernelspecs


def ir_kernelspec():
    if shutil.which("R") is None:
        return None
    try:
        return kernelspecs.find("ir")
    except kernelspecs.KernelSpecError:
        return None


pytestmark = pytest.mark.skipif(ir_kernelspec() is None, reason="R with IRkernel is not installed "
                                "(.ci/run installs r-base-core and r-cran-irkernel when it can)")


def printed(request, text):
    def check(frame):
        return (frame.get("kind") == "jupyter" and frame["header"]["msg_type"] == "stream"
                and text in frame["content"].get("text", "")
                and (frame.get("parent_header") or {}).get("msg_id") == request["header"]["msg_id"])
    return check


def test_r_session(server, open_channel, tmp_path):
    client = server.client
    session_id = new_id("r")
    # R's per-process temp dir goes under tmp_path: the R this test kills cannot remove its own
    client.call("PUT", "/sessions", {"session_id": session_id, "kernel_name": "ir",
                                     "env": [{"action": "replace", "name": "TMPDIR", "value": str(tmp_path)}]})
    described = get_session(server, session_id)
    assert described["language"] == "R" and described["interrupt_mode"] == "signal"
    assert described["argv"][:2] == ["R", "--slave"]
    info = client.call("POST", f"/sessions/{session_id}/start", timeout=60)
    assert info["language_info"]["name"] == "R"
    channel = open_channel(server, session_id)

    request = channel.execute('x <- 6 * 7; cat("answer", x, "\\n")')
    assert stream_text(replies_to(channel.until_idle(request, timeout=30), request)) == "answer 42 \n"

    request = channel.execute('stop("deliberate failure")')
    frames = replies_to(channel.until_idle(request, timeout=30), request)
    reply = [f for f in frames if f["header"]["msg_type"] == "execute_reply"][0]
    assert reply["content"]["status"] == "error"
    assert "deliberate failure" in "".join(f["content"].get("evalue", "") + "".join(f["content"].get("traceback", []))
                                           for f in frames if f["header"]["msg_type"] == "error"), frames

    # interrupt once the code runs (IRkernel drops a SIGINT that lands before it evaluates the cell)
    request = channel.execute('cat("sleeping\\n"); Sys.sleep(30)')
    channel.until(printed(request, "sleeping"), timeout=15)
    client.call("POST", f"/sessions/{session_id}/interrupt")
    channel.until_idle(request, timeout=15)  # well before the 30 s are up
    request = channel.execute('cat("still here", x, "\\n")')
    assert stream_text(replies_to(channel.until_idle(request, timeout=30), request)) == "still here 42 \n"

    first_pid = get_session(server, session_id)["process_id"]
    client.call("POST", f"/sessions/{session_id}/restart", timeout=60)
    wait_for(lambda: pid_gone(first_pid), 15, "the first R to exit")
    request = channel.execute('cat(exists("x"), "\\n")')
    assert stream_text(replies_to(channel.until_idle(request, timeout=30), request)) == "FALSE \n"

    second_pid = get_session(server, session_id)["process_id"]
    client.call("POST", f"/sessions/{session_id}/kill")
    wait_for(lambda: pid_gone(second_pid), 15, "the killed R to exit")
    wait_for(lambda: get_session(server, session_id)["status"] == "exited", 15, "status exited")

"""The kernel facts the delivery rule rests on (session/delivery.py, README "Nothing is lost or repeated").

Plain socket pairs, no server: if a platform behaves differently, these fail first and say which fact.
"""
import socket
import sys
import time

import pytest

from kcgevent.session import delivery
from kcgevent.websocket import OP_TEXT, frame, frame_size

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TIOCOUTQ semantics are Linux's")


def wait_until(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def tcp_pair():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


def test_unix_pending_is_zero_once_the_peer_has_read_everything():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, peer:
        ours.sendall(b"x" * 1000)
        assert delivery.pending(ours) > 0
        peer.recv(400)
        assert delivery.pending(ours) > 0, "partly read must not look like all read"
        peer.recv(600)
        assert delivery.pending(ours) == 0
        peer.close()
        assert not delivery.take_reset(ours), "a peer that read everything leaves no reset"


def test_unix_peer_that_closes_with_unread_data_leaves_a_reset():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        ours.sendall(b"y" * 5000)
        peer.recv(10)
        peer.close()
        assert delivery.pending(ours) == 0  # the unread data was thrown away ...
        assert delivery.take_reset(ours)  # ... and only the reset tells


def test_tcp_pending_counts_unacknowledged_bytes_and_our_fin(tcp_pair):
    server, client = tcp_pair
    server.setblocking(False)
    sent = 0
    try:
        while True:
            sent += server.send(b"z" * 65536)
    except BlockingIOError:
        pass
    server.setblocking(True)
    wait_until(lambda: delivery.pending(server) < sent)  # some is acknowledged (in the client's buffer)
    stuck = delivery.pending(server)
    assert stuck > 0
    server.shutdown(socket.SHUT_WR)
    assert delivery.pending(server) == stuck + 1, "the FIN counts as one more"
    received = 0
    while True:
        data = client.recv(1 << 20)
        if not data:
            break
        received += len(data)
    assert received == sent
    client.close()
    wait_until(lambda: delivery.pending(server) == 0 and delivery.tcp_over(server))


def test_tcp_pending_stays_exact_after_the_peer_resets(tcp_pair):
    server, client = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.setblocking(False)
    try:
        while True:
            server.send(b"w" * 65536)
    except BlockingIOError:
        pass
    wait_until(lambda: delivery.pending(server) > 0)
    time.sleep(0.05)
    before = delivery.pending(server)
    client.close()  # unread data: the client's TCP answers with a reset
    wait_until(lambda: delivery.tcp_over(server))
    assert delivery.pending(server) == before, "a reset must not change what counts as unacknowledged"


def test_abort_resets_so_the_peer_never_gets_what_was_not_acknowledged(tcp_pair):
    server, client = tcp_pair
    server.sendall(b"acked")
    wait_until(lambda: delivery.pending(server) == 0)
    delivery.abort(server)
    assert client.recv(100) == b"acked"  # acknowledged before: delivered
    with pytest.raises(ConnectionResetError):
        client.recv(100)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_frame_size_matches_the_frames_sent(n):
    assert frame_size(n) == len(frame(OP_TEXT, b"a" * n))

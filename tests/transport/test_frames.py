"""RPC frames (transport/rpc.FrameSocket) over a real TCP connection: whole frames with or
without polling, and deadlines kept although the kernel's bound is not reset per receive."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from memfabric.transport import rpc

from .paths import RECEIVE_PATH_IDS, RECEIVE_PATHS, Interrupted, interrupted_after

WAIT_S = 5.0   # a generous bound for "does not hang"; never a performance threshold


# Each test runs on the Python receive path and on the compiled one (_frames.c), sleeping
# and polling.
@pytest.fixture(params=RECEIVE_PATHS, ids=RECEIVE_PATH_IDS)
def frames(request):
    poll_s, compiled = request.param
    if compiled and rpc._frames is None:
        pytest.fail("the compiled receive path (memfabric._frames) was not built: run ./dev setup")
    listener = rpc.listen("127.0.0.1:0", 1)
    client = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S, poll_s)
    server_sock, _ = listener.accept()
    server = rpc.FrameSocket(server_sock, poll_s)
    client.compiled = server.compiled = compiled
    yield client, server
    client.close()
    server.close()
    listener.close()


@pytest.fixture(params=[0.0, 0.05], ids=["sleeps", "polls"])
def python_frames(request):
    """The Python path's own machinery: the kernel's receive bound (SO_RCVTIMEO), which the
    compiled path does not use (it waits in poll(2) with the deadline's timeout)."""
    listener = rpc.listen("127.0.0.1:0", 1)
    client = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S, request.param)
    server = rpc.FrameSocket(listener.accept()[0], request.param)
    client.compiled = server.compiled = False
    yield client, server
    client.close()
    server.close()
    listener.close()


def test_a_frame_and_its_payload_arrive_whole(frames):
    client, server = frames
    for size in (0, 100, rpc.SMALL_PAYLOAD + 1, 3 << 20):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        client.send({"id": size, "op": "seg_write"}, memoryview(payload))
        header, payload_len = server.recv_header(frame_timeout_s=WAIT_S)
        into = memoryview(bytearray(payload_len))
        server.recv_into_exact(into, time.monotonic() + WAIT_S)
        assert header == {"id": size, "op": "seg_write"} and bytes(into) == payload


def test_a_kernel_bound_shorter_than_the_deadline_waits_again(python_frames):
    client, server = python_frames
    client._bound(0.3)          # left from an earlier receive; the deadline is later than it
    threading.Timer(0.5, server.send, args=({"id": 1},)).start()
    header, _ = client.recv_header(time.monotonic() + WAIT_S)
    assert header == {"id": 1}


def test_a_kernel_bound_longer_than_the_deadline_is_cut_to_it(python_frames):
    client, _ = python_frames
    client._bound(WAIT_S)       # left from an earlier receive; this deadline is much nearer
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        client.recv_header(time.monotonic() + 0.2)
    assert time.monotonic() - started < WAIT_S / 2, "the leftover bound stretched the deadline"


def kernel_bound_s(sock: socket.socket) -> float:
    seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return seconds + micros / 1e6


def test_an_idle_connection_outlives_the_kernel_bound_and_drops_a_short_one(python_frames):
    client, server = python_frames
    server._bound(0.05)         # left from a payload receive; waiting for a request has no end
    seen = []

    def look_then_send() -> None:
        seen.append(kernel_bound_s(server.sock))
        client.send({"id": 2, "op": "hello"})
    threading.Timer(0.4, look_then_send).start()
    header, _ = server.recv_header(frame_timeout_s=WAIT_S)
    assert header == {"id": 2, "op": "hello"}
    assert seen[0] == 0 or seen[0] >= rpc.IDLE_BOUND_MIN_S, "an idle wait kept waking up every 50 ms"


def test_a_waiting_frame_is_taken_by_the_poll_without_blocking():
    listener = rpc.listen("127.0.0.1:0", 1)
    sender = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S)
    receiver = rpc.FrameSocket(listener.accept()[0], busy_poll_s=0.05)
    try:
        sender.send({"id": 3, "op": "seg_read"})
        time.sleep(0.05)                         # the frame is queued before the wait begins

        def no_blocking_receive(*_args):
            raise AssertionError("waited in the kernel: the poll did not take the frame")
        receiver._recv_some = no_blocking_receive
        header, _ = receiver.recv_header(frame_timeout_s=WAIT_S)
        assert header == {"id": 3, "op": "seg_read"}
    finally:
        sender.close()
        receiver.close()
        listener.close()


def test_the_deadline_holds_for_a_silent_peer(frames):
    client, _ = frames
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        client.recv_header(time.monotonic() + 0.2)
    assert time.monotonic() - started < WAIT_S


def test_a_hang_up_is_seen_and_unread_data_is_not_one(frames):
    client, server = frames
    server.send({"id": 4})                       # a reply waiting, unread
    time.sleep(0.05)
    assert not client.peer_gone()
    server.close()
    deadline = time.monotonic() + WAIT_S
    while not client.peer_gone():
        assert time.monotonic() < deadline, "the hang-up was never seen"
        time.sleep(0.01)
    header, _ = client.recv_header(time.monotonic() + WAIT_S)   # what was sent still arrives
    assert header == {"id": 4}


def test_a_trickled_frame_cannot_stretch_the_deadline(frames):
    client, server = frames
    stop = threading.Event()

    def trickle() -> None:                     # one byte of a frame every 50 ms, forever
        while not stop.wait(0.05):
            try:
                server.sock.send(b"\0")
            except OSError:
                return
    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(socket.timeout):
            client.recv_header(time.monotonic() + 0.3)
    finally:
        stop.set()
    assert time.monotonic() - started < WAIT_S


def test_a_gathered_payload_lands_in_scattered_buffers(frames):
    """A list payload goes as its parts back to back, and recv_into_views fills a list of
    buffers in order: more parts than one sendmsg or recvmsg_into takes (MAX_IOV), parts of
    every size, empty ones too, small frames (copied next to the header) and large ones."""
    client, server = frames
    for count, part in ((3, 10), (rpc.MAX_IOV + 5, 7), (rpc.MAX_IOV * 2 + 1, 4096), (5, 1 << 20)):
        parts = [memoryview(bytes([i % 251]) * (part + i % 3)) for i in range(count)]
        parts[1] = memoryview(b"")
        total = sum(len(p) for p in parts)
        sender = threading.Thread(target=client.send, args=({"id": count}, parts))
        sender.start()                           # a large frame fills the socket: receive meanwhile
        header, payload_len = server.recv_header(frame_timeout_s=WAIT_S)
        assert header == {"id": count} and payload_len == total
        into = [memoryview(bytearray(len(p))) for p in parts]
        server.recv_into_views(into, time.monotonic() + WAIT_S)
        sender.join(WAIT_S)
        assert [bytes(v) for v in into] == [bytes(p) for p in parts]


# ---- a payload landing with its header (recv_frame's `into`, the lone-reply fast path) -------------

def test_a_payload_of_the_expected_size_lands_with_its_header(frames):
    client, server = frames
    for size in (1, rpc.SMALL_PAYLOAD + 1, 1 << 20):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        sender = threading.Thread(target=server.send, args=({"id": size}, memoryview(payload)))
        sender.start()
        into = memoryview(bytearray(size))
        header, payload_len, landed = client.recv_frame(time.monotonic() + WAIT_S, WAIT_S, into)
        sender.join(WAIT_S)
        assert header == {"id": size} and payload_len == size
        assert landed == client.compiled      # the Python path leaves it to the caller
        if not landed:
            client.recv_into_exact(into, time.monotonic() + WAIT_S)
        assert bytes(into) == payload


def test_a_payload_of_another_size_or_a_long_header_is_left_unread(frames):
    """The buffer stays untouched and the stream whole: the next read takes the payload."""
    client, server = frames
    long_message = "x" * (rpc.FIRST_BLOCK * 2)
    for header, payload in (({"id": 1}, b"abc"), ({"id": 2, "error": 3, "msg": long_message}, b"0123456789"),
                            ({"id": 3, "error": 3, "msg": "short"}, b"")):
        server.send(header, memoryview(payload) if payload else None)
        into = memoryview(bytearray(b"\xee" * 10))
        got, payload_len, landed = client.recv_frame(time.monotonic() + WAIT_S, WAIT_S, into)
        assert got == header and payload_len == len(payload) and not landed
        assert bytes(into) == b"\xee" * 10, "a frame not for this buffer wrote into it"
        assert client.recv_exact(payload_len, time.monotonic() + WAIT_S) == payload
    server.send({"id": 4})
    assert client.recv_header(time.monotonic() + WAIT_S) == ({"id": 4}, 0)


def test_a_payload_that_stalls_part_way_is_a_mid_frame_timeout(frames):
    client, server = frames
    head = rpc.wire.encode({"id": 7})
    frame = rpc.PREFIX.pack(len(head), 1000) + head.ljust(rpc.FIRST_BLOCK - rpc.PREFIX.size, b"\0")
    server.sock.sendall(frame + b"y" * 500)          # half the payload, then silence
    into = memoryview(bytearray(1000))
    started = time.monotonic()
    with pytest.raises(socket.timeout) as raised:
        header, _, landed = client.recv_frame(time.monotonic() + WAIT_S, 0.3, into)
        if not landed:                               # the Python path: the caller reads it
            client.recv_into_exact(into, time.monotonic() + 0.3)
    assert time.monotonic() - started < WAIT_S
    if client.compiled:       # the Python path's caller knows it was mid-frame (rpc_link.py)
        assert isinstance(raised.value, rpc.MidFrameTimeout)


def test_a_peer_that_hangs_up_mid_wait_is_a_connection_error(frames):
    client, server = frames
    threading.Timer(0.2, server.close).start()
    with pytest.raises(ConnectionError):
        client.recv_frame(time.monotonic() + WAIT_S, WAIT_S, memoryview(bytearray(10)))


def test_a_signal_handler_that_raises_stops_a_wait(frames):
    """Ctrl-C during an idle wait (no deadline) is seen at once, as in a Python receive."""
    client, _ = frames

    with interrupted_after(0.3):
        started = time.monotonic()
        with pytest.raises(Interrupted):
            client.recv_frame(None, None, None)
        assert time.monotonic() - started < WAIT_S


def test_a_socket_closed_under_a_waiting_reader_never_lends_it_another_connection(frames):
    """Another thread closes the FrameSocket while a reader waits in it (RpcLink._shut does,
    from any thread), and a new connection then takes the lowest free fd number, the closed
    one. The reader must fail; it must not read the new connection's frame (the compiled
    receive works on the fd number, not on the Python socket)."""
    client, server = frames
    stolen = []
    for i in range(20):
        if i:        # a fresh connection each round: the last one is closed
            listener = rpc.listen("127.0.0.1:0", 1)
            client = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S, server._busy_poll.window_s)
            client.compiled = server.compiled
            server.close()
            server = rpc.FrameSocket(listener.accept()[0])
            listener.close()
        waiting, outcome = threading.Event(), []

        def read() -> None:
            waiting.set()
            try:
                outcome.append(client.recv_frame(time.monotonic() + WAIT_S, WAIT_S, None))
            except (ConnectionError, OSError) as exc:
                outcome.append(exc)
        reader = threading.Thread(target=read)
        reader.start()
        waiting.wait(WAIT_S)
        time.sleep(0.01)                       # in its wait
        client.close()
        mine, theirs = socket.socketpair()     # takes the fd number just closed, if it is free
        try:
            head = rpc.wire.encode({"id": 777})
            frame = rpc.PREFIX.pack(len(head), 0) + head.ljust(rpc.FIRST_BLOCK - rpc.PREFIX.size, b"\0")
            theirs.sendall(frame)
            reader.join(WAIT_S)
            assert not reader.is_alive()
            if not isinstance(outcome[0], BaseException):
                stolen.append(outcome[0])
            else:
                mine.settimeout(WAIT_S)
                assert mine.recv(len(frame), socket.MSG_WAITALL) == frame
        finally:
            mine.close()
            theirs.close()
    server.close()
    assert not stolen, f"{len(stolen)} of 20 readers read another connection's frame: {stolen[0]}"


def test_a_signal_that_comes_while_the_wait_polls_still_stops_it():
    """Ctrl-C that arrives while a wait busy-polls (no syscall there blocks, so none returns
    EINTR) must still stop the wait when it goes on to sleep; it must not be held until a
    frame comes."""
    listener = rpc.listen("127.0.0.1:0", 1)
    client = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S, 0.5)   # a long poll
    server = rpc.FrameSocket(listener.accept()[0])
    unblock = threading.Timer(2 * WAIT_S, server.send, args=({"id": 1},))   # ends the wait on any path
    unblock.start()
    try:
        with interrupted_after(0.1):                     # within the poll
            started = time.monotonic()
            with pytest.raises(Interrupted):
                client.recv_frame(None, None, None)
            assert time.monotonic() - started < WAIT_S, "the signal waited for a frame"
    finally:
        unblock.cancel()
        client.close()
        server.close()
        listener.close()

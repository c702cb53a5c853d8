"""The same-host channel (transport/ipc.IpcChannel) over a real SEQPACKET socket pair, on its
Python receive path and on the compiled one (_frames.c recv_packet): whole messages, fds
close-on-exec, oversized messages and too many fds refused with nothing leaked, EOF, the
kernel's receive bound, and a signal handler that raises."""

from __future__ import annotations

import fcntl
import os
import socket
import time

import pytest

from memfabric.errors import ProtocolError
from memfabric.limits import MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES
from memfabric.transport import ipc, wire

from .paths import RECEIVE_PATH_IDS, RECEIVE_PATHS, Interrupted, interrupted_after

WAIT_S = 5.0   # a generous bound for "does not hang"; never a performance threshold


@pytest.fixture(params=RECEIVE_PATHS, ids=RECEIVE_PATH_IDS)
def channels(request):
    poll_s, compiled = request.param
    if compiled and ipc._frames is None:
        pytest.fail("the compiled receive path (memfabric._frames) was not built: run ./dev setup")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = ipc.IpcChannel(a, poll_s), ipc.IpcChannel(b, poll_s)
    receiver.set_deadline(WAIT_S)
    sender.compiled = receiver.compiled = compiled
    yield sender, receiver
    sender.close()
    receiver.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_message_and_its_fds_arrive_whole_and_close_on_exec(channels):
    sender, receiver = channels
    r, w = os.pipe()
    try:
        sender.send({"id": 1, "op": "x", "data": b"y" * 1000}, [r, w])
        message, fds = receiver.recv()
        assert message == {"id": 1, "op": "x", "data": b"y" * 1000} and len(fds) == 2
        try:
            assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
            os.write(fds[1], b"through")          # the same pipe, received
            assert os.read(r, 7) == b"through"
        finally:
            for fd in fds:
                os.close(fd)
        sender.send({"id": 2})
        assert receiver.recv() == ({"id": 2}, [])
    finally:
        os.close(r)
        os.close(w)


def test_an_oversized_message_is_refused_and_its_fds_closed(channels):
    sender, receiver = channels
    r, w = os.pipe()
    try:
        before = open_fds()
        socket.send_fds(sender.sock, [b"\x81" + b"x" * MAX_MESSAGE_BYTES], [r])     # past the limit
        with pytest.raises(ProtocolError):
            receiver.recv()
        assert open_fds() == before, "a refused message's fds stayed open"
    finally:
        os.close(r)
        os.close(w)


def test_more_fds_than_a_message_takes_are_refused_and_none_leak(channels):
    sender, receiver = channels
    pipes = [os.pipe() for _ in range(MAX_FDS_PER_MESSAGE)]
    try:
        before = open_fds()
        socket.send_fds(sender.sock, [wire.encode({"id": 1})], [fd for pair in pipes for fd in pair])
        with pytest.raises(ProtocolError):
            receiver.recv()
        assert open_fds() == before, "fds of a refused message stayed open"
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)


def test_a_closed_peer_is_peer_closed(channels):
    sender, receiver = channels
    sender.close()
    with pytest.raises(ipc.PeerClosed):
        receiver.recv()


def test_the_kernel_bound_ends_a_silent_wait(channels):
    _, receiver = channels
    receiver.set_deadline(0.2)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        receiver.recv()
    assert time.monotonic() - started < WAIT_S


def test_a_signal_handler_that_raises_stops_a_wait(channels):
    """Ctrl-C while a client waits for its reply is seen at once."""
    _, receiver = channels

    with interrupted_after(0.3):
        started = time.monotonic()
        with pytest.raises(Interrupted):
            receiver.recv()
        assert time.monotonic() - started < WAIT_S

def test_a_signal_that_comes_while_the_wait_polls_still_stops_it():
    """Ctrl-C that arrives while the receive busy-polls (no syscall there blocks, so none
    returns EINTR) must stop the wait when it goes on to sleep, not at its kernel bound."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = ipc.IpcChannel(a), ipc.IpcChannel(b, 0.5)     # a long poll
    receiver.set_deadline(3 * WAIT_S)
    try:
        with interrupted_after(0.1):                     # within the poll
            started = time.monotonic()
            with pytest.raises(Interrupted):
                receiver.recv()
            assert time.monotonic() - started < WAIT_S, "the signal waited for the kernel bound"
    finally:
        sender.close()
        receiver.close()

"""Adaptive busy-polling (transport/busy_poll.py) on real sockets: when it polls, when it
sleeps, and that a message taken by the poll is the same whole message, fds and all."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from memfabric.errors import ProtocolError
from memfabric.limits import MAX_MESSAGE_BYTES
from memfabric.transport.busy_poll import BusyPoll
from memfabric.transport.ipc import IpcChannel


class Recorder:
    """A receive on a real socket pair that records which way each message was taken."""

    def __init__(self) -> None:
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.calls: list[str] = []

    def try_now(self) -> bytes:
        self.calls.append("poll")
        return self.mine.recv(64, socket.MSG_DONTWAIT)

    def block(self) -> bytes:
        self.calls.append("sleep")
        return self.mine.recv(64)

    def close(self) -> None:
        self.mine.close()
        self.theirs.close()


@pytest.fixture
def pair():
    recorder = Recorder()
    yield recorder
    recorder.close()


def test_a_waiting_message_is_taken_by_the_poll(pair):
    pair.theirs.send(b"ready")
    assert BusyPoll(0.05).receive(pair.try_now, pair.block) == b"ready"
    assert pair.calls == ["poll"]


def test_polling_stops_after_a_slow_peer_and_resumes_after_a_quick_one(pair):
    poll = BusyPoll(0.05)
    late = threading.Timer(0.3, pair.theirs.send, args=(b"late",))
    late.start()
    assert poll.receive(pair.try_now, pair.block) == b"late"       # polled the window, then slept
    assert pair.calls[0] == "poll" and pair.calls[-1] == "sleep"
    late.join()

    pair.calls.clear()
    pair.theirs.send(b"quick")
    assert poll.receive(pair.try_now, pair.block) == b"quick"
    assert pair.calls == ["sleep"], "after a wait longer than the window, the next one sleeps at once"

    pair.calls.clear()
    pair.theirs.send(b"again")
    assert poll.receive(pair.try_now, pair.block) == b"again"
    assert pair.calls == ["poll"], "a quick answer turns polling back on"


def test_a_zero_window_never_polls(pair):
    pair.theirs.send(b"x")
    assert BusyPoll(0.0).receive(pair.try_now, pair.block) == b"x"
    assert pair.calls == ["sleep"]


def test_an_error_from_the_poll_reaches_the_caller(pair):
    pair.theirs.close()                      # EOF is a result, not "nothing yet"
    assert BusyPoll(0.05).receive(pair.try_now, pair.block) == b""
    assert pair.calls == ["poll"]


@pytest.fixture
def channels():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = IpcChannel(a), IpcChannel(b, busy_poll_s=0.05)
    yield sender, receiver
    sender.close()
    receiver.close()


def never_block(channel: IpcChannel) -> None:
    def fail():
        raise AssertionError("waited in the kernel: the poll did not take the message")
    channel._recv_blocking = fail


def test_an_ipc_message_taken_by_the_poll_keeps_its_fds(channels):
    sender, receiver = channels
    r, w = os.pipe()
    try:
        sender.send({"op": "hello", "id": 7}, [w])
        never_block(receiver)
        message, fds = receiver.recv()
        assert message == {"op": "hello", "id": 7} and len(fds) == 1
        os.write(fds[0], b"through the passed fd")
        os.close(fds[0])
        assert os.read(r, 64) == b"through the passed fd"
    finally:
        os.close(r)
        os.close(w)


def test_an_oversized_ipc_message_taken_by_the_poll_is_refused(channels):
    sender, receiver = channels
    sender.sock.send(bytes(MAX_MESSAGE_BYTES + 1))
    never_block(receiver)
    with pytest.raises(ProtocolError):
        receiver.recv()

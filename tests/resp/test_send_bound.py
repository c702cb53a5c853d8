"""The door's replies are sent within RESP_SEND_TIMEOUT_S in all, with the kernel bounding each
wait (SO_SNDTIMEO): found by attacking the door with a client that reads a little at a time."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from memfabric.kv.resp.front import _bound_waits
from memfabric.kv.resp.sending import send_all


def _tcp_pair(small: bool) -> tuple[socket.socket, socket.socket]:
    """(door's end, client's end) of a loopback TCP connection, as the door has them."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.socket()
        if small:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        door, _ = listener.accept()
    finally:
        listener.close()
    if small:
        door.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return door, client


def test_a_client_reading_a_little_at_a_time_is_dropped_within_the_bound():
    """Before the fix (sock.sendall with SO_SNDTIMEO of 0.5 s): a reader taking 4 KiB every
    0.1 s was sent the whole 1 MiB, in 34 s here; each send() moved a few KiB within its bound
    (with the door's 60 s, a piece of a reply could be held for an hour). With a Python
    socket timeout (before SO_SNDTIMEO) sendall gave up after 0.5 s in all."""
    door, client = _tcp_pair(small=True)
    try:
        _bound_waits(door, 0.5)
        stop, read = threading.Event(), [0]

        def trickle():
            while not stop.is_set():
                got = client.recv(4096)
                if not got:
                    return
                read[0] += len(got)
                time.sleep(0.1)
        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        with pytest.raises(OSError):
            send_all(door, b"x" * (1 << 20), within_s=0.5)
        assert read[0] < 1 << 20
        stop.set()
    finally:
        door.close()
        client.close()


def test_a_reply_a_client_reads_is_sent_whole():
    door, client = _tcp_pair(small=False)
    try:
        _bound_waits(door, 5.0)
        got = bytearray()

        def drain():
            while len(got) < 3 << 20:
                piece = client.recv(1 << 16)
                if not piece:
                    return
                got.extend(piece)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        data = bytes(range(256)) * (3 << 12)
        send_all(door, data, within_s=30)
        reader.join(30)
        assert bytes(got) == data
        send_all(door, memoryview(b"tail"), within_s=30)
        assert client.recv(4) == b"tail"
    finally:
        door.close()
        client.close()

"""The door's event loop (_resp.c RespLoop) driven directly: the socket options it sets for a
connection go with the connection when it is handed back, however that happens."""

from __future__ import annotations

import socket
import threading

import pytest

_frames = pytest.importorskip("memfabric._frames")
pytestmark = pytest.mark.skipif(not hasattr(_frames, "RespLoop"), reason="the compiled part is not built")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        door, _ = listener.accept()
    finally:
        listener.close()
    return door, client


def test_a_low_water_mark_set_before_parking_goes_when_the_connection_is_handed_back_at_once():
    """A large command's head pending (what Python's parser left), its rest already received:
    serve set SO_RCVLOWAT for the rest, read it, and handed the connection back (a command not
    the loop's) without parking it, and left the mark set. The connection's next serve parked
    it with the mark still there: epoll never told of a short command again, and the client
    waited for ever (found with random pipelines of GETs, SETs of 70 KB and others)."""
    loop = _frames.RespLoop(5.0)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    door, client = _tcp_pair()
    try:
        key = b"k" * 10000                  # longer than the loop answers: Python's, once whole
        request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
        head, rest = request[:40], request[40:]
        client.sendall(rest)
        # All of the rest received before serve reads (bounded: 10 s a read).
        peeked = b""
        door.settimeout(10)
        while len(peeked) < len(rest):
            peeked = door.recv(len(rest), socket.MSG_PEEK | socket.MSG_WAITALL)
        door.setblocking(True)
        buffer = bytearray(_frames.DOOR_BUFFER_BYTES)
        status, data, gets, sets = loop.serve(door.fileno(), buffer, object(), [], b"pool", b"ns", b"sec", head,
                                              16, 5.0, False)
        assert status == _frames.DOOR_PYTHON and data == request and (gets, sets) == (0, 0)
        assert door.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    finally:
        loop.stop()
        runner.join(timeout=10)
        door.close()
        client.close()

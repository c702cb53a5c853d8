"""The client's compiled put call (_kvput.c call_put, ipc.py IpcChannel.call_put) over a real
SEQPACKET socket pair: the request it builds is byte for byte what msgpack makes of the same
map, and only a reply that is exactly {"stored": True, "id": <its id>} is taken as stored
without Python; every other reply is handed back whole."""

from __future__ import annotations

import os
import socket
import struct
import threading

import msgpack
import pytest

from memfabric.limits import MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES
from memfabric.transport import wire
from memfabric.transport.ipc import IpcChannel

_frames = pytest.importorskip("memfabric._frames")
CREDS = {"pool": "default", "ns": "a namespace", "sec": b"s" * 40}


def exchange(key: bytes, value: bytes, request_id: int, budget_s: float, answer) -> tuple[bytes, tuple]:
    """call_put on one end of a pair; the other end takes the request and sends `answer(request)`."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for s in (mine, theirs):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, MAX_MESSAGE_BYTES * 2)
        got: list[bytes] = []

        def serve() -> None:
            request = theirs.recv(MAX_MESSAGE_BYTES)
            got.append(request)
            theirs.send(answer(msgpack.unpackb(request)))
        t = threading.Thread(target=serve)
        t.start()
        head = wire.encode({"op": "kv_put", **CREDS})[1:]
        buffer = bytearray(MAX_MESSAGE_BYTES)
        result = _frames.call_put(mine.fileno(), head, len(CREDS) + 1, key, value, request_id, budget_s, buffer,
                                  MAX_FDS_PER_MESSAGE, 0.0)
        t.join(10)
        return got[0], result, buffer
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("key_n, value_n", [(1, 0), (31, 1), (32, 255), (255, 256), (256, 65535), (65536, 65536),
                                            (7, 150 << 10)])
@pytest.mark.parametrize("request_id", [0, 127, 128, 255, 65536, 1 << 40])
def test_the_request_is_what_msgpack_makes(key_n, value_n, request_id):
    key, value = bytes(range(256)) * (key_n // 256) + b"k" * (key_n % 256), b"v" * value_n
    budget = 9.87654321
    request, result, _ = exchange(key, value, request_id, budget, lambda m: msgpack.packb({"stored": True, "id": m["id"]}))
    assert request == wire.encode({"op": "kv_put", **CREDS, "key": key, "value": value, "id": request_id,
                                   "budget_s": budget})
    assert result[0] == _frames.PUT_STORED and result[1] == []


@pytest.mark.parametrize("answer", [
    {"stored": False},                                  # NX said no: Python reads it
    {"stored": True, "gone": [["default", 3]]},         # segment news ride along
    {"error": 5, "msg": "permission denied"},
    {"stored": 1},                                      # not True: not the plain reply
])
def test_other_replies_are_handed_back_whole(answer):
    request, result, buffer = exchange(b"k", b"v", 77, 1.0, lambda m: msgpack.packb({**answer, "id": m["id"]}))
    n, fds, flags, _ = result
    assert n > 0 and fds == []
    assert msgpack.unpackb(bytes(buffer[:n])) == {**answer, "id": 77}


def test_a_reply_to_another_request_is_not_taken_as_this_ones():
    _, result, buffer = exchange(b"k", b"v", 77, 1.0, lambda m: msgpack.packb({"stored": True, "id": 76}))
    assert result[0] > 0 and msgpack.unpackb(bytes(buffer[:result[0]])) == {"stored": True, "id": 76}


def test_the_channel_call_reads_a_plain_reply_without_decoding():
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = IpcChannel(mine)
    try:
        assert channel.compiled_calls
        head = wire.encode({"op": "kv_put", **CREDS})[1:]
        theirs.send(msgpack.packb({"stored": True, "id": 5}))     # already waiting when it asks
        assert channel.call_put(head, len(CREDS) + 1, b"k", b"v", 5, 1.0) == ({"stored": True, "id": 5}, [])
        assert msgpack.unpackb(theirs.recv(65536))["key"] == b"k"
    finally:
        channel.close()
        theirs.close()


def _put_call_against(serve) -> tuple[tuple[int, int, float], bytearray]:
    """IpcChannel.put_call's call (ServerLink.call_compiled's terms) on one end of a pair;
    `serve(theirs, request)` plays the server on the other."""
    _records = pytest.importorskip("memfabric._records")
    assert _records
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
        t = threading.Thread(target=lambda: serve(theirs, msgpack.unpackb(theirs.recv(MAX_MESSAGE_BYTES))))
        t.start()
        head = wire.encode({"op": "kv_put", **CREDS})[1:]
        buffer = bytearray(MAX_MESSAGE_BYTES)
        result = IpcChannel.put_call(head, len(CREDS) + 1, b"k", b"v")(mine.fileno(), buffer, 0.0, 9, 1.0)
        t.join(10)
        return result, buffer
    finally:
        mine.close()
        theirs.close()


def test_the_link_call_takes_a_plain_reply_as_done():
    _records = pytest.importorskip("memfabric._records")
    (status, value, _), _ = _put_call_against(lambda s, m: s.send(msgpack.packb({"stored": True, "id": m["id"]})))
    assert (status, value) == (_records.CALL_OK, 1)


def test_the_link_call_hands_back_any_other_reply_for_python_to_read():
    _records = pytest.importorskip("memfabric._records")
    reply = msgpack.packb({"error": 5, "msg": "permission denied", "id": 9})
    (status, value, _), buffer = _put_call_against(lambda s, m: s.send(reply))
    assert (status, value, bytes(buffer[:value])) == (_records.CALL_REPLY, len(reply), reply)


def test_the_link_call_says_closed_timed_out_or_untrusted():
    _records = pytest.importorskip("memfabric._records")
    (status, _, _), _ = _put_call_against(lambda s, m: s.shutdown(socket.SHUT_RDWR))
    assert status == _records.CALL_CLOSED
    (status, _, _), _ = _put_call_against(lambda s, m: None)          # no reply within SO_RCVTIMEO
    assert status == _records.CALL_TIMEOUT
    before = len(os.listdir("/proc/self/fd"))
    with open(os.devnull) as f:      # a reply carrying an fd: the stream is not to be trusted, the fd closed
        (status, _, _), _ = _put_call_against(lambda s, m: socket.send_fds(s, [msgpack.packb({"id": 9})], [f.fileno()]))
        assert status == _records.CALL_BAD
    assert len(os.listdir("/proc/self/fd")) == before

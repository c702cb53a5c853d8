"""The compiled span paths (_spans.c) over a real TCP connection, with no server around them:
serve_spans() serving exactly what a grant covers and handing every other frame back whole,
revocation racing a transfer, broken streams; call_span() and the replies it must leave to
Python. Every wait is bounded; nothing here asserts how fast anything was."""

from __future__ import annotations

import fcntl
import mmap
import socket
import struct
import termios
import threading
import time

import msgpack
import pytest

from memfabric.transport import rpc, wire

from .paths import Interrupted, interrupted_after

_frames = rpc._frames
if _frames is None or not hasattr(_frames, "serve_spans"):
    pytest.fail("the compiled span paths (memfabric._frames) were not built: run ./dev setup", allow_module_level=True)

WAIT_S = 5.0
SEGMENT = 7
SEG_BYTES = 1 << 20
SPAN_OFFSET, SPAN_BYTES = 64 << 10, 256 << 10        # the object's bytes inside the segment
GENERATION, SLOT = 41, 3
SEC = b"the-sec"
NAMES = ("pool", "ns", "1-3-41")


def request(op: str = "seg_read", offset: int = SPAN_OFFSET, length: int = 4096, request_id: int = 5,
            **changes) -> dict:
    m = {"pool": NAMES[0], "ns": NAMES[1], "sec": SEC, "bm_id": NAMES[2], "segment": SEGMENT,
         "op": op, "offset": offset, "length": length, "id": request_id}
    m.update(changes)
    return {k: v for k, v in m.items() if v is not DROP}


DROP = object()


def block_of(head: bytes, payload_len: int) -> bytes:
    first = rpc.PREFIX.pack(len(head), payload_len) + head
    return first + bytes(max(0, rpc.FIRST_BLOCK - len(first)))


class Served:
    """A segment, its object's grant, and serve_spans() on the server end of a TCP connection."""

    def __init__(self) -> None:
        listener = rpc.listen("127.0.0.1:0", 1)
        self.client = socket.create_connection(listener.getsockname())
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server, _ = listener.accept()
        listener.close()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, rpc.timeval(WAIT_S))
        self.segment = mmap.mmap(-1, SEG_BYTES)
        self.view = memoryview(self.segment)
        for i in range(0, SEG_BYTES, 4096):
            self.view[i:i + 4096] = bytes([i // 4096 % 251]) * 4096
        self.gen_map = mmap.mmap(-1, 4096)
        self.gens = memoryview(self.gen_map).cast("Q")
        self.gens[2 * SLOT] = GENERATION
        self.grants = _frames.SpanGrants()
        self.grant()
        self.block = memoryview(bytearray(rpc.FIRST_BLOCK))
        self.results: list = []
        self.thread: threading.Thread | None = None

    def grant(self, spans=None) -> None:
        spans = spans or [(SEGMENT, SPAN_OFFSET, SPAN_BYTES, self.view)]
        self.grants.add(*NAMES, SEC, spans, self.gens, 2 * SLOT, GENERATION, ("token",))

    def serve(self, frame_timeout_s: float = WAIT_S) -> None:
        """serve_spans() in a thread, until it returns (its result or exception in results)."""
        def run():
            try:
                self.results.append(_frames.serve_spans(self.server.fileno(), self.block, self.grants, 0.0001,
                                                        True, frame_timeout_s, 64 << 20))
            except BaseException as exc:      # for the test to see
                self.results.append(exc)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def returned(self):
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "serve_spans() did not return"
        return self.results.pop()

    def reply(self) -> tuple[dict, bytes]:
        self.client.settimeout(WAIT_S)
        block = recv_exactly(self.client, rpc.FIRST_BLOCK)
        head_len, payload_len = rpc.PREFIX.unpack_from(block)
        return wire.decode(block[rpc.PREFIX.size:rpc.PREFIX.size + head_len]), recv_exactly(self.client, payload_len)

    def nothing_sent(self) -> bool:
        try:
            return self.client.recv(1, socket.MSG_DONTWAIT) == b"x"
        except BlockingIOError:
            return True

    def close(self) -> None:
        self.client.close()
        if self.thread is not None:
            self.thread.join(WAIT_S)
        self.server.close()
        self.grants.close()


def unread(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_a_granted_read_is_sent_from_the_segment_and_a_write_lands_in_it(served):
    served.serve()
    served.client.sendall(block_of(wire.encode(request("seg_read", SPAN_OFFSET + 4096, 8192, 9)), 0))
    header, payload = served.reply()
    assert header == {"id": 9} and payload == bytes(served.view[SPAN_OFFSET + 4096:SPAN_OFFSET + 12288])
    data = bytes(range(256)) * 32
    served.client.sendall(block_of(wire.encode(request("seg_write", SPAN_OFFSET, len(data), 10)), len(data)) + data)
    header, payload = served.reply()
    assert header == {"id": 10} and payload == b""
    assert bytes(served.view[SPAN_OFFSET:SPAN_OFFSET + len(data)]) == data
    # Ids as large as msgpack carries, and keys in any order, come back as they were.
    big = 2 ** 64 - 1
    served.client.sendall(block_of(wire.encode(dict(reversed(request(request_id=big).items()))), 0))
    assert served.reply()[0] == {"id": big}
    assert served.grants.served == 3
    served.client.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        raise served.returned()


def _raw_map(pairs: list[tuple[str, object]]) -> bytes:
    """A msgpack map of exactly these pairs (duplicates kept), as a dict cannot hold them."""
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(len(pairs)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in pairs)


# Frames the compiled loop must hand to Python untouched: (name, header bytes, payload length).
FALLBACKS = [
    ("another secId", wire.encode(request(sec=b"the-seC")), 0),
    ("a longer secId", wire.encode(request(sec=SEC + b"x")), 0),
    ("the secId as str", wire.encode(request(sec=SEC.decode())), 0),
    ("another object", wire.encode(request(bm_id="1-3-42")), 0),
    ("another namespace", wire.encode(request(ns="nt")), 0),
    ("another segment", wire.encode(request(segment=SEGMENT + 1)), 0),
    ("before the span", wire.encode(request(offset=SPAN_OFFSET - 1)), 0),
    ("past the span", wire.encode(request(offset=SPAN_OFFSET + SPAN_BYTES - 4095)), 0),
    ("wrapping past 2**64", wire.encode(request(offset=2 ** 64 - 100, length=4096)), 0),
    ("length 0", wire.encode(request(length=0)), 0),
    ("a negative offset", wire.encode(request(offset=-1)), 0),
    ("a bool id", wire.encode(request(request_id=True)), 0),
    ("an extra key", wire.encode({**request(), "budget_s": 5.0}), 0),
    ("a missing key", wire.encode(request(offset=DROP)), 0),
    ("another op", wire.encode(request(op="seg_read_many")), 0),
    ("a read with a payload", wire.encode(request()), 10),
    ("a write with the wrong payload", wire.encode(request(op="seg_write", length=4096)), 4095),
    ("a duplicate key", _raw_map([*request().items(), ("offset", SPAN_OFFSET + 4096)]), 0),
    ("bytes after the map", wire.encode(request()) + b"\x00", 0),
    ("a float length", wire.encode(request(length=4096.0)), 0),
    ("not a map", msgpack.packb([1, 2, 3]), 0),
    ("garbage", bytes(range(200)), 0),
    ("a header longer than the block", wire.encode(request(ns="n" * 300)), 0),
]


@pytest.mark.parametrize("name,head,payload_len", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_a_frame_the_grant_does_not_cover_is_handed_back_whole(served, name, head, payload_len):
    served.serve()
    block = block_of(head, payload_len)
    served.client.sendall(block[:rpc.FIRST_BLOCK])
    status, _, info = served.returned()
    assert status == _frames.FALLBACK and info is None
    assert bytes(served.block) == block[:rpc.FIRST_BLOCK]      # for Python's header_in_block()
    assert served.nothing_sent() and served.grants.served == 0


def test_a_freed_generation_or_a_revoked_grant_is_handed_back(served):
    frame = block_of(wire.encode(request()), 0)
    served.gens[2 * SLOT] = 0               # freed: its home zeroes the word first
    served.serve()
    served.client.sendall(frame)
    assert served.returned()[0] == _frames.FALLBACK
    served.gens[2 * SLOT] = GENERATION
    assert served.grants.revoke(*NAMES) is None       # idle: nothing in flight to hold
    assert len(served.grants) == 0
    served.serve()
    served.client.sendall(frame)
    assert served.returned()[0] == _frames.FALLBACK and served.nothing_sent()


def test_a_grant_revoked_during_its_transfer_is_owed_until_the_transfer_ends(served):
    served.serve()
    length = 64 << 10
    served.client.sendall(block_of(wire.encode(request("seg_write", SPAN_OFFSET, length, 3)), length))
    served.client.sendall(b"a" * 100)
    # Once the loop took those 100 bytes it holds the grant: a revoke says which segment.
    wait_for(lambda: unread(served.server) == 0, "the loop to take the payload's first bytes")
    assert served.grants.revoke(*NAMES) == SEGMENT
    assert served.grants.take_owed() == []            # still under way
    served.client.sendall(b"a" * (length - 100))
    assert served.reply()[0] == {"id": 3}
    assert served.returned()[0] == _frames.OWED
    assert served.grants.take_owed() == [(("token",), SEGMENT)]
    assert served.grants.take_owed() == []


def test_a_stalled_payload_or_a_closed_peer_fails_the_transfer_and_says_so(served):
    length = 64 << 10
    served.serve(frame_timeout_s=0.2)
    served.client.sendall(block_of(wire.encode(request("seg_write", SPAN_OFFSET, length)), length) + b"z" * 10)
    status, _, info = served.returned()
    assert status == _frames.TRANSFER_FAILED and info == "seg_write: it stalled part way"
    assert served.grants.take_owed() == [] and served.grants.revoke(*NAMES) is None   # not held
    served.grant()
    served.serve()
    served.client.sendall(block_of(wire.encode(request("seg_write", SPAN_OFFSET, length)), length) + b"z" * 10)
    time.sleep(0.05)
    served.client.close()
    status, _, info = served.returned()
    assert status == _frames.TRANSFER_FAILED and "closed" in info


def test_a_stalled_first_block_is_stalled(served):
    served.serve(frame_timeout_s=0.2)
    served.client.sendall(block_of(wire.encode(request()), 0)[:100])
    assert served.returned()[0] == rpc._frames.STALLED


def test_grants_change_only_between_serves_and_keep_their_memory_mapped(served):
    served.serve()
    served.client.sendall(block_of(wire.encode(request()), 0))
    assert served.reply()[0] == {"id": 5}          # the loop runs: only revoke() may change grants
    for change in (served.grant, lambda: served.grants.remove(*NAMES), served.grants.close):
        with pytest.raises(RuntimeError):
            change()
    served.client.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        raise served.returned()
    # The grant exports the segment's view (as a server's DramSegment.close() meets it): the
    # mapping cannot go while the grant lives.
    with pytest.raises(BufferError):
        served.view.release()
    assert served.grants.remove(*NAMES) is True and served.grants.remove(*NAMES) is False
    served.view.release()
    served.segment.close()
    served.gens.release()
    served.gen_map.close()


def test_a_span_outside_its_view_is_refused(served):
    small = memoryview(bytearray(4096))
    with pytest.raises(ValueError):
        served.grant([(SEGMENT, 0, 8192, small)])
    with pytest.raises(ValueError):
        served.grant([(SEGMENT, -1, 10, small)])
    with pytest.raises(ValueError):
        served.grants.add(*NAMES, SEC, [(SEGMENT, 0, 10, small)], served.gens, 10 ** 6, GENERATION, None)


# ---- the client's call -------------------------------------------------------------------------


@pytest.fixture
def pair():
    listener = rpc.listen("127.0.0.1:0", 1)
    client = rpc.connect("127.0.0.1:%d" % listener.getsockname()[1], None, WAIT_S, 0.0001)
    server, _ = listener.accept()
    listener.close()
    server.settimeout(WAIT_S)
    yield client, server
    client.close()
    server.close()


HEAD = msgpack.packb({"pool": "p", "ns": "n", "sec": b"s", "bm_id": "1-0-1", "segment": 2, "op": "seg_read"},
                     use_bin_type=True)[1:]


def answer(server: socket.socket, header: dict, payload: bytes = b"") -> dict:
    """Read the request, answer it; returns the request's header."""
    block = recv_exactly(server, rpc.FIRST_BLOCK)
    head_len, payload_len = rpc.PREFIX.unpack_from(block)
    got = wire.decode(block[rpc.PREFIX.size:rpc.PREFIX.size + head_len])
    recv_exactly(server, payload_len)
    server.sendall(block_of(wire.encode(header), len(payload)) + payload)
    return got


def call(client, into=None, payload=None, request_id=7, timeout_s=WAIT_S, frame_timeout_s=WAIT_S) -> int:
    n = len(into if into is not None else payload)
    status, _ = _frames.call_span(client.sock.fileno(), client._block, HEAD, 6, 4096, n, request_id, payload, into,
                                  0.0001, True, timeout_s, frame_timeout_s)
    return status


def test_call_span_sends_the_request_and_lands_the_reply(pair):
    client, server = pair
    into = memoryview(bytearray(1000))
    result: list = []
    t = threading.Thread(target=lambda: result.append(answer(server, {"id": 7}, b"r" * 1000)))
    t.start()
    assert call(client, into=into) == _frames.OK
    t.join(WAIT_S)
    assert result == [{"pool": "p", "ns": "n", "sec": b"s", "bm_id": "1-0-1", "segment": 2, "op": "seg_read",
                       "offset": 4096, "length": 1000, "id": 7}]
    assert bytes(into) == b"r" * 1000


@pytest.mark.parametrize("reply,payload,status", [
    ({"id": 7, "error": 3, "msg": "no"}, b"", _frames.BLOCK),       # an error: Python reads it
    ({"id": 8}, b"r" * 1000, _frames.LANDED),                        # another id: Python refuses it
    ({"id": 7, "more": 1}, b"r" * 1000, _frames.LANDED),             # more than the id
    ({"id": 7}, b"r" * 999, _frames.BLOCK),                          # the wrong payload
], ids=["error", "wrong-id", "more-keys", "short-payload"])
def test_call_span_leaves_any_other_reply_to_python(pair, reply, payload, status):
    client, server = pair
    into = memoryview(bytearray(1000))
    t = threading.Thread(target=answer, args=(server, reply, payload))
    t.start()
    assert call(client, into=into) == status
    t.join(WAIT_S)
    header, payload_len = client.header_in_block(WAIT_S, client._block)
    assert header == reply and payload_len == len(payload)


def test_call_span_says_when_nothing_came_or_a_reply_stalled(pair):
    client, server = pair
    assert call(client, into=memoryview(bytearray(10)), timeout_s=0.1) == _frames.NOTHING
    recv_exactly(server, rpc.FIRST_BLOCK)
    server.sendall(block_of(wire.encode({"id": 7}), 10)[:50])
    assert call(client, into=memoryview(bytearray(10)), request_id=8, frame_timeout_s=0.1) == _frames.STALLED


def test_call_span_with_a_header_too_long_sends_nothing(pair):
    client, server = pair
    head = msgpack.packb({"ns": "n" * 250}, use_bin_type=True)[1:]
    assert _frames.call_span(client.sock.fileno(), client._block, head, 1, 0, 10, 1, b"x" * 10, None, 0.0, False,
                             WAIT_S, WAIT_S) == (_frames.UNSENT, False)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(1)


def test_call_span_refuses_a_buffer_of_another_length(pair):
    client, _ = pair
    fd, block = client.sock.fileno(), client._block
    with pytest.raises(ValueError):
        _frames.call_span(fd, block, HEAD, 6, 0, 11, 1, b"x" * 10, None, 0.0, False, WAIT_S, WAIT_S)
    with pytest.raises(ValueError):
        _frames.call_span(fd, block, HEAD, 6, 0, 10, 1, b"x" * 10, memoryview(bytearray(10)), 0.0, False, WAIT_S,
                          WAIT_S)


def test_ctrl_c_while_a_call_span_send_is_blocked_raises_at_once(pair):
    """The peer takes no more bytes: the send blocks, bounded only by SO_SNDTIMEO (long here).
    A signal whose handler raises (Ctrl-C) must raise at once, as it does in Python's own
    sendmsg, also after part of the payload went out."""
    client, server = pair
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, rpc.timeval(60.0))
    payload = memoryview(bytearray(64 << 20))
    started = time.monotonic()
    with pytest.raises(Interrupted):
        with interrupted_after(0.3):
            call(client, payload=payload)
    assert time.monotonic() - started < 30, "the interrupt waited for the send's own bound"


# ---- the registry of grants (bigmemory/span_grants.py) ------------------------------------------


def test_a_connection_holds_a_bounded_number_of_grants_and_revocation_finds_them(monkeypatch):
    from memfabric.bigmemory import span_grants
    monkeypatch.setattr(span_grants, "MAX_SPAN_GRANTS_PER_CONNECTION", 4)
    segment = mmap.mmap(-1, SEG_BYTES)
    view = memoryview(segment)
    registry = span_grants.SpanGrantRegistry()
    a, b = registry.open(), registry.open()
    for i in range(6):
        for grants in (a, b):
            registry.grant(grants, ("pool", "ns", f"1-{i}-1"), SEC, [(SEGMENT, 4096 * i, 4096, view)], None, i, 1,
                           ("token", i))
    assert len(a.table) == len(b.table) == 4 and list(a.keys) == [("pool", "ns", f"1-{i}-1") for i in range(2, 6)]
    assert registry.revoke("pool", "ns", "1-0-1") == []          # forgotten by both: nothing left to revoke
    assert registry.revoke("pool", "ns", "1-3-1") == [] and len(a.table) == len(b.table) == 3
    assert registry.revoke_namespace("pool", "ns") == [] and len(a.table) == len(b.table) == 0
    registry.grant(a, ("pool", "ns", "1-9-1"), SEC, [(SEGMENT, 0, 4096, view)], None, 9, 1, None)
    assert registry.close(a) == [] and registry.close(b) == [] and registry._holders == {}
    # A grant for an object with more extents than a grant holds is not made (Python serves it).
    c = registry.open()
    registry.grant(c, ("pool", "ns", "1-10-1"), SEC,
                   [(SEGMENT, 4096 * i, 4096, view) for i in range(span_grants.MAX_EXTENTS_PER_SPAN_GRANT + 1)],
                   None, 10, 1, None)
    assert len(c.table) == 0
    registry.close(c)
    view.release()
    segment.close()

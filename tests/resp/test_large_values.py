"""Large values through the commands that hand one back (GET, GETEX, GETRANGE, GETDEL,
GETSET, SET ... GET), on the door's server and on another: byte for byte as Redis answers,
streamed from where the value lies with at most one piece of it in the door's memory at a
time (taken from the reply budget), and a value a command takes away (GETDEL, GETSET) is
never lost for want of reply memory: the command is refused before it runs."""

from __future__ import annotations

import socket
import threading

import redis

from memfabric.kv.rules import homes
from memfabric.limits import KV_INLINE_BYTES

from ..helpers import WAIT_S, wait_until
from .one_door import one_door
from .test_reply_memory import PeakResident
from .wire import READ_S, Raw, encode, stall_reply_budget

MiB = 1 << 20


def _key_on(server_id: int, prefix: str) -> str:
    return next(k for k in (f"{prefix}:{i}" for i in range(1000)) if homes(k.encode(), [1, 2], 1) == [server_id])


def test_large_values_read_and_taken_are_redis_byte_for_byte(redis_server, door_port):
    """Before: GETEX, GETDEL, GETSET and SET ... GET of a value past 192 KiB homed on the other
    server answered LIMIT_EXCEEDED (the value did not fit the servers' message), after GETDEL
    had deleted it and GETSET had written the new one."""
    for server_id in (1, 2):
        for size in (KV_INLINE_BYTES + 1, 3 * MiB, 17 * MiB):
            key = _key_on(server_id, f"large{size}")
            value = bytes(range(256)) * (size // 256) + b"t" * (size % 256)
            other = b"o" * (size + 7)
            requests = [encode("SET", key, value), encode("GET", key), encode("GETRANGE", key, "5", "10"),
                        encode("GETRANGE", key, "-100", "-1"), encode("GETRANGE", key, "1000", str(size * 2)),
                        encode("GETRANGE", key, "0", "-1"), encode("GETEX", key, "EX", "100"), encode("TTL", key),
                        encode("GETSET", key, other), encode("SET", key, value, "GET"), encode("STRLEN", key),
                        encode("GETDEL", key), encode("GET", key), encode("EXISTS", key), encode("GETDEL", key)]
            answers = []
            for port in (redis_server.port, door_port):
                raw = Raw(port)
                raw.sock.settimeout(READ_S * 3)
                # Sent while the replies are read: neither side's buffers hold a pipeline this large.
                sender = threading.Thread(target=raw.send, args=(b"".join(requests),), daemon=True)
                sender.start()
                answers.append([raw.reply() for _ in requests])
                sender.join(WAIT_S)
                raw.close()
            for i, (theirs, ours) in enumerate(zip(*answers)):
                assert ours == theirs, f"server {server_id}, {size} bytes, request {i}: " \
                                       f"{ours[:60]!r}... vs Redis's {theirs[:60]!r}..."


VALUE_BYTES = 12 * MiB
CLIENTS = 6
BUDGET = 24 * MiB
SLACK = 48 * MiB


def test_concurrent_large_gets_hold_no_more_than_the_budget():
    """Before: a GET of a 12 MiB value held it three times over in the door's memory (read,
    joined, framed), and six at once grew the server by about 200 MiB, past any bound."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="160MiB", resp_reply_budget="24MiB") as door:
        setup = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
        values = {f"big:{i}": bytes([65 + i]) * VALUE_BYTES for i in range(CLIENTS)}
        for k, v in values.items():
            setup.set(k, v)
        outcomes: list[str] = []
        lock = threading.Lock()

        def client(key: str) -> None:
            r = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
            for got in (lambda: r.get(key), lambda: r.getex(key, ex=1000), lambda: r.getrange(key, 0, -1)):
                try:
                    outcome = "whole" if got() == values[key] else "WRONG"
                except redis.ResponseError as exc:
                    outcome = f"error {exc}"
                with lock:
                    outcomes.append(outcome)
            r.close()

        peak = PeakResident(door.pid)
        threads = [threading.Thread(target=client, args=(k,)) for k in values]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 12)
            assert not t.is_alive(), "a GET client hung"
        growth = peak.growth()
        assert outcomes == ["whole"] * (CLIENTS * 3), outcomes
        assert growth <= BUDGET + SLACK, f"the server grew by {growth / MiB:.0f} MiB during the GETs " \
                                         f"(budget {BUDGET / MiB:.0f} MiB + {SLACK / MiB:.0f} MiB slack)"
        memory = setup.info("memory")
        assert memory["mem_clients_normal"] == 0, memory           # every reply gave its bytes back
        assert 0 < memory["reply_budget_peak"] <= BUDGET, memory
        setup.close()


def test_a_value_taken_away_is_not_lost_when_the_reply_memory_is_taken():
    """Readers that read nothing hold the whole reply budget: GETDEL and GETSET of a large value
    are refused before they run (the key keeps its value); once the readers go, they are
    answered whole."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="96MiB", resp_reply_budget="16MiB") as door:
        r = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
        big = b"b" * (4 * MiB)
        r.set("taken", big)
        r.set("small", b"s" * 100)
        stalled = stall_reply_budget(door.port, r)       # two readers hold 8 MiB each: the whole budget
        for refused in (lambda: r.getdel("taken"), lambda: r.getset("taken", b"new")):
            try:
                refused()
                raise AssertionError("a large value was answered with the whole reply budget held by others")
            except redis.ResponseError as exc:
                assert "LIMIT_EXCEEDED" in str(exc) and "resp_reply_budget" in str(exc), exc
        assert r.strlen("taken") == len(big) and r.get("small") == b"s" * 100     # small values still go
        for raw in stalled:
            raw.close()
        wait_until(lambda: r.info("memory")["mem_clients_normal"] == 0, "the stalled replies to give back their bytes")
        assert r.getset("taken", b"new") == big and r.getdel("taken") == b"new"
        r.close()


def _used(r: redis.Redis) -> int:
    return r.info("memory")["used_memory"]


def test_a_reader_that_goes_away_mid_value_lets_its_hold_go(door_port):
    """Clients that read the start of a large value and hang up, many more than a connection
    may hold at once: each reply's hold on the record is let go (on the other server, whose
    link to the door carries them all), so the value's memory comes back once it is deleted."""
    r = redis.Redis(port=door_port, socket_timeout=READ_S * 3)
    key = _key_on(2, "cut")
    before = _used(r)
    r.set(key, b"c" * (17 * MiB))
    for _ in range(80):
        raw = Raw(door_port)
        raw.send(encode("GET", key))
        assert raw.sock.recv(4096).startswith(b"$%d\r\n" % (17 * MiB))
        raw.close()
    assert r.get(key) == b"c" * (17 * MiB)
    r.delete(key)
    wait_until(lambda: _used(r) == before, "the deleted value's memory to come back")
    r.close()


def test_a_value_read_while_it_is_overwritten_and_deleted_comes_whole(door_port):
    """A slow reader of a large value gets the value as it was when its GET ran, byte for byte,
    while other clients overwrite and delete the key: the record is held until the reply is
    sent."""
    r = redis.Redis(port=door_port, socket_timeout=READ_S * 3)
    for server_id in (1, 2):
        key = _key_on(server_id, "race")
        first = bytes(range(256)) * (12 * MiB // 256)
        r.set(key, first)
        slow = Raw(door_port)
        # A window far smaller than the value: the door's reply waits on this reader (a small
        # one, 4 KiB, makes the reading itself crawl on delayed acknowledgements).
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        slow.send(encode("GET", key))
        head = slow.sock.recv(64)                   # the reply has begun
        for i in range(5):
            r.set(key, bytes([i]) * (12 * MiB))
            r.delete(key)
        expected = b"$%d\r\n%s\r\n" % (len(first), first)
        got = bytearray(len(expected))
        got[:len(head)] = head
        view, at = memoryview(got), len(head)
        while at < len(got):
            n = slow.sock.recv_into(view[at:])
            assert n, "the door closed the connection half-way through the value"
            at += n
        assert got == expected
        slow.close()
    r.close()


def test_a_short_range_of_a_large_value_takes_only_its_bytes_of_the_reply_memory():
    """GETRANGE of a few bytes of a large value holds those bytes of the reply budget while it
    is sent, not a whole piece (1 MiB): before, the door's peak was a piece per such reply."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="64MiB") as door:
        r = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
        value = bytes(range(256)) * (3 * MiB // 256)
        r.set("large", value)
        assert r.getrange("large", 1000, 1009) == value[1000:1010]
        assert r.info("memory")["reply_budget_peak"] == 10
        assert r.getrange("large", 0, -1) == value             # a whole value: a piece at a time
        assert r.info("memory")["reply_budget_peak"] == MiB
        r.close()

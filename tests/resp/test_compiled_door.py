"""The door's GET and SET answered in compiled code (_resp.c): on a one-server pool (every key
homed where the door is), against a real redis-server, byte for byte: pipelines mixing them
with everything else, every split of a request across reads, keys and values with CR LF in
them, wrong arity, options, case; the counters INFO shows; that the compiled path is taken.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

import memfabric
from .conftest import door_fabric_of
from .wire import Raw, encode

_frames = pytest.importorskip("memfabric._frames")
pytestmark = pytest.mark.skipif(not hasattr(_frames, "RespLoop"), reason="the compiled part is not built")


@pytest.fixture(scope="module")
def one_server_door():
    yield from door_fabric_of(1)


@pytest.fixture
def pair(redis_server, one_server_door):
    door, redis = Raw(one_server_door.resp_port), Raw(redis_server.port)
    for r in (door, redis):
        r.send(encode("FLUSHALL"))
        assert r.reply() == b"+OK\r\n"
    yield door, redis
    door.close()
    redis.close()


def compiled(fab) -> tuple[int, int]:
    with memfabric.init(fab.directory) as s:
        stats = s.link(1).call("stats")
    return stats["compiled_gets"], stats["compiled_puts"]


def replies(r: Raw, data: bytes, count: int, split: list[int] | None = None) -> bytes:
    """Send `data` (in pieces ending at `split`, if given), then read `count` replies."""
    if split is None:
        r.send(data)
    else:
        at = 0
        for end in [*split, len(data)]:
            if end > at:
                r.send(data[at:end])
                at = end
    return b"".join(r.reply() for _ in range(count))


def mixed(rng: random.Random, n: int) -> list[bytes]:
    keys = [b"k", b"key:1", b"\r\n", b"a b", bytes(range(256))[:40], b"K"]
    out = []
    for _ in range(n):
        key = rng.choice(keys)
        value = rng.choice([b"", b"v", b"\r\n\r\n", b"x" * rng.randint(1, 5000), bytes(rng.randrange(256)
                                                                                      for _ in range(50))])
        out.append(rng.choice([
            encode(rng.choice(["SET", "set", "SeT"]), key, value),
            encode(rng.choice(["GET", "get", "gEt"]), key),
            encode("GET", key + b"-missing"),
            encode("SET", key, value, "EX", "100"),
            encode("SET", key, value, "NX"),
            encode("SET", key, value, "GET"),
            encode("GET", key, b"extra"),
            encode("SET", key),
            encode("APPEND", key, b"+"),
            encode("STRLEN", key),
            encode("DEL", key),
            encode("EXISTS", key),
            encode("TYPE", key),
            encode("GETSET", key, value),
            encode("NOSUCHCOMMAND", key),
            b"GET " + rng.choice([b"k", b"key:1", b"K"]) + b"\r\n",                 # inline
        ]))
    return out


def test_pipelines_of_get_and_set_answer_as_redis(pair, one_server_door):
    door, redis = pair
    before = compiled(one_server_door)
    rng = random.Random(7)
    for round_ in range(30):
        batch = mixed(rng, rng.randint(1, 40))
        data = b"".join(batch)
        assert replies(door, data, len(batch)) == replies(redis, data, len(batch)), f"round {round_}"
    for _ in range(200):                      # plain GET and SET runs: what the compiled path takes
        key, value = b"plain:%d" % rng.randrange(20), b"v" * rng.randrange(1000, 1100)
        data = encode("SET", key, value) + encode("GET", key) + encode("GET", b"nope")
        assert replies(door, data, 3) == replies(redis, data, 3)
    after = compiled(one_server_door)
    assert after[0] - before[0] > 100 and after[1] - before[1] > 100, (before, after)


def test_requests_split_at_every_byte_answer_as_redis(pair):
    door, redis = pair
    batch = [encode("SET", b"s", b"one\r\ntwo"), encode("GET", b"s"), encode("get", b"none"), encode("SET", b"t", b""),
             encode("GET", b"t"), encode("STRLEN", b"s"), encode("SET", b"s", b"x" * 300), encode("GET", b"s")]
    data = b"".join(batch)
    expected = replies(redis, data, len(batch))
    for cut in range(1, len(data)):
        assert replies(door, data, len(batch), split=[cut]) == expected, f"cut at {cut}"
    assert replies(door, data, len(batch), split=list(range(1, len(data)))) == expected


def test_values_around_the_compiled_limits_answer_as_redis(pair):
    door, redis = pair
    for size in (0, 1, 64 * 1024 - 10, 64 * 1024, 64 * 1024 + 1, 100 * 1024, 200 * 1024, 300 * 1024):
        value = bytes(random.Random(size).randrange(256) for _ in range(min(size, 1000))) * (size // 1000 + 1)
        value = value[:size]
        data = encode("SET", b"big", value) + encode("GET", b"big") + encode("SET", b"big", value) + encode("GET", b"big")
        assert replies(door, data, 4) == replies(redis, data, 4), size


def test_counters_count_compiled_commands_as_redis_does(pair):
    """INFO's commands processed, hits and misses move as Redis's do."""
    door, redis = pair

    def figures(r: Raw) -> dict[bytes, int]:
        r.send(encode("INFO", "stats"))
        lines = r.reply().split(b"\r\n")
        return {k: int(v) for k, _, v in (line.partition(b":") for line in lines)
                if k in (b"total_commands_processed", b"keyspace_hits", b"keyspace_misses")}
    data = b"".join(encode("SET", b"c%d" % (i % 5), b"v") + encode("GET", b"c%d" % (i % 7)) for i in range(300))
    deltas = []
    for r in (door, redis):
        first = figures(r)
        replies(r, data, 600)
        last = figures(r)
        deltas.append({k: last[k] - first[k] for k in first})
    assert deltas[0] == deltas[1]


def test_a_command_pending_when_a_compiled_call_ends_stays_compiled(one_server_door):
    """A compiled call answers for DOOR_CALL_MAX_S, then Python checks the pool again: a
    command received whole or in part by then goes back to the compiled path, not to Python
    (a 64 KiB SET was nearly always half-received then: one in a few dozen went to Python)."""
    from memfabric.kv.resp.front import DOOR_CALL_MAX_S
    from memfabric.kv.service import SETTINGS_TTL_S

    assert 1.5 * DOOR_CALL_MAX_S < SETTINGS_TTL_S

    r = Raw(one_server_door.resp_port)
    try:
        set_ = encode("SET", b"pending", b"v" * 1000)
        for cut in (10, len(set_) // 2, len(set_) - 1):
            # The door's grant covers this size, for the settings' time to live from now (once
            # it is out, the next SET is Python's, which reads the settings and grants again).
            time.sleep(SETTINGS_TTL_S)
            assert replies(r, set_ * 3, 3) == b"+OK\r\n" * 3
            before = compiled(one_server_door)[1]
            r.send(set_[:cut])
            time.sleep(1.5 * DOOR_CALL_MAX_S)
            r.send(set_[cut:])
            assert r.reply() == b"+OK\r\n"
            assert compiled(one_server_door)[1] - before == 1
    finally:
        r.close()


def test_a_client_that_leaves_mid_request_leaves_the_door_up(one_server_door):
    for cut in (3, 10, 25):
        with socket.create_connection(("127.0.0.1", one_server_door.resp_port), timeout=10) as s:
            s.sendall(encode("SET", b"a", b"1") + encode("SET", b"half", b"x" * 100)[:cut])
            assert s.recv(100) == b"+OK\r\n"
    r = Raw(one_server_door.resp_port)
    try:
        r.send(encode("GET", b"half") + encode("GET", b"a"))
        assert r.reply() == b"$-1\r\n" and r.reply() == b"$1\r\n1\r\n"
    finally:
        r.close()


def test_shared_grants_keep_namespaces_apart(one_server_door):
    """The door's grants are shared by its connections (a new connection's GETs and SETs are
    compiled at once), and hold several namespaces: a client of one never reads or writes
    another's keys through them, whatever it sends."""
    with memfabric.init(one_server_door.directory) as s:
        s.create_namespace("tenant-b", sec_id="b-secret").kv().put(b"shared-name", b"b's value")
    a, b = Raw(one_server_door.resp_port), Raw(one_server_door.resp_port)
    try:
        b.send(encode("AUTH", "tenant-b", "b-secret"))
        assert b.reply() == b"+OK\r\n"
        for r, value in ((a, b"a's value"), (b, b"b's value 2")):
            for _ in range(3):                         # the first ones grant; the rest are compiled
                r.send(encode("SET", b"shared-name", value) + encode("GET", b"shared-name"))
                assert r.reply() == b"+OK\r\n" and r.reply() == b"$%d\r\n%s\r\n" % (len(value), value)
        before = compiled(one_server_door)
        fresh = Raw(one_server_door.resp_port)         # a new connection: compiled from its first GET
        try:
            fresh.send(encode("GET", b"shared-name") + encode("SET", b"other", b"x"))
            assert fresh.reply() == b"$9\r\na's value\r\n" and fresh.reply() == b"+OK\r\n"
            wrong = Raw(one_server_door.resp_port)
            try:
                wrong.send(encode("AUTH", "tenant-b", "not-b") + encode("GET", b"shared-name"))
                assert wrong.reply().startswith(b"-WRONGPASS")
                assert wrong.reply() == b"$9\r\na's value\r\n"      # still the default namespace's
            finally:
                wrong.close()
        finally:
            fresh.close()
        after = compiled(one_server_door)
        assert after[0] > before[0] and after[1] > before[1]
        b.send(encode("GET", b"shared-name") + encode("GET", b"other"))
        assert b.reply() == b"$11\r\nb's value 2\r\n" and b.reply() == b"$-1\r\n"
    finally:
        a.close()
        b.close()
    with memfabric.init(one_server_door.directory) as s:
        kv_b = s.namespace("tenant-b", "b-secret").kv()
        assert kv_b.get(b"shared-name") == b"b's value 2" and kv_b.get(b"other") is None


def test_a_client_that_reads_nothing_holds_up_no_one(one_server_door):
    """One thread answers every connection's GETs and SETs (RespLoop): a client that sends a
    pipeline of 64 KiB GETs and reads none of the replies fills its socket, and the loop
    goes on with the others (its replies wait for it; it sends nothing more meanwhile)."""
    big = b"v" * (64 << 10)
    r = Raw(one_server_door.resp_port)
    try:
        r.send(encode("SET", b"big", big))
        assert r.reply() == b"+OK\r\n"
    finally:
        r.close()
    stuck = socket.create_connection(("127.0.0.1", one_server_door.resp_port), timeout=10)
    try:
        stuck.sendall(encode("GET", b"big") * 800)        # 52 MB of replies (past the sockets' buffers), none read
        others = [Raw(one_server_door.resp_port) for _ in range(3)]
        try:
            for i in range(50):
                for n, o in enumerate(others):
                    o.send(encode("SET", b"o%d" % n, b"%d" % i) + encode("GET", b"o%d" % n) + encode("GET", b"big"))
                    assert o.reply() == b"+OK\r\n" and o.reply() == b"$%d\r\n%d\r\n" % (len(b"%d" % i), i)
                    assert o.reply() == b"$%d\r\n%s\r\n" % (len(big), big)
        finally:
            for o in others:
                o.close()
        # Then it reads: every reply, whole and in order.
        stuck.settimeout(30)
        want, got = (b"$%d\r\n%s\r\n" % (len(big), big)) * 800, bytearray()
        while len(got) < len(want):
            chunk = stuck.recv(1 << 20)
            assert chunk, "closed before every reply came"
            got += chunk
        assert got == want
    finally:
        stuck.close()


@pytest.mark.parametrize("value_bytes", [100, 30_000, 64 << 10])
def test_pipelines_of_small_and_large_gets_answer_as_redis(pair, value_bytes):
    """A pipeline's replies go out together, the reply buffer sent when a GET's value does
    not fit what is left of it (before, room for a 64 KiB reply was kept, so each reply
    of a pipeline went out alone): GETs of small and large values by turns, hits and
    misses, answered as Redis does."""
    door, redis = pair
    setup = encode("SET", b"small", b"s" * 7) + encode("SET", b"large", b"L" * value_bytes)
    rng = random.Random(value_bytes)
    keys = [rng.choice([b"small", b"large", b"missing"]) for _ in range(300)]
    data = b"".join(encode("GET", k) for k in keys)
    for r in (door, redis):
        assert replies(r, setup, 2) == b"+OK\r\n" * 2
    assert replies(door, data, len(keys)) == replies(redis, data, len(keys))


@pytest.fixture
def door_with_short_send_bound(tmp_path, monkeypatch):
    """A one-server door whose replies must be taken within 1 s (RESP_SEND_TIMEOUT_S, 60 s
    otherwise), set in the server by a sitecustomize."""
    (tmp_path / "sitecustomize.py").write_text(
        "import memfabric.kv.resp.front as front\nfront.RESP_SEND_TIMEOUT_S = 1.0\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    yield from door_fabric_of(1)


def _read_until_closed(sock: socket.socket, pause_s: float, limit: int) -> tuple[int, bool]:
    """Read, `pause_s` between reads, until `limit` bytes came or the door closed the
    connection (bounded by the socket's timeout): the bytes read, whether it was closed."""
    got = 0
    while got < limit:
        try:
            piece = sock.recv(1 << 20)
        except ConnectionResetError:
            return got, True
        if not piece:
            return got, True
        got += len(piece)
        time.sleep(pause_s)
    return got, False


def test_replies_wait_for_a_slow_reader_but_not_for_one_that_reads_nothing(door_with_short_send_bound):
    """The loop waits for a client to take its replies, send_timeout_s at most for each batch:
    a client reading 256 KiB every 50 ms (52 MB in about 10 s, ten times the bound) gets
    every reply; one that reads nothing for twice the bound is closed (its replies are not
    held past it). Before, the bound ran from the first reply that had to wait, however much
    was taken since."""
    port = door_with_short_send_bound.resp_port
    big = b"v" * (64 << 10)
    r = Raw(port)
    try:
        r.send(encode("SET", b"big", big))
        assert r.reply() == b"+OK\r\n"
    finally:
        r.close()
    reply_bytes = len(b"$%d\r\n" % len(big)) + len(big) + 2
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
        slow.sendall(encode("GET", b"big") * 800)
        idle.sendall(encode("GET", b"big") * 800)
        got, closed = _read_until_closed(slow, 0.05, 800 * reply_bytes)
        assert (got, closed) == (800 * reply_bytes, False)
        time.sleep(2.0)
        got, closed = _read_until_closed(idle, 0.0, 800 * reply_bytes)
        assert closed and got < 800 * reply_bytes
    finally:
        slow.close()
        idle.close()

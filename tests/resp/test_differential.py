"""The Redis-protocol door against Redis itself: the same command sequences sent to a real
redis-server and to the door (of a two-server fabric, so that half the keys live on the
server without the door and go there server to server), the replies compared byte for byte.

Where the two may rightly differ (a client id, a key order, a millisecond), the test says
so and compares what must agree."""

from __future__ import annotations

import random
import socket

import pytest

from .wire import Raw, command, encode


@pytest.fixture
def pair(redis_server, door_port):
    """A connection to each, both keyspaces empty."""
    redis, door = Raw(redis_server.port), Raw(door_port)
    assert redis.run(["FLUSHALL"]) == door.run(["FLUSHALL"]) == [b"+OK\r\n"]
    yield redis, door
    redis.close()
    door.close()


def same(pair, lines: list[str | bytes]) -> list[bytes]:
    redis, door = pair
    want, got = redis.run(lines), door.run(lines)
    for line, w, g in zip(lines, want, got):
        assert g == w, f"{line!r}: redis-server said {w!r}, the door {g!r}\n(in {lines!r})"
    return got


CASES: dict[str, list[str]] = {
    "connection": [
        "PING", "PING hello", "PING a b", "ECHO", "ECHO 'x y'", "ECHO a b", "SELECT 0", "SELECT x", "SELECT 16",
        "SELECT -1", "SELECT 99999999999999999999", "CLIENT SETNAME", "CLIENT SETNAME a b", "CLIENT GETNAME",
        "CLIENT SETNAME conn-1", "CLIENT GETNAME", "CLIENT SETNAME \"a b\"", "CLIENT SETNAME \"\"",
        "CLIENT GETNAME", "CLIENT", "CLIENT foo", "CLIENT ID x", "CONFIG", "CONFIG GET", "CONFIG foo",
        "CONFIG GET appendonly", "CONFIG GET maxmemory", "CONFIG GET nosuchparameter", "COMMAND foo",
        "HELLO 4", "HELLO x", "HELLO 1", "HELLO 2 foo", "HELLO 2 SETNAME", "HELLO 3 SETNAME",
    ],
    "unknown commands": [
        "FOO", "FOO a b c", "foo \"\"", "NOSUCH " + "x" * 200, "NOSUCH " + " ".join(["abcdefghij"] * 20),
        "\"a\\x00b\" c", "x\\x00y", "'a b' 'c d'", "GET\\x00 a",
    ],
    "set and get": [
        "GET k", "SET k v", "GET k", "SET k v2 NX", "GET k", "SET k v3 XX", "GET k", "SET new v XX", "GET new",
        "SET k v4 GET", "SET k2 v GET", "SET k v5 NX GET", "SET k3 v XX GET", "GET k3", "SET k v ex 100",
        "TTL k", "SET k v px 100000", "TTL k", "SET k v exat 4102444800", "EXPIRETIME k",
        "SET k v pxat 4102444800000", "PEXPIRETIME k", "SET k v2 KEEPTTL", "EXPIRETIME k", "GET k",
        "SET k v3", "TTL k", "SET k v EX 10 EX 20", "TTL k", "SET k v nx nx", "SET k v EX 0", "SET k v EX -1",
        "SET k v PX 0", "SET k v EX x", "SET k v EX", "SET k v EX 10 PX 10", "SET k v KEEPTTL EX 10",
        "SET k v EX 10 KEEPTTL", "SET k v NX XX", "SET k v XX NX", "SET k v FOO", "SET k v GET GET",
        "SET k v EX 9223372036854775807", "SET k v EX 9223372036854776", "SET k v PX 9223372036854775807",
        "SET k v EXAT 9223372036854775807", "SET k v PXAT 9223372036854775807", "PEXPIRETIME k", "SET k",
        "SET",
        "GET", "GET a b", "SET k v EXAT 1", "GET k", "EXISTS k", "SET k \"\"", "GET k", "STRLEN k",
        "SET k v persist", "set K V ex 5 nx", "get K", "SET k v pX 1000000 Get", "ttl k",
    ],
    "setnx setex psetex getset": [
        "SETNX a 1", "SETNX a 2", "GET a", "SETNX a", "SETEX b 100 v", "TTL b", "GET b", "SETEX b 0 v",
        "SETEX b -5 v", "SETEX b x v", "SETEX b 100", "PSETEX c 100000 v", "TTL c", "PSETEX c 0 v",
        "PSETEX c 9223372036854775807 v", "SETEX b 9223372036854775 v", "GETSET a 3", "GETSET nope 1",
        "GET nope", "GETSET a", "SET t v EX 100", "GETSET t w", "TTL t",
    ],
    "getex getdel": [
        "GETEX k", "SET k v", "GETEX k", "GETEX k EX 100", "TTL k", "GETEX k PERSIST", "TTL k",
        "GETEX k PX 50000", "TTL k", "GETEX k EXAT 4102444800", "EXPIRETIME k", "GETEX k PXAT 4102444800000",
        "PEXPIRETIME k", "GETEX k EX 0", "GETEX k EX -1", "GETEX k EX x", "GETEX k PERSIST EX 10",
        "GETEX k EX 10 PERSIST", "GETEX k FOO", "GETEX k EX", "GETEX k EX 10 PX 10", "GETEX k NX",
        "GETEX k KEEPTTL", "GETEX nope EX 10", "GETEX k EXAT 1", "GET k", "SET d v", "GETDEL d", "GETDEL d",
        "EXISTS d", "GETDEL", "GETDEL a b", "GETEX", "SET e v", "GETEX e PX 100000", "GETEX e PERSIST", "TTL e",
    ],
    "mset mget msetnx": [
        "MSET a 1 b 2 c 3", "MGET a b c d", "MSET a", "MSET a 1 b", "MSET", "MGET", "MSETNX a 9 x 1", "GET x",
        "MSETNX x 1 y 2", "MGET x y", "MSETNX x", "MSETNX z 1 z 2", "GET z", "MGET a a a",
        "MSET a \"\" b \"x y\"", "MGET a b",
    ],
    "append strlen setrange getrange": [
        "APPEND a x", "APPEND a yz", "GET a", "STRLEN a", "STRLEN nope", "APPEND a", "APPEND a \"\"",
        "SETRANGE r 5 x", "GET r", "SETRANGE r 0 ab", "GET r", "SETRANGE r 10 \"\"", "STRLEN r",
        "SETRANGE nope 3 \"\"", "EXISTS nope", "SETRANGE r -1 x", "SETRANGE r x y", "SETRANGE r 536870912 x",
        "SETRANGE r 536870911 xy", "SETRANGE nope 536870912 \"\"", "SETRANGE r 536870912 \"\"",
        "SET s \"Hello World\"", "GETRANGE s 0 4", "GETRANGE s -3 -1", "GETRANGE s 0 -1", "GETRANGE s 10 100",
        "GETRANGE s -1 -5", "GETRANGE s 5 3", "GETRANGE s -100 2", "GETRANGE s 0 -100", "GETRANGE s x 1",
        "GETRANGE s 1 x", "GETRANGE nope 0 -1", "GETRANGE s 0", "SET e \"\"", "GETRANGE e 0 -1",
        "GETRANGE e 0 0", "SETRANGE e 0 \"\"", "SETRANGE t 2 \"\\x00\\xff\"", "GET t", "GETRANGE s 11 11",
        "GETRANGE s 9223372036854775807 9223372036854775807", "GETRANGE s -9223372036854775808 -1",
        "SET ex v EX 100", "APPEND ex w", "TTL ex", "SETRANGE ex 0 Q", "TTL ex", "GET ex",
    ],
    "incr decr": [
        "INCR n", "INCR n", "INCRBY n 10", "DECR n", "DECRBY n 5", "GET n", "INCRBY n x", "INCRBY n 1.5",
        "INCRBY n", "SET s abc", "INCR s", "DECR s", "SET big 9223372036854775807", "INCR big",
        "INCRBY big 0", "SET small -9223372036854775808", "DECR small", "DECRBY small 1",
        "DECRBY n -9223372036854775808", "INCRBY n -9223372036854775808", "INCRBY n 9223372036854775808",
        "SET sp \" 1\"", "INCR sp", "SET z 0", "INCR z", "SET lz 01", "INCR lz", "SET p +1", "INCR p",
        "SET m -0", "INCR m", "SET e \"\"", "INCR e", "SET t 5 EX 100", "INCR t", "TTL t",
        "SET long 123456789012345678901", "INCR long", "INCR", "INCR a b", "DECRBY n", "SET neg -5", "INCR neg",
    ],
    "incrbyfloat": [
        "INCRBYFLOAT f 10.5", "INCRBYFLOAT f 0.1", "GET f", "INCRBYFLOAT f -5.0e3", "INCRBYFLOAT f 0x10",
        "INCRBYFLOAT f \" 1\"", "INCRBYFLOAT f 1x", "INCRBYFLOAT f nan", "INCRBYFLOAT f inf",
        "INCRBYFLOAT f -inf", "INCRBYFLOAT f 1e-5000", "INCRBYFLOAT f 1e5000", "INCRBYFLOAT g -0",
        "INCRBYFLOAT g 0.0", "INCRBYFLOAT h 3", "INCRBYFLOAT h 1.0e0", "SET s abc", "INCRBYFLOAT s 1",
        "SET i 10", "INCRBYFLOAT i 2.5", "INCRBYFLOAT i 1e300", "INCRBYFLOAT i -1e300", "INCRBYFLOAT w",
        "INCRBYFLOAT j 5.0000000000000000001", "INCRBYFLOAT k .5", "INCRBYFLOAT k 5.", "INCRBYFLOAT l 1e20",
        "INCRBYFLOAT m 3.14159265358979323846", "INCRBYFLOAT m 2.718281828459045", "SET t 1 EX 100",
        "INCRBYFLOAT t 1", "TTL t", "INCRBYFLOAT x \"\"", "INCRBYFLOAT y 1e4000",
    ],
    "del exists type unlink": [
        "SET a 1", "SET b 2", "EXISTS a", "EXISTS a b c", "EXISTS a a a", "DEL a c", "DEL a", "EXISTS a",
        "TYPE b", "TYPE a", "UNLINK b b", "EXISTS b", "DEL", "EXISTS", "UNLINK", "TYPE", "TYPE a b",
        "MSET x 1 y 2 z 3", "DEL x y z w", "DBSIZE", "DBSIZE x",
    ],
    "rename copy": [
        "RENAME a b", "SET a 1", "RENAME a b", "GET a", "GET b", "RENAME b b", "GET b", "RENAMENX b b",
        "RENAMENX nope x", "SET c 3", "RENAMENX b c", "RENAMENX b d", "GET d", "SET e 5 EX 100", "RENAME e f",
        "TTL f", "EXISTS e", "SET g 1", "RENAME f g", "GET g", "TTL g", "COPY g h", "GET h", "TTL h", "COPY g h",
        "COPY g h REPLACE", "COPY g g", "COPY nope x", "COPY g i DB 0", "GET i", "COPY g i FOO", "COPY g i DB",
        "COPY g i DB x", "COPY g i REPLACE REPLACE", "COPY g", "RENAME a", "RENAMENX a", "COPY g g DB x",
        "DBSIZE",
    ],
    "expire": [
        "EXPIRE k 100", "SET k v", "EXPIRE k 100", "TTL k", "EXPIRE k 50 GT", "EXPIRE k 500 GT", "TTL k",
        "EXPIRE k 1000 LT", "EXPIRE k 10 LT", "TTL k", "EXPIRE k 20 NX", "EXPIRE k 20 XX", "TTL k",
        "PERSIST k", "PERSIST k", "TTL k", "EXPIRE k 20 XX", "EXPIRE k 20 GT", "EXPIRE k 20 LT", "TTL k",
        "PERSIST k", "EXPIRE k 20 NX", "TTL k", "EXPIRE k 10 NX XX", "EXPIRE k 10 GT LT", "EXPIRE k 10 NX GT",
        "EXPIRE k 10 FOO", "EXPIRE k x", "EXPIRE k x FOO", "EXPIRE k 10 XX GT", "EXPIRE k 10 XX LT", "TTL k",
        "EXPIRE k 9223372036854775807", "EXPIRE k 9223372036854775", "PEXPIRE k 9223372036854775807",
        "EXPIRE k -9223372036854775808", "TTL k", "EXPIRE k", "EXPIRE", "SET p v", "PEXPIRE p 100000",
        "TTL p", "EXPIREAT p 4102444800", "EXPIRETIME p", "PEXPIRETIME p", "PEXPIREAT p 4102444800123",
        "PEXPIRETIME p", "EXPIRETIME p", "EXPIREAT p 4102444800 LT", "EXPIREAT p 4202444800 GT",
        "EXPIRETIME p", "EXPIRETIME nope", "PEXPIRETIME nope", "TTL nope", "PTTL nope", "EXPIRETIME",
        "SET q v", "EXPIRETIME q", "PEXPIRETIME q", "PTTL q", "EXPIRE q 0", "EXISTS q", "SET q v",
        "EXPIRE q -1", "EXISTS q", "SET q v", "EXPIREAT q 1", "EXISTS q", "SET q v", "PEXPIRE q -100",
        "GET q", "SET q v", "EXPIRE q -1 NX", "GET q", "PERSIST nope", "PERSIST", "EXPIRE q 10 nx xx gt",
    ],
    "keys flush": [
        "KEYS *", "SET foo 1", "KEYS *", "KEYS f*", "KEYS x*", "RANDOMKEY", "RANDOMKEY x", "DEL foo",
        "RANDOMKEY", "DBSIZE", "FLUSHDB", "FLUSHDB ASYNC", "FLUSHDB SYNC", "FLUSHDB x", "FLUSHDB ASYNC x",
        "FLUSHALL", "FLUSHALL x", "DBSIZE", "KEYS", "SCAN", "SCAN x", "SCAN -", "SCAN \" 1\"",
        "SCAN 0 COUNT 0", "SCAN 0 COUNT x", "SCAN 0 MATCH", "SCAN 0 FOO", "SCAN 0 TYPE", "SCAN 0",
        "SCAN 0 COUNT 5 MATCH *", "SCAN 18446744073709551616",
    ],
    "binary and large arguments": [
        "SET \"\\x00\\x01\\xff\" \"\\r\\n\\x00\"", "GET \"\\x00\\x01\\xff\"", "STRLEN \"\\x00\\x01\\xff\"",
        "SET " + "k" * 1000 + " " + "v" * 100000, "STRLEN " + "k" * 1000, "GETRANGE " + "k" * 1000 + " 99990 -1",
        "APPEND " + "k" * 1000 + " tail", "STRLEN " + "k" * 1000,
    ],
}


@pytest.mark.parametrize("resp", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_commands_answer_as_redis(pair, case, resp):
    """Each case in RESP2 and, after HELLO 3, in RESP3 (nulls, maps, sets of their own)."""
    if resp == 3:
        _hello(pair, "HELLO 3")
    same(pair, CASES[case])


def _hello(pair, line: str) -> None:
    """HELLO on both: the replies alike but for the connection's id (each numbers its own)."""
    redis, door = pair
    want, got = redis.run([line])[0], door.run([line])[0]
    assert want.split(b"$2\r\nid\r\n")[0] == got.split(b"$2\r\nid\r\n")[0]
    assert want.split(b"$4\r\nmode\r\n")[1] == got.split(b"$4\r\nmode\r\n")[1]


def test_large_values_answer_as_redis(pair):
    """Values past what a request carries (192 KiB) and past one payload (by the door's own
    reserve, fill and commit, or forwarded to the key's home): bytes as Redis's."""
    big = bytes(random.Random(1).randrange(256) for _ in range(1000)) * 700      # 700 KB
    redis, door = pair
    for raw in (redis, door):
        raw.send(b"".join(encode("SET", f"big{i}", big) for i in range(6)))
        assert [raw.reply() for _ in range(6)] == [b"+OK\r\n"] * 6
    same(pair, [f"GET big{i}" for i in range(6)] + ["MGET big0 big1 nope big2", "STRLEN big3",
                                                  "GETRANGE big4 699990 -1", "APPEND big5 x", "STRLEN big5",
                                                  "GETDEL big5", "EXISTS big5", "RENAME big4 moved",
                                                  "GET moved", "COPY moved copied", "GET copied"])


def test_keys_and_scan_find_the_same_keys(pair):
    """Key order is each store's own: the sets must agree, for KEYS and for a whole SCAN."""
    redis, door = pair
    lines = [f"SET key:{i} {i}" for i in range(300)] + [f"SET other:{i} x" for i in range(50)] + ["SET k[1] y"]
    same(pair, lines)
    for pattern in ("*", "key:1*", "other:?", "*[0-2]", "k\\[1\\]", "*:[^0-8]", "key:2?9", "nomatch*"):
        want, got = redis.run([f"KEYS {pattern}"])[0], door.run([f"KEYS {pattern}"])[0]
        assert sorted(_bulks(got)) == sorted(_bulks(want)), pattern
    for match in ("", " MATCH key:*", " MATCH *1", " COUNT 7", " TYPE string", " TYPE list"):
        assert sorted(_scan_all(door, match)) == sorted(_scan_all(redis, match)), match
    random_key = door.run(["RANDOMKEY"])[0]
    assert _bulks(b"*1\r\n" + random_key)[0] in set(_bulks(redis.run(["KEYS *"])[0]))


def _bulks(reply: bytes) -> list[bytes]:
    """The bulks of an array reply of bulks."""
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"*")
    out, i = [], 1
    for _ in range(int(lines[0][1:])):
        length = int(lines[i][1:])
        rest = b"\r\n".join(lines[i + 1:])
        out.append(rest[:length])
        i += 1 + rest[:length].count(b"\r\n") + 1
    return out


def _scan_all(raw: Raw, options: str) -> list[bytes]:
    cursor, keys = b"0", []
    for _ in range(10_000):
        reply = raw.run([f"SCAN {cursor.decode()}{options}"])[0]
        head, _, rest = reply.partition(b"\r\n")
        assert head == b"*2"
        length, _, rest = rest.partition(b"\r\n")
        cursor = rest[:int(length[1:])]
        keys += _bulks(rest[int(length[1:]) + 2:])
        if cursor == b"0":
            return keys
    pytest.fail("SCAN did not end")


def test_time_to_live_in_milliseconds(pair):
    """PTTL counts down by the clock: within a second of Redis's."""
    redis, door = pair
    for raw in pair:
        raw.run(["SET k v PX 100000"])
    want, got = int(redis.run(["PTTL k"])[0][1:-2]), int(door.run(["PTTL k"])[0][1:-2])
    assert 98_000 < got <= 100_000 and abs(want - got) < 2000


def test_time_to_live_of_the_farthest_deadline(pair):
    """TTL of a key set to expire at the last millisecond there is: the rounding to a second
    depends on the clock's millisecond, so the two may differ by one (not compared exactly)."""
    redis, door = pair
    for raw in pair:
        assert raw.run(["SET k v PXAT 9223372036854775807"]) == [b"+OK\r\n"]
    want, got = int(redis.run(["TTL k"])[0][1:-2]), int(door.run(["TTL k"])[0][1:-2])
    assert abs(want - got) <= 1 and got > 9_000_000_000_000_000


def test_hello_and_client_id(pair):
    """HELLO 2 answers as Redis's, but for the connection's id (each numbers its own)."""
    redis, door = pair
    for line in ("HELLO", "HELLO 2", "HELLO 3", "HELLO", "HELLO 2 SETNAME me"):
        _hello(pair, line)
    assert door.run(["CLIENT GETNAME"]) == [b"$2\r\nme\r\n"]
    assert door.run(["CLIENT ID"])[0].startswith(b":")
    assert b"redis_version:" in door.run(["INFO"])[0] and b"# Keyspace" in door.run(["INFO keyspace"])[0]
    assert door.run(["INFO nosuchsection"]) == redis.run(["INFO nosuchsection"]) == [b"$0\r\n\r\n"]
    for section in ("server", "clients", "memory", "stats", "keyspace"):
        assert door.run([f"INFO {section}"])[0].split(b"\r\n")[1].startswith(b"# " + section.capitalize().encode())


# ---- the protocol --------------------------------------------------------------------------------

def raw_exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data`, end the sending side, read until the server closes: what came back."""
    raw = Raw(port)
    try:
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)
        return raw.until_closed()
    finally:
        raw.close()


MALFORMED = [
    b"*-1\r\nPING\r\n", b"*0\r\n*1\r\n$4\r\nPING\r\n", b"*x\r\n", b"*1\r\n$-1\r\n", b"*1\r\n+3\r\n",
    b"*1\r\n$4\r\nPINGXX*1\r\n$4\r\nPING\r\n", b"*2147483648\r\n", b"*99999999999999999999\r\n",
    b"*1\r\n$536870913\r\n", b"*1\r\n$x\r\n", b"*+1\r\n", b"*01\r\n", b"*-0\r\n", b"* 1\r\n", b"*1 \r\n",
    b"*1\r\n$04\r\nPING\r\n", b"*1\r\n$+4\r\nPING\r\n", b"PING \"a\r\n", b"PING 'a\r\n", b"PING \"a\"b\r\n",
    b"PING 'a'b\r\n", b"PING \"\\x4\"\r\n", b"PING \"\\x41\\n\\t\\q\"\r\n", b"PING 'it\\'s'\r\n",
    b"\r\n\r\n\n PING\r\n", b"PING\n", b"PING\r\r\n", b"ECHO a\x00b\r\nPING\r\n", b"*1\r\n$4\x00\r\nPING\r\n",
    b"*1\r\n$4\rxPING\r\n", b"*1\rx$4\r\nPING\r\n", b"*2\r\n$4\r\nECHO\r\n$3\r\nabc", b"*1\r\n",
    b"PING" + b" " * 70000, b"*" + b"1" * 70000, b"*1\r\n$" + b"1" * 70000, b"*1\r\n%4\r\nPING\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", b"GET\r\nSET a\r\nECHO\r\n", b"\x00\r\nPING\r\n",
    b"*1\r\n$4\r\nquit\r\n*1\r\n$4\r\nPING\r\n", b"QUIT now\r\nPING\r\n",
]


@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: repr(d[:30]))
def test_malformed_requests_answer_as_redis(redis_server, door_port, data):
    """Redis's error, then the connection closed as Redis closes it (or left open where
    Redis waits for the rest), and the door goes on serving others."""
    want = raw_exchange(redis_server.port, data)
    got = raw_exchange(door_port, data)
    assert got == want


FRAGMENTS = [b"*", b"$", b"\r\n", b"\n", b"\r", b"-1", b"0", b"1", b"2", b"3", b"4", b"10", b"99999999999", b"x",
             b"PING", b"ECHO", b"SET", b"GET", b"fz", b"\"", b"'", b" ", b"\\x41", b"\\", b"\x00", b"+", b"-",
             b"abc", b"*1\r\n$4\r\nPING\r\n", b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n", b"*3\r\n$3\r\nSET\r\n",
             b"$2\r\nfz\r\n", b"\r\n$1\r\nv\r\n"]


def test_fuzzed_requests_answer_as_redis(redis_server, door_port):
    """Requests built from RESP's pieces at random (seeded): every one answered byte for byte
    as Redis answers it, the connection closed or not as Redis's."""
    rng = random.Random(20261128)
    other = Raw(door_port)                  # a bystander: it must see nothing of the fuzzing
    try:
        for case in range(300):
            data = b"".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 40)))
            want = raw_exchange(redis_server.port, data)
            got = raw_exchange(door_port, data)
            assert got == want, f"case {case}: {data!r}"
        assert other.run(["PING", "ECHO still"]) == [b"+PONG\r\n", b"$5\r\nstill\r\n"]
    finally:
        other.close()


def test_pipelining_thousands_of_commands(pair):
    """10,000 commands in one send: the replies in order, as Redis's."""
    redis, door = pair
    lines: list[str] = []
    for i in range(2500):
        lines += [f"SET p:{i} {i}", f"INCR p:{i}", f"GET p:{i}", f"EXISTS p:{i} p:{i + 1}"]
    same(pair, lines)
    same(pair, ["DBSIZE"])


def test_a_command_later_in_the_same_read_after_an_error_keeps_going(pair):
    same(pair, ["NOSUCH", "PING", "GET", "SET a 1", "GET a"])
    redis, door = pair
    for raw in pair:
        raw.send(b"ECHO inline\r\n" + command("ECHO multi"))
    assert [redis.reply(), redis.reply()] == [door.reply(), door.reply()]


def test_door_survives_many_connections_closing_abruptly(door_port):
    for _ in range(50):
        raw = Raw(door_port)
        raw.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc")
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()                         # a reset mid-request
    raw = Raw(door_port)
    try:
        assert raw.run(["PING"]) == [b"+PONG\r\n"]
    finally:
        raw.close()


def test_commands_of_many_keys_answer_as_redis(pair):
    """More keys than one batch to a server (MAX_KV_BATCH), values that fit a batch and one
    that does not, a key set twice: as Redis's."""
    keys = [f"many:{i}" for i in range(10_000)]
    big = "B" * 250_000
    same(pair, [b"MSET " + b" ".join(f"{k} {i}".encode() for i, k in enumerate(keys)),
                f"MSET dup 1 dup {big} dup 3 dup2 {big}", "GET dup", "STRLEN dup2",
                b"MGET " + b" ".join(k.encode() for k in keys[::-1]) + b" nope",
                b"EXISTS " + b" ".join(k.encode() for k in keys) + b" nope many:1",
                b"MSETNX " + b" ".join(f"{k} x".encode() for k in keys[:5000]) + b" fresh 1",
                "GET fresh", b"DEL " + b" ".join(k.encode() for k in keys[:7000]) + b" nope", "DBSIZE"])


def test_commands_of_many_long_keys_answer_as_redis(pair):
    """Keys whose bytes alone pass what one request to a server carries (60 keys of 60 KB):
    MGET, EXISTS and DEL went to a server as one request and got LIMIT_EXCEEDED back."""
    keys = [(f"{i:05d}" * 12_000).encode() for i in range(60)]
    redis, door = pair
    for raw in (redis, door):
        raw.send(b"".join(encode("SET", k, b"v") for k in keys))
        assert [raw.reply() for _ in keys] == [b"+OK\r\n"] * len(keys)
    same(pair, [b"MGET " + b" ".join(keys) + b" nope", b"EXISTS " + b" ".join(keys),
                b"DEL " + b" ".join(keys[:30]), b"MGET " + b" ".join(keys[25:35]), "DBSIZE"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_commands_written_inline_answer_as_redis(redis_server, door_port, case):
    """The same cases as telnet would send them (inline: split as Redis splits them, quotes and
    \\x escapes), the whole exchange compared until the server closes."""
    data = b"FLUSHALL\r\n" + b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n"
                                      for line in CASES[case])
    assert raw_exchange(door_port, data) == raw_exchange(redis_server.port, data)


def test_scan_of_an_emptied_large_keyspace_ends_at_once(pair):
    """After FLUSHALL of many keys (the door's tables stay large), SCAN 0 says 0, as Redis."""
    same(pair, [b"MSET " + b" ".join(b"e%d 1" % i for i in range(20_000)), "FLUSHALL", "SCAN 0", "SCAN 0 COUNT 1",
                "KEYS *", "RANDOMKEY", "DBSIZE"])

"""An adversary's round on the door's compiled GET and SET (_resp.c): what it answers must stay
what Python would answer while the pool around it changes, whatever a client sends."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import pytest

import memfabric
from memfabric.errors import MemfabricError
from memfabric.kv.resp.front import DOOR_CALL_MAX_S
from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import free_ports, stop_process, wait_until
from .conftest import door_fabric_of
from .wire import Raw, encode

_frames = pytest.importorskip("memfabric._frames")
pytestmark = pytest.mark.skipif(not hasattr(_frames, "RespLoop"), reason="the compiled part is not built")


def _compiled_puts(fab: LocalFabric) -> int:
    with memfabric.init(fab.directory, server=0) as s:
        return s.link(1).call("stats")["compiled_puts"]


def test_a_connection_in_the_compiled_path_follows_a_server_joining_the_pool():
    """The compiled path answers only while every key is homed at the door (a one-server
    pool). A connection that entered it then must not go on writing there once a second
    server serves the pool: its SET of a key homed on the other server lands there, where
    every other client reads it. (Before: the connection stayed in one compiled call as long
    as it sent something within RESP_SEND_TIMEOUT_S, up to 4096 commands, and wrote every
    key at the door's server: a fresh connection read the key from its home and missed it.)"""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-join-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--resp-port", str(port)]).start()
    pid = fab.server_pids()[2]
    stopped = False
    old = None
    try:
        theirs = next(b"join:%d" % i for i in range(100) if homes(b"join:%d" % i, [1, 2], 1) == [2])
        ours = next(b"join:%d" % i for i in range(100) if homes(b"join:%d" % i, [1, 2], 1) == [1])
        stop_process(pid)
        stopped = True

        def compiled_now() -> bool:
            """A fresh connection's SETs are answered compiled: the door sees one server."""
            before = _compiled_puts(fab)
            r = Raw(port)
            try:
                for i in range(3):
                    r.send(encode("SET", ours, b"%d" % i))
                    assert r.reply() == b"+OK\r\n"
            finally:
                r.close()
            return _compiled_puts(fab) > before
        wait_until(compiled_now, "the door to see the second server gone", timeout_s=30)
        old = Raw(port)                        # enters the compiled path, and waits there
        old.send(encode("SET", ours, b"1") + encode("GET", ours) + encode("SET", theirs, b"stale")
                 + encode("GET", theirs))
        assert [old.reply() for _ in range(4)] == [b"+OK\r\n", b"$1\r\n1\r\n", b"+OK\r\n", b"$5\r\nstale\r\n"]
        os.kill(pid, signal.SIGCONT)
        stopped = False
        serial = iter(range(1000))
        written: list[bytes] = []

        def routed_home() -> bool:
            """A fresh connection's SET of `theirs` lands on server 2: the door sees it back."""
            value = b"fresh-%d" % next(serial)
            written.append(value)
            r = Raw(port)
            try:
                r.send(encode("SET", theirs, value))
                if r.reply() != b"+OK\r\n":
                    return False
            finally:
                r.close()
            sec = open(os.path.join(fab.directory, "resp.secid")).read().strip().encode()
            try:
                with memfabric.init(fab.directory, server=0) as s:
                    reply = s.link(2).call("kv_get", pool="default", ns="default", sec=sec, key=theirs)
            except MemfabricError:          # this session does not see server 2 back yet
                return False
            return reply.get("found") and reply.get("value") == value
        wait_until(routed_home, "the door to route the second server's keys to it", timeout_s=30)
        time.sleep(2 * DOOR_CALL_MAX_S)        # the longest a compiled call answers under the view it began with
        old.send(encode("GET", theirs))      # its home's value, not the one the door's server kept
        assert old.reply() == b"$%d\r\n%s\r\n" % (len(written[-1]), written[-1])
        old.send(encode("SET", theirs, b"from-old") + encode("GET", theirs))
        assert old.reply() == b"+OK\r\n" and old.reply() == b"$8\r\nfrom-old\r\n"
        fresh = Raw(port)
        try:
            fresh.send(encode("GET", theirs))
            assert fresh.reply() == b"$8\r\nfrom-old\r\n"
        finally:
            fresh.close()
    finally:
        if old is not None:
            old.close()
        if stopped:
            os.kill(pid, signal.SIGCONT)
        assert fab.stop() == 0, "".join(fab.output[-30:])


@pytest.fixture(scope="module")
def one_server_door():
    yield from door_fabric_of(1)


def _compiled_counts(fab: LocalFabric) -> tuple[int, int]:
    with memfabric.init(fab.directory) as s:
        stats = s.link(1).call("stats")
    return stats["compiled_gets"], stats["compiled_puts"]


def test_resp3_clients_get_the_compiled_path_and_redis_bytes(redis_server, one_server_door):
    """redis-py 8 speaks RESP3 unless told otherwise (HELLO 3 on connecting): its GETs and SETs
    are answered compiled too, a miss as RESP3's null, every reply Redis's byte for byte.
    (Before: only RESP2 connections took the compiled path; redis-py's default never did.)"""
    door, redis = Raw(one_server_door.resp_port), Raw(redis_server.port)
    try:
        for r in (door, redis):
            r.send(encode("HELLO", "3") + encode("FLUSHALL"))
            r.reply()
            assert r.reply() == b"+OK\r\n"
        before = _compiled_counts(one_server_door)
        data = b"".join(encode("SET", b"r3:%d" % (i % 7), b"v" * (i % 300)) + encode("GET", b"r3:%d" % (i % 11))
                        + encode("GET", b"r3:none") for i in range(300))
        data += encode("HELLO", "2") + encode("GET", b"r3:none") + encode("GET", b"r3:1") + encode("HELLO", "3") \
            + encode("GET", b"r3:none") + encode("GET", b"r3:1")
        count = 900 + 6
        for cut in (None, 1000, 5000):
            replies = []
            for r in (door, redis):
                if cut is None:
                    r.send(data)
                else:
                    r.send(data[:cut])
                    r.send(data[cut:])
                replies.append([r.reply() for _ in range(count)])
            hellos = [i for i in range(count) if replies[1][i].startswith((b"%", b"*"))]
            for i in hellos:         # HELLO's map: the door's server and version are its own
                replies[0][i] = replies[1][i] = b"hello"
            assert replies[0] == replies[1]
        after = _compiled_counts(one_server_door)
        assert after[0] - before[0] > 500 and after[1] - before[1] > 500, (before, after)
    finally:
        door.close()
        redis.close()


def test_error_replies_echo_a_clients_bytes_as_redis_does(redis_server, one_server_door):
    """An unknown command (or subcommand) named in bytes past ASCII is echoed in the error as
    sent, as Redis does. (Before: as UTF-8 of their latin-1 reading, 'g\\xc3\\x85t' for 'g\\xc5t'.)"""
    door, redis = Raw(one_server_door.resp_port), Raw(redis_server.port)
    try:
        data = (encode(b"g\xc5t", b"k\xff") + encode("CLIENT", b"\xe9t\xe9") + encode(b"\xff\xfe", b"\x80")
                + encode("GET", b"k"))
        got = []
        for r in (door, redis):
            r.send(data)
            got.append([r.reply() for _ in range(4)])
        assert got[0] == got[1]
    finally:
        door.close()
        redis.close()


def test_a_key_past_the_limit_gets_the_doors_error_on_either_path(one_server_door):
    """GET of a key longer than MAX_KV_KEY_BYTES answers the door's error (README: a key is 1 to
    65,536 bytes), whether the compiled path or Python answers it. (Before: the compiled path
    answered a miss, $-1, and Python the error: which one depended on the grants.)"""
    r = Raw(one_server_door.resp_port)
    try:
        for n in (65537, 70000, 200000):
            key = b"L" * n
            r.send(encode("SET", b"warm", b"1") + encode("GET", b"warm") + encode("GET", key) + encode("GETEX", key))
            got = [r.reply() for _ in range(4)]
            error = b"-ERR a key is 1 to 65536 bytes, got %d\r\n" % n
            assert got == [b"+OK\r\n", b"$1\r\n1\r\n", error, error], n
    finally:
        r.close()


def test_auth_switching_mid_pipeline_answers_each_get_from_its_namespace(one_server_door):
    """GET, AUTH to another namespace, a wrong AUTH, GET, SET, ... in one write (and byte by
    byte): the compiled path hands each AUTH to Python and answers what follows under the
    namespace it chose; a wrong secId changes nothing."""
    fab = one_server_door
    door_sec = open(os.path.join(fab.directory, "resp.secid")).read().strip()
    with memfabric.init(fab.directory) as s:
        for name in ("sw2", "sw3"):
            s.create_namespace(name, sec_id=name + "-sec")
    auth = {"default": ("AUTH", door_sec), "sw2": ("AUTH", "sw2", "sw2-sec"), "sw3": ("AUTH", "sw3", "sw3-sec")}
    model: dict[str, bytes | None] = {n: None for n in auth}
    rng = random.Random(17)
    r = Raw(fab.resp_port)
    before = _compiled_counts(fab)
    try:
        r.send(encode("DEL", b"sw"))
        r.reply()
        for round_ in range(40):
            current, batch, expected, serial = "default", [], [], 0
            if round_ % 3 == 2:
                batch.append(encode("HELLO", "3"))
                expected.append(None)
            for _ in range(rng.randint(2, 12)):
                step = rng.choice(["default", "sw2", "sw3", "wrong", "get", "get", "set"])
                if step in auth:
                    batch.append(encode(*auth[step]))
                    expected.append(b"+OK\r\n")
                    current = step
                elif step == "wrong":
                    batch.append(encode("AUTH", "sw2", "not-its-secret"))
                    expected.append(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
                elif step == "get":
                    batch.append(encode("GET", b"sw"))
                    v = model[current]
                    miss = b"_\r\n" if round_ % 3 == 2 else b"$-1\r\n"
                    expected.append(miss if v is None else b"$%d\r\n%s\r\n" % (len(v), v))
                else:
                    serial += 1
                    model[current] = b"%s-%d-%d" % (current.encode(), round_, serial)
                    batch.append(encode("SET", b"sw", model[current]))
                    expected.append(b"+OK\r\n")
            batch += [encode("HELLO", "2"), encode(*auth["default"])]
            expected += [None, b"+OK\r\n"]
            data = b"".join(batch)
            if round_ % 2:
                for i in range(len(data)):
                    r.send(data[i:i + 1])
            else:
                r.send(data)
            got = [r.reply() for _ in expected]
            assert [g for g, e in zip(got, expected) if e is not None] == [e for e in expected if e is not None], \
                (round_, data)
    finally:
        r.close()
    after = _compiled_counts(fab)
    assert after[0] > before[0] and after[1] > before[1], (before, after)      # the compiled path answered


def test_commands_answered_before_a_client_vanishes_are_counted(one_server_door):
    """A client pipelines GETs of 60 KiB values, reads nothing, and resets the connection: the
    compiled call's send fails. The GETs it answered (each a keyspace hit) are counted in INFO's
    commands processed all the same. (Before: the call raised, its counts lost: hits moved,
    total_commands_processed did not.)"""
    import struct

    infos = [0]

    def figures(r: Raw) -> dict[bytes, int]:
        infos[0] += 1
        r.send(encode("INFO", "stats"))
        lines = r.reply().split(b"\r\n")
        return {k: int(v) for k, _, v in (line.partition(b":") for line in lines)
                if k in (b"total_commands_processed", b"keyspace_hits")}
    r = Raw(one_server_door.resp_port)
    try:
        r.send(encode("SET", b"vanish", b"v" * (60 << 10)) + encode("GET", b"vanish") + encode("GET", b"vanish"))
        assert [r.reply()[:5] for _ in range(3)] == [b"+OK\r\n", b"$6144", b"$6144"]
        first = figures(r)
        infos[0] = 0
        s = socket.create_connection(("127.0.0.1", one_server_door.resp_port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(encode("GET", b"vanish") * 200)          # some 12 MiB of replies nobody reads
        wait_until(lambda: figures(r)[b"keyspace_hits"] > first[b"keyspace_hits"] + 1, "GETs answered")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                          # a reset: the door's send fails

        def settled() -> dict[bytes, int] | None:
            a = figures(r)
            time.sleep(0.2)
            b = figures(r)
            return b if b[b"keyspace_hits"] == a[b"keyspace_hits"] and \
                b[b"total_commands_processed"] == a[b"total_commands_processed"] + 1 else None
        last = wait_until(settled, "the door to let the client go")
        hits = last[b"keyspace_hits"] - first[b"keyspace_hits"]
        commands = last[b"total_commands_processed"] - first[b"total_commands_processed"]
        # Counted since `first`: its own INFO and every one after but the last, and the GETs.
        assert hits > 1 and commands == hits + infos[0], (hits, commands, infos[0])
    finally:
        r.close()

"""The door under concurrent clients and failures: read-modify-write commands lose nothing,
moves in both directions never hang, a SCAN across a growing table misses no key, a dead
server's keys get an error in bounded time and the door goes on."""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest
import redis

from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, free_ports, stop_process, wait_until
from .wire import Raw

THREADS = 6
# What a door client must never read in an error: a path, an address (host:port, IPv4, IPv6),
# a server's id, an internal operation's name.
INTERNAL_DETAIL = re.compile(r"/\w|\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]*:[0-9a-fA-F:]*\]|:\d{2,5}\b|"
                             r"\bservers? \d|\bserver\(s\)|\bkv_\w+|\.sock\b|\bipc\b|\bhost '")


def reveals_nothing(message: str) -> bool:
    return INTERNAL_DETAIL.search(message) is None


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=30, protocol=2)


def _run(workers) -> None:
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:       # noqa: BLE001 -- reported below
                errors.append(exc)
        return run
    threads = [threading.Thread(target=guarded(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 6)
        assert not t.is_alive(), "a door client hung"
    assert not errors, errors


def _keys_on_both(prefix: str, n: int) -> list[str]:
    keys = [f"{prefix}{i}" for i in range(n)]
    assert {homes(k.encode(), [1, 2], 1)[0] for k in keys} == {1, 2}
    return keys


def test_concurrent_increments_and_appends_lose_nothing(door_port):
    keys = _keys_on_both("race:n:", 8)
    _client(door_port).delete(*keys, "race:log")

    def work(me: int):
        def run():
            r = _client(door_port)
            for i in range(150):
                r.incr(keys[i % len(keys)])
                r.incrbyfloat(keys[(i + 1) % len(keys)] + ":f", 0.5)
                r.append("race:log", f"{me}")
            r.close()
        return run
    _run([work(me) for me in range(THREADS)])
    r = _client(door_port)
    assert sum(int(r.get(k)) for k in keys) == THREADS * 150
    assert sum(float(r.get(k + ":f")) for k in keys) == THREADS * 150 * 0.5
    log = r.get("race:log")
    assert len(log) == THREADS * 150 and all(log.count(str(me).encode()) == 150 for me in range(THREADS))


def test_renames_both_ways_between_servers_never_hang(door_port):
    """RENAME a b and RENAME b a at once, a and b on different servers (and on one): each
    returns, and the value is never lost or doubled."""
    pairs = []
    for i in range(200):
        a, b = f"mv:a{i}", f"mv:b{i}"
        if homes(a.encode(), [1, 2], 1) != homes(b.encode(), [1, 2], 1):
            pairs.append((a, b))
        if len(pairs) == 2:
            break
    same = next((f"mv:s{i}", f"mv:t{i}") for i in range(200)
                if homes(f"mv:s{i}".encode(), [1, 2], 1) == homes(f"mv:t{i}".encode(), [1, 2], 1))
    pairs.append(same)
    r = _client(door_port)
    for a, b in pairs:
        r.delete(a, b)
        r.set(a, "the value")

    def mover(src_first: bool):
        def run():
            client = _client(door_port)
            for _ in range(60):
                for a, b in pairs:
                    src, dst = (a, b) if src_first else (b, a)
                    try:
                        client.rename(src, dst)
                    except redis.ResponseError as exc:
                        assert "no such key" in str(exc)
            client.close()
        return run
    _run([mover(True), mover(False), mover(True), mover(False)])
    for a, b in pairs:
        values = [v for v in r.mget(a, b) if v is not None]
        assert values == [b"the value"], (a, b, values)


@pytest.mark.parametrize("count, added", [(50, 60), (100, 40)])
def test_scan_misses_no_key_while_the_table_grows(door_port, count, added):
    """Keys added during the SCAN replace the servers' tables (they grow) under its cursor,
    several times in one pass: a key there all along is returned all the same. Before, a
    table replaced twice in one pass was read on from the cursor's slot of the new table,
    which held other keys there (one run in four of the first case lost keys; the property
    test in tests/kv/test_growth.py finds it every time)."""
    r = _client(door_port)
    r.flushdb()
    present = {f"scan:{i}".encode() for i in range(600)}
    for k in present:
        r.set(k, "x")
    seen: set[bytes] = set()
    cursor, grow = 0, 0
    for _ in range(10_000):              # bounded: a pass ends
        cursor, keys = r.scan(cursor, count=count)
        seen.update(keys)
        with r.pipeline(transaction=False) as pipe:
            for _ in range(added):
                pipe.set(f"grow:{grow}", "y")
                grow += 1
            pipe.execute()
        if cursor == 0:
            break
    assert cursor == 0
    assert present <= seen


def test_a_dead_server_costs_its_keys_only(fresh_fabric):
    """kill -9 of the server without the door: its keys get an error (not a hang), the door's
    own keys are served throughout, and once the cluster sees it dead its keys live anew."""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-kill-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--resp-port", str(port)]).start()
    try:
        keys = _keys_on_both("dead:", 20)
        theirs = [k for k in keys if homes(k.encode(), [1, 2], 1) == [2]]
        ours = [k for k in keys if homes(k.encode(), [1, 2], 1) == [1]]
        r = _client(port)
        for k in keys:
            r.set(k, "v")
        os.kill(fab.server_pids()[2], signal.SIGKILL)
        with pytest.raises(redis.ResponseError, match="SERVER_UNAVAILABLE|TIMEOUT") as failed:
            r.get(theirs[0])
        assert reveals_nothing(str(failed.value)), str(failed.value)
        assert r.mget(ours) == [b"v"] * len(ours)
        wait_until(lambda: _served(r, theirs[0]), "the dead server's keys to live on server 1")
        assert r.set(theirs[1], "again") and r.get(theirs[1]) == b"again"
        assert r.get(theirs[2]) is None          # it was only on the dead server
        raw = Raw(port)
        assert raw.run(["PING"]) == [b"+PONG\r\n"]
        raw.close()
        r.close()
    finally:
        fab.stop()


def _served(r: redis.Redis, key: str) -> bool:
    try:
        r.get(key)
        return True
    except redis.ResponseError:
        return False


def test_moves_started_on_two_servers_at_once_do_not_wait_on_each_other(door_fabric, door_port):
    """The door copies a -> b at a's server while a client asks b's server to copy b -> a:
    each server asks the other. Neither may hold its key's stripe while it asks (each would
    wait for the other's until a TIMEOUT)."""
    import memfabric
    a = next(f"x:a{i}" for i in range(100) if homes(f"x:a{i}".encode(), [1, 2], 1) == [1])
    b = next(f"x:b{i}" for i in range(100) if homes(f"x:b{i}".encode(), [1, 2], 1) == [2])
    sec = open(os.path.join(door_fabric.directory, "resp.secid")).read().strip()
    r = _client(door_port)
    r.set(a, "v")
    r.set(b, "v")
    with memfabric.init(door_fabric.directory, server=0) as session:
        link = session.link(2)
        creds = {"pool": "default", "ns": "default", "sec": sec.encode()}

        def door_side():
            client = _client(door_port)
            for _ in range(200):
                assert client.copy(a, b, replace=True)
            client.close()

        def server_two_side():
            for _ in range(200):
                assert link.call("kv_move", **creds, key=b.encode(), to=a.encode(), keep=True)["moved"]
        _run([door_side, server_two_side])
    assert r.mget(a, b) == [b"v", b"v"]


def test_a_stopped_server_holds_up_only_its_own_keys(fresh_fabric):
    """SIGSTOP the server without the door: a command on one of its keys answers an error once
    the peer call times out; meanwhile other connections' keys on the door's server are served."""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-stop-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=30.0, extra_args=["--resp-port", str(port)]).start()
    pid = fab.server_pids()[2]
    try:
        keys = _keys_on_both("stop:", 20)
        theirs = next(k for k in keys if homes(k.encode(), [1, 2], 1) == [2])
        ours = [k for k in keys if homes(k.encode(), [1, 2], 1) == [1]]
        r = _client(port)
        for k in keys:
            r.set(k, "v")
        stop_process(pid)
        outcome: list[BaseException | bytes] = []

        def blocked():
            try:
                outcome.append(_client(port).get(theirs))
            except redis.ResponseError as exc:
                outcome.append(exc)
        t = threading.Thread(target=blocked)
        t.start()
        served = 0
        while t.is_alive() and served < 2000:
            assert r.mget(ours) == [b"v"] * len(ours)
            served += 1
        t.join(WAIT_S * 3)
        assert not t.is_alive()
        assert isinstance(outcome[0], redis.ResponseError) and "TIMEOUT" in str(outcome[0]), outcome
        # Before: "TIMEOUT server at /tmp/.../server-2/ipc.sock did not answer 'kv_get' within 3s".
        assert reveals_nothing(str(outcome[0])), outcome
        assert served > 0
    finally:
        os.kill(pid, signal.SIGCONT)
        fab.stop()

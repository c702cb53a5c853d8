"""MemKV with replicas on one host's servers: killing a server loses no key that had a copy
elsewhere; a key without one is SERVER_UNAVAILABLE until the cluster sees its server dead,
then a miss; never wrong bytes. (tests/multihost/test_kv_hosts.py does it across hosts.)"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import memfabric
from memfabric.kv.rules import homes

from ..helpers import MiB, wait_until


def _value(i: int) -> bytes:
    size = MiB + i if i % 25 == 0 else 100 + i
    return (f"{i}:".encode() * size)[:size]


def _kill(fab, server_id: int) -> None:
    pid = fab.server_pids()[server_id]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the server to die")


def _seen_dead(session: memfabric.Session, server_id: int) -> None:
    wait_until(lambda: not any(s["alive"] for s in session.servers() if s["server_id"] == server_id),
               "the cluster to see the killed server dead", timeout_s=30)


@pytest.mark.parametrize("client", ["same-host", "remote"])
def test_killing_a_server_loses_no_key_that_had_a_replica(fresh_fabric, client):
    fab = fresh_fabric(servers=3, capacity="64MiB", segment_size="4MiB")
    where = fab.directory if client == "same-host" else os.path.join(fab.directory, "remote.toml")
    with memfabric.init(fab.directory, server=0) as admin, memfabric.init(where) as s:
        admin.create_namespace("rep", sec_id="k").kv().configure(replicas=2)
        kv = s.namespace("rep", "k").kv()
        keys = [f"key-{i}".encode() for i in range(200)]
        for i, key in enumerate(keys):
            assert kv.put(key, _value(i))
        kv.put("gone", b"deleted before the kill")
        assert kv.delete("gone")
        kv.put("expires", b"x", ttl_s=0.5)
        stats = kv.stats()
        assert stats["keys"] == 201 and stats["held_keys"] == 2 * 201     # each key on two servers
        servers = sorted(x["server_id"] for x in s.servers())
        victim = admin.local.server_id if client == "remote" else servers[-1]
        firsts = [k for k in keys if homes(k, servers, 1)[0] == victim]
        assert firsts, "some keys live first on the victim"
        _kill(fab, victim)
        # At once (the cluster may not know yet): every key is read from its other home.
        assert kv.get_many(keys) == [_value(i) for i in range(len(keys))]
        for i in (0, 25, 50):
            into = np.empty(len(_value(i)), dtype=np.uint8)
            assert kv.get_into(keys[i], into) == len(_value(i)) and into.tobytes() == _value(i)
        assert kv.get("gone") is None                              # the delete reached the replica
        _seen_dead(s, victim)
        assert kv.get_many(keys) == [_value(i) for i in range(len(keys))]
        assert kv.get("gone") is None
        # Writes go on at the new first homes, and read back.
        for key in firsts[:20]:
            assert kv.put(key, b"rewritten")
            assert kv.get(key) == b"rewritten"
        assert kv.delete(firsts[0]) and kv.get(firsts[0]) is None


def test_a_key_without_a_replica_is_unavailable_then_a_miss_never_wrong_bytes(fresh_fabric):
    fab = fresh_fabric(servers=3, capacity="64MiB", segment_size="4MiB")
    with memfabric.init(fab.directory, server=0) as s:
        kv = s.create_namespace("single", sec_id="k").kv()
        keys = [f"key-{i}".encode() for i in range(200)]
        for i, key in enumerate(keys):
            kv.put(key, _value(i))
        kv.put("three-copies", b"precious", replicas=3)        # a key's own count beats the namespace's
        servers = sorted(x["server_id"] for x in s.servers())
        victim = [x for x in servers if x != s.local.server_id][0]
        lost = {k for k in keys if homes(k, servers, 1)[0] == victim}
        assert lost
        _kill(fab, victim)
        for i, key in enumerate(keys):
            try:
                got = kv.get(key)
            except memfabric.ServerUnavailable:
                assert key in lost                            # only the dead server's keys
                continue
            assert got == (None if key in lost else _value(i))  # a miss, never another's bytes
        _seen_dead(s, victim)
        values = kv.get_many(keys)
        for i, key in enumerate(keys):
            assert values[i] == (None if key in lost else _value(i))
        assert kv.get("three-copies") == b"precious"
        assert kv.put(next(iter(lost)), b"new home") and kv.get(next(iter(lost))) == b"new home"


def test_two_servers_replicating_to_each_other_at_once_never_wait_on_each_other(fresh_fabric):
    """A first home held its key's lock stripe while its replica took the same stripe there:
    two servers writing, each to the other, keys of one stripe waited for each other until
    the peer call timed out. A replica's write takes no stripe (versions order it)."""
    from memfabric.kv.rules import key_hash
    from memfabric.kv.space import KEY_LOCK_STRIPES
    import threading

    fab = fresh_fabric(servers=2, capacity="64MiB", segment_size="4MiB")
    with memfabric.init(fab.directory, server=0) as s:
        s.create_namespace("cross", sec_id="k").kv().configure(replicas=2)
        servers = sorted(x["server_id"] for x in s.servers())
        by_home: dict[int, list[bytes]] = {server: [] for server in servers}
        i = 0
        while min(len(v) for v in by_home.values()) < 8:         # keys of stripe 0 homed on each
            key = f"cross-{i}".encode()
            i += 1
            if key_hash(key) % KEY_LOCK_STRIPES == 0:
                by_home[homes(key, servers, 1)[0]].append(key)
        errors: list[BaseException] = []

        def writer(keys: list[bytes]) -> None:
            try:
                with memfabric.init(os.path.join(fab.directory, "remote.toml")) as mine:
                    kv = mine.namespace("cross", "k").kv()
                    for n in range(150):
                        kv.put(keys[n % len(keys)], f"{n}".encode())
            except BaseException as exc:          # noqa: BLE001 - the test reports it
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(keys,)) for keys in by_home.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        missed = [line for line in fab.output if "missed a write" in line]
        assert missed == [], missed[:3]          # each write reached its replica

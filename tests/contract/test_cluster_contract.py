"""One contract, both cluster backends: the embedded SQLite file and a real etcd."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from memfabric.cluster import open_cluster
from memfabric.errors import LimitExceeded, NamespaceExists, ServerUnavailable

_prefixes = itertools.count()


@pytest.fixture(params=["embedded", "etcd"])
def make_cluster(request, tmp_path):
    """A factory: each call is another client of the same cluster service (like another server)."""
    opened = []
    if request.param == "embedded":
        settings = {"path": str(tmp_path / "cluster.db")}
    else:
        etcd = request.getfixturevalue("etcd")
        settings = {"endpoints": [etcd.endpoint], "prefix": f"/contract-{os.getpid()}-{next(_prefixes)}"}

    def make(liveness_timeout_s: float = 3.0):
        cluster = open_cluster(request.param, liveness_timeout_s=liveness_timeout_s, **settings)
        opened.append(cluster)
        return cluster

    make.backend = request.param
    make.settings = settings
    yield make
    for cluster in opened:
        cluster.close()


def register(cluster, key: str, pid: int = 1000) -> int:
    return cluster.register_server(node_key=key, host="h", ipc_socket=f"/s/{key}", rpc_address="1.2.3.4:5",
                                   pid=pid)


def test_ids_are_unique_and_stable_per_node_key(make_cluster):
    a, b = make_cluster(), make_cluster()
    ids = [register(a, "node-a", 1), register(b, "node-b", 2), register(a, "node-c", 3)]
    assert sorted(ids) == [1, 2, 3]
    a.deregister_server(ids[0])
    assert register(b, "node-a", 4) == ids[0]          # same data directory, same id


def test_concurrent_registration_never_shares_an_id(make_cluster):
    clusters = [make_cluster() for _ in range(6)]
    ids: list[int] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        server_id = register(clusters[i], f"node-{i}", 100 + i)
        with lock:
            ids.append(server_id)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(ids) == list(range(1, 7))


def test_a_live_server_keeps_its_node_key(make_cluster):
    a, b = make_cluster(), make_cluster()
    register(a, "shared", pid=1)
    with pytest.raises(ServerUnavailable):
        register(b, "shared", pid=2)


def test_heartbeat_carries_resources_to_every_member(make_cluster):
    a, b = make_cluster(), make_cluster()
    sid = register(a, "n", 7)
    a.heartbeat(sid, {"default": {"capacity_bytes": 100, "free_bytes": 60}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = {s.server_id: s for s in b.servers()}
        if seen.get(sid) and seen[sid].pools:
            break
        time.sleep(0.05)
    record = {s.server_id: s for s in b.servers()}[sid]
    assert record.alive and record.pid == 7 and record.rpc_address == "1.2.3.4:5"
    assert record.pools == {"default": {"capacity_bytes": 100, "free_bytes": 60}}


def test_deregistered_server_is_dead_at_once(make_cluster):
    a, b = make_cluster(), make_cluster()
    sid = register(a, "n")
    a.deregister_server(sid)
    assert not {s.server_id: s for s in b.servers()}[sid].alive


def test_silent_server_is_dead_within_the_liveness_timeout(make_cluster):
    a, b = make_cluster(liveness_timeout_s=2.0), make_cluster(liveness_timeout_s=2.0)
    sid = register(a, "silent")
    assert {s.server_id: s for s in b.servers()}[sid].alive
    deadline = time.monotonic() + 15          # bounded wait, not a timing assertion
    while time.monotonic() < deadline and {s.server_id: s for s in b.servers()}[sid].alive:
        time.sleep(0.1)
    assert not {s.server_id: s for s in b.servers()}[sid].alive


def test_a_heartbeat_says_whether_the_server_stayed_alive_throughout(make_cluster):
    """MemKV forgets its keys only when members may have seen the server dead (kv/service.py
    rejoined): etcd knows (was the lease refreshed, or gone?); the embedded catalog leaves it
    to the time between beats (None)."""
    a, b = make_cluster(liveness_timeout_s=2.0), make_cluster(liveness_timeout_s=2.0)
    sid = register(a, "beating")
    if make_cluster.backend == "embedded":
        assert a.heartbeat(sid, {}) is None
        return
    assert a.heartbeat(sid, {}) is True
    a._client.revoke_lease(a._leases[sid])          # what a lease running out does
    assert not {s.server_id: s for s in b.servers()}[sid].alive
    assert a.heartbeat(sid, {}) is False             # registered again, under a new lease
    assert a.heartbeat(sid, {}) is True
    deadline = time.monotonic() + 5           # b's watch hears of it soon: a bounded wait
    while time.monotonic() < deadline and not {s.server_id: s for s in b.servers()}[sid].alive:
        time.sleep(0.05)
    assert {s.server_id: s for s in b.servers()}[sid].alive


def test_namespace_catalog(make_cluster):
    a, b = make_cluster(), make_cluster()
    first = a.create_namespace("default", "kv", 3, "aa", "bb")
    with pytest.raises(NamespaceExists):
        b.create_namespace("default", "kv", 0, "cc", "dd")
    seen = b.get_namespace("default", "kv")
    assert (seen.attribute, seen.salt_hex, seen.sec_hash_hex, seen.incarnation) == (3, "aa", "bb", first.incarnation)
    assert b.get_namespace("default", "nope") is None
    assert [(r.pool, r.ns) for r in b.namespaces()] == [("default", "kv")]
    assert not b.delete_namespace("default", "kv", first.incarnation + 12345)   # stale incarnation
    assert b.delete_namespace("default", "kv", first.incarnation)
    assert a.get_namespace("default", "kv") is None
    again = a.create_namespace("default", "kv", 0, "ee", "ff")
    assert again.incarnation != first.incarnation        # old grants die with the old namespace


def test_namespace_limit(make_cluster, monkeypatch):
    import memfabric.cluster.embedded as embedded
    import memfabric.cluster.etcd as etcd_backend
    monkeypatch.setattr(embedded, "MAX_NAMESPACES", 3)
    monkeypatch.setattr(etcd_backend, "MAX_NAMESPACES", 3)
    a = make_cluster()
    for i in range(3):
        a.create_namespace("default", f"n{i}", 0, "s", "h")
    with pytest.raises(LimitExceeded):
        a.create_namespace("default", "n3", 0, "s", "h")


def test_epochs_strictly_increase_across_clients_and_reopens(make_cluster):
    a, b = make_cluster(), make_cluster()
    got: list[int] = []
    lock = threading.Lock()

    def take(cluster) -> None:
        for _ in range(20):
            epoch = cluster.next_epoch()
            with lock:
                got.append(epoch)
    threads = [threading.Thread(target=take, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 40 and min(got) >= 1
    again = make_cluster()          # another client, as a restarted server would open
    assert again.next_epoch() > max(got)


# ---- liveness never waits for the catalog ---------------------------------------------------------

LOCK_AND_STOP = r"""
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")     # SQLite's write lock, held ...
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)   # ... by a process that does not run
db.execute("ROLLBACK")
"""


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


def test_liveness_does_not_wait_for_a_stuck_catalog_writer(make_cluster):
    """A process stopped while it holds the catalog's write lock (SIGSTOP, a debugger) makes
    catalog writes fail, boundedly and saying why; servers still beat and see each other alive
    for several liveness periods. (etcd has no lock a client can hold.)"""
    if make_cluster.backend != "embedded":
        pytest.skip("etcd has no write lock a client can hold")
    liveness_s = 2.0
    a, b = make_cluster(liveness_timeout_s=liveness_s), make_cluster(liveness_timeout_s=liveness_s)
    ids = [register(a, "node-a", 1), register(b, "node-b", 2)]
    writer = subprocess.Popen([sys.executable, "-c", LOCK_AND_STOP, make_cluster.settings["path"]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        deadline = time.monotonic() + 10
        while not stopped(writer.pid):
            assert time.monotonic() < deadline, "the writer did not stop"
            time.sleep(0.01)
        end = time.monotonic() + 2.5 * liveness_s
        while time.monotonic() < end:
            for cluster, sid in ((a, ids[0]), (b, ids[1])):
                cluster.heartbeat(sid, {"default": {"capacity_bytes": 100, "free_bytes": sid}})
            for cluster in (a, b):
                view = {s.server_id: s for s in cluster.servers()}
                assert all(view[sid].alive for sid in ids), "a healthy server read as dead"
                assert view[ids[1]].pools == {"default": {"capacity_bytes": 100, "free_bytes": ids[1]}}
            time.sleep(0.1)
        for _ in range(3):     # every write fails, saying why (not once, then hangs)
            with pytest.raises(ServerUnavailable) as err:
                a.create_namespace("default", "blocked", 0, "s", "h")
            assert "locked" in str(err.value)
        assert a.get_namespace("default", "blocked") is None
        assert b.namespaces() == []                      # reads go on
    finally:
        writer.send_signal(signal.SIGCONT)
        writer.kill()
        writer.wait()
    a.create_namespace("default", "after", 0, "s", "h")  # the lock is gone with its holder
    assert b.get_namespace("default", "after") is not None


# ---- who made a namespace, and how many one client may have ---------------------------------------


def test_namespaces_per_creator_are_recorded_counted_and_capped(make_cluster):
    a, b = make_cluster(), make_cluster()
    for i in range(2):
        a.create_namespace("default", f"u{i}", 0, "s", "h", creator="uid 1000", creator_limit=2)
    with pytest.raises(LimitExceeded) as err:
        b.create_namespace("default", "u2", 0, "s", "h", creator="uid 1000", creator_limit=2)
    assert "uid 1000" in str(err.value) and "2" in str(err.value)
    assert b.get_namespace("default", "u2") is None
    b.create_namespace("default", "x", 0, "s", "h", creator="uid 1001", creator_limit=2)   # another client
    b.create_namespace("default", "y", 0, "s", "h")                                         # no limit given
    assert {r.ns: r.creator for r in a.namespaces()} == {"u0": "uid 1000", "u1": "uid 1000",
                                                         "x": "uid 1001", "y": ""}
    first = b.get_namespace("default", "u0")
    assert first.creator == "uid 1000"
    assert a.delete_namespace("default", "u0", first.incarnation)           # room comes back
    a.create_namespace("default", "u2", 0, "s", "h", creator="uid 1000", creator_limit=2)


def test_a_catalog_written_before_creators_is_still_read(make_cluster, tmp_path):
    """Records of earlier versions have no creator: they read as made by no one in particular."""
    if make_cluster.backend == "embedded":
        path = make_cluster.settings["path"]
        db = sqlite3.connect(path)
        db.executescript("""
            CREATE TABLE namespaces (pool TEXT NOT NULL, ns TEXT NOT NULL, attribute INTEGER NOT NULL,
                salt TEXT NOT NULL, sec_hash TEXT NOT NULL, incarnation INTEGER NOT NULL, PRIMARY KEY (pool, ns));
            CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT INTO namespaces VALUES ('default', 'old', 5, 'aa', 'bb', 7);
            INSERT INTO counters VALUES ('incarnation', 7);
        """)
        db.close()
        cluster = make_cluster()
    else:
        cluster = make_cluster()
        cluster._client.put(cluster._key("ns", "default", "old"),
                            json.dumps({"attribute": 5, "salt": "aa", "sec_hash": "bb"}))
    old = cluster.get_namespace("default", "old")
    assert (old.attribute, old.salt_hex, old.sec_hash_hex, old.creator) == (5, "aa", "bb", "")
    new = cluster.create_namespace("default", "new", 0, "s", "h", creator="uid 3", creator_limit=1)
    assert new.incarnation != old.incarnation
    assert [(r.ns, r.creator) for r in cluster.namespaces()] == [("new", "uid 3"), ("old", "")]
    assert cluster.delete_namespace("default", "old", old.incarnation)


def test_namespace_settings_live_and_die_with_their_incarnation(make_cluster):
    a, b = make_cluster(), make_cluster()
    rec = a.create_namespace("p", "settled", 0, "00", "11")
    assert a.get_settings("p", "settled", rec.incarnation, "kv") is None
    assert a.set_settings("p", "settled", rec.incarnation, "kv", {"memory_limit": 1024, "eviction": "lru"})
    assert b.get_settings("p", "settled", rec.incarnation, "kv") == {"memory_limit": 1024, "eviction": "lru"}
    assert b.set_settings("p", "settled", rec.incarnation, "kv", {"replicas": 2})
    assert a.get_settings("p", "settled", rec.incarnation, "kv") == {"replicas": 2}
    assert not a.set_settings("p", "settled", rec.incarnation + 999, "kv", {"x": 1})   # no such incarnation
    assert a.delete_namespace("p", "settled", rec.incarnation)
    assert a.get_settings("p", "settled", rec.incarnation, "kv") is None
    again = a.create_namespace("p", "settled", 0, "00", "11")
    assert a.get_settings("p", "settled", again.incarnation, "kv") is None

"""One contract, both cluster backends: the embedded SQLite file and a real etcd."""

from __future__ import annotations

import itertools
import os
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

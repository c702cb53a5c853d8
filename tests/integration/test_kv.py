"""MemKV's native API on a real fabric of two servers, from a same-host client (lock-free gets
from the mapped index) and from a remote one (RPC only): every operation, values of every
size class, TTLs, the memory limit with eviction and refusal, counters, wrong secIds."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import memfabric
from memfabric.errors import BmError, InvalidArgument, MemfabricError, OutOfMemory, PermissionDenied
from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric
from memfabric.limits import KV_INLINE_BYTES, MAX_KV_KEY_BYTES

from ..conftest import short_tmp_dir
from ..helpers import ns_name, wait_until

MiB = 1 << 20


@pytest.fixture(scope="module")
def kv_fabric():
    fab = LocalFabric(short_tmp_dir("mf-kv-"), servers=2, capacity="256MiB", segment_size="4MiB",
                      liveness_timeout_s=2.0).start()
    yield fab
    assert fab.stop() == 0, "".join(fab.output[-30:])


def _session(fab: LocalFabric, where: str) -> memfabric.Session:
    if where == "same-host":
        return memfabric.init(fab.directory, server=0)
    return memfabric.init(os.path.join(fab.directory, "remote.toml"))


@pytest.fixture(params=["same-host", "remote"])
def where(request):
    return request.param


@pytest.fixture
def kv(kv_fabric, where, request):
    """A namespace of the test's own and its KV, from a client of the kind `where` names."""
    name = ns_name(request)
    with _session(kv_fabric, where) as s:
        ns = s.create_namespace(name, sec_id=f"sec-{name}")
        try:
            yield ns.kv()
        finally:
            ns.destroy()


def test_put_get_delete_exists(kv):
    assert kv.get(b"k") is None and not kv.exists("k")
    assert kv.put(b"k", b"v1") is True
    assert kv.get(b"k") == b"v1" and kv.get("k") == b"v1"
    assert kv.exists("k")
    assert kv.put("k", bytearray(b"v2")) is True
    assert kv.get("k") == b"v2"
    assert kv.delete("k") is True
    assert kv.delete("k") is False
    assert kv.get("k") is None


def test_keys_and_values_of_every_kind(kv):
    arr = np.arange(1000, dtype=np.float64)
    kv.put("numpy", arr)
    assert np.array_equal(np.frombuffer(kv.get("numpy"), dtype=np.float64), arr)
    kv.put("view", memoryview(b"abcdef")[2:])
    assert kv.get("view") == b"cdef"
    kv.put("empty", b"")
    assert kv.get("empty") == b"" and kv.exists("empty")
    kv.put("text", "héllo")                       # a str value: UTF-8, as a key
    assert kv.get("text") == "héllo".encode()
    kv.put("ключ", b"unicode key")
    assert kv.get("ключ".encode()) == b"unicode key"
    longest = b"K" * MAX_KV_KEY_BYTES
    kv.put(longest, b"long key")
    assert kv.get(longest) == b"long key"
    strided = np.arange(100, dtype=np.uint8)[::2]
    kv.put("strided", strided)
    assert kv.get("strided") == strided.tobytes()


@pytest.mark.parametrize("bad", [b"", "", b"K" * (MAX_KV_KEY_BYTES + 1), None, 5, 1.5, ["k"]])
def test_bad_keys_are_invalid_argument_with_the_limit(kv, bad):
    with pytest.raises(InvalidArgument) as err:
        kv.put(bad, b"v")
    if isinstance(bad, (bytes, str)):
        assert str(MAX_KV_KEY_BYTES) in str(err.value)
    with pytest.raises(InvalidArgument):
        kv.get(bad)


@pytest.mark.parametrize("bad", [None, 5, object(), {"a": 1}])
def test_bad_values_are_invalid_argument(kv, bad):
    with pytest.raises(InvalidArgument):
        kv.put("k", bad)
    assert kv.get("k") is None


@pytest.mark.parametrize("size", [0, 1, 4096, 60 << 10, 64 << 10, KV_INLINE_BYTES - 10, KV_INLINE_BYTES + 1,
                                  1 * MiB + 7, 16 * MiB])
def test_values_of_every_size_class_round_trip(kv, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert kv.put("v", data)
    assert kv.get("v") == data.tobytes()
    into = np.zeros(size + 3, dtype=np.uint8)
    assert kv.get_into("v", into) == size
    assert np.array_equal(into[:size], data) and not into[size:].any()
    # Replaced by a value of another class: the old record goes, the new one is whole.
    other = data[::-1].copy() if size else np.ones(5, dtype=np.uint8)
    kv.put("v", other)
    assert kv.get("v") == other.tobytes()


@pytest.mark.parametrize("size", [10, 300 << 10, 2 * MiB])
def test_get_into_a_buffer_too_small_is_invalid_argument_and_leaves_it_untouched(kv, size):
    kv.put("v", b"x" * size)
    buffer = np.full(size - 1, 7, dtype=np.uint8)
    with pytest.raises(InvalidArgument) as err:
        kv.get_into("v", buffer)
    assert str(size) in str(err.value)
    assert (buffer == 7).all()
    assert kv.get_into("v", np.empty(size, dtype=np.uint8)) == size   # the hold was let go
    assert kv.get_into("missing", buffer) is None and (buffer == 7).all()


def test_get_into_refuses_a_read_only_buffer(kv):
    kv.put("v", b"abc")
    with pytest.raises(InvalidArgument):
        kv.get_into("v", b"xxx")


def test_nx_and_xx(kv):
    assert kv.put("k", b"1", xx=True) is False
    assert kv.get("k") is None
    assert kv.put("k", b"1", nx=True) is True
    assert kv.put("k", b"2", nx=True) is False
    assert kv.get("k") == b"1"
    assert kv.put("k", b"3", xx=True) is True
    assert kv.get("k") == b"3"
    with pytest.raises(InvalidArgument):
        kv.put("k", b"4", nx=True, xx=True)
    big = b"B" * (2 * MiB)
    assert kv.put("k", big, nx=True) is False              # large values too: refused, memory given back
    assert kv.put("k", big, xx=True) is True and kv.get("k") == big


def test_ttl_expiry_is_seen_by_every_reader_at_once(kv):
    kv.put("t", b"soon", ttl_s=0.3)
    kv.put("forever", b"x")
    left = kv.ttl("t")
    assert 0 < left <= 0.3
    assert kv.ttl("forever") == -1.0
    assert kv.ttl("missing") == -2.0
    time.sleep(0.35)
    assert kv.get("t") is None
    assert not kv.exists("t")
    assert kv.ttl("t") == -2.0
    assert kv.get_many(["t", "forever"]) == [None, b"x"]


def test_expire_sets_and_refreshes_a_ttl(kv):
    kv.put("k", b"v")
    assert kv.expire("k", 0.2) is True
    assert 0 < kv.ttl("k") <= 0.2
    assert kv.expire("missing", 1) is False
    assert kv.expire("k", 100) is True
    assert kv.ttl("k") > 99
    kv.put("k", b"rewritten")                   # a put without ttl_s: no expiry (as Redis's SET)
    assert kv.ttl("k") == -1.0
    for bad in (0, -1, float("nan"), "1", None, True):
        with pytest.raises(InvalidArgument):
            kv.expire("k", bad)


def test_expired_keys_give_their_memory_back_without_a_reader(kv):
    # Long enough for the count below on a loaded machine (0.2 s was not: 148 of 300 were left).
    kv.put_many({f"e{i}": b"x" * 1000 for i in range(300)}, ttl_s=2.0)
    before = kv.stats()
    assert before["keys"] == 300
    wait_until(lambda: kv.stats()["keys"] == 0, "the sweep to delete expired keys", timeout_s=10)
    after = kv.stats()
    assert after["expired"] >= 300 and after["bytes"] < before["bytes"]


def test_incr(kv):
    assert kv.incr("n") == 1
    assert kv.incr("n", 41) == 42
    assert kv.incr("n", -50) == -8
    assert kv.get("n") == b"-8"
    assert kv.incr("n", np.int64(8)) == 0
    kv.put("text", b"abc")
    with pytest.raises(InvalidArgument):
        kv.incr("text")
    kv.put("big", str(2 ** 63 - 1).encode())
    with pytest.raises(InvalidArgument):
        kv.incr("big")
    assert kv.get("big") == str(2 ** 63 - 1).encode()
    kv.put("ttl", b"5", ttl_s=100)
    assert kv.incr("ttl") == 6 and kv.ttl("ttl") > 99     # incr keeps the TTL (as Redis)
    with pytest.raises(InvalidArgument):
        kv.incr("n", 1.5)


def test_batches(kv):
    items = {f"b{i}": f"value-{i}".encode() * (i % 7) for i in range(2000)}
    kv.put_many(items)
    keys = list(items) + ["missing"]
    assert kv.get_many(keys) == list(items.values()) + [None]
    assert kv.exists_many(["b1", "nope", "b1999"]) == [True, False, True]
    buffers = [np.zeros(100, dtype=np.uint8) for _ in range(3)]
    assert kv.get_many_into(["b3", "missing", "b10"], buffers) == [21, None, 24]
    assert bytes(buffers[0][:21]) == items["b3"] and bytes(buffers[2][:24]) == items["b10"]
    with pytest.raises(InvalidArgument):
        kv.get_many_into(["b3"], [])
    assert kv.delete_many(["b1", "b2", "nope"]) == 2
    assert kv.get_many(["b1", "b2", "b3"]) == [None, None, items["b3"]]
    kv.put_many([("pair", b"p"), (b"pair2", np.arange(3, dtype=np.uint8))], ttl_s=50)
    assert kv.get("pair2") == bytes([0, 1, 2]) and kv.ttl("pair") > 49


def test_batches_mixing_small_and_large_values(kv):
    big = np.random.default_rng(1).integers(0, 256, 3 * MiB, dtype=np.uint8)
    kv.put_many({"small": b"s", "big": big, "medium": b"m" * (100 << 10)})
    assert kv.get_many(["big", "small", "medium"]) == [big.tobytes(), b"s", b"m" * (100 << 10)]
    into = [np.empty(3 * MiB, dtype=np.uint8), np.empty(1, dtype=np.uint8)]
    assert kv.get_many_into(["big", "small"], into) == [3 * MiB, 1]
    assert np.array_equal(into[0], big)


def test_a_batch_of_many_values_is_a_few_requests_not_one_per_key(kv, monkeypatch):
    """A remote batch once carried 192 KiB of values per reply and fetched every other key on
    its own (1,000 x 4 KiB: 953 round trips). Now its values ride as one payload per reply,
    and the keys a reply has no room for (past KV_GET_MANY_PAYLOAD_BYTES) are asked again."""
    rng = np.random.default_rng(5)
    items = {f"many-{i}".encode(): rng.integers(0, 256, 4096 if i % 50 else 200 << 10, dtype=np.uint8).tobytes()
             for i in range(3000)}          # 16 MiB in all: past one reply's room
    kv.put_many(items)
    asked: list[str] = []
    for link_class in {type(kv._session.link(s)) for s in kv._pool_servers()}:
        for name in ("call", "submit"):
            real = getattr(link_class, name, None)
            if real is None:
                continue

            def counting(self, op, *args, _real=real, **kwargs):
                asked.append(op)
                return _real(self, op, *args, **kwargs)
            monkeypatch.setattr(link_class, name, counting)
    keys = list(items) + [b"many-missing"]
    assert kv.get_many(keys) == list(items.values()) + [None]
    buffers = [bytearray(200 << 10) for _ in keys]
    lengths = kv.get_many_into(keys, buffers)
    assert [bytes(b[:n]) for b, n in zip(buffers, lengths[:-1])] == list(items.values()) and lengths[-1] is None
    # Same host, most keys are read in place; remote, 2 x 3,001 keys ask a few requests per server.
    assert asked.count("kv_get") == 0 and asked.count("kv_get_many") <= 2 * 12, asked.count("kv_get_many")


def test_scan_gives_every_key_once_across_servers(kv):
    keys = {f"user:{i}".encode() for i in range(3000)} | {f"other:{i}".encode() for i in range(100)}
    kv.put_many({k: b"" for k in keys})
    seen = list(kv.scan(batch=128))
    assert len(seen) == len(set(seen)) == len(keys) and set(seen) == keys
    assert set(kv.scan("user:")) == {k for k in keys if k.startswith(b"user:")}
    assert list(kv.scan(b"none")) == []
    assert len(kv) == len(keys)
    servers = sorted(s["server_id"] for s in kv._session.servers())
    assert {homes(k, servers, 1)[0] for k in keys} == set(servers)   # the keys really are on both


def test_stats_count_hits_misses_keys_and_bytes(kv):
    kv.put("a", b"x" * 1000)
    kv.put("b", b"y")
    base = kv.stats()
    for _ in range(5):
        kv.get("a")
    for _ in range(3):
        kv.get("nope")
    stats = kv.stats()
    assert stats["hits"] - base["hits"] == 5 and stats["misses"] - base["misses"] == 3
    assert stats["keys"] == 2 and stats["bytes"] >= 1001
    assert stats["memory_limit"] is None and stats["evictions"] == 0
    assert stats["settings"] == {"memory_limit": None, "eviction": "lru", "replicas": 1}


def test_gets_of_threads_sharing_a_kv_are_each_counted_once(kv):
    """Same-host gets count in the client's own stats words, added by the compiled probe and
    by batches with the GIL held: threads sharing them lose no count and add none."""
    kv.put("shared", b"v" * 100)
    base = kv.stats()
    threads, each = 4, 300

    def reader():
        for i in range(each):
            kv.get("shared")
            kv.get(f"missing-{i}")
        kv.get_many(["shared", "missing"] * 5)

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers)
    stats = kv.stats()
    assert stats["hits"] - base["hits"] == threads * (each + 5)
    assert stats["misses"] - base["misses"] == threads * (each + 5)


def test_flush(kv):
    kv.put_many({f"f{i}": b"v" for i in range(500)})
    assert kv.flush() == 500
    assert len(kv) == 0 and kv.get("f1") is None
    kv.put("again", b"works")
    assert kv.get("again") == b"works"


def test_configure_is_kept_by_the_cluster(kv_fabric, where, request):
    name = ns_name(request)
    with _session(kv_fabric, where) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            settings = ns.kv().configure(memory_limit="8MiB", eviction="refuse")
            assert settings == {"memory_limit": 8 * MiB, "eviction": "refuse", "replicas": 1}
            with _session(kv_fabric, "remote" if where == "same-host" else "same-host") as other:
                assert other.namespace(name, "k").kv().stats()["settings"] == settings
            for bad in ({"memory_limit": "lots"}, {"memory_limit": -1}, {"eviction": "random"},
                        {"replicas": 0}, {"replicas": 99}, {"replicas": "2"}):
                with pytest.raises(InvalidArgument):
                    ns.kv().configure(**bad)
            assert ns.kv().configure(memory_limit=None)["memory_limit"] is None
        finally:
            ns.destroy()


def test_eviction_keeps_the_namespace_within_its_limit(kv):
    limit = 4 * MiB
    kv.configure(memory_limit=limit, eviction="lru")
    value = b"v" * 4000
    for i in range(3000):                       # 12 MB of values into a 4 MiB limit
        assert kv.put(f"k{i}", value)
        if i % 50 == 0:
            kv.get("hot")          # a miss before i == 10: fine
        if i == 10:
            kv.put("hot", b"keep me")
        if i > 10 and i % 20 == 0:
            assert kv.get("hot") == b"keep me"  # read often: the clock keeps it
    stats = kv.stats()
    assert stats["bytes"] <= limit
    assert stats["evictions"] > 1000
    assert kv.get("hot") == b"keep me"
    present = sum(v is not None for v in kv.get_many([f"k{i}" for i in range(3000)]))
    assert 0 < present < 3000
    assert kv.get("k2999") == value             # the newest write is there


def test_refuse_fails_out_of_memory_and_loses_nothing(kv):
    kv.configure(memory_limit=2 * MiB, eviction="refuse")
    stored = 0
    with pytest.raises(OutOfMemory) as err:
        for i in range(10_000):
            kv.put(f"k{i}", b"v" * 4000)
            stored += 1
    assert "refuse" in str(err.value)
    assert 100 < stored < 10_000
    assert all(v == b"v" * 4000 for v in kv.get_many([f"k{i}" for i in range(stored)]))
    assert kv.stats()["evictions"] == 0
    with pytest.raises(OutOfMemory):
        kv.put("large", b"L" * (3 * MiB))
    assert kv.delete("k0") and kv.put("k0", b"room again")


def test_a_wrong_sec_id_is_permission_denied_and_reveals_nothing(kv_fabric, where, request):
    name = ns_name(request)
    with _session(kv_fabric, where) as s:
        ns = s.create_namespace(name, sec_id="right")
        try:
            ns.kv().put("secret", b"data")
            wrong = s.namespace(name, "wrong").kv()
            for call in (lambda: wrong.get("secret"), lambda: wrong.get("missing"), lambda: wrong.exists("secret"),
                         lambda: wrong.put("secret", b"x"), lambda: wrong.delete("secret"),
                         lambda: wrong.ttl("secret"), lambda: list(wrong.scan()), lambda: wrong.stats(),
                         lambda: wrong.flush(), lambda: wrong.get_into("secret", bytearray(10)),
                         lambda: wrong.configure(eviction="refuse"), lambda: wrong.incr("n"),
                         lambda: wrong.put("big", b"x" * (2 * MiB))):
                with pytest.raises(PermissionDenied) as err:
                    call()
                assert "secret" not in str(err.value)
            assert ns.kv().get("secret") == b"data" and len(ns.kv()) == 1
        finally:
            ns.destroy()


def test_keyspaces_of_namespaces_are_apart(kv_fabric, where, request):
    name = ns_name(request)
    with _session(kv_fabric, where) as s:
        a = s.create_namespace(name + "a", sec_id="a")
        b = s.create_namespace(name + "b", sec_id="b")
        try:
            a.kv().put("same", b"A")
            b.kv().put("same", b"B" * (2 * MiB))
            assert a.kv().get("same") == b"A" and b.kv().get("same") == b"B" * (2 * MiB)
            a.kv().flush()
            assert b.kv().get("same") == b"B" * (2 * MiB)
        finally:
            a.destroy()
            b.destroy()


def test_a_destroyed_namespace_takes_its_keys_and_a_new_one_starts_empty(kv_fabric, where, request):
    name = ns_name(request)
    with _session(kv_fabric, where) as s:
        ns = s.create_namespace(name, sec_id="k")
        kv = ns.kv()
        kv.put("k", b"old")
        kv.put("big", b"O" * (2 * MiB))
        ns.destroy()
        with pytest.raises(MemfabricError) as err:
            kv.get("k")
        assert err.value.code in (BmError.NO_SUCH_NAMESPACE, BmError.PERMISSION_DENIED)
        again = s.create_namespace(name, sec_id="k")
        try:
            assert again.kv().get("k") is None and again.kv().get("big") is None and len(again.kv()) == 0
        finally:
            again.destroy()


def test_threads_share_one_kv(kv):
    import threading
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                key = f"t{t}-{i % 10}"
                value = f"{t}:{i}".encode() * (1 + i % 5)
                kv.put(key, value)
                got = kv.get(key)
                assert got is not None and got.split(b":")[0] == str(t).encode()
                if i % 50 == 0:
                    kv.put(f"big{t}", bytes([t]) * (300 << 10))
                    assert kv.get(f"big{t}") == bytes([t]) * (300 << 10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_status_and_namespaces_show_the_keyspaces_figures(kv_fabric, request):
    import json
    import subprocess
    import sys
    name = ns_name(request)
    with memfabric.init(kv_fabric.directory, server=0) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        try:
            kv.put_many({f"k{i}": b"v" * 1000 for i in range(30)})
            kv.get("k1")
            kv.get("nope")
            (row,) = [n for n in s.namespaces() if n.ns == name]
            assert row.kv_keys == 30 and row.kv_bytes >= 30_000 and row.kv_hits >= 1 and row.kv_misses >= 1
            proc = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", kv_fabric.directory,
                                   "--json"], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            (shown,) = [n for n in json.loads(proc.stdout)["namespaces"] if n["ns"] == name]
            assert shown["kv_keys"] == 30 and shown["kv_evictions"] == 0
            table = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", kv_fabric.directory],
                                   capture_output=True, text=True, timeout=60)
            assert table.returncode == 0 and "evictions" in table.stdout
        finally:
            s.namespace(name, "k").destroy()


def test_a_put_whose_flags_are_not_booleans_is_refused_by_the_server(kv):
    """The server checks a put's flags itself (a client of its own may send anything): each of
    nx, xx, keepttl and get is a bool or absent, and nx with xx is refused; nothing is written."""
    home = kv._homes(b"flags")[0]
    for flags in ({"nx": 1}, {"xx": 0}, {"keepttl": "yes"}, {"get": None}, {"nx": True, "xx": True}):
        with pytest.raises(InvalidArgument, match="booleans|exclude"):
            kv._call(home, "kv_put", key=b"flags", value=b"v", **flags)
        assert kv.get(b"flags") is None
    assert kv._call(home, "kv_put", key=b"flags", value=b"v", nx=True, get=False)["stored"] is True
    assert kv._call(home, "kv_put", key=b"flags", value=b"w", nx=True)["stored"] is False
    assert kv.get(b"flags") == b"v"


@pytest.mark.parametrize("field, bad", [("generation", "1"), ("generation", 1.5), ("generation", -1),
                                        ("generation", True), ("generation", [1]), ("restart", "no"),
                                        ("restart", 0), ("restart", None), ("restart", [])])
def test_a_scan_s_generation_and_restart_of_a_wrong_type_are_invalid_argument(kv, field, bad):
    """kv_scan's fields from a client of its own: `restart` of any type but bool was taken as
    True or False by chance ("no": True) instead of refused."""
    servers = kv._pool_servers(fresh=True)
    with pytest.raises(InvalidArgument):
        kv._call(servers[0], "kv_scan", cursor=0, batch=10, prefix=b"", servers=servers, **{field: bad})

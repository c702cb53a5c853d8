"""MemKV attacked as an adversary and used as a newcomer would: requests with the wrong
credentials, counter slots outliving their namespace, requests given up on, bad arguments of
every kind, the memory limit, and servers that stop or restart under replicas. Each test is a
finding of the attack round: it failed before its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import memfabric
from memfabric.errors import InvalidArgument, NoSuchNamespace, PermissionDenied, ServerUnavailable, Timeout
from memfabric.kv.rules import homes
from memfabric.launcher import die_with_parent, wait_for_line
from memfabric.limits import KV_INLINE_BYTES
from memfabric.load import audit, leak_figures

from ..helpers import MiB, ns_name, stop_process, wait_until


def _servers(session: memfabric.Session) -> list[int]:
    return sorted(s["server_id"] for s in session.servers() if s["alive"])


def _key_homed_on(session: memfabric.Session, server_id: int, prefix: str = "k") -> str:
    servers = _servers(session)
    return next(f"{prefix}{i}" for i in range(10_000) if homes(f"{prefix}{i}".encode(), servers, 1)[0] == server_id)


def _bytes_held(directory: str, name: str, sec: str) -> int:
    """The namespace's KV bytes on every server, asked by a session of its own."""
    with memfabric.init(directory, server=0) as s:
        return s.namespace(name, sec).kv().stats()["bytes"]


def test_a_commit_abort_or_let_go_with_wrong_credentials_loses_nothing(fabric, request):
    """A kv_commit or kv_abort naming a wrong secId or another namespace failed, and its
    reservation was forgotten with its memory still counted: held until the namespace went,
    not even given back when the client disconnected. A kv_let_go so made lost the hold: the
    value's memory stayed after its key was deleted."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            link, wire = s.local, dict(ns.wire_creds)
            key = _key_homed_on(s, link.server_id)
            first = link.call("kv_reserve", **wire, length=2 * MiB)["token"]
            second = link.call("kv_reserve", **wire, length=2 * MiB)["token"]
            with pytest.raises(PermissionDenied):
                link.call("kv_commit", **{**wire, "sec": b"wrong"}, token=first, key=key.encode())
            with pytest.raises(NoSuchNamespace):
                link.call("kv_commit", **{**wire, "ns": name + "-none"}, token=first, key=key.encode())
            with pytest.raises(NoSuchNamespace):
                link.call("kv_abort", **{**wire, "ns": name + "-none"}, token=second)
            link.call("kv_commit", **wire, token=first, key=key.encode())     # still there
            assert ns.kv().get(key) == bytes(2 * MiB)
            link.call("kv_abort", **wire, token=second)

            ns.kv().put(key, b"H" * (KV_INLINE_BYTES + 1))
            reply = link.call("kv_get", **wire, key=key.encode())            # a hold (IPC)
            assert "hold" in reply
            with pytest.raises(PermissionDenied):
                link.call("kv_let_go", **{**wire, "sec": b"wrong"}, hold=reply["hold"])
            ns.kv().delete(key)
            assert _bytes_held(fabric.directory, name, "k") > KV_INLINE_BYTES     # held: not reused
            link.call("kv_let_go", **wire, hold=reply["hold"])
            assert _bytes_held(fabric.directory, name, "k") == 0
            reserved = link.call("kv_reserve", **wire, length=MiB)["token"]
            with pytest.raises(PermissionDenied):
                link.call("kv_abort", **{**wire, "sec": b"wrong"}, token=reserved)
            s.close()
            # The session went: what it still had reserved went back with it.
            assert _bytes_held(fabric.directory, name, "k") == 0
        finally:
            s.close()
            with memfabric.init(fabric.directory, server=0) as admin:
                admin.destroy_namespace(name, "k")


def test_counter_slots_stay_with_their_keyspace_across_a_destroy(fabric, request):
    """A client's counter slot was given back by namespace name: a client of a destroyed
    namespace that went away gave its slot to the namespace made again under that name, where
    another client held it, and the next client was handed it too. Two clients then wrote one
    pair of counters: same-host hits were lost and others counted twice."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as admin:
        old = memfabric.init(fabric.directory, server=0)
        try:
            key = _key_homed_on(admin, admin.local.server_id)
            old_kv = old.create_namespace(name, sec_id="k").kv()
            old_kv.put(key, b"v")
            assert old_kv.get(key) == b"v"            # lock-free: it has its counter slot
            admin.destroy_namespace(name, "k")
            kv = admin.create_namespace(name, sec_id="k").kv()
            kv.put(key, b"v")
            with memfabric.init(fabric.directory, server=0) as a:
                a_kv = a.namespace(name, "k").kv()
                base = kv.stats()
                for _ in range(5):
                    assert a_kv.get(key) == b"v"
                old.close()                          # gives back the slot it had
                with memfabric.init(fabric.directory, server=0) as b:
                    b_kv = b.namespace(name, "k").kv()
                    for _ in range(3):
                        assert b_kv.get(key) == b"v"
                    for _ in range(2):
                        assert a_kv.get(key) == b"v"
                    assert kv.stats()["hits"] - base["hits"] == 10
        finally:
            old.close()
            admin.destroy_namespace(name, "k")


def test_a_same_host_reader_of_a_destroyed_keyspace_is_told_at_once(fabric, request):
    """A same-host client kept reading the index of a keyspace destroyed by another client:
    its gets said "missing" where every other client got NO_SUCH_NAMESPACE, and once the
    namespace was made again they still missed keys that `exists` said were there."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as admin, \
            memfabric.init(fabric.directory, server=0) as reader:
        key = _key_homed_on(admin, admin.local.server_id)
        admin.create_namespace(name, sec_id="k").kv().put(key, b"old")
        kv = reader.namespace(name, "k").kv()
        assert kv.get(key) == b"old"
        admin.destroy_namespace(name, "k")
        with pytest.raises(NoSuchNamespace):
            kv.get(key)
        admin.create_namespace(name, sec_id="k").kv().put(key, b"new")
        try:
            assert kv.exists(key)
            assert kv.get(key) == b"new"
        finally:
            admin.destroy_namespace(name, "k")


def test_the_audit_accounts_for_kv_memory(fabric, request):
    """The audit (server/audit.py, `memfabric load`'s leak check) knew only BigMemory: every
    byte of keys and values showed as memory no record accounts for, so it could not tell a
    KV leak from a KV."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            kv = ns.kv()
            kv.put_many({f"small{i}": b"s" * (i * 37) for i in range(300)})
            large = _key_homed_on(s, s.local.server_id, "large")
            kv.put(large, b"L" * (3 * MiB))
            kv.put("staged", b"M" * (KV_INLINE_BYTES - 100))      # in extents, from the request
            held = s.local.call("kv_get", **ns.wire_creds, key=large.encode())   # held, then deleted
            kv.delete(large)
            s.local.call("kv_reserve", **ns.wire_creds, length=MiB)        # reserved, being filled
            held_bytes, unaccounted = leak_figures(audit(s), "default", [name])
            assert held_bytes > 4 * MiB and unaccounted == 0
            s.local.call("kv_let_go", **ns.wire_creds, hold=held["hold"])
            kv.flush()
            assert leak_figures(audit(s), "default", [name])[1] == 0
        finally:
            ns.destroy()


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_a_large_put_or_get_given_up_on_gives_back_what_the_server_kept(fresh_fabric, where):
    """A kv_reserve (a large put) or a kv_get answered with a hold, whose caller timed out,
    was carried out when the server came back: the reservation or the hold lasted as long as
    the session, its memory counted (and 16 of them stopped the session's large puts)."""
    fab = fresh_fabric(servers=2, capacity="64MiB", segment_size="1MiB")
    path = fab.directory if where == "same-host" else os.path.join(fab.directory, "remote.toml")
    with memfabric.init(fab.directory, server=0) as admin, \
            memfabric.init(path, timeout_s=0.5, **({"server": 0} if where == "same-host" else {})) as s:
        ns = admin.create_namespace("late", sec_id="k")
        kv = s.namespace("late", "k").kv()
        home = admin.local.server_id
        big, held = _key_homed_on(admin, home, "big"), _key_homed_on(admin, home, "held")
        kv.put(held, b"H" * (KV_INLINE_BYTES + 1))
        assert kv.get(big) is None                 # the links are up, the view is known
        pid = fab.server_pids()[home]
        stop_process(pid)
        try:
            with pytest.raises(Timeout):
                kv.put(big, b"B" * (2 * MiB))
            if where == "same-host":               # a hold: what a same-host get the index cannot answer asks
                with pytest.raises(Timeout):
                    s.link(home).call("kv_get", **ns.wire_creds, key=held.encode())
        finally:
            os.kill(pid, signal.SIGCONT)
        ns.kv().delete(held)
        # The late replies come with the link's next answer; what undoes them goes then.
        wait_until(lambda: kv.get("nothing") is None and _bytes_held(fab.directory, "late", "k") == 0,
                   "the reservation and the hold to be given back")
        kv.put(big, b"B" * (2 * MiB))
        assert kv.get(big) == b"B" * (2 * MiB)


def _bad_calls(kv) -> dict[str, object]:
    """Calls a newcomer (or a fuzzer) makes that must each be INVALID_ARGUMENT, touching nothing."""
    import decimal

    import numpy as np
    return {
        "a str key with a lone surrogate": lambda: kv.put("\ud800", b"v"),
        "a str value with a lone surrogate": lambda: kv.put("k", "\udfff"),
        "a scan prefix with a lone surrogate": lambda: list(kv.scan("p\ud800")),
        "ttl_s numpy bool": lambda: kv.put("k", b"v", ttl_s=np.bool_(True)),
        "ttl_s Decimal sNaN": lambda: kv.put("k", b"v", ttl_s=decimal.Decimal("sNaN")),
        "ttl_s an array": lambda: kv.put("k", b"v", ttl_s=np.array([1.0, 2.0])),
        "ttl_s past a float": lambda: kv.put("k", b"v", ttl_s=10 ** 400),
        "expire numpy bool": lambda: kv.expire("k", np.bool_(True)),
        "put_many ttl_s past a float": lambda: kv.put_many({"k": b"v"}, ttl_s=10 ** 400),
        "replicas True": lambda: kv.put("k", b"v", replicas=True),
        "configure replicas True": lambda: kv.configure(replicas=True),
        "incr by past 64 bits": lambda: kv.incr("n", 2 ** 70),
        "memory_limit past 64 bits": lambda: kv.configure(memory_limit=2 ** 70),
        "memory_limit str past 64 bits": lambda: kv.configure(memory_limit="99999999999999999999999GiB"),
        "get_many None": lambda: kv.get_many(None),
        "get_many one str key": lambda: kv.get_many("abc"),
        "get_many one bytes key": lambda: kv.get_many(b"abc"),
        "exists_many 5": lambda: kv.exists_many(5),
        "delete_many None": lambda: kv.delete_many(None),
        "delete_many one str key": lambda: kv.delete_many("abc"),
        "get_many_into buffers None": lambda: kv.get_many_into(["k"], None),
        "get_many_into one buffer": lambda: kv.get_many_into(["k"], bytearray(8)),
        "put_many None": lambda: kv.put_many(None),
        "put_many 5": lambda: kv.put_many(5),
        "put_many triples": lambda: kv.put_many([("a", b"1", 3)]),
        "put_many two-letter strs": lambda: kv.put_many(["ab", "cd"]),
        "put_many one str": lambda: kv.put_many("ab"),
    }


def test_bad_arguments_are_invalid_argument_and_touch_nothing(fabric, request):
    """Each of these raised a raw UnicodeEncodeError, ValueError, TypeError or OverflowError,
    was taken for something else (a numpy bool as one second, True as one replica, "abc" as
    three keys, ["ab", "cd"] as a=b and c=d), or, for a memory_limit past 64 bits, was kept
    by the cluster and made every later kv_stats, put and get of the namespace INTERNAL_ERROR."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            kv = ns.kv()
            kv.put("k", b"before")
            kv.put("n", b"7")
            wrong = {}
            for what, call in _bad_calls(kv).items():
                try:
                    call()
                    wrong[what] = "accepted"
                except InvalidArgument:
                    pass
                except Exception as exc:     # noqa: BLE001 -- what it raised is the finding
                    wrong[what] = f"{type(exc).__name__}: {exc}"[:160]
            assert not wrong, wrong
            assert kv.get("k") == b"before" and kv.get("n") == b"7"
            assert kv.get_many(["a", "c", "\ud800".encode("utf-8", "surrogatepass")]) == [None, None, None]
            stats = kv.stats()
            assert stats["keys"] == 2 and stats["settings"]["memory_limit"] is None
        finally:
            ns.destroy()


@pytest.mark.parametrize("text", [b"1_0", b"\xd9\xa1", b" 1", b"1 ", b"+1", b"01", b"-0", b"0x1", b"", b"1e3"])
def test_incr_takes_only_ascii_decimal_integers_as_redis_does(fabric, request, text):
    """INCR read the value with Python's int(): "1_0" was 10, and incremented to 11."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            kv = ns.kv()
            kv.put("n", text)
            with pytest.raises(InvalidArgument):
                kv.incr("n")
            assert kv.get("n") == text
            kv.put("m", b"-12")
            assert kv.incr("m", 12) == 0 and kv.incr("m") == 1
        finally:
            ns.destroy()


@pytest.mark.parametrize("size", [KV_INLINE_BYTES - 1000, 3 * MiB])
def test_a_value_larger_than_its_share_of_the_limit_evicts_nothing(fabric, request, size):
    """With eviction "lru", a value that could never fit its server's share of memory_limit
    evicted up to 64 keys, then failed OUT_OF_MEMORY anyway: those keys were lost for nothing."""
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(name, sec_id="k")
        try:
            kv = ns.kv()
            share = (KV_INLINE_BYTES - 2000) * len(_servers(s)) if size < MiB else 4 * MiB
            kv.configure(memory_limit=share, eviction="lru")
            home = s.local.server_id
            keys = [_key_homed_on(s, home, f"keep{i}-") for i in range(20)]
            for key in keys:
                kv.put(key, b"k" * 1000)
            with pytest.raises(memfabric.OutOfMemory) as err:
                kv.put(_key_homed_on(s, home, "huge"), b"h" * size)
            assert "share" in str(err.value)
            assert kv.get_many(keys) == [b"k" * 1000] * len(keys)
            assert kv.stats()["evictions"] == 0
        finally:
            ns.destroy()


def _alive(session: memfabric.Session, server_id: int) -> bool:
    return any(s["server_id"] == server_id and s["alive"] for s in session.servers())


def _restart(fab, server_id: int) -> subprocess.Popen:
    config = os.path.join(fab.directory, f"server-{server_id}", "server.toml")
    proc = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
    wait_for_line(proc, " ready ", 30, [])
    return proc


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_server_back_from_a_stop_the_cluster_took_for_death_never_serves_an_old_value(fresh_fabric, replicas):
    """A key's first home was stopped (SIGSTOP) until the cluster saw it dead; a put of the
    key went to the next server and was acknowledged. When the stopped server came back, every
    client (same-host, lock-free; and remote) read the value from before that put: an
    acknowledged write lost, an old value served. Now the server forgets its keys before it
    serves them again, and same-host readers (compiled lookup or not, get or get_many) stop at
    its index's lease: the key reads as the acknowledged value where a replica holds it, else
    as missing, never as the old one."""
    fab = fresh_fabric(servers=2, capacity="32MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s, \
            memfabric.init(os.path.join(fab.directory, "remote.toml")) as r:
        kv = s.create_namespace("stale", sec_id="k").kv()
        remote = r.namespace("stale", "k").kv()
        kv.configure(replicas=replicas)
        me = s.local.server_id
        other = next(x for x in _servers(s) if x != me)
        key = _key_homed_on(s, other)
        big = _key_homed_on(s, other, "big")
        kv.put(key, b"old")
        kv.put(big, b"O" * (2 * MiB))
        assert kv.get(key) == remote.get(key) == b"old"
        # A same-host client whose view of the pool is a moment old when it reads (pinned here,
        # as a slow refresh leaves it): it still takes the stopped server for the key's home.
        late = s.namespace("stale", "k").kv()
        assert late.get(key) == b"old"
        view = late._servers, late._local

        def pin() -> None:      # a get that finds no home refreshes the view: pinned again
            late._servers, late._local = view
            late._servers_at = late._replicas_at = float("inf")

        pin()
        pid = fab.server_pids()[other]
        stop_process(pid)
        try:
            wait_until(lambda: not _alive(s, other), "the cluster to see the stopped server dead")
            assert kv.put(key, b"new") and kv.put(big, b"N" * (2 * MiB))     # at the next server
            assert kv.get(key) == remote.get(key) == b"new"
            assert late.get(key) == b"new"           # not the stopped server's index: its lease ran out
            pin()
            assert late.get_many([key, big]) == [b"new", b"N" * (2 * MiB)]      # nor grouped
            pin()
            buffers = [bytearray(8), bytearray(2 * MiB)]
            assert late.get_many_into([key, big], buffers) == [3, 2 * MiB] and buffers[0][:3] == b"new"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: _alive(s, other), "the server to be alive again")
        # Without a replica, the new value stays on the server that took the key over, which
        # no longer is its home: the key is missing (never old). stats() takes a fresh view.
        new, new_big = b"new", b"N" * (2 * MiB)
        allowed, allowed_big = ({new}, {new_big}) if replicas > 1 else ({None}, {None})
        for client in (kv, remote):
            client.stats()
            assert client.get(key) in allowed
            assert client.get(big) in allowed_big
            got, got_big = client.get_many([key, big])
            assert got in allowed and got_big in allowed_big
            if replicas > 1:
                assert client.exists(key)
        kv.put(key, b"newest")                     # its first home again, and the replicas follow
        assert kv.get(key) == remote.get(key) == b"newest"


def test_a_restarted_first_home_does_not_hide_what_its_replica_holds(fresh_fabric):
    """With replicas=2, the first home of some keys was killed and restarted (DRAM: empty).
    A remote client still read those keys from their replica, but a same-host client read
    them as missing, and exists and ttl said missing to everyone."""
    fab = fresh_fabric(servers=2, capacity="32MiB", segment_size="1MiB")
    restarted = None
    with memfabric.init(fab.directory, server=0) as s, \
            memfabric.init(os.path.join(fab.directory, "remote.toml")) as r:
        kv = s.create_namespace("restart", sec_id="k").kv()
        remote = r.namespace("restart", "k").kv()
        kv.configure(replicas=2)
        me = s.local.server_id
        other = next(x for x in _servers(s) if x != me)
        keys = [_key_homed_on(s, other, f"r{i}-") for i in range(5)]
        kv.put_many({k: k.encode() for k in keys}, ttl_s=1000)
        kv.put(keys[0] + "-big", b"B" * (2 * MiB))
        os.kill(fab.server_pids()[other], signal.SIGKILL)
        wait_until(lambda: not _alive(s, other), "the cluster to see the killed server dead")
        try:
            restarted = _restart(fab, other)
            wait_until(lambda: _alive(s, other), "the restarted server to be seen alive")
            for client in (kv, remote):
                assert client.get_many(keys) == [k.encode() for k in keys]
                assert client.get(keys[0]) == keys[0].encode()
                assert client.get(keys[0] + "-big") == b"B" * (2 * MiB)
                buffer = bytearray(64)
                assert client.get_into(keys[1], buffer) == len(keys[1])
                assert client.exists_many(keys) == [True] * len(keys)
                assert 990 < client.ttl(keys[2]) <= 1000
                assert client.get("never-written") is None and client.ttl("never-written") == -2.0
        finally:
            if restarted is not None:
                restarted.send_signal(signal.SIGTERM)
                restarted.wait(15)


def _refused(link, wire: dict, key: str) -> bool:
    try:
        link.call("kv_get", **wire, key=key.encode())
    except ServerUnavailable as exc:
        assert "has not reached the cluster" in str(exc)
        return True
    return False


def test_a_server_cut_off_from_the_cluster_refuses_its_keys_then_forgets_them(fresh_fabric):
    """A server whose heartbeats cannot reach the cluster (here its liveness file is made
    immutable: the process runs on and answers) refuses MemKV requests before the cluster can
    take it for dead, and its same-host readers stop at its index's lease; once it is seen
    dead, writes of its keys go to the next server; when its heartbeats land again it has
    forgotten its keys (this key has no replica: a miss, never the old value)."""
    fab = fresh_fabric(servers=2, capacity="32MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s, \
            memfabric.init(os.path.join(fab.directory, "remote.toml")) as r:
        ns = s.create_namespace("cut", sec_id="k")
        kv, remote = ns.kv(), r.namespace("cut", "k").kv()
        other = next(x for x in _servers(s) if x != s.local.server_id)
        key = _key_homed_on(s, other)
        kv.put(key, b"old")
        late = s.namespace("cut", "k").kv()     # a same-host client whose view stays as it was
        assert late.get(key) == b"old"
        view = late._servers, late._local

        def pin() -> None:
            late._servers, late._local = view
            late._servers_at = late._replicas_at = float("inf")

        link, wire = s.link(other), dict(ns.wire_creds)
        liveness = os.path.join(fab.directory, "cluster.db-liveness", f"server-{other}.json")
        if subprocess.run(["chattr", "+i", liveness], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (it needs root and a file system with it)")
        try:
            wait_until(lambda: _refused(link, wire, key), "the cut-off server to refuse its keys")
            wait_until(lambda: not _alive(s, other), "the cluster to see the cut-off server dead")
            assert kv.put(key, b"new")                       # at the next server
            assert kv.get(key) == remote.get(key) == b"new"
            pin()
            assert late.get(key) == b"new"                   # not the index whose lease ran out
            pin()
            assert late.get_many([key]) == [b"new"]
            assert _refused(link, wire, key)
        finally:
            subprocess.run(["chattr", "-i", liveness], check=True)
        wait_until(lambda: _alive(s, other), "the server to be seen alive again")
        assert link.call("kv_get", **wire, key=key.encode())["found"] is False      # forgotten
        for client in (kv, remote, late):
            client.stats()                                   # a fresh view: its home again
            assert client.get(key) is None and client.get_many([key]) == [None]
        kv.put(key, b"newest")
        assert kv.get(key) == remote.get(key) == late.get(key) == b"newest"

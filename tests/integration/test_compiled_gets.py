"""Remote MemKV gets answered and called in compiled code (_kvget.c, kv/get_grants.py), with
real servers and real sockets: that they are, that they give exactly what the Python path
gives (hits, misses, expired keys, wrong secIds, a destroyed namespace, a flush, a table that
grew), and attacks on them (a key overwritten and deleted by another process while a remote
reader reads, threads sharing a session, garbage frames on a granted connection, a client
killed mid-request, a stopped server).

Every wait is bounded; no test asserts how fast anything was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import memfabric
from memfabric.errors import BmError
from memfabric.kv import get_grants

from ..helpers import CHILD_WAIT_S, WAIT_S, ns_name, stop_process, wait_until
from ..transport.paths import interrupted_after
from .test_rpc_review import (raw_client, recv_exactly, recv_frame_header, remote, remote_config, rpc_address,
                              send_frame)

KiB = 1 << 10
pytestmark = pytest.mark.skipif(not get_grants.compiled_hash(), reason="the compiled part is not built")


def compiled_gets(session: memfabric.Session, server_id: int) -> int:
    """Gets the server answered in compiled code so far."""
    return session.link(server_id).call("stats")["compiled_gets"]


def served_sum(session: memfabric.Session) -> int:
    return sum(compiled_gets(session, s["server_id"]) for s in session.servers())


def reply(sock) -> tuple[dict, bytes]:
    header, n = recv_frame_header(sock)
    return header, recv_exactly(sock, n)


def value_of(key: bytes, size: int) -> bytes:
    return (key * (size // len(key) + 1))[:size]


def test_remote_gets_are_answered_in_compiled_code(fabric, request):
    """After a connection's first get of a keyspace, its gets of small values are answered
    without Python on the server, and a lone caller's go through one compiled call; values
    (of every size), misses and larger values exactly as Python gives them."""
    with remote(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        sizes = [0, 1, 100, 200, 243, 244, 255, 256, 4 * KiB, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 150 * KiB,
                 300 * KiB]
        keys = {f"key-{n}".encode(): value_of(f"v{n}:".encode(), n) for n in sizes}
        for key, value in keys.items():
            kv.put(key, value)
        for key, value in keys.items():            # the first gets are Python's: they grant
            assert kv.get(key) == value
        served_before, called_before = served_sum(s), sum(s.link(x["server_id"]).compiled_gets for x in s.servers())
        for _ in range(20):
            for key, value in keys.items():
                assert kv.get(key) == value
                buf = bytearray(len(value) + 3)
                assert kv.get_into(key, buf) == len(value)
                assert bytes(buf[:len(value)]) == value
            assert kv.get(b"no-such-key") is None
        small = sum(1 for n in sizes if n <= 64 * KiB)
        assert served_sum(s) - served_before >= 20 * (2 * small + 1) - 4
        called = sum(s.link(x["server_id"]).compiled_gets for x in s.servers()) - called_before
        assert called >= 20 * (2 * len(sizes) + 1) - 4


def test_stats_count_compiled_gets(fabric, request):
    """Hits and misses answered in compiled code are counted where stats() sees them, and
    stay counted once the connection is gone."""
    name = ns_name(request)
    with remote(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"a", b"1" * 4096)
        kv.get(b"a")
        kv.get(b"missing")
        before = kv.stats()
        served = served_sum(s)
        for _ in range(50):
            assert kv.get(b"a") == b"1" * 4096
            assert kv.get(b"missing") is None
        assert served_sum(s) - served >= 98
        after = kv.stats()
        assert after["hits"] - before["hits"] == 50
        assert after["misses"] - before["misses"] == 50
    with remote(fabric) as s2:
        kv2 = s2.namespace(name, sec_id="k").kv()
        assert kv2.stats()["hits"] == after["hits"]         # the connection gone, its gets stay counted
        assert kv2.stats()["misses"] == after["misses"]


def test_expired_keys_go_to_python(fabric, request):
    """A key that expired is a miss, deleted and counted as expired by Python (the compiled
    path never answers it)."""
    with remote(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"stay", b"s" * 4096)
        kv.get(b"stay")                           # granted
        kv.put(b"brief", b"b" * 4096, ttl_s=0.2)
        assert kv.get(b"brief") == b"b" * 4096
        expired = kv.stats()["expired"]
        wait_until(lambda: kv.get(b"brief") is None, "the key to expire")
        assert kv.stats()["expired"] == expired + 1
        assert kv.stats()["keys"] == 1


def test_a_wrong_sec_id_on_a_granted_connection_reveals_nothing(fabric, request):
    """On a connection granted a keyspace, a get with another secId is Python's: PERMISSION_DENIED,
    without the value; the right one goes on being answered."""
    name = ns_name(request)
    with remote(fabric) as s:
        ns = s.create_namespace(name, sec_id="right")
        kv = ns.kv()
        kv.put(b"secret", b"S" * 4096)
        home = None
        _, token, _ = remote_config(fabric)
        for server in s.servers():
            sid = server["server_id"]
            with raw_client(rpc_address(s, sid), token) as sock:
                good = {"op": "kv_get", "pool": ns.pool, "ns": name, "sec": ns.sec_id, "key": b"secret"}
                send_frame(sock, {**good, "id": 10})
                first, _ = reply(sock)
                if not first.get("found"):
                    continue                      # not its home
                home = sid
                before = compiled_gets(s, sid)
                send_frame(sock, {**good, "id": 11})
                header, _ = reply(sock)
                assert header == {"id": 11, "found": True, "value": b"S" * 4096}
                assert compiled_gets(s, sid) == before + 1
                for i, sec in enumerate([b"wrong", b"", ns.sec_id + b"x", ns.sec_id[:-1]]):
                    send_frame(sock, {**good, "sec": sec, "id": 20 + i})
                    header, payload = reply(sock)
                    assert header["id"] == 20 + i
                    expected = BmError.INVALID_ARGUMENT if not sec else BmError.PERMISSION_DENIED
                    assert header["error"] == expected, (sec, header)
                    assert b"S" * 64 not in payload and "value" not in header
                send_frame(sock, {**good, "id": 30})
                assert reply(sock)[0] == {"id": 30, "found": True, "value": b"S" * 4096}
        assert home is not None


def test_garbage_gets_on_a_granted_connection_are_pythons(fabric, request):
    """Requests that look like a get but are not exactly one (other types, other keys, a
    payload, as_hold) get Python's answer, and the connection goes on."""
    name = ns_name(request)
    with remote(fabric) as s:
        ns = s.create_namespace(name, sec_id="k")
        kv = ns.kv()
        kv.put(b"g", b"G" * 1000)
        _, token, _ = remote_config(fabric)
        for server in s.servers():
            with raw_client(rpc_address(s, server["server_id"]), token) as sock:
                good = {"op": "kv_get", "pool": ns.pool, "ns": name, "sec": ns.sec_id, "key": b"g"}
                send_frame(sock, {**good, "id": 1})
                found = reply(sock)[0].get("found")
                bad = [
                    ({**good, "key": "g"}, None),                   # a str key: Python takes it as UTF-8
                    ({**good, "key": b""}, "error"),
                    ({**good, "key": 5}, "error"),
                    ({**good, "sec": "k"}, None),
                    ({**good, "as_hold": True}, None),
                    ({**good, "extra": 1}, None),
                    ({**good, "pool": "nope"}, "error"),
                    ({**good, "ns": name + "x"}, "error"),
                ]
                for i, (frame, expect) in enumerate(bad):
                    send_frame(sock, {**frame, "id": 100 + i})
                    header, _ = reply(sock)
                    assert header["id"] == 100 + i
                    if expect == "error":
                        assert "error" in header, (frame, header)
                    else:
                        assert ("error" in header) or header.get("found") == found
                send_frame(sock, {**good, "id": 200}, b"payload")     # a get that carries a payload
                header, _ = reply(sock)
                assert header["id"] == 200 and "error" in header
                send_frame(sock, {**good, "id": 201})
                header, _ = reply(sock)
                assert header["id"] == 201 and header.get("found") == found


def test_destroyed_namespace_and_flush(fabric, request):
    """A granted keyspace that is flushed answers misses; one whose namespace is destroyed
    answers NO_SUCH_NAMESPACE, never its old values, also when made again."""
    name = ns_name(request)
    with remote(fabric) as s:
        ns = s.create_namespace(name, sec_id="k")
        kv = ns.kv()
        keys = [f"f{i}".encode() for i in range(20)]
        for k in keys:
            kv.put(k, k * 100)
        for _ in range(3):
            assert [kv.get(k) for k in keys] == [k * 100 for k in keys]
        served = served_sum(s)
        assert kv.flush() == len(keys)
        assert [kv.get(k) for k in keys] == [None] * len(keys)
        assert [kv.get(k) for k in keys] == [None] * len(keys)
        assert served_sum(s) > served                       # misses answered in compiled code again
        for k in keys:
            kv.put(k, k * 50)
        assert [kv.get(k) for k in keys] == [k * 50 for k in keys]
        with remote(fabric) as other:
            other.namespace(name, sec_id="k").destroy()
        with pytest.raises(memfabric.NoSuchNamespace):
            kv.get(keys[0])
        kv2 = s.create_namespace(name, sec_id="k2").kv()
        assert kv2.get(keys[0]) is None
        with pytest.raises((memfabric.NoSuchNamespace, memfabric.PermissionDenied)):
            kv.get(keys[0])


def test_a_table_that_grows_while_a_remote_client_reads(fabric, request):
    """Another client puts many keys (the index is followed by larger ones, drained into
    them) while a remote client reads a fixed set: every read is its key's value."""
    name = ns_name(request)
    with remote(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        fixed = {f"fixed-{i}".encode(): os.urandom(200 + i) for i in range(30)}
        for k, v in fixed.items():
            kv.put(k, v)
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                with remote(fabric) as w:
                    wkv = w.namespace(name, sec_id="k").kv()
                    for i in range(6000):
                        if stop.is_set():
                            return
                        wkv.put(f"filler-{i}".encode(), b"f" * 64)
            except BaseException as exc:      # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        served = served_sum(s)
        try:
            deadline = time.monotonic() + 120
            while t.is_alive() and time.monotonic() < deadline:
                for k, v in fixed.items():
                    assert kv.get(k) == v
        finally:
            stop.set()
            t.join(WAIT_S)
        assert not errors, errors
        assert kv.stats()["keys"] >= 6000
        for k, v in fixed.items():
            assert kv.get(k) == v
        assert served_sum(s) > served


WRITER = r"""
import sys, memfabric
cfg, name, key, sizes = sys.argv[1], sys.argv[2], sys.argv[3].encode(), [int(x) for x in sys.argv[4].split(",")]
with memfabric.init(cfg) as s:
    kv = s.namespace(name, sec_id="k").kv()
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        if i % 5 == 0:
            kv.delete(key)
        else:
            n = sizes[i % len(sizes)]
            stamp = b"%08d|" % i
            kv.put(key, (stamp * (n // len(stamp) + 1))[:n])
"""


def test_a_key_overwritten_and_deleted_by_another_process_is_never_torn(fabric, request):
    """Another process overwrites (values of several sizes, each one stamp repeated) and
    deletes a key in a tight loop while this remote reader reads it and a neighbour: each read
    is None or one whole value of that key, never torn, never another key's bytes."""
    name = ns_name(request)
    with remote(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"neighbour", b"N" * 4096)
        kv.put(b"hot", b"start")
        cfg = remote_config(fabric)[0]
        child = subprocess.Popen([sys.executable, "-c", WRITER, cfg, name, "hot", "4096,100,3000,60000,17"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            served = served_sum(s)
            seen = set()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                got = kv.get(b"hot")
                if got is not None and got != b"start":
                    stamp = got[:9]
                    assert stamp.endswith(b"|") and stamp[:8].isdigit(), got[:40]
                    assert got == (stamp * (len(got) // 9 + 1))[:len(got)], "a torn value"
                    seen.add(len(got))
                assert kv.get(b"neighbour") == b"N" * 4096
            assert len(seen) >= 2
            assert served_sum(s) > served
        finally:
            child.kill()
            child.wait(CHILD_WAIT_S)


READER = r"""
import sys, memfabric
cfg, name = sys.argv[1], sys.argv[2]
with memfabric.init(cfg) as s:
    kv = s.namespace(name, sec_id="k").kv()
    print("ready", flush=True)
    while True:
        kv.get(b"k")
"""


def test_a_client_killed_mid_request(fabric, request):
    """Clients killed while they get leave the server answering everyone else (in compiled
    code), and give back their counters' slots."""
    name = ns_name(request)
    with remote(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"k", b"v" * 4096)
        cfg = remote_config(fabric)[0]
        for _ in range(5):
            child = subprocess.Popen([sys.executable, "-c", READER, cfg, name], stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout.readline().strip() == "ready"
                time.sleep(0.2)
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(CHILD_WAIT_S)
        served = served_sum(s)
        for _ in range(20):
            assert kv.get(b"k") == b"v" * 4096
        assert served_sum(s) >= served + 19
        hits = kv.stats()["hits"]
        assert kv.get(b"k") == b"v" * 4096
        assert kv.stats()["hits"] == hits + 1


def test_threads_sharing_a_session(fabric, request):
    """Threads get through one session (one link per server) at once: each gets its own
    key's value, whether its get went through the compiled call or the link's pipeline."""
    name = ns_name(request)
    with remote(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        values = {f"t{i}".encode(): os.urandom(4096) for i in range(8)}
        for k, v in values.items():
            kv.put(k, v)
        errors: list[BaseException] = []

        def reader(key: bytes) -> None:
            try:
                for _ in range(300):
                    assert kv.get(key) == values[key]
                    assert kv.get(key + b"-missing") is None
            except BaseException as exc:      # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in values]
        for t in threads:
            t.start()
        for t in threads:
            t.join(2 * WAIT_S)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)


def test_a_stopped_server(fresh_fabric, request):
    """A get of a stopped server's key times out (or finds the server unavailable) within the
    link's bounds; once it runs again, gets are answered (in compiled code) again."""
    fab = fresh_fabric(servers=1)
    pid = fab.server_pids()[1]
    with remote(fab, timeout_s=1.0) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"k", b"v" * 4096)
        assert kv.get(b"k") == b"v" * 4096
        assert kv.get(b"k") == b"v" * 4096
        calls = s.link(1).compiled_gets
        stop_process(pid)
        try:
            started = time.monotonic()
            with pytest.raises((memfabric.Timeout, memfabric.ServerUnavailable)):
                kv.get(b"k")
            assert time.monotonic() - started < WAIT_S
        finally:
            os.kill(pid, signal.SIGCONT)
        assert s.link(1).compiled_gets == calls + 1
        wait_until(lambda: _get_or_none(kv, b"k") == b"v" * 4096, "a get after the stop")
        served = served_sum(s)
        assert kv.get(b"k") == b"v" * 4096
        assert served_sum(s) > served


def _get_or_none(kv, key):
    try:
        return kv.get(key)
    except memfabric.MemfabricError:
        return None


def test_a_namespace_destroyed_under_compiled_readers(fresh_fabric, request):
    """Readers get (in compiled code) while the namespace is destroyed: each get is its value
    or NO_SUCH_NAMESPACE, the server stays up, and its memory comes back whole."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    name = ns_name(request)
    with remote(fab) as owner, remote(fab) as reader_session:
        kv = owner.create_namespace(name, sec_id="k").kv()
        values = {f"d{i}".encode(): os.urandom(4096) for i in range(200)}
        kv.put_many(values)
        rkv = reader_session.namespace(name, sec_id="k").kv()
        errors: list[BaseException] = []
        ended = threading.Event()

        def reader() -> None:
            try:
                while not ended.is_set():
                    for k, v in values.items():
                        try:
                            got = rkv.get(k)
                        except memfabric.NoSuchNamespace:
                            ended.set()
                            return
                        assert got == v
            except BaseException as exc:      # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: compiled_gets(owner, 1) > 100, "compiled gets")
        owner.namespace(name, sec_id="k").destroy()
        for t in threads:
            t.join(WAIT_S)
        assert not errors, errors[:3]
        assert ended.is_set()
        again = owner.create_namespace(name + "-2", sec_id="k")
        big = again.alloc(12 << 20)          # the destroyed keyspace's memory is free again
        big.free()
        kv2 = again.kv()
        kv2.put(b"x", b"y")
        assert kv2.get(b"x") == b"y" and kv2.get(b"x") == b"y"


def test_a_ctrl_c_while_a_compiled_get_waits_for_a_stopped_server(fresh_fabric, request):
    """A signal whose handler raises (Ctrl-C) while a compiled get polls for a stopped
    server's reply raises at once; the link is shut (its stream's position is unknown), the
    late reply never lands in the buffer given back, and the next get is answered."""
    fab = fresh_fabric(servers=1)
    pid = fab.server_pids()[1]
    with remote(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"k", b"v" * 4096)
        assert kv.get(b"k") == b"v" * 4096
        link = s.link(1)
        buf = bytearray(4096)

        stop_process(pid)
        try:
            with interrupted_after(0.3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
                kv.get_into(b"k", buf)
        finally:
            os.kill(pid, signal.SIGCONT)
        # Python's wait leaves the link as it is (test_interrupted_calls.py): shut, it waited in call_get.
        assert s.link(1) is not link, "the link stayed: the get did not wait in call_get"
        buf[:] = b"M" * 4096
        wait_until(lambda: _get_or_none(kv, b"k") == b"v" * 4096, "a get after the stop")
        assert buf == b"M" * 4096

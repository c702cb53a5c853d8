"""The invariants of DESIGN.md, and every error code a client can meet, against a real fabric."""

from __future__ import annotations

import fcntl
import os
import socket
import time

import msgpack
import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OperatorCode
from memfabric import compat as C
from memfabric.errors import (
    BmError,
    Busy,
    InvalidArgument,
    NamespaceExists,
    NoSuchNamespace,
    NoSuchObject,
    NoSuchPool,
    OutOfMemory,
    OutOfRange,
    PermissionDenied,
)
from memfabric.limits import MAX_MESSAGE_BYTES, MAX_OBJECT_BYTES
from ..helpers import KiB, MiB, WAIT_S, alloc_when_possible, ns_name, random_bytes, wait_until



# ---- helpers -------------------------------------------------------------------------------


def other_server(s: memfabric.Session) -> int:
    return next(x["server_id"] for x in s.servers() if x["alive"] and x["server_id"] != s.local.server_id)



# ---- capacity ------------------------------------------------------------------------------


def test_capacity_is_never_exceeded(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    capacity_total = 2 * 8 * MiB
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("fill", sec_id="fill")
        objs = []
        with pytest.raises(OutOfMemory) as err:
            for _ in range(capacity_total // MiB + 5):       # bounded: more than can fit
                objs.append(ns.alloc(MiB))
        assert err.value.code == BmError.OUT_OF_MEMORY
        handed_out = sum(n for bm in objs for _, n in bm.extents)
        assert handed_out <= capacity_total
        assert handed_out == capacity_total, "every byte of the pool should be usable"
        # Even one page more is refused, in any placement.
        for affinity in (Affinity("local"), Affinity("spread"), Affinity("server", server_id=other_server(s))):
            with pytest.raises(OutOfMemory):
                ns.alloc(4096, affinity)
        for server in s.servers():
            pool = server["pools"]["default"]
            assert server["alive"] and pool["used_bytes"] <= pool["capacity_bytes"], server

        # The servers still answer, and every object still holds its bytes.
        for i, bm in enumerate(objs):
            bm.write(i.to_bytes(4, "little") * 1024, MiB - 4096)
        for i, bm in enumerate(objs):
            assert bm.read(MiB - 4096, 4096) == i.to_bytes(4, "little") * 1024
        info = {n.ns: n for n in s.namespaces()}["fill"]
        assert (info.object_count, info.used_bytes) == (len(objs), capacity_total)

        # Memory freed moments ago is reusable: the server waits out the grace itself.
        # (First let the heartbeats catch up, so that placement does not send the request
        # to a peer whose last published figures predate the fill.)
        wait_until(lambda: all(x["pools"]["default"]["free_bytes"] == 0 for x in s.servers()),
                   "heartbeats to show the pool full")
        me = s.local.server_id
        victim = next(bm for bm in objs if {sid for sid, _ in bm.extents} == {me})
        objs.remove(victim)
        victim.free()
        again = ns.alloc(MiB)
        assert again.read() == bytes(MiB)
        with pytest.raises(OutOfMemory):
            ns.alloc(4096)


def test_oversized_allocations_fail_whole(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="4MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("big", sec_id="big")
        keep = ns.alloc(MiB)
        for size, affinity in [(8 * MiB + 1, Affinity("spread")), (5 * MiB, Affinity("local")),
                               (5 * MiB, Affinity("server", server_id=other_server(s)))]:
            with pytest.raises(OutOfMemory):
                ns.alloc(size, affinity)
        info = {n.ns: n for n in s.namespaces()}["big"]
        assert (info.object_count, info.used_bytes) == (1, MiB)
        # Nothing was half-reserved: the rest of the pool is still there, in one spread object.
        rest = alloc_when_possible(ns, 7 * MiB, Affinity("spread"))
        assert sum(n for _, n in rest.extents) == 7 * MiB
        keep.free()


def _fill_all(ns: memfabric.Namespace, capacity_bytes: int, timeout_s: float) -> int:
    """Allocate 1 MiB objects until the pool's capacity is taken; OUT_OF_MEMORY is retried for
    `timeout_s` (memory freed by a gone client comes back asynchronously). Returns the bytes got."""
    got = 0
    deadline = time.monotonic() + timeout_s
    while got < capacity_bytes:
        try:
            ns.alloc(MiB)
            got += MiB
        except OutOfMemory:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return got


def test_destroyed_namespace_memory_is_reusable_by_the_same_session(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        first = s.create_namespace("first", sec_id="k")
        for _ in range(4):
            first.alloc(MiB).write(b"x")
        s.destroy_namespace("first", "k")
        wait_until(lambda: s.servers()[0]["pools"]["default"]["free_bytes"] == 4 * MiB,
                   "the server to publish the memory as free")
        second = s.create_namespace("second", sec_id="k")
        assert _fill_all(second, 4 * MiB, timeout_s=2.0) == 4 * MiB


def test_memory_used_by_a_cross_server_copy_is_reusable_after_destroy(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="2MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        me, other = s.local.server_id, other_server(s)
        ns = s.create_namespace("copy", sec_id="k")
        a = ns.alloc(MiB, Affinity("server", server_id=me))
        b = ns.alloc(MiB, Affinity("server", server_id=other))
        a.write(b"payload")
        a.copy_to(b, length=7)              # server `other` maps a's segment on server `me`
        b.copy_to(a, src_offset=0, dst_offset=100, length=7)
        assert b.read(0, 7) == b"payload" and a.read(100, 7) == b"payload"
        s.destroy_namespace("copy", "k")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("after", sec_id="k")
        assert _fill_all(ns, 4 * MiB, timeout_s=2.0) == 4 * MiB, "the whole pool should be usable again"


# ---- stale handles -------------------------------------------------------------------------


def test_stale_handle_never_touches_the_object_that_reuses_its_slot(fresh_fabric):
    # One server, one segment: the new object can only be in the freed object's memory.
    fab = fresh_fabric(servers=1, capacity="1MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s, memfabric.init(fab.directory) as s2:
        ns = s.create_namespace("reuse", sec_id="k")
        old = ns.alloc(MiB)
        old.write(b"\xaa" * MiB)
        old_id, old_extents = old.bm_id, old.extents
        elsewhere = s2.namespace("reuse", "k").open(old_id)     # another session's handle
        assert elsewhere.read(0, 4) == b"\xaa" * 4
        old.free()

        new = ns.alloc(MiB)
        assert new.extents == old_extents
        assert new.bm_id != old_id and new.bm_id.split("-")[:2] == old_id.split("-")[:2], \
            "the slot is reused with a new generation"
        assert new.read() == bytes(MiB), "freed memory is zeroed before reuse"
        pattern = random_bytes(MiB, seed=1).tobytes()
        new.write(pattern)

        for stale in (old, elsewhere):
            with pytest.raises(NoSuchObject):
                stale.read(0, 16)
            buf = bytearray(b"\x01" * 16)
            with pytest.raises(NoSuchObject):
                stale.read(0, into=buf)
            assert buf == b"\x01" * 16
            with pytest.raises(NoSuchObject):
                stale.write(b"\xbb" * 4096, 0)
            with pytest.raises(NoSuchObject):
                stale.map()
            with pytest.raises(NoSuchObject):
                stale.expand(2 * MiB)
            with pytest.raises(NoSuchObject):
                stale.copy_to(new, length=16)
            with pytest.raises(NoSuchObject):
                new.copy_to(stale, length=16)
            with pytest.raises(NoSuchObject):
                stale.swap_in("/dev/zero", length=16)
            with pytest.raises(NoSuchObject):
                stale.free()
        with pytest.raises(NoSuchObject):
            ns.open(old_id)
        assert ns.batch_free([old_id]) == [BmError.NO_SUCH_OBJECT]
        assert new.read() == pattern
        assert s2.namespace("reuse", "k").open(new.bm_id).read() == pattern


def test_memory_of_an_object_freed_while_mapped_is_not_reused_until_unmapped(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="1MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace("pinned", sec_id="k")
        bm = ns.alloc(MiB)
        bm.write(b"\x3c" * MiB)
        m = bm.map()
        bm.free()
        with pytest.raises(NoSuchObject):
            bm.read(0, 1)
        # The only memory there is is still mapped: nobody else may get it.
        with pytest.raises(OutOfMemory):
            ns.alloc(4096)
        m.view[:4] = b"mine"
        assert bytes(m.view[:8]) == b"mine" + b"\x3c" * 4
        m.close()
        again = ns.alloc(MiB)            # the server waits out the grace
        assert again.read() == bytes(MiB)


def test_handles_of_a_destroyed_namespace_are_dead(session, request):
    name = ns_name(request)
    ns = session.create_namespace(name, sec_id="k")
    bm = ns.alloc(4096)
    bm.write(b"secret")
    session.destroy_namespace(name, "k")
    outcome = []
    for attempt in (lambda: bm.read(0, 6), lambda: bm.write(b"x", 0)):
        try:
            outcome.append(attempt())
        except NoSuchObject:
            outcome.append("NO_SUCH_OBJECT")
    assert outcome == ["NO_SUCH_OBJECT", "NO_SUCH_OBJECT"]


# ---- secIds ---------------------------------------------------------------------------------


def test_wrong_sec_id_is_permission_denied(fabric, session, ns, compat_session):
    right = f"sec-{ns.name}"
    bm = ns.alloc(8192)
    bm.write(b"top secret")
    wrong = session.namespace(ns.name, "wrong")
    with pytest.raises(PermissionDenied) as err:
        wrong.alloc(4096)
    assert err.value.code == BmError.PERMISSION_DENIED
    with pytest.raises(PermissionDenied):
        wrong.open(bm.bm_id)
    assert wrong.batch_free([bm.bm_id]) == [BmError.PERMISSION_DENIED]
    with pytest.raises(PermissionDenied):
        session.destroy_namespace(ns.name, "wrong")
    # Another session that never proved the right secId fares no better.
    with memfabric.init(fabric.directory, server=1) as other:
        with pytest.raises(PermissionDenied):
            other.namespace(ns.name, "wrong").open(bm.bm_id)
        with pytest.raises(PermissionDenied):
            other.namespace(ns.name, right[:-1]).alloc(10)

    # compat: a handle cached under the right secId does not let a wrong one through.
    good = C.BmInfo(ns=ns.name, sec_id=right)
    assert C.BM_AllocSec(good, 4096, 0, None) == 0
    assert C.BM_WriteSec(good, 0, 6, b"hidden", 0) == 0
    bad = C.BmInfo(ns=ns.name, sec_id="wrong", bm_id=good.bm_id, size=good.size)
    buf = bytearray(6)
    assert C.BM_ReadSec(bad, 0, 6, buf, 0) == BmError.PERMISSION_DENIED
    assert buf == bytes(6), "a refused read reveals nothing"
    assert C.BM_WriteSec(bad, 0, 6, b"forged", 0) == BmError.PERMISSION_DENIED
    assert C.BM_ExpandSec(bad, 8192, 0) == BmError.PERMISSION_DENIED
    assert C.BM_MapSec(bad, C.PROT_READ, 0) == (BmError.PERMISSION_DENIED, None)
    assert C.BM_FreeSec(bad, 0) == BmError.PERMISSION_DENIED
    assert C.BM_BatchFreeSec([good.bm_id], 1, 0, ns.name, "wrong") == BmError.PERMISSION_DENIED
    assert C.BM_AllocSec(C.BmInfo(ns=ns.name, sec_id="wrong"), 4096, 0, None) == BmError.PERMISSION_DENIED
    assert C.BM_DestroyNSSec("default", ns.name, "wrong") == BmError.PERMISSION_DENIED
    assert C.BM_ReadSec(good, 0, 6, buf, 0) == 0 and buf == b"hidden"
    assert good.size == 4096
    assert bm.read(0, 10) == b"top secret"
    assert C.BM_FreeSec(good, 0) == 0


def test_segments_and_generation_tables_need_the_right_sec_id(session, request):
    # The raw requests a client makes before it maps anything.
    a, b = ns_name(request) + "a", ns_name(request) + "b"
    ns_a = session.create_namespace(a, sec_id="ka")
    ns_b = session.create_namespace(b, sec_id="kb")
    try:
        bm_a = ns_a.alloc(4096)
        bm_b = ns_b.alloc(4096)
        link = session.local
        seg_b = session.local.call("describe", pool="default", ns=b, sec=b"kb", bm_id=bm_b.bm_id)["extents"][0][1]
        seg_a = session.local.call("describe", pool="default", ns=a, sec=b"ka", bm_id=bm_a.bm_id)["extents"][0][1]
        assert seg_a != seg_b, "a segment is lent to one namespace at a time"
        with pytest.raises(PermissionDenied):
            link.call_with_fds("segments", pool="default", ns=b, sec=b"wrong", segments=[seg_b])
        with pytest.raises(PermissionDenied):
            # The right secId of another namespace opens none of this one's segments.
            link.call_with_fds("segments", pool="default", ns=a, sec=b"ka", segments=[seg_b])
        with pytest.raises(PermissionDenied):
            link.call_with_fds("ns_open", pool="default", ns=b, sec=b"ka")
        with pytest.raises(PermissionDenied):
            link.call_with_fds("describe", pool="default", ns=b, sec=b"ka", bm_id=bm_b.bm_id)
    finally:
        session.destroy_namespace(a, "ka")
        session.destroy_namespace(b, "kb")


def test_segments_handed_to_clients_are_sealed(session, ns):
    bm = ns.alloc(4096)
    bm.write(b"sealed")
    segment = session.local.call("describe", **ns.wire_creds, bm_id=bm.bm_id)["extents"][0][1]
    fd = session.local.segment_fd(ns.creds, segment)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, f"seals {seals:#x}"
    size = os.fstat(fd).st_size
    for new_size in (0, size // 2, size * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, new_size)
    assert os.fstat(fd).st_size == size
    assert bm.read(0, 6) == b"sealed"


# ---- zeroing -------------------------------------------------------------------------------


def test_freed_memory_is_zeroed_before_reuse_in_the_same_namespace(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="2MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace("z", sec_id="z")
        for size in (2 * MiB, 5000, MiB + 4096 * 3 + 1):
            bm = ns.alloc(size)
            bm.write(b"\xa5" * size)
            extents = bm.extents
            bm.free()
            again = ns.alloc(size)            # waits out the grace: the pool holds only this
            assert again.extents == extents
            assert again.read() == bytes(size)
            with again.map() as m:
                assert not any(m.view), "the whole mapped range is zero"
            again.free()


def test_freed_memory_is_zeroed_before_another_namespace_gets_it(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="2MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace("first", sec_id="1")
        bm = ns.alloc(2 * MiB)
        bm.write(b"\x5a" * bm.size)
        bm.free()
    # That session held the segments; once it is gone they can go to another namespace.
    with memfabric.init(fab.directory) as s:
        ns2 = s.create_namespace("second", sec_id="2")
        bm2 = alloc_when_possible(ns2, 2 * MiB)
        assert bm2.read() == bytes(2 * MiB)
        with bm2.map() as m:
            assert not any(m.view)


# ---- out of range ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "spread"])
def test_out_of_range_writes_nothing(session, ns, kind, tmp_path):
    bm = ns.alloc(2 * MiB + 10, Affinity(kind))
    data = random_bytes(bm.size, seed=2)
    bm.write(data)
    size = bm.size
    for offset, length in [(size - 5, 6), (size, 1), (-1, 2), (0, size + 1), (MiB, 2 * MiB)]:
        with pytest.raises(OutOfRange) as err:
            bm.read(offset, length)
        assert err.value.code == BmError.OUT_OF_RANGE
        if offset >= 0:
            with pytest.raises(OutOfRange):
                bm.write(b"\xff" * length, offset)
            into = bytearray(b"\x01" * length)
            with pytest.raises(OutOfRange):
                bm.read(offset, into=into)
            assert into == b"\x01" * length
    with pytest.raises(OutOfRange):
        bm.write(b"\xff" * 10, -3)
    with pytest.raises(OutOfRange):
        bm.read(size + 1)

    other = ns.alloc(MiB, Affinity("server", server_id=other_server(session)))
    other_data = random_bytes(MiB, seed=3)
    other.write(other_data)
    for src_off, dst_off, length in [(0, MiB - 10, 11), (size - 10, 0, 11), (-1, 0, 5), (0, -1, 5), (0, 0, -1)]:
        with pytest.raises(OutOfRange):
            bm.copy_to(other, src_offset=src_off, dst_offset=dst_off, length=length)
    with pytest.raises(OutOfRange):
        other.copy_to(bm, src_offset=0, dst_offset=size - MiB + 1, length=MiB)
    with pytest.raises(OutOfRange):
        bm.copy_to(bm, src_offset=0, dst_offset=size - 100, length=101)

    src = tmp_path / "f.bin"
    src.write_bytes(b"\xee" * 100)
    with pytest.raises(OutOfRange):
        bm.swap_in(str(src), offset=size - 50, length=100)
    with pytest.raises(OutOfRange):
        ns.gather([(bm, size - 4, 8)], OperatorCode.CONCAT)
    with pytest.raises(OutOfRange):
        ns.gather([(bm, 0, 2 * MiB)], OperatorCode.CONCAT, dst=other)     # does not fit the destination

    assert bm.read() == data.tobytes()
    assert other.read() == other_data.tobytes()


# ---- invalid arguments ---------------------------------------------------------------------


def test_garbage_arguments_are_invalid_argument(fabric, session, ns):
    for size in (-1, 0, MAX_OBJECT_BYTES + 1, "10", 1.5, None):
        with pytest.raises(InvalidArgument) as err:
            ns.alloc(size)
        assert err.value.code == BmError.INVALID_ARGUMENT
    for name in ("", "has space", "x" * 65, "semi;colon", "ünicode", None, 7):
        with pytest.raises(InvalidArgument):
            session.create_namespace(name, sec_id="k")
        with pytest.raises(InvalidArgument):
            session.create_namespace("fine", sec_id="k", pool=name)
    for sec in ("", b"", "x" * 257, None, 12):
        with pytest.raises(InvalidArgument):
            session.create_namespace("fine", sec_id=sec)
    for attribute in (-1, 2**31, "0", True):
        with pytest.raises(InvalidArgument):
            session.create_namespace("fine", sec_id="k", attribute=attribute)
    assert "fine" not in {n.ns for n in session.namespaces()}
    for bm_id in ("garbage", "1-0-0", "a-b-c", "1-2", "1-2-3-4", "", "-1-0-1", "1-0-1" + "0" * 70, 7, None,
                  "１-0-1"):
        with pytest.raises(InvalidArgument):
            ns.open(bm_id)
    assert ns.batch_free(["garbage", "1-0-0"]) == [BmError.INVALID_ARGUMENT] * 2
    with pytest.raises(InvalidArgument):
        Affinity("everywhere")
    with pytest.raises(InvalidArgument):
        Affinity("server")
    with pytest.raises(InvalidArgument):
        Affinity("local", server_id=1)
    bm = ns.alloc(4096)
    with pytest.raises(InvalidArgument):
        bm.read("0", 10)
    with pytest.raises(InvalidArgument):
        bm.write("not a buffer")
    with pytest.raises(InvalidArgument):
        bm.read(0, into=b"read-only buffer")
    with pytest.raises(OutOfRange):          # a length past the buffer: a range, not a type
        bm.read(0, 100, into=bytearray(10))
    with pytest.raises(InvalidArgument):
        bm.expand(10)
    with pytest.raises(InvalidArgument):
        bm.expand("8192")
    with pytest.raises(InvalidArgument):
        ns.gather([(bm, 0, 8)], OperatorCode.SUM, dtype="object")
    with pytest.raises(InvalidArgument):
        ns.gather([], OperatorCode.CONCAT)
    with pytest.raises(InvalidArgument):
        memfabric.init("/nonexistent/fabric/dir")
    with pytest.raises(InvalidArgument):
        memfabric.init(fabric.directory, server=99)
    for window in (-1, 10**9, 0.5):
        with pytest.raises(InvalidArgument):
            memfabric.init(fabric.directory, busy_poll_us=window)
    assert bm.read(0, 4) == bytes(4)


def test_requests_missing_fields_are_invalid_argument(fabric, session, ns):
    sec = f"sec-{ns.name}".encode()
    requests = [("copy", {}),
                ("copy", {"src": "not a map", "dst": 5}),
                ("gather", {"operator": "concat",
                            "inputs": [{"pool": "default", "ns": ns.name, "sec": f"sec-{ns.name}",
                                        "bm_id": ns.alloc(8).bm_id, "offset": 0, "length": 8}]}),
                # Names that are not strings (once an INTERNAL_ERROR: they were used as dict keys).
                ("alloc", {"pool": ["default"], "ns": ns.name, "sec": sec, "size": 8}),
                ("alloc", {"pool": "default", "ns": {"n": 1}, "sec": sec, "size": 8})]
    with memfabric.init(os.path.join(fabric.directory, "remote.toml")) as remote:
        for link in (session.local, remote.local):          # IPC, then RPC
            codes = []
            for op, args in requests:
                try:
                    link.call(op, **dict(args))
                    codes.append(0)
                except memfabric.MemfabricError as exc:
                    codes.append(exc.code)
            assert codes == [BmError.INVALID_ARGUMENT] * len(requests), (link, codes)
            assert link.call("hello", role="client")["server_id"], "the connection still serves"


# ---- namespaces and pools -------------------------------------------------------------------


def test_namespace_errors(session, ns, request):
    with pytest.raises(NamespaceExists) as err:
        session.create_namespace(ns.name, sec_id=f"sec-{ns.name}")
    assert err.value.code == BmError.NAMESPACE_EXISTS
    with pytest.raises(NamespaceExists):
        session.create_namespace(ns.name, sec_id="another secret")
    missing = ns_name(request) + "-missing"
    for attempt in (lambda: session.namespace(missing, "k").alloc(10),
                    lambda: session.namespace(missing, "k").open("1-0-1"),
                    lambda: session.destroy_namespace(missing, "k")):
        with pytest.raises(NoSuchNamespace) as err:
            attempt()
        assert err.value.code == BmError.NO_SUCH_NAMESPACE
    with pytest.raises(NoSuchPool) as err:
        session.create_namespace("p", sec_id="k", pool="no-such-pool")
    assert err.value.code == BmError.NO_SUCH_POOL
    with pytest.raises(NoSuchPool):
        session.namespace("p", "k", pool="no-such-pool").alloc(10)
    assert "p" not in {n.ns for n in session.namespaces()}
    # Destroyed means gone: the name is free again, with a new secId.
    session.destroy_namespace(ns.name, f"sec-{ns.name}")
    with pytest.raises(NoSuchNamespace):
        ns.alloc(10)
    session.create_namespace(ns.name, sec_id=f"sec-{ns.name}")


# ---- compat init -------------------------------------------------------------------------------


def test_not_initialized_and_already_initialized(fabric):
    assert C.BM_Exit() == BmError.NOT_INITIALIZED
    info = C.BmInfo(ns="x", sec_id="y")
    assert C.BM_AllocSec(info, 10, 0, None) == BmError.NOT_INITIALIZED
    assert C.BM_CreateNSSec("default", "x", 0, "y") == BmError.NOT_INITIALIZED
    assert C.BM_QueryNSCache() == (BmError.NOT_INITIALIZED, None)
    assert C.BM_ReadSec(info, 0, 1, bytearray(1), 0) == BmError.NOT_INITIALIZED
    assert C.BM_Init("/nonexistent/fabric/dir") == BmError.INVALID_ARGUMENT
    assert C.BM_Exit() == BmError.NOT_INITIALIZED, "a failed BM_Init leaves no session"
    assert C.BM_Init(fabric.directory) == 0
    try:
        assert C.BM_Init(fabric.directory) == BmError.ALREADY_INITIALIZED
        assert C.BM_InitWithExtAttr(fabric.directory, 0, {"server": 1}) == BmError.ALREADY_INITIALIZED
        rc, _ = C.BM_QueryNSCache()
        assert rc == 0, "the first session survives a second BM_Init"
    finally:
        assert C.BM_Exit() == 0
    assert C.BM_Exit() == BmError.NOT_INITIALIZED


# ---- the IPC front door ------------------------------------------------------------------------


def _raw_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)   # room for one oversized packet
    sock.settimeout(WAIT_S)
    sock.connect(path)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1 << 20) == b""
    except ConnectionResetError:
        return True


def test_malformed_and_oversized_messages_close_only_that_connection(fabric, session, ns):
    path = f"{fabric.directory}/server-1/ipc.sock"
    bm = ns.alloc(64 * KiB)
    bm.write(b"before")

    # A well-formed request on a raw socket gets a reply: the test can tell a reply from a close.
    with _raw_socket(path) as sock:
        sock.send(msgpack.packb({"op": "hello", "id": 1}))
        reply = msgpack.unpackb(sock.recv(1 << 20))
        assert reply["id"] == 1 and "server_id" in reply
        sock.send(msgpack.packb({"op": "no-such-op", "id": 2}))
        reply = msgpack.unpackb(sock.recv(1 << 20))
        assert reply["error"] == BmError.INVALID_ARGUMENT, "an unknown operation is an error reply"

    oversized = msgpack.packb({"op": "hello", "id": 1, "pad": b"\0" * (MAX_MESSAGE_BYTES + 1024)})
    assert len(oversized) > 256 * KiB
    for payload in (b"\xc1\xff garbage \x00\x01", msgpack.packb([1, 2, 3]), msgpack.packb({"op": "hello"}),
                    msgpack.packb({"op": "hello", "id": "1"}), b"\x81" * 1000, oversized, b"x" * (300 * KiB)):
        with _raw_socket(path) as sock:
            sock.send(payload)
            assert _closed_by_server(sock), f"server kept a connection that sent {payload[:20]!r}"
        # A session opened before, and a new one, keep working.
        marker = (payload + b"......")[:6]
        bm.write(marker, 100)
        assert bm.read(100, 6) == marker
        assert ns.open(bm.bm_id) is not None
        with memfabric.init(fabric.directory, server=0) as fresh:
            assert fresh.namespace(ns.name, f"sec-{ns.name}").open(bm.bm_id).read(0, 6) == b"before"
    assert all(s["alive"] for s in session.servers())


# ---- unmapping with live buffers -------------------------------------------------------------


def test_unmap_with_a_live_numpy_array_is_busy(ns, compat_session):
    info = C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}")
    assert C.BM_AllocSec(info, 3 * MiB, 0, Affinity("spread")) == 0
    rc, view = C.BM_MapSec(info, C.PROT_READ | C.PROT_WRITE, 0)
    assert rc == 0
    arr = np.frombuffer(view, dtype=np.uint8)
    arr[:5] = [1, 2, 3, 4, 5]
    assert C.BM_Unmap(info.bm_id, view) == BmError.BUSY
    assert arr[:5].tolist() == [1, 2, 3, 4, 5], "a refused unmap leaves the mapping usable"
    del arr
    assert C.BM_Unmap(info.bm_id, view) == 0
    assert C.BM_Unmap(info.bm_id, view) == BmError.INVALID_ARGUMENT, "already unmapped"
    buf = bytearray(5)
    assert C.BM_ReadSec(info, 0, 5, buf, 0) == 0 and buf == b"\x01\x02\x03\x04\x05"

    # An array made from a slice of the view holds the mapping too.
    rc, view = C.BM_MapSec(info, C.PROT_READ, 0)
    assert rc == 0
    part = np.frombuffer(view[MiB:MiB + 10], dtype=np.uint8)
    assert C.BM_Unmap(info.bm_id, view) == BmError.BUSY
    del part
    assert C.BM_Unmap(info.bm_id, view) == 0

    # The Pythonic mapping says the same with an exception.
    handle = ns.open(info.bm_id)
    m = handle.map()
    arr = np.frombuffer(m.view, dtype=np.uint8)
    with pytest.raises(Busy):
        m.close()
    del arr
    m.close()
    assert C.BM_FreeSec(info, 0) == 0


def test_alloc_right_after_free_in_a_full_pool_reuses_local_memory(fresh_fabric):
    # Memory freed a moment ago is still resting (the reuse grace); placement must count
    # it as this server's, not send the request to a peer whose figures are stale.
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace("full", sec_id="k")
        objs = []
        while True:
            try:
                objs.append(ns.alloc(1 << 20))
            except memfabric.OutOfMemory:
                break
        assert len(objs) == 16
        local = next(o for o in objs if o.extents[0][0] == s.local.server_id)
        local.free()
        again = ns.alloc(1 << 20)
        assert again.extents == [(s.local.server_id, 1 << 20)]
        assert again.read(0, 1 << 20) == bytes(1 << 20)

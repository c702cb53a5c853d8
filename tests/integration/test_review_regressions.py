"""Regression tests for the review's reproductions (r1-r10): each finding, as it must now hold.

Every wait on something the servers do asynchronously (heartbeats, the reuse grace, a
reconcile with the catalog) is bounded; nothing asserts how long an operation took.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import threading
import time
import uuid

import msgpack
import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric import compat as C
from memfabric.datapath.link import ServerLink
from memfabric.errors import (
    BmError,
    LimitExceeded,
    MemfabricError,
    NoSuchNamespace,
    NoSuchObject,
    OutOfMemory,
    PermissionDenied,
)
from memfabric.limits import (
    MAX_GATHER_INPUTS,
    MAX_NAME_CHARS,
    MAX_NAMESPACES,
    MAX_SEC_ID_BYTES,
)

from ..helpers import WAIT_S, Child, KiB, MiB, alloc_when_possible, stop_process, wait_until



# ---- helpers -------------------------------------------------------------------------------


def raises_code(fn) -> BmError | None:
    """The error code `fn()` fails with, or None when it succeeds."""
    try:
        fn()
    except MemfabricError as exc:
        return exc.code
    return None


def secret_pattern(n: int, seed: int) -> np.ndarray:
    """Random bytes with no zero byte, so that "reads zeros" and "shows the secret" differ everywhere."""
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def ns(session):
    name = unique("rev")
    handle = session.create_namespace(name, sec_id=f"sec-{name}")
    yield handle
    session.destroy_namespace(name, f"sec-{name}")


# ---- 1. (r1, r2) a mapping that outlives its namespace or its session ----------------------------


def _assert_stale_mapping_is_isolated(view: memoryview, arr: np.ndarray, victim_size: int,
                                      directory: str, session: memfabric.Session) -> None:
    """Another tenant takes the whole (4 MiB) pool and writes a secret; the stale mapping
    `view` (and the numpy array `arr` made from it before) must neither show nor change it."""
    tenant = session.create_namespace(unique("tenant-b"), sec_id="secret-of-b")
    fresh = alloc_when_possible(tenant, 4 * MiB)          # the only memory there is: A's, reused
    assert fresh.read() == bytes(4 * MiB), "reused memory is zeroed first"
    secret = secret_pattern(4 * MiB, seed=11)
    fresh.write(secret)

    seen = np.frombuffer(bytes(view[:victim_size]), dtype=np.uint8)
    assert np.count_nonzero(seen) == 0, (
        f"the stale mapping shows {np.count_nonzero(seen)} bytes of another tenant's memory")
    assert np.count_nonzero(arr) == 0, "a numpy array made from the stale mapping shows another tenant's memory"
    assert bytes(view[:32]) != secret[:32].tobytes()

    # Writes through the stale mapping go nowhere the new tenant can see.
    view[:5] = b"EVIL!"
    view[victim_size - 4096:victim_size] = b"\xee" * 4096
    arr[1000:2000] = 0x5A
    assert fresh.read() == secret.tobytes(), "a write through a stale mapping reached another tenant's object"
    with memfabric.init(directory) as third:          # as any other client sees it
        assert third.namespace(tenant.name, "secret-of-b").open(fresh.bm_id).read(0, 4096) == secret[:4096].tobytes()
    tenant.destroy()


def test_mapping_outliving_its_destroyed_namespace_never_shows_the_next_tenant(fresh_fabric):
    # r1: 1 server of 4 MiB, so the next tenant's object can only be in A's memory.
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        a = s.create_namespace("tenant-a", sec_id="secA")
        bm = a.alloc(4 * MiB)
        bm.write(b"A" * 100)
        m = bm.map()
        arr = np.frombuffer(m.view, dtype=np.uint8)
        assert bytes(m.view[:4]) == b"AAAA" and arr[0] == ord("A")
        a.destroy()                                    # by the session that maps it

        with memfabric.init(fab.directory) as other:   # another tenant, another session
            _assert_stale_mapping_is_isolated(m.view, arr, 4 * MiB, fab.directory, other)
        with pytest.raises(NoSuchObject):
            bm.read(0, 4)

        del arr
        try:
            m.close()
        except (NoSuchNamespace, NoSuchObject):
            pass    # the object's namespace is gone: there is nothing left to unpin
        m.close()   # closed for good either way
        assert s.namespaces() is not None, "the session keeps working"


def test_mapping_outliving_its_closed_session_never_shows_the_next_tenant(fresh_fabric):
    # r2: the session that made the mapping closes; its namespace is destroyed by another one.
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    s = memfabric.init(fab.directory)
    a = s.create_namespace("tenant-a2", sec_id="secA")
    bm = a.alloc(4 * MiB)
    bm.write(b"A2" * 50)
    m = bm.map()
    arr = np.frombuffer(m.view, dtype=np.uint8)
    assert bytes(m.view[:2]) == b"A2"
    s.close()                                          # the server lets go of its segments

    with memfabric.init(fab.directory) as other:
        other.destroy_namespace("tenant-a2", "secA")
        _assert_stale_mapping_is_isolated(m.view, arr, 4 * MiB, fab.directory, other)
    del arr
    try:
        m.close()
    except MemfabricError:
        pass        # the session is closed: there is nobody to unpin with


# ---- 2. (r7) a server that missed a namespace destroy ------------------------------------------


def test_server_that_missed_a_destroy_does_not_serve_the_old_namespace(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="16MiB", segment_size="1MiB")
    s_b = memfabric.init(fab.directory, server=1)      # a client of server B
    sid_b = s_b.local.server_id
    pid_b = fab.server_pids()[sid_b]
    old = s_b.create_namespace("r7", sec_id="old-secret")
    bm = old.alloc(4096)
    bm.write(b"OLD TENANT DATA")
    bm_id = bm.bm_id
    s_b.close()

    # A session of server B that keeps its proof of the old secId across the destroy.
    stale = memfabric.init(fab.directory, server=1)
    stale_handle = stale.namespace("r7", "old-secret").open(bm_id)
    assert stale_handle.read(0, 15) == b"OLD TENANT DATA"

    s_a = memfabric.init(fab.directory, server=0)
    assert s_a.local.server_id != sid_b
    stop_process(pid_b)
    try:
        s_a.destroy_namespace("r7", "old-secret")      # server B cannot hear of it
    finally:
        os.kill(pid_b, signal.SIGCONT)
    s_a.create_namespace("r7", sec_id="new-secret")    # same name, a new secId and incarnation

    # First (before any new connection proves anything there): the connection that proved the
    # old secId before the destroy loses it (server B reconciles with the catalog on heartbeats).
    wait_until(lambda: raises_code(lambda: stale_handle.read(0, 15)) == BmError.NO_SUCH_OBJECT,
               "the old handle on server B to fail")
    wait_until(lambda: raises_code(lambda: stale.namespace("r7", "old-secret").alloc(4096))
               == BmError.PERMISSION_DENIED, "server B to refuse the old secId on an old connection")
    with pytest.raises(PermissionDenied):
        stale_handle.refresh()                         # asks server B again, with the old secId
    with pytest.raises(NoSuchObject):
        stale_handle.read(0, 15)
    stale.close()

    # A new connection to server B: the old secId is refused, the new one works.
    with memfabric.init(fab.directory, server=1) as s_new:
        assert s_new.local.server_id == sid_b
        old_view = s_new.namespace("r7", "old-secret")
        wait_until(lambda: raises_code(lambda: old_view.open(bm_id)) == BmError.PERMISSION_DENIED,
                   "server B to refuse the destroyed namespace's secId")
        with pytest.raises(PermissionDenied):
            old_view.alloc(4096)
        with pytest.raises(PermissionDenied):
            old_view.open(bm_id)
        assert old_view.batch_free([bm_id]) == [BmError.PERMISSION_DENIED]

        new_view = s_new.namespace("r7", "new-secret")
        fresh = new_view.alloc(4096)
        assert {sid for sid, _ in fresh.extents} == {sid_b}
        fresh.write(b"new tenant")
        assert fresh.read(0, 10) == b"new tenant"
        # The old object is gone: under the new secId its id is unknown, or names a new, zeroed object.
        try:
            again = new_view.open(bm_id)
        except NoSuchObject:
            pass
        else:
            assert again.read(0, 15) != b"OLD TENANT DATA"
            assert again.bm_id == fresh.bm_id

    assert s_a.namespace("r7", "new-secret").open(fresh.bm_id).read(0, 10) == b"new tenant"
    s_a.destroy_namespace("r7", "new-secret")
    s_a.close()


# ---- 3. (r6) the reuse grace protects large copies ------------------------------------------------

R6_WRITER = r"""
import sys, numpy as np, memfabric
directory, ns_name, sec, size, stride = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = memfabric.init(directory, server=0)
ns = s.namespace(ns_name, sec)
data = np.full(size * stride, 0xAA, np.uint8)[::stride]     # stride 2: a slow, byte-by-byte copy
print("ready", flush=True)
for line in sys.stdin:
    bm = ns.open(line.strip())
    bm.write(data[:4096])                                      # layout mapped, first touches paid
    print("writing", flush=True)
    try:
        bm.write(data)
        print("ok", flush=True)
    except memfabric.NoSuchObject:
        print("NoSuchObject", flush=True)
    del bm
"""


@pytest.mark.parametrize("stride, reuse_after_s", [(1, 0.06), (2, 0.1)], ids=["contiguous", "strided-slow"])
def test_object_freed_during_a_big_write_does_not_receive_its_tail(fresh_fabric, stride, reuse_after_s):
    """A 48 MiB write from another process; the object is freed as it starts, and an object
    allocated >= 60 ms later reuses all of its memory (the pool is exactly that big). The
    stale write must stop (NO_SUCH_OBJECT) and never reach the new object. The strided
    source makes the copy take far longer than the 50 ms grace (one 4 MiB chunk still far less)."""
    size = 48 * MiB
    fab = fresh_fabric(servers=1, capacity="48MiB", segment_size="4MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("r6", sec_id="k")
        child = Child(R6_WRITER, fab.directory, "r6", "k", str(size), str(stride))
        try:
            assert child.expect(30) == "ready"
            outcomes = []
            buf = np.empty(size, dtype=np.uint8)
            for _ in range(6):                      # bounded: stop after 3 frees that raced the write
                victim = alloc_when_possible(ns, size)
                child.send(victim.bm_id)
                assert child.expect() == "writing"
                victim.free()                       # mid-copy, most of the time
                freed_at = time.monotonic()
                time.sleep(max(0.0, freed_at + reuse_after_s - time.monotonic()))
                fresh = alloc_when_possible(ns, size)
                assert sorted(fresh.extents) == sorted(victim.extents)
                outcome = child.expect()
                assert outcome in ("NoSuchObject", "ok"), outcome
                outcomes.append(outcome)
                fresh.read(0, into=buf)
                leaked = int(np.count_nonzero(buf))
                assert leaked == 0, (f"a write to a freed object put {leaked} bytes into the object "
                                     f"that reused its memory ({reuse_after_s * 1000:.0f} ms after the free)")
                fresh.free()
                if outcomes.count("NoSuchObject") >= 3:
                    break
        finally:
            child.close()
        if "NoSuchObject" not in outcomes:
            pytest.skip(f"every write finished before the free landed ({outcomes}); nothing raced")


# ---- 4. (r4) memory freed object by object goes back to the pool -----------------------------------


def test_pool_freed_object_by_object_is_whole_again_for_another_namespace(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="4MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        me = s.local.server_id
        other = next(x["server_id"] for x in s.servers() if x["server_id"] != me)
        a = s.create_namespace("r4a", sec_id="a")
        objs = [a.alloc(2 * MiB, Affinity("server", server_id=sid)) for sid in (me, me, other, other)]
        for bm in objs:
            bm.write(b"a" * 4096)
        with pytest.raises(OutOfMemory):
            a.alloc(4096)
        for bm in objs:                              # one by one; the session stays open
            bm.free()
        del objs
        wait_until(lambda: all(x["pools"]["default"]["free_bytes"] == 4 * MiB for x in s.servers()),
                   "both servers to publish their memory as free")

        # Namespace B, same session (the link that mapped A's segments is still open).
        b = s.create_namespace("r4b", sec_id="b")
        whole = alloc_when_possible(b, 4 * MiB, Affinity("local"))
        assert whole.extents == [(me, MiB)] * 4
        assert whole.read() == bytes(4 * MiB)
        theirs = alloc_when_possible(b, 4 * MiB, Affinity("server", server_id=other))
        assert {sid for sid, _ in theirs.extents} == {other}
        whole.free()
        theirs.free()
        spread = alloc_when_possible(b, 8 * MiB, Affinity("spread"))
        assert sum(n for _, n in spread.extents) == 8 * MiB
        spread.free()

        # And namespace C of another session, while A's and B's session is still open.
        with memfabric.init(fab.directory, server=0) as s2:
            c = s2.create_namespace("r4c", sec_id="c")
            again = alloc_when_possible(c, 8 * MiB, Affinity("spread"))
            assert sum(n for _, n in again.extents) == 8 * MiB
            assert again.read() == bytes(8 * MiB)


# ---- 5. (r5) an oversized request is refused, the session lives on --------------------------------


def test_oversized_request_is_limit_exceeded_and_the_session_keeps_working(session):
    name = unique("r5")
    sec = "k" * MAX_SEC_ID_BYTES
    big = session.create_namespace(name, sec_id=sec)
    try:
        bm = big.alloc(4096)
        bm.write(b"kept")
        with pytest.raises(LimitExceeded) as err:
            big.gather([(bm, 0, 4)] * MAX_GATHER_INPUTS)
        assert err.value.code == BmError.LIMIT_EXCEEDED
        assert isinstance(err.value, memfabric.LimitExceeded)

        # The same session: existing handles, new objects, control calls.
        assert bm.read(0, 4) == b"kept"
        other = big.alloc(8192)
        other.write(b"after the refusal", 100)
        assert other.read(100, 17) == b"after the refusal"
        assert name in {n.ns for n in session.namespaces()}
        dst, length = big.gather([(bm, 0, 4)] * 8)        # a gather that fits still works
        assert length == 32 and dst.read(0, 32) == b"kept" * 8
    finally:
        session.destroy_namespace(name, sec)


# ---- 6. (r10) at most MAX_NAMESPACES namespaces; the listing keeps working -------------------------


def test_namespace_count_is_capped_and_listing_still_works(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        assert s.namespaces() == []

        def name(i: int) -> str:                    # the longest names allowed
            return f"tenant-{i:05d}-".ljust(MAX_NAME_CHARS, "x")

        # Many tenants fill the catalog (written straight into it: one client may create only
        # max_namespaces_per_client, and each create costs a slow hash); this client the last one.
        from memfabric.cluster import open_cluster
        from memfabric.core.namespaces import hash_sec_id
        salt_hex, stored = hash_sec_id(b"k")
        catalog = open_cluster("embedded", path=os.path.join(fab.directory, "cluster.db"))
        try:
            for i in range(MAX_NAMESPACES - 1):
                catalog.create_namespace("default", name(i), 0, salt_hex, stored, creator=f"uid {10_000 + i}")
        finally:
            catalog.close()
        s.create_namespace(name(MAX_NAMESPACES - 1), sec_id="k")
        with pytest.raises(LimitExceeded) as err:
            s.create_namespace(name(MAX_NAMESPACES), sec_id="k")
        assert err.value.code == BmError.LIMIT_EXCEEDED
        with pytest.raises(LimitExceeded):
            s.create_namespace("short", sec_id="k")

        listed = s.namespaces()
        assert len(listed) == MAX_NAMESPACES
        assert {n.ns for n in listed} == {name(i) for i in range(MAX_NAMESPACES)}
        assert len(s.namespaces()) == MAX_NAMESPACES, "the session survives the biggest listing"
        # Room comes back when a namespace goes.
        s.destroy_namespace(name(0), "k")
        s.create_namespace(name(MAX_NAMESPACES), sec_id="k").alloc(4096).write(b"works")
        assert len(s.namespaces()) == MAX_NAMESPACES
        with memfabric.init(fab.directory) as fresh:
            assert len(fresh.namespaces()) == MAX_NAMESPACES


# ---- 7. (r3) int8 and other non-byte buffers ----------------------------------------------------------


def test_int8_and_float32_buffers_are_written_and_read_byte_for_byte(ns, compat_session):
    bm = ns.alloc(64 * KiB)
    signed = np.arange(-128, 128, dtype=np.int8)
    bm.write(signed, 0)
    assert bm.read(0, 256) == signed.tobytes()
    back = np.zeros(256, dtype=np.int8)
    bm.read(0, into=back)
    assert np.array_equal(back, signed)

    matrix = np.random.default_rng(3).standard_normal((64, 48)).astype(np.float32)
    assert matrix.flags.c_contiguous and matrix.ndim == 2
    bm.write(matrix, 4096)
    assert bm.read(4096, matrix.nbytes) == matrix.tobytes()
    out = np.empty_like(matrix)
    bm.read(4096, into=out)
    assert np.array_equal(out, matrix)

    bm.write(array.array("b", [-1, 2, -3]), 20000)
    assert bm.read(20000, 3) == bytes([255, 2, 253])

    # compat: BM_ReadSec into an int8 numpy buffer.
    info = C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}", bm_id=bm.bm_id, size=bm.size)
    buf = np.zeros(256, dtype=np.int8)
    assert C.BM_ReadSec(info, 0, 256, buf, 0) == 0
    assert np.array_equal(buf, signed)
    assert C.BM_WriteSec(info, 30000, 256, signed[::-1].copy(), 0) == 0
    assert bm.read(30000, 256) == signed[::-1].tobytes()
    assert bm.read(0, 4) == signed[:4].tobytes(), "the object is still fine"


# ---- 8. (r9) threads opening objects at once leak no fds -------------------------------------------


def test_concurrent_opens_leak_no_fds_after_session_close(fabric):
    name = unique("r9")
    with memfabric.init(fabric.directory, server=0) as setup:
        other = next(x["server_id"] for x in setup.servers() if x["server_id"] != setup.local.server_id)
        made = setup.create_namespace(name, sec_id="k")
        # Objects homed on the other server, two per 1 MiB segment: segments are shared.
        ids = [made.alloc(512 * KiB, Affinity("server", server_id=other)).bm_id for _ in range(64)]
    try:
        before = open_fd_count()
        c = memfabric.init(fabric.directory, server=0)
        n = c.namespace(name, "k")
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def opener() -> None:
            try:
                start.wait(WAIT_S)
                for bm_id in ids:
                    n.open(bm_id).read(0, 1)
            except Exception as exc:   # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=opener) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 3)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert open_fd_count() > before, "the session holds fds while open"
        c.close()
        leaked = open_fd_count() - before
        assert leaked <= 0, f"{leaked} fds still open after session.close()"
    finally:
        with memfabric.init(fabric.directory, server=0) as s:
            s.destroy_namespace(name, "k")


# ---- 9. peer operations are for servers only --------------------------------------------------------


def test_a_client_cannot_be_a_peer(fabric, session, ns):
    path = session.local.ipc_socket
    with pytest.raises(PermissionDenied):
        ServerLink(path, role="peer")
    sec = f"sec-{ns.name}"
    home = session.home()
    with pytest.raises(PermissionDenied):
        home.call("extent_alloc", pool="default", ns=ns.name, sec=sec, size=4096, bm_id="2-0-1")
    with pytest.raises(PermissionDenied):
        home.call("extent_free", pool="default", ns=ns.name, sec=sec, bm_id="2-0-1", extents=[[0, 0, 4096]])
    with pytest.raises(PermissionDenied):
        home.call("ns_usage")
    bm = ns.alloc(4096)
    bm.write(b"still here")
    with pytest.raises(PermissionDenied):
        home.call("ns_drop", pool="default", ns=ns.name, sec=sec, incarnation=0)
    assert bm.read(0, 10) == b"still here", "a refused ns_drop dropped nothing"

    # On a raw connection: a refused peer hello grants nothing for later requests.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(WAIT_S)
    sock.connect(path)
    with sock:
        sock.send(msgpack.packb({"op": "hello", "id": 1, "role": "peer", "pid": fabric.server_pids()[session.local.server_id]}))
        reply = msgpack.unpackb(sock.recv(1 << 20))
        assert reply["id"] == 1 and reply.get("error") == BmError.PERMISSION_DENIED, reply
        sock.send(msgpack.packb({"op": "extent_alloc", "id": 2, "pool": "default", "ns": ns.name,
                                 "sec": sec.encode(), "size": 4096, "bm_id": "2-0-1"}))
        reply = msgpack.unpackb(sock.recv(1 << 20))
        assert reply["id"] == 2 and reply.get("error") == BmError.PERMISSION_DENIED, reply

    # The servers themselves are still peers of each other: a spread object uses both.
    spread = ns.alloc(3 * MiB, Affinity("spread"))
    assert len({sid for sid, _ in spread.extents}) == 2
    spread.write(b"peers work", MiB * 2 + 10)
    assert spread.read(MiB * 2 + 10, 10) == b"peers work"
    spread.free()
    assert all(s["alive"] for s in session.servers())

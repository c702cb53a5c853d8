"""The seed's C API names (memfabric.compat): every BM_* function, its return code and its effect."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import memfabric
from memfabric.compat import (
    PROT_READ,
    PROT_WRITE,
    BM_AllocSec,
    BM_BatchFreeSec,
    BM_CopySec,
    BM_CreateNSSec,
    BM_DestroyNSSec,
    BM_Exit,
    BM_ExpandSec,
    BM_FreeSec,
    BM_GatherSec,
    BM_Init,
    BM_InitWithExtAttr,
    BM_MapSec,
    BM_QueryNSCache,
    BM_ReadSec,
    BM_SpecificObjSwapInSec,
    BM_Unmap,
    BM_WriteSec,
    BmAffinity,
    BmError,
    BmInfo,
    BmOperatorCode,
    DiskFileDesc,
    QueryNsCache,
)

from ..helpers import KiB, MiB, random_bytes

OK = 0


def read_all(info: BmInfo) -> bytes:
    buf = bytearray(info.size)
    assert BM_ReadSec(info, 0, info.size, buf, 0) == OK
    return bytes(buf)


def query(ns: str) -> QueryNsCache | None:
    rc, rows = BM_QueryNSCache()
    assert rc == OK
    return next((r for r in rows if r.ns == ns), None)


@pytest.fixture
def bm(fabric):
    """An initialized compat session; BM_Exit at the end whatever happens."""
    assert BM_Init(fabric.directory, 0) == OK
    try:
        yield
    finally:
        BM_Exit()


@pytest.fixture
def ns(bm):
    name = f"compat-{uuid.uuid4().hex[:10]}"
    assert BM_CreateNSSec("default", name, 7, "sec") == OK
    yield name
    BM_DestroyNSSec("default", name, "sec")


def alloc(ns: str, size: int, affinity=None) -> BmInfo:
    info = BmInfo(ns=ns, sec_id="sec")
    assert BM_AllocSec(info, size, 0, affinity) == OK
    return info


def server_ids(fabric) -> tuple[int, int]:
    with memfabric.init(fabric.directory, server=0) as s:
        me = s.local.server_id
        return me, next(x["server_id"] for x in s.servers() if x["server_id"] != me)


# ---- session ---------------------------------------------------------------------------------


def test_init_and_exit(fabric):
    assert BM_Init(fabric.directory) == OK
    assert BM_Init(fabric.directory) == BmError.ALREADY_INITIALIZED
    assert BM_Exit() == OK
    assert BM_Exit() == BmError.NOT_INITIALIZED
    assert BM_QueryNSCache() == (BmError.NOT_INITIALIZED, None)
    assert BM_Init("/no/such/fabric") == BmError.INVALID_ARGUMENT
    assert BM_Exit() == BmError.NOT_INITIALIZED


def test_init_with_ext_attr(fabric):
    me, other = server_ids(fabric)
    assert BM_InitWithExtAttr(fabric.directory, 0, {"colour": "blue"}) == BmError.INVALID_ARGUMENT
    assert BM_InitWithExtAttr(fabric.directory, 0, {"server": 5}) == BmError.INVALID_ARGUMENT
    assert BM_Exit() == BmError.NOT_INITIALIZED
    # server=1: the second configured server; busy_poll_us=0: every wait sleeps (works the same).
    assert BM_InitWithExtAttr(fabric.directory, 0, {"server": 1, "timeout_s": 5.0, "busy_poll_us": 0}) == OK
    try:
        name = f"compat-{uuid.uuid4().hex[:10]}"
        assert BM_CreateNSSec("default", name, 0, "sec") == OK
        info = alloc(name, 4096)
        assert int(info.bm_id.split("-")[0]) == other, "local placement lands on the chosen server"
        assert BM_DestroyNSSec("default", name, "sec") == OK
    finally:
        assert BM_Exit() == OK


def test_exit_closes_live_mappings(fabric):
    assert BM_Init(fabric.directory) == OK
    name = f"compat-{uuid.uuid4().hex[:10]}"
    try:
        assert BM_CreateNSSec("default", name, 0, "sec") == OK
        info = alloc(name, 8192)
        rc, view = BM_MapSec(info, PROT_READ | PROT_WRITE, 0)
        assert rc == OK
        view[:4] = b"kept"
    finally:
        assert BM_Exit() == OK
    assert BM_Init(fabric.directory) == OK
    try:
        assert read_all(info)[:4] == b"kept"
        # Mapping was unpinned by BM_Exit: a free now returns the memory at once.
        assert BM_FreeSec(info, 0) == OK
        assert BM_DestroyNSSec("default", name, "sec") == OK
    finally:
        BM_Exit()


# ---- namespaces ------------------------------------------------------------------------------


def test_create_destroy_query_namespaces(bm):
    name = f"compat-{uuid.uuid4().hex[:10]}"
    assert query(name) is None
    assert BM_CreateNSSec("default", name, 12, "sec") == OK
    assert query(name) == QueryNsCache("default", name, 12, 0, 0)
    assert BM_CreateNSSec("default", name, 12, "sec") == BmError.NAMESPACE_EXISTS
    assert BM_CreateNSSec("nopool", name, 0, "sec") == BmError.NO_SUCH_POOL
    assert BM_CreateNSSec("default", "bad name", 0, "sec") == BmError.INVALID_ARGUMENT
    assert BM_CreateNSSec("default", "fine", -1, "sec") == BmError.INVALID_ARGUMENT
    assert BM_CreateNSSec("default", "fine", 0, "") == BmError.INVALID_ARGUMENT

    a = alloc(name, 1000)
    alloc(name, MiB + 1, BmAffinity("spread"))
    assert query(name) == QueryNsCache("default", name, 12, 2, 1000 + MiB + 1)
    assert BM_FreeSec(a, 0) == OK
    assert query(name) == QueryNsCache("default", name, 12, 1, MiB + 1)

    assert BM_DestroyNSSec("default", name, "wrong") == BmError.PERMISSION_DENIED
    assert BM_DestroyNSSec("default", name, "sec") == OK
    assert query(name) is None
    assert BM_DestroyNSSec("default", name, "sec") == BmError.NO_SUCH_NAMESPACE
    assert BM_AllocSec(BmInfo(ns=name, sec_id="sec"), 10, 0, None) == BmError.NO_SUCH_NAMESPACE


# ---- objects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["local", "server", "spread"])
def test_alloc_write_read_free(fabric, ns, placement):
    me, other = server_ids(fabric)
    affinity = {"local": None, "server": BmAffinity("server", server_id=other),
                "spread": BmAffinity("spread")}[placement]
    info = alloc(ns, 2 * MiB + 3, affinity)
    assert info.size == 2 * MiB + 3 and info.bm_id
    if placement == "server":
        assert int(info.bm_id.split("-")[0]) == other
    assert read_all(info) == bytes(info.size)

    data = random_bytes(info.size, seed=1)
    assert BM_WriteSec(info, 0, info.size, data, 0) == OK
    assert read_all(info) == data.tobytes()
    # A length shorter than the buffer writes only that much; numpy buffers of any dtype go as bytes.
    assert BM_WriteSec(info, MiB - 2, 4, b"\x01\x02\x03\x04\x05\x06", 0) == OK
    data[MiB - 2:MiB + 2] = [1, 2, 3, 4]
    words = np.arange(1000, dtype=np.int32)
    assert BM_WriteSec(info, 10, 4000, words, 0) == OK
    data[10:4010] = words.view(np.uint8)
    assert read_all(info) == data.tobytes()
    # BM_ReadSec fills the caller's buffer in place, only `length` bytes of it.
    back = np.zeros(1000, np.int32)
    assert BM_ReadSec(info, 10, 4000, back, 0) == OK
    assert np.array_equal(back, words)
    buf = bytearray(b"\xee" * 10)
    assert BM_ReadSec(info, MiB - 2, 4, buf, 0) == OK
    assert buf == b"\x01\x02\x03\x04" + b"\xee" * 6

    assert BM_WriteSec(info, 0, 11, b"0123456789", 0) == BmError.OUT_OF_RANGE
    assert BM_ReadSec(info, 0, 11, bytearray(10), 0) == BmError.OUT_OF_RANGE
    assert BM_WriteSec(info, info.size - 1, 2, b"xx", 0) == BmError.OUT_OF_RANGE
    assert BM_ReadSec(info, info.size - 1, 2, bytearray(2), 0) == BmError.OUT_OF_RANGE
    assert BM_ReadSec(info, 0, 4, b"ro!!", 0) == BmError.INVALID_ARGUMENT
    assert read_all(info) == data.tobytes()

    # Another process's view: a fresh BmInfo with the same identity reads the same bytes.
    copy = BmInfo(ns=ns, sec_id="sec", bm_id=info.bm_id, size=info.size)
    assert read_all(copy) == data.tobytes()

    assert BM_FreeSec(info, 0) == OK
    assert BM_FreeSec(info, 0) == BmError.NO_SUCH_OBJECT
    assert BM_ReadSec(copy, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_OBJECT
    assert BM_WriteSec(copy, 0, 1, b"x", 0) == BmError.NO_SUCH_OBJECT


def test_alloc_errors(ns):
    info = BmInfo(ns=ns, sec_id="sec")
    assert BM_AllocSec(info, 0, 0, None) == BmError.INVALID_ARGUMENT
    assert BM_AllocSec(info, -5, 0, None) == BmError.INVALID_ARGUMENT
    assert BM_AllocSec(info, 1 << 36, 0, BmAffinity("spread")) == BmError.OUT_OF_MEMORY
    assert BM_AllocSec(BmInfo(ns=ns, sec_id="nope"), 10, 0, None) == BmError.PERMISSION_DENIED
    assert BM_AllocSec("not an info", 10, 0, None) == BmError.INVALID_ARGUMENT
    assert info.bm_id == "" and info.size == 0, "a failed allocation fills nothing in"
    assert query(ns).object_count == 0
    assert BM_FreeSec(BmInfo(ns=ns, sec_id="sec", bm_id="junk"), 0) == BmError.INVALID_ARGUMENT


def test_batch_free(fabric, ns):
    me, other = server_ids(fabric)
    infos = [alloc(ns, 4096), alloc(ns, 4096, BmAffinity("server", server_id=other)),
             alloc(ns, 3 * MiB, BmAffinity("spread")), alloc(ns, 4096)]
    ids = [i.bm_id for i in infos]
    # num bounds the ids looked at: the last one survives.
    assert BM_BatchFreeSec(ids, 3, 0, ns, "sec") == OK
    for info in infos[:3]:
        assert BM_ReadSec(info, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_OBJECT
    assert BM_ReadSec(infos[3], 0, 1, bytearray(1), 0) == OK
    assert query(ns).object_count == 1
    # The first failure's code comes back; the rest are still freed.
    assert BM_BatchFreeSec([ids[0], "junk", ids[3]], 3, 0, ns, "sec") == BmError.NO_SUCH_OBJECT
    assert query(ns).object_count == 0
    assert BM_BatchFreeSec(ids, 5, 0, ns, "sec") == BmError.INVALID_ARGUMENT
    assert BM_BatchFreeSec(ids, -1, 0, ns, "sec") == BmError.INVALID_ARGUMENT
    assert BM_BatchFreeSec([], 0, 0, ns, "sec") == OK
    assert BM_BatchFreeSec(ids, 1, 0, ns, "wrong") == BmError.PERMISSION_DENIED


def test_expand(fabric, ns):
    info = alloc(ns, MiB - 100)
    data = random_bytes(info.size, seed=2)
    assert BM_WriteSec(info, 0, info.size, data, 0) == OK
    assert BM_ExpandSec(info, 3 * MiB + 1, 0) == OK
    assert info.size == 3 * MiB + 1
    got = read_all(info)
    assert got[:MiB - 100] == data.tobytes() and got[MiB - 100:] == bytes(2 * MiB + 101)
    assert BM_WriteSec(info, info.size - 3, 3, b"end", 0) == OK
    assert BM_ExpandSec(info, 10, 0) == BmError.INVALID_ARGUMENT
    assert info.size == 3 * MiB + 1
    assert BM_ExpandSec(info, 0, 0) == BmError.INVALID_ARGUMENT
    assert read_all(info)[-3:] == b"end"
    assert BM_FreeSec(info, 0) == OK
    assert BM_ExpandSec(info, 4 * MiB, 0) == BmError.NO_SUCH_OBJECT


def test_map_and_unmap(ns):
    info = alloc(ns, 2 * MiB + 1, BmAffinity("spread"))
    data = random_bytes(info.size, seed=3)
    assert BM_WriteSec(info, 0, info.size, data, 0) == OK

    rc, view = BM_MapSec(info, PROT_READ | PROT_WRITE, 0)
    assert rc == OK and view.nbytes == info.size and not view.readonly
    assert bytes(view) == data.tobytes()
    view[MiB - 1:MiB + 1] = b"\xab\xcd"
    data[MiB - 1:MiB + 1] = [0xAB, 0xCD]
    assert read_all(info) == data.tobytes()
    assert BM_Unmap("1-0-1" if info.bm_id != "1-0-1" else "2-0-1", view) == BmError.INVALID_ARGUMENT
    assert BM_Unmap(info.bm_id, memoryview(bytearray(4))) == BmError.INVALID_ARGUMENT
    assert BM_Unmap(info.bm_id, view) == OK
    assert BM_Unmap(info.bm_id, view) == BmError.INVALID_ARGUMENT

    rc, ro = BM_MapSec(info, PROT_READ, 0)
    assert rc == OK and ro.readonly and bytes(ro) == data.tobytes()
    assert BM_Unmap(info.bm_id, ro) == OK
    assert BM_MapSec(info, PROT_WRITE, 0) == (BmError.INVALID_ARGUMENT, None)
    assert BM_MapSec(info, 0x8 | PROT_READ, 0) == (BmError.INVALID_ARGUMENT, None)

    # An object freed while mapped: the mapping stays valid until unmapped, the handle is dead.
    rc, view = BM_MapSec(info, PROT_READ | PROT_WRITE, 0)
    assert rc == OK
    assert BM_FreeSec(info, 0) == OK
    assert BM_ReadSec(info, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_OBJECT
    assert bytes(view[:10]) == data[:10].tobytes()
    assert BM_Unmap(info.bm_id, view) == OK
    assert BM_MapSec(info, PROT_READ, 0) == (BmError.NO_SUCH_OBJECT, None)


def test_copy(fabric, ns):
    me, other = server_ids(fabric)
    src = alloc(ns, 2 * MiB, BmAffinity("server", server_id=me))
    dst = alloc(ns, 2 * MiB, BmAffinity("server", server_id=other))
    sdata, ddata = random_bytes(src.size, 4), random_bytes(dst.size, 5)
    assert BM_WriteSec(src, 0, src.size, sdata, 0) == OK
    assert BM_WriteSec(dst, 0, dst.size, ddata, 0) == OK
    assert BM_CopySec(src, 100, dst, MiB - 50, MiB, 0) == OK
    ddata[MiB - 50:2 * MiB - 50] = sdata[100:MiB + 100]
    assert read_all(dst) == ddata.tobytes()
    assert BM_CopySec(src, 0, dst, MiB + 1, MiB, 0) == BmError.OUT_OF_RANGE
    assert BM_CopySec(src, MiB + 1, dst, 0, MiB, 0) == BmError.OUT_OF_RANGE
    assert read_all(dst) == ddata.tobytes()
    assert BM_CopySec(src, 0, src, 10, 100, 0) == OK           # overlapping, within one extent
    sdata[10:110] = sdata[0:100].copy()
    assert read_all(src) == sdata.tobytes()
    wrong = BmInfo(ns=ns, sec_id="wrong", bm_id=src.bm_id, size=src.size)
    assert BM_CopySec(wrong, 0, dst, 0, 10, 0) == BmError.PERMISSION_DENIED
    assert BM_CopySec(src, 0, wrong, 0, 10, 0) == BmError.PERMISSION_DENIED
    assert read_all(dst) == ddata.tobytes()


def test_swap_in(ns, tmp_path):
    info = alloc(ns, MiB + MiB // 2, BmAffinity("spread"))
    file_bytes = random_bytes(2 * MiB, seed=6)
    path = tmp_path / "in.bin"
    path.write_bytes(file_bytes.tobytes())
    assert BM_SpecificObjSwapInSec(DiskFileDesc(str(path), 4096 + 7), info, 0, 100, MiB) == OK
    want = np.zeros(info.size, np.uint8)
    want[100:100 + MiB] = file_bytes[4103:4103 + MiB]
    assert read_all(info) == want.tobytes()
    assert BM_SpecificObjSwapInSec(DiskFileDesc(str(path), 2 * MiB - 10), info, 0, 0, 11) == BmError.OUT_OF_RANGE
    assert BM_SpecificObjSwapInSec(DiskFileDesc(str(path), 0), info, 0, info.size - 1, 2) == BmError.OUT_OF_RANGE
    assert BM_SpecificObjSwapInSec(DiskFileDesc(str(tmp_path / "nope"), 0), info, 0, 0, 1) == BmError.IO_ERROR
    assert BM_SpecificObjSwapInSec(DiskFileDesc(str(path), -1), info, 0, 0, 1) == BmError.INVALID_ARGUMENT
    assert read_all(info) == want.tobytes()


def test_gather(fabric, ns):
    me, other = server_ids(fabric)
    inputs = [alloc(ns, MiB, BmAffinity("server", server_id=me)),
              alloc(ns, MiB, BmAffinity("server", server_id=other)),
              alloc(ns, 2 * MiB, BmAffinity("spread"))]
    arrays = [random_bytes(i.size, seed=10 + k) for k, i in enumerate(inputs)]
    for info, arr in zip(inputs, arrays):
        assert BM_WriteSec(info, 0, info.size, arr, 0) == OK

    # CONCAT into a new object (empty bm_id): info is filled in.
    out = BmInfo(ns=ns, sec_id="sec")
    rc, length = BM_GatherSec([(inputs[0], 5, 100), (inputs[2], MiB - 10, 20), (inputs[1], 0, MiB)],
                              BmOperatorCode.CONCAT, 0, out)
    assert rc == OK and length == 120 + MiB
    assert out.bm_id and out.size >= length
    want = np.concatenate([arrays[0][5:105], arrays[2][MiB - 10:MiB + 10], arrays[1]])
    buf = bytearray(length)
    assert BM_ReadSec(out, 0, length, buf, 0) == OK and buf == want.tobytes()

    # Reductions over a dtype into an existing object.
    n = 64 * KiB
    typed = [arrays[0][:n].view(np.int32), arrays[1][8:8 + n].view(np.int32),
             arrays[2][MiB - 4096:MiB - 4096 + n].view(np.int32)]
    items = [(inputs[0], 0, n), (inputs[1], 8, n), (inputs[2], MiB - 4096, n)]
    dst = alloc(ns, n, BmAffinity("server", server_id=other))
    for op, want in [(BmOperatorCode.SUM, typed[0] + typed[1] + typed[2]),
                     (BmOperatorCode.MIN, np.minimum(np.minimum(typed[0], typed[1]), typed[2])),
                     (BmOperatorCode.MAX, np.maximum(np.maximum(typed[0], typed[1]), typed[2]))]:
        rc, length = BM_GatherSec(items, op, 0, dst, dtype="int32")
        assert (rc, length) == (OK, n)
        got = np.zeros(n // 4, np.int32)
        assert BM_ReadSec(dst, 0, n, got, 0) == OK
        assert np.array_equal(got, want), op.name

    assert BM_GatherSec(items[:2], BmOperatorCode.SUM, 0, dst, dtype="int33") == (BmError.INVALID_ARGUMENT, None)
    assert BM_GatherSec([(inputs[0], 0, 8), (inputs[1], 0, 4)], BmOperatorCode.SUM, 0, dst,
                        dtype="int32") == (BmError.INVALID_ARGUMENT, None)
    assert BM_GatherSec(items, BmOperatorCode.CONCAT, 0, dst) == (BmError.OUT_OF_RANGE, None)
    assert BM_GatherSec([(inputs[0], MiB - 1, 2)], BmOperatorCode.CONCAT, 0,
                        BmInfo(ns=ns, sec_id="sec")) == (BmError.OUT_OF_RANGE, None)
    assert BM_GatherSec(items, 99, 0, dst) == (BmError.INVALID_ARGUMENT, None)


# ---- the fast path: no server round trip once the layout is known ------------------------------


@pytest.fixture
def round_trips(monkeypatch):
    """Counts every request this process sends a server (each link's calls go through
    ServerLink.call_with_fds or RpcLink.call): reads and writes themselves never do."""
    from memfabric.datapath.link import ServerLink
    from memfabric.datapath.rpc_link import RpcLink
    count = [0]
    for cls, name in ((ServerLink, "call_with_fds"), (RpcLink, "call")):
        real = getattr(cls, name)

        def counted(self, *args, _real=real, **kwargs):
            count[0] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, counted)

    def since(fn) -> int:
        before = count[0]
        fn()
        return count[0] - before
    return since


def read_write_many(info: BmInfo, times: int = 20) -> None:
    data = random_bytes(4 * KiB, seed=20)
    back = bytearray(4 * KiB)
    for i in range(times):
        assert BM_WriteSec(info, i * 8, 4 * KiB, data, 0) == OK
        assert BM_ReadSec(info, i * 8, 4 * KiB, back, 0) == OK
        assert back == data.tobytes()


@pytest.mark.parametrize("placement", ["local", "server", "spread"])
def test_read_and_write_ask_no_server_once_the_layout_is_known(fabric, ns, round_trips, placement):
    me, other = server_ids(fabric)
    affinity = {"local": None, "server": BmAffinity("server", server_id=other),
                "spread": BmAffinity("spread")}[placement]
    info = alloc(ns, 2 * MiB + 3, affinity)
    assert round_trips(lambda: read_write_many(info)) == 0, "BM_AllocSec already knows the layout"
    # A fresh BmInfo with the same identity: the same object, known already.
    same = BmInfo(ns=ns, sec_id="sec", bm_id=info.bm_id, size=info.size)
    assert round_trips(lambda: read_write_many(same)) == 0
    # An object another client made: the first call learns its layout, no later one asks.
    with memfabric.init(fabric.directory) as session:
        made = session.namespace(ns, "sec").alloc(2 * MiB + 3, affinity)
        theirs = BmInfo(ns=ns, sec_id="sec", bm_id=made.bm_id, size=made.size)
    assert round_trips(lambda: read_write_many(theirs, times=1)) >= 1
    assert round_trips(lambda: read_write_many(theirs)) == 0
    # The secId presented is checked on the fast path too, against the one the server accepted.
    wrong = BmInfo(ns=ns, sec_id="wrong", bm_id=info.bm_id, size=info.size)
    assert BM_ReadSec(wrong, 0, 1, bytearray(1), 0) == BmError.PERMISSION_DENIED
    assert BM_WriteSec(wrong, 0, 1, b"x", 0) == BmError.PERMISSION_DENIED
    other_ns = BmInfo(ns=ns + "x", sec_id="sec", bm_id=info.bm_id, size=info.size)
    assert BM_ReadSec(other_ns, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_NAMESPACE
    assert round_trips(lambda: read_write_many(info)) == 0, "a refused secId leaves the known handle alone"


def test_the_fast_path_checks_every_kind_of_secid(ns):
    # Known under a secId given as a bytearray, which can change after it was accepted.
    mutable = bytearray(b"sec")
    info = BmInfo(ns=ns, sec_id=mutable)
    assert BM_AllocSec(info, 4 * KiB, 0, None) == OK
    assert BM_WriteSec(info, 0, 3, b"abc", 0) == OK
    mutable[:] = b"bad"
    assert BM_ReadSec(info, 0, 3, bytearray(3), 0) == BmError.PERMISSION_DENIED
    for bad in (None, "", 7, b"se", "sec\0"):
        refused = BmInfo(ns=ns, sec_id=bad, bm_id=info.bm_id)
        assert BM_ReadSec(refused, 0, 3, bytearray(3), 0) in (BmError.INVALID_ARGUMENT, BmError.PERMISSION_DENIED), bad
    for good in ("sec", b"sec", bytearray(b"sec")):
        back = bytearray(3)
        assert BM_ReadSec(BmInfo(ns=ns, sec_id=good, bm_id=info.bm_id), 0, 3, back, 0) == OK
        assert back == b"abc"
    for bad_id in (None, 7, ["x"], info.bm_id + "0"):
        assert BM_ReadSec(BmInfo(ns=ns, sec_id="sec", bm_id=bad_id), 0, 3, bytearray(3), 0) in (
            BmError.INVALID_ARGUMENT, BmError.NO_SUCH_OBJECT), bad_id


def test_known_layouts_are_bounded_least_recently_used_first(ns, round_trips, monkeypatch):
    import memfabric.compat as compat
    monkeypatch.setattr(compat, "COMPAT_HANDLES_KEPT", 4)
    infos = [alloc(ns, 8 * KiB) for _ in range(6)]
    # The two oldest were pushed out by the four after them: each asks once, then is known again.
    for info in infos[2:]:
        assert round_trips(lambda: read_write_many(info, times=2)) == 0
    assert round_trips(lambda: read_write_many(infos[0], times=2)) == 1
    assert round_trips(lambda: read_write_many(infos[0], times=2)) == 0
    assert round_trips(lambda: read_write_many(infos[5], times=2)) == 0, "used recently: still known"


def test_freed_objects_are_forgotten(fabric, ns, round_trips):
    info, other = alloc(ns, 8 * KiB), alloc(ns, 8 * KiB)
    assert BM_FreeSec(info, 0) == OK
    # Dropped at the free: the next call asks the server, which says the object is gone.
    assert round_trips(lambda: BM_ReadSec(info, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_OBJECT) == 1
    # Freed by another client: found freed without a round trip, then forgotten.
    with memfabric.init(fabric.directory) as session:
        session.namespace(ns, "sec").open(other.bm_id).free()
    assert round_trips(lambda: BM_ReadSec(other, 0, 1, bytearray(1), 0)) == 0
    assert BM_ReadSec(other, 0, 1, bytearray(1), 0) == BmError.NO_SUCH_OBJECT
    assert round_trips(lambda: BM_WriteSec(other, 0, 1, b"x", 0)) == 1
    batch = [alloc(ns, 4 * KiB) for _ in range(2)]
    assert BM_BatchFreeSec([b.bm_id for b in batch], 2, 0, ns, "sec") == OK
    assert round_trips(lambda: BM_ReadSec(batch[0], 0, 1, bytearray(1), 0)) == 1
    # Found freed by any call, not only reads and writes: forgotten too.
    for found_freed in (lambda i: BM_MapSec(i, PROT_READ, 0)[0], lambda i: BM_ExpandSec(i, 16 * KiB, 0),
                        lambda i: BM_CopySec(i, 0, i, 8, 8, 0)):
        info = alloc(ns, 8 * KiB)
        with memfabric.init(fabric.directory) as session:
            session.namespace(ns, "sec").open(info.bm_id).free()
        assert found_freed(info) == BmError.NO_SUCH_OBJECT
        assert round_trips(lambda: BM_ReadSec(info, 0, 1, bytearray(1), 0)) == 1, "asked again"


# ---- why a call failed: BM_GetLastError -------------------------------------------------------


def test_every_failure_says_why(fabric, ns, tmp_path):
    """Each refused call leaves its reason for BM_GetLastError, naming the call; the code is
    the most precise one BmError has."""
    from memfabric.compat import BM_GetLastError
    info = alloc(ns, 8 * KiB)
    failures = [
        (lambda: BM_ReadSec(info, 0, 4, b"ro!!", 0), BmError.INVALID_ARGUMENT, "BM_ReadSec", "read-only"),
        (lambda: BM_ReadSec(info, 0, 11, bytearray(10), 0), BmError.OUT_OF_RANGE, "BM_ReadSec", "10-byte buffer"),
        (lambda: BM_WriteSec(info, 0, 11, b"0123456789", 0), BmError.OUT_OF_RANGE, "BM_WriteSec", "10-byte buffer"),
        (lambda: BM_WriteSec(info, 0, -1, b"0123456789", 0), BmError.OUT_OF_RANGE, "BM_WriteSec", "-1"),
        (lambda: BM_WriteSec(info, 0, 4, 1234, 0), BmError.INVALID_ARGUMENT, "BM_WriteSec", "buffer"),
        (lambda: BM_ReadSec(info, 0, 4, "text", 0), BmError.INVALID_ARGUMENT, "BM_ReadSec", "buffer"),
        (lambda: BM_ReadSec(info, info.size - 1, 2, bytearray(2), 0), BmError.OUT_OF_RANGE, "BM_ReadSec",
         "outside object"),
        (lambda: BM_ReadSec("nope", 0, 1, bytearray(1), 0), BmError.INVALID_ARGUMENT, "BM_ReadSec", "BmInfo"),
        (lambda: BM_ExpandSec(info, 10, 0), BmError.INVALID_ARGUMENT, "BM_ExpandSec", "shrink"),
        (lambda: BM_ExpandSec(info, 0, 0), BmError.INVALID_ARGUMENT, "BM_ExpandSec", "size"),
        (lambda: BM_AllocSec(BmInfo(ns=ns, sec_id="sec"), 0, 0, None), BmError.INVALID_ARGUMENT, "BM_AllocSec",
         "size"),
        (lambda: BM_AllocSec(BmInfo(ns=ns, sec_id="nope"), 10, 0, None), BmError.PERMISSION_DENIED,
         "BM_AllocSec", "secId"),
        (lambda: BM_FreeSec(BmInfo(ns=ns, sec_id="sec", bm_id="junk"), 0), BmError.INVALID_ARGUMENT,
         "BM_FreeSec", "junk"),
        (lambda: BM_BatchFreeSec([info.bm_id], 2, 0, ns, "sec"), BmError.INVALID_ARGUMENT, "BM_BatchFreeSec",
         "num"),
        (lambda: BM_MapSec(info, PROT_WRITE, 0)[0], BmError.INVALID_ARGUMENT, "BM_MapSec", "prot"),
        (lambda: BM_Unmap(info.bm_id, memoryview(bytearray(4))), BmError.INVALID_ARGUMENT, "BM_Unmap",
         "not a live mapping"),
        (lambda: BM_CreateNSSec("default", "bad name", 0, "sec"), BmError.INVALID_ARGUMENT, "BM_CreateNSSec",
         "name"),
        (lambda: BM_CreateNSSec("default", ns, 0, "sec"), BmError.NAMESPACE_EXISTS, "BM_CreateNSSec", ns),
        (lambda: BM_SpecificObjSwapInSec(DiskFileDesc(str(tmp_path / "none")), info, 0, 0, 1), BmError.IO_ERROR,
         "BM_SpecificObjSwapInSec", "none"),
        (lambda: BM_GatherSec([(info, 0, 8)], 99, 0, info)[0], BmError.INVALID_ARGUMENT, "BM_GatherSec", "99"),
        (lambda: BM_GatherSec([(info, 0, 8)], BmOperatorCode.SUM, 0, info, dtype="int33")[0],
         BmError.INVALID_ARGUMENT, "BM_GatherSec", "int33"),
        (lambda: BM_InitWithExtAttr(fabric.directory, 0, None), BmError.ALREADY_INITIALIZED,
         "BM_InitWithExtAttr", "BM_Exit"),
    ]
    for call, code, name, reason in failures:
        assert call() == code, (name, reason)
        message = BM_GetLastError()
        assert message.startswith(name + ": ") and reason in message, (message, reason)
    assert BM_ReadSec(info, 0, 1, bytearray(1), 0) == OK
    assert reason in BM_GetLastError(), "as errno: a success leaves the last failure's message"
    assert read_all(info) == bytes(info.size), "no failure above wrote a byte"


def test_last_error_is_per_thread(ns):
    import threading
    from memfabric.compat import BM_GetLastError
    info = alloc(ns, 4 * KiB)
    assert BM_ReadSec(info, 0, 5, bytearray(4), 0) == BmError.OUT_OF_RANGE
    seen = []

    def other() -> None:
        seen.append(BM_GetLastError())
        seen.append(BM_ExpandSec(info, 1, 0))
        seen.append(BM_GetLastError())
    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert seen[0] == "", "a thread that never failed has no message"
    assert seen[1] == BmError.INVALID_ARGUMENT and "BM_ExpandSec" in seen[2]
    assert "4-byte buffer" in BM_GetLastError(), "another thread's failure leaves this thread's message"


def test_last_error_without_a_session():
    from memfabric.compat import BM_GetLastError
    assert BM_Exit() == BmError.NOT_INITIALIZED
    assert BM_GetLastError().startswith("BM_Exit: ")
    assert BM_Init("/no/such/fabric") == BmError.INVALID_ARGUMENT
    assert BM_GetLastError().startswith("BM_Init: ") and "/no/such/fabric" in BM_GetLastError()


def test_threads_share_the_known_handles(ns, monkeypatch):
    """Readers and writers on many threads while another frees and allocates: every call
    answers OK or NO_SUCH_OBJECT (the object went), and the known handles stay within their
    bound."""
    import threading
    import memfabric.compat as compat
    monkeypatch.setattr(compat, "COMPAT_HANDLES_KEPT", 4)
    live = [alloc(ns, 8 * KiB) for _ in range(6)]
    codes: set[int] = set()
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        back = bytearray(4 * KiB)
        while not stop.is_set():
            info = live[int(rng.integers(len(live)))]
            fill = bytes([int(rng.integers(256))]) * (4 * KiB)
            codes.add(BM_WriteSec(info, 0, len(fill), fill, 0))
            codes.add(BM_ReadSec(info, 0, len(back), back, 0))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            slot = i % len(live)
            gone, live[slot] = live[slot], alloc(ns, 8 * KiB)
            assert BM_FreeSec(gone, 0) == OK
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert codes <= {OK, BmError.NO_SUCH_OBJECT}, codes
    assert len(compat._known._handles) <= 4

"""Every Pythonic BigMemory operation against a real fabric, data checked byte for byte.

Placements: `local` (the session's own server), `server` (the other server) and `spread`
(striped over both). Random data comes from numpy with a fixed seed per test.
"""

from __future__ import annotations

import tracemalloc
import uuid

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OperatorCode
from memfabric.errors import BmError, InvalidArgument, IOError_, NoSuchObject, OutOfMemory, OutOfRange
from ..helpers import KiB, MiB, ns_name, random_bytes, resident_bytes

PLACEMENTS = ("local", "server", "spread")


# ---- helpers -------------------------------------------------------------------------------


def server_ids(s: memfabric.Session) -> tuple[int, int]:
    """(this session's server, another live server)."""
    me = s.local.server_id
    others = [x["server_id"] for x in s.servers() if x["alive"] and x["server_id"] != me]
    assert others, f"the fabric should have a second live server: {s.servers()}"
    return me, others[0]


def affinity_for(s: memfabric.Session, kind: str) -> tuple[Affinity, set[int]]:
    """The affinity for a placement and the set of servers its extents must be on."""
    me, other = server_ids(s)
    if kind == "local":
        return Affinity("local"), {me}
    if kind == "server":
        return Affinity("server", server_id=other), {other}
    return Affinity("spread"), {me, other}


def home_of(bm: memfabric.BigMemory) -> int:
    return int(bm.bm_id.split("-")[0])


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def assert_same(got: bytes | np.ndarray, want: np.ndarray) -> None:
    got_a = as_array(got) if isinstance(got, (bytes, bytearray)) else np.asarray(got)
    assert got_a.shape == want.shape, f"{got_a.shape} bytes read, {want.shape} expected"
    bad = np.flatnonzero(got_a != want)
    assert bad.size == 0, f"{bad.size} bytes differ, first at {bad[:5].tolist()}"


# ---- fixtures ------------------------------------------------------------------------------




# ---- placement, read, write ------------------------------------------------------------------


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_write_read_roundtrip(session, ns, kind):
    affinity, servers = affinity_for(session, kind)
    size = 3 * MiB + 123
    bm = ns.alloc(size, affinity)
    assert bm.size == size
    assert {sid for sid, _ in bm.extents} == servers, bm.extents
    assert sum(n for _, n in bm.extents) >= size
    if kind == "server":
        assert home_of(bm) == next(iter(servers)), "an object placed on a server has its home there"

    # Fresh memory is zero.
    assert_same(bm.read(), np.zeros(size, np.uint8))

    data = random_bytes(size, seed=1)
    bm.write(data, 0)
    assert_same(bm.read(0, size), data)

    # Ranges crossing extent boundaries (1 MiB segments), read as bytes and into buffers.
    for offset, length in [(0, 1), (MiB - 7, 14), (MiB + 5, 2 * MiB), (size - 1, 1), (size, 0), (12345, 777)]:
        assert_same(bm.read(offset, length), data[offset:offset + length])
        into = np.full(length, 0xEE, np.uint8)
        assert bm.read(offset, into=into) is None
        assert_same(into, data[offset:offset + length])
    buf = bytearray(b"\xee" * 100)
    bm.read(MiB - 50, 60, into=buf)                 # length shorter than the buffer: the rest untouched
    assert bytes(buf[:60]) == data[MiB - 50:MiB + 10].tobytes()
    assert bytes(buf[60:]) == b"\xee" * 40

    # Writes at odd offsets from several buffer kinds, including typed and strided arrays.
    words = np.random.default_rng(2).integers(-2**31, 2**31, 1000, dtype=np.int32)
    bm.write(words, MiB - 2000)
    data[MiB - 2000:MiB + 2000] = words.view(np.uint8)
    bm.write(memoryview(b"hello"), 3)
    data[3:8] = np.frombuffer(b"hello", np.uint8)
    bm.write(bytearray(b"\x01\x02\x03"), size - 3)
    data[size - 3:] = [1, 2, 3]
    strided = random_bytes(4000, seed=3)[::2]
    bm.write(strided, 2 * MiB - 1000)
    data[2 * MiB - 1000:2 * MiB + 1000] = strided
    assert_same(bm.read(), data)
    back = np.empty(1000, np.int32)
    bm.read(MiB - 2000, into=back)
    assert np.array_equal(back, words)


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_read_without_a_buffer_copies_once(session, ns, kind):
    """read() with no `into` builds its bytes in one copy from the pool: at its peak it holds
    the result and nothing else of that size (tracemalloc sees every Python allocation).
    Reads larger than one 4 MiB chunk used to fill a bytearray first, then copy it."""
    affinity, _ = affinity_for(session, kind)
    size = 9 * MiB + 5
    bm = ns.alloc(size, affinity)
    data = random_bytes(size, seed=11)
    bm.write(data)
    for offset, length in [(0, None), (MiB - 3, 6 * MiB), (5, 3 * MiB)]:
        tracemalloc.start()
        try:
            got = bm.read(offset, length)
            peak_bytes = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        want = data[offset:] if length is None else data[offset:offset + length]
        assert type(got) is bytes
        assert_same(got, want)
        assert hash(got) == hash(want.tobytes()), "a bytes like any other"
        n = len(got)
        assert n <= peak_bytes < n + MiB, f"{peak_bytes} bytes held at once to read {n}"


def test_open_from_another_session_sees_the_same_bytes(fabric, session, ns):
    bm = ns.alloc(2 * MiB + 1, Affinity("spread"))
    data = random_bytes(bm.size, seed=4)
    bm.write(data)
    info = bm.info()
    assert info == {"bm_id": bm.bm_id, "pool": "default", "ns": ns.name, "size": bm.size}
    with memfabric.init(fabric.directory, server=1) as other:
        theirs = other.namespace(ns.name, f"sec-{ns.name}").open(bm.bm_id)
        assert theirs.size == bm.size and theirs.extents == bm.extents
        assert_same(theirs.read(), data)
        theirs.write(b"\xab" * 10, MiB - 5)
    data[MiB - 5:MiB + 5] = 0xAB
    assert_same(bm.read(), data)


def test_a_new_object_is_resident_before_its_first_write(session, ns):
    """A client maps whole segments lazily; alloc faults in just the new object's pages, so
    its first write runs at memcpy speed instead of faulting page by page."""
    bm = ns.alloc(16 * KiB, Affinity("server", session.local.server_id))
    [(_, segment, offset, length)] = bm._described.raw_extents
    segment_range = session.local._segments[("default", segment)].range   # a namespace's first: 64 KiB
    resident = resident_bytes(segment_range)
    assert length <= resident < segment_range.length, "the object's pages, not the whole segment"


# ---- map -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_map_gives_one_contiguous_view(session, ns, kind):
    affinity, _ = affinity_for(session, kind)
    size = 2 * MiB + 4096 + 10
    bm = ns.alloc(size, affinity)
    if kind == "spread":
        assert len(bm.extents) >= 2, f"a spread object of {size} bytes should have several extents"
    data = random_bytes(size, seed=5)
    bm.write(data)
    with bm.map(writable=True) as m:
        assert m.writable
        view = m.view
        assert view.nbytes == size and view.contiguous and not view.readonly
        arr = np.frombuffer(view, dtype=np.uint8)
        assert_same(arr, data)
        # Writes through the mapping are the object's bytes, across extent boundaries.
        patch = random_bytes(64 * KiB, seed=6)
        arr[MiB - 32 * KiB:MiB + 32 * KiB] = patch
        view[size - 4:] = b"tail"
        data[MiB - 32 * KiB:MiB + 32 * KiB] = patch
        data[size - 4:] = np.frombuffer(b"tail", np.uint8)
        assert_same(bm.read(), data)
        # And writes through the handle show in the mapping at once.
        bm.write(b"\x5a" * 100, 2 * MiB - 50)
        data[2 * MiB - 50:2 * MiB + 50] = 0x5A
        assert_same(arr, data)
        del arr
    with bm.map(writable=False) as ro:
        assert ro.view.readonly and not ro.writable
        assert_same(np.frombuffer(ro.view, np.uint8), data)
        with pytest.raises(TypeError):
            ro.view[0:1] = b"x"
    assert_same(bm.read(), data)


# ---- spread beyond one server --------------------------------------------------------------


def test_spread_object_bigger_than_one_server(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("big", sec_id="big")
        size = 12 * MiB + 1000
        # No single server has that much: local and server placements cannot hold it.
        with pytest.raises(OutOfMemory):
            ns.alloc(size, Affinity("local"))
        bm = ns.alloc(size, Affinity("spread"))
        per_server: dict[int, int] = {}
        for sid, n in bm.extents:
            per_server[sid] = per_server.get(sid, 0) + n
        assert len(per_server) == 2 and all(n <= 8 * MiB for n in per_server.values()), per_server
        assert sum(per_server.values()) >= size
        data = random_bytes(size, seed=7)
        bm.write(data)
        assert_same(bm.read(), data)
        with bm.map() as m:
            assert m.view.nbytes == size
            assert_same(np.frombuffer(m.view, np.uint8), data)
        assert [n.used_bytes for n in s.namespaces() if n.ns == "big"] == [size]
        bm.free()


# ---- expand ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_expand_keeps_contents_and_new_bytes_are_zero(fabric, session, ns, kind):
    affinity, _ = affinity_for(session, kind)
    size = MiB + 100
    bm = ns.alloc(size, affinity)
    data = random_bytes(size, seed=8)
    bm.write(data)
    with memfabric.init(fabric.directory, server=1) as other:
        theirs = other.namespace(ns.name, f"sec-{ns.name}").open(bm.bm_id)
        assert theirs.size == size

        new_size = 3 * MiB + 5
        bm.expand(new_size)
        assert bm.size == new_size
        assert sum(n for _, n in bm.extents) >= new_size
        got = as_array(bm.read())
        assert_same(got[:size], data)
        assert_same(got[size:], np.zeros(new_size - size, np.uint8))
        # The new bytes are usable, right up to the end.
        tail = random_bytes(new_size - size, seed=9)
        bm.write(tail, size)
        whole = np.concatenate([data, tail])
        assert_same(bm.read(), whole)
        # Another session's handle notices the growth and sees the same bytes.
        assert_same(theirs.read(), whole)
        assert theirs.size == new_size
        with bm.map() as m:
            assert m.view.nbytes == new_size
            assert_same(np.frombuffer(m.view, np.uint8), whole)


def test_expand_within_the_last_page_is_zero(ns):
    bm = ns.alloc(100)
    bm.write(b"\xff" * 100)
    bm.expand(4000)
    assert bm.read() == b"\xff" * 100 + bytes(3900)
    bm.expand(4096 * 3 + 1)
    assert bm.read() == b"\xff" * 100 + bytes(4096 * 3 + 1 - 100)
    with pytest.raises(InvalidArgument):
        bm.expand(50)           # expand never shrinks
    assert bm.size == 4096 * 3 + 1


# ---- copy ----------------------------------------------------------------------------------------


def test_copy_between_objects_on_different_servers(session, ns):
    me, other = server_ids(session)
    a = ns.alloc(2 * MiB + 17, Affinity("server", server_id=me))
    b = ns.alloc(2 * MiB + 17, Affinity("server", server_id=other))
    c = ns.alloc(3 * MiB, Affinity("spread"))
    assert {s for s, _ in a.extents} == {me} and {s for s, _ in b.extents} == {other}
    da, db, dc = random_bytes(a.size, 10), random_bytes(b.size, 11), random_bytes(c.size, 12)
    a.write(da), b.write(db), c.write(dc)

    a.copy_to(b, src_offset=1000, dst_offset=MiB - 3, length=MiB + 7)          # me -> other
    db[MiB - 3:2 * MiB + 4] = da[1000:1000 + MiB + 7]
    assert_same(b.read(), db)
    assert_same(a.read(), da)                                                   # source unchanged

    b.copy_to(a, length=b.size)                                                 # other -> me, whole
    da[:] = db
    assert_same(a.read(), da)

    c.copy_to(a, src_offset=MiB - 10, dst_offset=5, length=2 * MiB)             # spread -> me
    da[5:5 + 2 * MiB] = dc[MiB - 10:3 * MiB - 10]
    assert_same(a.read(), da)

    a.copy_to(c, src_offset=0, dst_offset=c.size - a.size, length=a.size)      # me -> spread
    dc[c.size - a.size:] = da
    assert_same(c.read(), dc)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_overlapping_copy_within_one_extent(ns, direction):
    bm = ns.alloc(512 * KiB)
    assert len(bm.extents) == 1
    data = random_bytes(bm.size, seed=13)
    bm.write(data)
    src, dst = (1000, 5000) if direction == "forward" else (5000, 1000)
    length = 200 * KiB
    bm.copy_to(bm, src_offset=src, dst_offset=dst, length=length)
    want = data.copy()
    want[dst:dst + length] = data[src:src + length]
    assert_same(bm.read(), want)


@pytest.mark.parametrize("size, src, dst, length, seed", [
    (3 * MiB, MiB // 2 + 3, 100, 2 * MiB, 14),          # to a lower offset
    (2 * MiB, 0, MiB // 2, MiB + MiB // 2, 15),         # to a higher offset
], ids=["to-lower-offset", "to-higher-offset"])
def test_overlapping_copy_across_extents(ns, size, src, dst, length, seed):
    bm = ns.alloc(size)
    if len(bm.extents) < 2:
        pytest.fail(f"a {size >> 20} MiB object should span several 1 MiB segments: {bm.extents}")
    data = random_bytes(bm.size, seed=seed)
    bm.write(data)
    bm.copy_to(bm, src_offset=src, dst_offset=dst, length=length)
    want = data.copy()
    want[dst:dst + length] = data[src:src + length]
    assert_same(bm.read(), want)


# ---- swap_in -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_swap_in_from_a_file(session, ns, kind, tmp_path):
    affinity, _ = affinity_for(session, kind)
    size = 2 * MiB + 300
    bm = ns.alloc(size, affinity)
    data = random_bytes(size, seed=16)
    bm.write(data)
    file_bytes = random_bytes(3 * MiB, seed=17)
    path = tmp_path / "source.bin"
    path.write_bytes(file_bytes.tobytes())

    n = bm.swap_in(str(path), file_offset=12345, offset=MiB - 100, length=MiB + 200)
    assert n == MiB + 200
    data[MiB - 100:2 * MiB + 100] = file_bytes[12345:12345 + MiB + 200]
    assert_same(bm.read(), data)

    # Without a length: as much as both the file (from file_offset) and the object (from offset) hold.
    n = bm.swap_in(str(path), file_offset=3 * MiB - 1000, offset=10)
    assert n == 1000
    data[10:1010] = file_bytes[3 * MiB - 1000:]
    assert_same(bm.read(), data)

    # A file too short for the range asked: OUT_OF_RANGE, and nothing written.
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x77" * 4096)
    with pytest.raises(OutOfRange) as err:
        bm.swap_in(str(short), file_offset=0, offset=0, length=8192)
    assert err.value.code == BmError.OUT_OF_RANGE
    with pytest.raises(OutOfRange):
        bm.swap_in(str(short), file_offset=4000, offset=0, length=100)
    # A range past the object's end: OUT_OF_RANGE too.
    with pytest.raises(OutOfRange):
        bm.swap_in(str(path), file_offset=0, offset=size - 10, length=11)
    # A file that does not exist: IO_ERROR.
    with pytest.raises(IOError_) as err:
        bm.swap_in(str(tmp_path / "missing.bin"), length=10)
    assert err.value.code == BmError.IO_ERROR
    assert_same(bm.read(), data)


# ---- gather --------------------------------------------------------------------------------


class GatherEnv:
    """Three 1.5 MiB inputs (here, on the other server, spread) and numpy copies of their bytes.

    Shared by the gather tests: a server that gathers from a peer keeps that peer's segments
    mapped (see the xfail in test_errors.py), so one namespace for all of them keeps the
    module's fabric from running out of lendable segments.
    """

    def __init__(self, session: memfabric.Session, ns: memfabric.Namespace) -> None:
        self.session, self.ns = session, ns
        size = MiB + MiB // 2
        self.objs = [ns.alloc(size, affinity_for(session, kind)[0]) for kind in PLACEMENTS]
        self.arrays = [random_bytes(size, seed=20 + i) for i in range(3)]
        for bm, arr in zip(self.objs, self.arrays):
            bm.write(arr)

    def fill(self, i: int, offset: int, values: np.ndarray) -> None:
        self.objs[i].write(values, offset)
        self.arrays[i][offset:offset + values.nbytes] = values.view(np.uint8)


@pytest.fixture(scope="module")
def gather_env(fabric):
    name = f"gather-{uuid.uuid4().hex[:8]}"
    with memfabric.init(fabric.directory, server=0) as s:
        env = GatherEnv(s, s.create_namespace(name, sec_id="g"))
        yield env
        s.destroy_namespace(name, "g")


def test_gather_concat(gather_env):
    env, ns = gather_env, gather_env.ns
    objs, arrays = env.objs, env.arrays
    pieces = [(objs[0], 7, 1000), (objs[1], MiB // 2 - 10, MiB), (objs[2], 0, objs[2].size), (objs[0], 0, 1)]
    out, length = ns.gather(pieces, OperatorCode.CONCAT)
    want = np.concatenate([arrays[0][7:1007], arrays[1][MiB // 2 - 10:MiB + MiB // 2 - 10], arrays[2],
                           arrays[0][:1]])
    assert length == want.size
    assert out.size >= length
    assert home_of(out) == env.session.local.server_id
    assert_same(as_array(out.read(0, length)), want)
    out.free()

    # Into an existing object, on the other server: written from offset 0, the rest untouched.
    me, other = server_ids(env.session)
    dst = ns.alloc(3 * MiB, Affinity("server", server_id=other))
    before = random_bytes(dst.size, seed=30)
    dst.write(before)
    got_dst, length = ns.gather(pieces[:2], OperatorCode.CONCAT, dst=dst)
    assert got_dst is dst and length == 1000 + MiB
    before[:length] = want[:length]
    assert_same(dst.read(), before)
    dst.free()


@pytest.mark.parametrize("op, reduce", [(OperatorCode.SUM, np.add), (OperatorCode.MIN, np.minimum),
                                         (OperatorCode.MAX, np.maximum)])
@pytest.mark.parametrize("dtype", ["int32", "uint8", "int64", "float64"])
def test_gather_reductions(gather_env, op, reduce, dtype):
    env = gather_env
    dt = np.dtype(dtype)
    length = 256 * KiB
    offsets = [0, MiB - 64 * KiB, 8 * KiB]       # the second range crosses an extent boundary
    rng = np.random.default_rng([int(op), dt.num])
    for i, offset in enumerate(offsets):
        if dt.kind == "f":
            env.fill(i, offset, rng.uniform(-1e6, 1e6, length // dt.itemsize).astype(dt))
        else:
            env.fill(i, offset, rng.integers(0, 256, length, dtype=np.uint8))
    typed = [env.arrays[i][offsets[i]:offsets[i] + length].view(dt) for i in range(3)]
    want = typed[0].copy()
    for t in typed[1:]:
        reduce(want, t, out=want)

    out, got_len = env.ns.gather([(env.objs[i], offsets[i], length) for i in range(3)], op, dtype=dtype)
    assert got_len == length
    result = np.frombuffer(out.read(0, length), dtype=dt)
    out.free()
    assert np.array_equal(result, want), f"{op.name} over {dtype} differs from numpy's"
    if op == OperatorCode.SUM and dt.kind in "iu" and dt.itemsize > 1:
        # The dtype matters: a byte-wise sum (carries dropped) would give other bytes.
        bytewise = typed[0].view(np.uint8) + typed[1].view(np.uint8) + typed[2].view(np.uint8)
        assert not np.array_equal(result.view(np.uint8), bytewise)


def test_gather_reduction_into_a_given_destination(gather_env):
    env = gather_env
    objs, arrays = env.objs, env.arrays
    dst = env.ns.alloc(64 * KiB, Affinity("spread"))
    dst.write(b"\xff" * dst.size)
    got, length = env.ns.gather([(objs[1], 4, 4096), (objs[2], 4 * KiB, 4096)], OperatorCode.SUM, dst=dst,
                                dtype="int32")
    assert got is dst and length == 4096
    want = arrays[1][4:4100].view(np.int32) + arrays[2][4 * KiB:8 * KiB].view(np.int32)
    assert np.array_equal(np.frombuffer(dst.read(0, 4096), np.int32), want)
    assert dst.read(4096) == b"\xff" * (dst.size - 4096)
    dst.free()


def test_gather_reduction_needs_equal_lengths_of_whole_elements(gather_env):
    objs, ns = gather_env.objs, gather_env.ns
    with pytest.raises(InvalidArgument):
        ns.gather([(objs[0], 0, 8), (objs[1], 0, 12)], OperatorCode.SUM, dtype="int32")
    with pytest.raises(InvalidArgument):
        ns.gather([(objs[0], 0, 6), (objs[1], 0, 6)], OperatorCode.SUM, dtype="int32")
    with pytest.raises(InvalidArgument):
        ns.gather([(objs[0], 0, 8)], OperatorCode.SUM, dtype="complex64")


# ---- free, batch_free, namespaces ------------------------------------------------------------


def test_free_then_the_handle_and_the_id_are_dead(ns):
    bm = ns.alloc(10 * KiB)
    bm.write(b"abc")
    bm_id = bm.bm_id
    bm.free()
    with pytest.raises(NoSuchObject):
        bm.read(0, 3)
    with pytest.raises(NoSuchObject):
        ns.open(bm_id)


def test_batch_free_reports_per_id(session, ns):
    _, other = server_ids(session)
    here = ns.alloc(4096)
    there = ns.alloc(4096, Affinity("server", server_id=other))
    spread = ns.alloc(3 * MiB, Affinity("spread"))
    gone = ns.alloc(4096)
    gone_id = gone.bm_id
    gone.free()
    survivor = ns.alloc(4096)
    survivor.write(b"still here")

    ids = [here.bm_id, "not-an-id", there.bm_id, gone_id, spread.bm_id, here.bm_id, "1-0-0"]
    codes = ns.batch_free(ids)
    assert codes == [0, BmError.INVALID_ARGUMENT, 0, BmError.NO_SUCH_OBJECT, 0, BmError.NO_SUCH_OBJECT,
                     BmError.INVALID_ARGUMENT]
    for bm in (here, there, spread):
        with pytest.raises(NoSuchObject):
            bm.read(0, 1)
        with pytest.raises(NoSuchObject):
            ns.open(bm.bm_id)
    assert survivor.read(0, 10) == b"still here"
    assert ns.batch_free([]) == []
    info = {n.ns: n for n in session.namespaces()}[ns.name]
    assert (info.object_count, info.used_bytes) == (1, 4096)


def test_namespaces_counts(session, request):
    name = ns_name(request)
    ns = session.create_namespace(name, sec_id="k", attribute=42)
    try:
        info = {n.ns: n for n in session.namespaces()}[name]
        assert (info.pool, info.attribute, info.object_count, info.used_bytes) == ("default", 42, 0, 0)
        _, other = server_ids(session)
        a = ns.alloc(1000)
        b = ns.alloc(MiB + 1, Affinity("server", server_id=other))
        c = ns.alloc(3 * MiB, Affinity("spread"))
        info = {n.ns: n for n in session.namespaces()}[name]
        assert (info.object_count, info.used_bytes) == (3, 1000 + MiB + 1 + 3 * MiB)
        b.expand(2 * MiB)
        a.free()
        info = {n.ns: n for n in session.namespaces()}[name]
        assert (info.object_count, info.used_bytes) == (2, 2 * MiB + 3 * MiB)
        c.free()
        b.free()
        info = {n.ns: n for n in session.namespaces()}[name]
        assert (info.object_count, info.used_bytes) == (0, 0)
    finally:
        session.destroy_namespace(name, "k")
    assert name not in {n.ns for n in session.namespaces()}

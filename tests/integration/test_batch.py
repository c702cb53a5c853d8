"""Batches across objects (Session.read_many / write_many, compat's BM_BatchReadSec and
BM_BatchWriteSec), on one host (memcpy, no round trip) and over RPC (one request per server):
the same bytes as single reads and writes, every item checked before a byte moves, one
result per item, and the limits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memfabric
from memfabric import Affinity, BmError
from memfabric import compat as C
from memfabric.bigmemory import batch
from memfabric.datapath.rpc_link import RpcLink
from memfabric.errors import InvalidArgument, LimitExceeded, NotInitialized, OutOfRange
from memfabric.limits import MAX_BATCH_ITEMS, MAX_BATCH_REQUEST_BYTES, MAX_BATCH_SPANS_PER_REQUEST

from ..conftest import short_tmp_dir
from ..helpers import KiB, MiB, WAIT_S, random_bytes, stop_process
from memfabric.launcher import LocalFabric, wait_for_line

FREED = int(BmError.NO_SUCH_OBJECT)
GONE = int(BmError.SERVER_UNAVAILABLE)


@pytest.fixture(scope="module")
def batch_fabric():
    """Two servers; clients on this host use memcpy, clients with remote.toml use RPC."""
    fab = LocalFabric(short_tmp_dir("mf-batch-"), servers=2, capacity="64MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0).start()
    yield fab
    assert fab.stop() == 0


def open_session(fab, path: str):
    return memfabric.init(fab.directory if path == "ipc" else os.path.join(fab.directory, "remote.toml"))


@pytest.fixture(scope="module", params=["ipc", "ipc-python", "rpc"])
def objects(batch_fabric, request):
    """A session (same host, or over RPC) with objects of every shape: small ones on each
    server, one larger than a segment, one spread over both servers (several pieces).
    "ipc-python": the same host without the compiled copies (_native.c), the Python way."""
    path = request.param.removesuffix("-python")
    with open_session(batch_fabric, path) as s, pytest.MonkeyPatch.context() as patch:
        if request.param.endswith("-python"):
            patch.setattr(batch, "_native", None)
        name = f"objects-{request.param}"
        ns = s.create_namespace(name, sec_id="k")
        try:
            objs = [ns.alloc(size, Affinity("server", server)) for size, server in
                    [(4 * KiB, 1), (4 * KiB, 2), (10_000, 1), (64 * KiB, 2), (3 * MiB + 5, 1)]]
            objs.append(ns.alloc(5 * MiB, Affinity("spread")))
            assert {server for server, _ in objs[-1].extents} == {1, 2}
            for i, bm in enumerate(objs):
                bm.write(random_bytes(bm.size, i))
            yield path, s, ns, objs
        finally:
            ns.destroy()


def item_strategy(sizes: list[int]):
    """(object index, offset, length) inside that object, lengths 0..the rest of it."""
    return st.integers(0, len(sizes) - 1).flatmap(
        lambda k: st.integers(0, sizes[k]).flatmap(
            lambda off: st.tuples(st.just(k), st.just(off), st.integers(0, min(sizes[k] - off, 256 * KiB)))))


SIZES = [4 * KiB, 4 * KiB, 10_000, 64 * KiB, 3 * MiB + 5, 5 * MiB]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(item_strategy(SIZES), min_size=1, max_size=40), seed=st.integers(0, 1 << 30))
def test_a_batch_moves_what_single_reads_and_writes_do(objects, items, seed):
    """write_many then read_many of random items (overlaps too: later items win, as writes in
    order would) agree byte for byte with single write() and read() calls."""
    _, s, _, objs = objects
    assert [bm.size for bm in objs] == SIZES
    rng = np.random.default_rng(seed)
    # Overlapping writes have no promised order within a batch: write disjoint ranges only.
    taken: dict[int, list[tuple[int, int]]] = {}
    disjoint = []
    for k, off, n in items:
        if all(off + n <= a or b <= off for a, b in taken.get(k, [])):
            taken.setdefault(k, []).append((off, off + n))
            disjoint.append((k, off, n))
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _, _, n in disjoint]
    assert s.write_many([(objs[k], off, n, d) for (k, off, n), d in zip(disjoint, data)]) == [0] * len(disjoint)
    for (k, off, n), d in zip(disjoint, data):
        assert objs[k].read(off, n) == d.tobytes()
    # Reads of any items, overlapping or not, into numpy arrays and bytearrays.
    outs = [np.full(n, 0xAB, dtype=np.uint8) if i % 2 else bytearray(b"\xab" * n) for i, (_, _, n) in enumerate(items)]
    assert s.read_many([(objs[k], off, n, out) for (k, off, n), out in zip(items, outs)]) == [0] * len(items)
    for (k, off, n), out in zip(items, outs):
        assert bytes(out) == objs[k].read(off, n)


def test_lengths_default_to_the_buffer_and_cut_it(objects):
    _, s, _, objs = objects
    a, b = objs[0], objs[2]
    assert s.write_many([(a, 100, None, b"hello"), (b, 9_990, 3, b"xyz-not-this")]) == [0, 0]
    assert a.read(100, 5) == b"hello" and b.read(9_990, 4) == b"xyz" + b.read(9_993, 1)
    out = bytearray(8)
    assert s.read_many([(a, 100, 5, out)]) == [0]
    assert out[:5] == b"hello" and out[5:] == bytes(3)


def test_a_freed_object_fails_its_item_and_no_other(batch_fabric, objects):
    path, s, ns, objs = objects
    doomed = ns.alloc(4 * KiB, Affinity("server", 2))
    doomed.write(b"d" * 4096)
    bufs = [bytearray(4096) for _ in range(3)]
    doomed.free()
    assert s.read_many([(objs[0], 0, 4096, bufs[0]), (doomed, 0, 4096, bufs[1]), (objs[1], 0, 4096, bufs[2])]) \
        == [0, FREED, 0]
    assert bufs[0] == objs[0].read(0, 4096) and bufs[2] == objs[1].read(0, 4096)
    assert s.write_many([(doomed, 0, 4, b"late"), (objs[2], 0, 4, b"kept")]) == [FREED, 0]
    assert objs[2].read(0, 4) == b"kept"
    # Another process's handle on the same object: freed there, seen here.
    with open_session(batch_fabric, path) as other:
        theirs = other.namespace(ns.name, "k").open(objs[3].bm_id)
        victim = ns.alloc(8 * KiB, Affinity("server", 1))
        mine = other.namespace(ns.name, "k").open(victim.bm_id)
        victim.free()
        got = other.read_many([(theirs, 0, 16, bytearray(16)), (mine, 0, 16, bytearray(16))])
        assert got == [0, FREED]


def test_every_item_is_checked_before_anything_moves(objects):
    _, s, _, objs = objects
    a, b = objs[0], objs[1]
    before_a, before_b = a.read(0, 4096), b.read(0, 4096)
    good = (a, 0, 4, b"AAAA")
    bad_items = [
        ((b, 4093, 4, b"BBBB"), OutOfRange, "item 1"),               # past the end
        ((b, -1, 4, b"BBBB"), OutOfRange, "item 1"),
        ((b, 0, 5, b"BBBB"), InvalidArgument, "does not fit"),       # longer than its buffer
        ((b, 0, 4.0, b"BBBB"), InvalidArgument, "length"),
        ((b, "0", 4, b"BBBB"), InvalidArgument, "offset"),
        ((b, 0, 4, 1234), InvalidArgument, "buffer"),
        (("1-2-3", 0, 4, b"BBBB"), InvalidArgument, "BigMemory"),
        ((b, 0, 4), InvalidArgument, "expected"),
        (None, InvalidArgument, "expected"),
    ]
    for bad, error, words in bad_items:
        with pytest.raises(error, match=words):
            s.write_many([good, bad])
        assert a.read(0, 4096) == before_a and b.read(0, 4096) == before_b, f"{bad!r} let a write through"
    out = bytearray(b"\xee" * 4)
    for bad, error, words in [((b, 0, 4, b"read-only"), InvalidArgument, "read-only"),
                              ((b, 0, 4, np.zeros(8, dtype=np.uint8)[::2]), InvalidArgument, "contiguous"),
                              ((b, 4096, 1, bytearray(1)), OutOfRange, "outside")]:
        with pytest.raises(error, match=words):
            s.read_many([(a, 0, 4, out), bad])
        assert out == b"\xee" * 4, f"{bad!r} let a read through"
    with pytest.raises(InvalidArgument, match="list"):
        s.read_many(5)


def test_a_refused_batch_lets_its_buffers_go(objects):
    """The compiled plan holds the callers' buffers from its checks to its copies: a batch
    refused in between gives them back at once (a bytearray can grow again)."""
    _, s, _, objs = objects
    out = bytearray(16)
    with pytest.raises(OutOfRange):
        s.read_many([(objs[0], 0, 16, out), (objs[1], 4096, 1, bytearray(1))])
    out.extend(b"x")
    assert s.read_many([(objs[0], 0, 16, out)]) == [0] and out[:16] == objs[0].read(0, 16)
    out.extend(b"y")
    assert s.read_many([[objs[0], 0, None, np.zeros(2, dtype=np.float64)]]) == [0]


def test_a_handle_of_another_session_is_refused(batch_fabric, objects):
    path, s, ns, objs = objects
    with open_session(batch_fabric, path) as other:
        theirs = other.namespace(ns.name, "k").open(objs[0].bm_id)
        with pytest.raises(InvalidArgument, match="another session"):
            s.read_many([(objs[1], 0, 4, bytearray(4)), (theirs, 0, 4, bytearray(4))])


def test_a_closed_session_refuses_batches(batch_fabric):
    s = memfabric.init(batch_fabric.directory)
    s.close()
    with pytest.raises(NotInitialized):
        s.read_many([])


def test_an_empty_batch_and_empty_items(objects):
    _, s, _, objs = objects
    assert s.read_many([]) == [] and s.write_many(()) == []
    assert s.read_many([(objs[0], 4096, 0, bytearray())]) == [0]
    assert s.write_many(iter([(objs[0], 0, 0, b"")])) == [0]


def test_the_items_per_call_limit(objects):
    _, s, _, objs = objects
    with pytest.raises(LimitExceeded, match=str(MAX_BATCH_ITEMS)):
        s.read_many([(objs[0], 0, 1, bytearray(1))] * (MAX_BATCH_ITEMS + 1))
    assert s.read_many([(objs[0], 0, 1, bytearray(1))] * MAX_BATCH_ITEMS) == [0] * MAX_BATCH_ITEMS


def test_large_shares_go_as_several_requests(objects, monkeypatch):
    """More spans or bytes for one server than one request holds: several requests, pipelined,
    and still the same bytes (the client's bounds made small here; the server's hold)."""
    path, s, _, objs = objects
    if path != "rpc":
        pytest.skip("requests exist only over RPC")
    monkeypatch.setattr(batch, "MAX_BATCH_SPANS_PER_REQUEST", 7)
    monkeypatch.setattr(batch, "MAX_BATCH_REQUEST_BYTES", 100 * KiB)
    sent = []
    real_send = RpcLink._send

    def counting_send(self, pending, *rest, **kwargs):
        if pending.op in (batch.READ_OP, batch.WRITE_OP):
            sent.append((self.server_id, pending.op, len(pending.args["spans"]) // 4))
        return real_send(self, pending, *rest, **kwargs)
    monkeypatch.setattr(RpcLink, "_send", counting_send)
    small = [(objs[k % 2], (k * 64) % 4000, 64) for k in range(30)]          # 15 spans per server
    big = [(objs[4], 0, 3 * MiB + 5), (objs[5], 17, 5 * MiB - 17)]          # > 100 KiB each
    items = small + big
    data = [random_bytes(n, k) for k, (_, _, n) in enumerate(items)]
    # Disjoint small writes: each (object, offset) once.
    assert len({(id(bm), off) for bm, off, _ in small}) == len(small)
    assert s.write_many([(bm, off, n, d) for (bm, off, n), d in zip(items, data)]) == [0] * len(items)
    assert all(count <= 7 for _, _, count in sent)
    assert len(sent) >= 2 * (15 // 7 + 1) + (3 * MiB) // (100 * KiB)
    for (bm, off, n), d in zip(items, data):
        assert bm.read(off, n) == d.tobytes()
    outs = [np.empty(n, dtype=np.uint8) for _, _, n in items]
    assert s.read_many([(bm, off, n, out) for (bm, off, n), out in zip(items, outs)]) == [0] * len(items)
    assert all(np.array_equal(out, d) for out, d in zip(outs, data))


def test_the_server_refuses_malformed_batch_requests_and_serves_on(batch_fabric, objects):
    """Bad batch requests get precise errors (never INTERNAL_ERROR); the connection goes on."""
    path, s, ns, objs = objects
    if path != "rpc":
        pytest.skip("batch requests exist only over RPC")
    link = s.link(1)
    bm = objs[0]
    seg = bm._layout.pieces[0][2].segment
    base = bm._layout.pieces[0][3]
    creds = [list(ns.creds)]
    good = {"creds": creds, "objects": [[0, bm.bm_id]], "spans": [0, seg, base, 16]}
    cases = [
        ({**good, "spans": [0, seg, base]}, BmError.INVALID_ARGUMENT),
        ({**good, "spans": [0, seg, base, "16"]}, BmError.INVALID_ARGUMENT),
        ({**good, "spans": [0, seg, base, 0]}, BmError.INVALID_ARGUMENT),
        ({**good, "spans": [1, seg, base, 16]}, BmError.INVALID_ARGUMENT),
        ({**good, "spans": [0, seg, base, 16] * (MAX_BATCH_SPANS_PER_REQUEST + 1)}, BmError.LIMIT_EXCEEDED),
        ({**good, "spans": [0, seg, base, MAX_BATCH_REQUEST_BYTES + 1]}, BmError.LIMIT_EXCEEDED),
        ({**good, "objects": [[5, bm.bm_id]]}, BmError.INVALID_ARGUMENT),
        ({**good, "objects": [[0, "not-an-id"]]}, BmError.INVALID_ARGUMENT),
        ({**good, "creds": [["default", ns.name]]}, BmError.INVALID_ARGUMENT),
        ({**good, "creds": "x"}, BmError.INVALID_ARGUMENT),
    ]
    for header, code in cases:
        rid, pending = link.submit(batch.READ_OP, dict(header), into=[memoryview(bytearray(16))])
        with pytest.raises(memfabric.MemfabricError) as caught:
            link.wait(rid, pending, batch.READ_OP)
        assert caught.value.code == code, header
    # A write whose payload does not match its spans: refused, its payload drained.
    rid, pending = link.submit(batch.WRITE_OP, dict(good), payload=[memoryview(b"x" * 20)])
    with pytest.raises(memfabric.ProtocolError):
        link.wait(rid, pending, batch.WRITE_OP)
    # Spans outside the object, a wrong secId: those spans fail, the others are served.
    into = [memoryview(bytearray(16)) for _ in range(3)]
    header = {"creds": creds + [[ns.pool, ns.name, b"wrong"]], "objects": [[0, bm.bm_id], [1, bm.bm_id]],
              "spans": [0, seg, base + 4096 * 4096, 16, 0, seg, base, 16, 1, seg, base, 16]}
    rid, pending = link.submit(batch.READ_OP, header, into=into)
    reply = link.wait(rid, pending, batch.READ_OP)
    assert reply["failed"] == [0, 2]
    assert reply["codes"] == [int(BmError.OUT_OF_RANGE), int(BmError.PERMISSION_DENIED)]
    assert bytes(into[1]) == bm.read(0, 16) and bytes(into[0]) == bytes(16)
    assert not link.closed and s.read_many([(bm, 0, 16, bytearray(16))]) == [0]


def test_a_server_killed_mid_batch_fails_its_items_only(fresh_fabric):
    """Server 2 stopped, then killed while a batch waits for it: its items get
    SERVER_UNAVAILABLE, server 1's are done, over RPC and on one host."""
    fab = fresh_fabric(servers=2, capacity="16MiB")
    pids = fab.server_pids()
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=20) as s:
        ns = s.create_namespace("killed", sec_id="k")
        on = {server: [ns.alloc(4 * KiB, Affinity("server", server)) for _ in range(4)] for server in (1, 2)}
        for server, objs in on.items():
            for i, bm in enumerate(objs):
                bm.write(bytes([server * 10 + i]) * 4096)
        items = [(bm, 0, 4096, bytearray(4096)) for server in (1, 2) for bm in on[server]]
        writes = [(bm, 0, 4096, bytes([99]) * 4096) for server in (1, 2) for bm in on[server]]
        stop_process(pids[2])
        outcome: dict[str, list[int]] = {}

        def run() -> None:
            outcome["read"] = s.read_many(items)
            outcome["write"] = s.write_many(writes)
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the batch finished although server 2 is stopped"
        os.kill(pids[2], signal.SIGKILL)
        os.kill(pids[2], signal.SIGCONT)
        worker.join(WAIT_S)
        assert not worker.is_alive(), "the batch did not end after its server was killed"
        assert outcome["read"][:4] == [0] * 4 and all(code in (GONE, int(BmError.TIMEOUT))
                                                      for code in outcome["read"][4:])
        assert [bytes(buf) for _, _, _, buf in items[:4]] == [bytes([10 + i]) * 4096 for i in range(4)]
        assert outcome["write"][:4] == [0] * 4 and all(outcome["write"][4:])
        assert all(bm.read(0, 4096) == bytes([99]) * 4096 for bm in on[1])


def test_compat_batch_read_and_write(batch_fabric):
    assert C.BM_Init(batch_fabric.directory) == 0
    try:
        assert C.BM_CreateNSSec("default", "compat-batch", 0, "k") == 0
        infos = [C.BmInfo(ns="compat-batch", sec_id="k") for _ in range(3)]
        for info in infos:
            assert C.BM_AllocSec(info, 4096, 0, None) == 0
        items = [C.BmBatchItem(info, 8, 5, f"data{i}".encode()) for i, info in enumerate(infos)]
        results: list[int] = []
        assert C.BM_BatchWriteSec(items, 3, 0, results) == 0 and results == [0, 0, 0]
        outs = [bytearray(5) for _ in infos]
        assert C.BM_BatchReadSec([(info, 8, 5, out) for info, out in zip(infos, outs)], 3, 0, results) == 0
        assert outs == [b"data0", b"data1", b"data2"]
        # A freed object fails its item; the rest go; the first failure's code is returned.
        assert C.BM_FreeSec(infos[1], 0) == 0
        outs = [bytearray(5) for _ in infos]
        code = C.BM_BatchReadSec([(info, 8, 5, out) for info, out in zip(infos, outs)], 3, 0, results)
        assert code == FREED and results == [0, FREED, 0] and outs[2] == b"data2"
        # A bad item: its code for every item, nothing moved.
        assert C.BM_BatchWriteSec([(infos[0], 8, 5, b"XXXXX"), (infos[2], 4095, 5, b"YYYYY")], 2, 0, results) \
            == int(BmError.OUT_OF_RANGE)
        assert results == [int(BmError.OUT_OF_RANGE)] * 2
        assert C.BM_ReadSec(infos[0], 8, 5, outs[0], 0) == 0 and outs[0] == b"data0"
        assert C.BM_BatchReadSec([(infos[0], 0, 1, bytearray(1))], 2, 0) == int(BmError.INVALID_ARGUMENT)
        assert C.BM_DestroyNSSec("default", "compat-batch", "k") == 0
    finally:
        C.BM_Exit()


@pytest.mark.parametrize("path", ["ipc", "rpc"])
def test_threads_share_a_session_for_batches_while_objects_come_and_go(batch_fabric, path):
    """Batches from four threads of one session at once, while a fifth frees and makes objects
    that also ride in the batches: every item of a live object is right, a freed one says so."""
    with open_session(batch_fabric, path) as s:
        ns = s.create_namespace(f"threads-{path}", sec_id="k")
        try:
            mine = {t: [ns.alloc(8 * KiB, Affinity("server", 1 + i % 2)) for i in range(16)] for t in range(4)}
            churn = [ns.alloc(4 * KiB, Affinity("server", 1 + i % 2)) for i in range(8)]
            errors: list[str] = []
            stop = threading.Event()

            def worker(t: int) -> None:
                try:
                    for round_ in range(15):
                        data = [bytes([(t * 31 + round_ + i) % 256]) * (8 * KiB) for i in range(16)]
                        victims = list(churn)
                        codes = s.write_many([(bm, 0, None, d) for bm, d in zip(mine[t], data)]
                                             + [(v, 0, 16, b"c" * 16) for v in victims])
                        if codes[:16] != [0] * 16 or not set(codes[16:]) <= {0, FREED}:
                            errors.append(f"thread {t} write: {codes}")
                        outs = [bytearray(8 * KiB) for _ in range(16)]
                        codes = s.read_many([(bm, 0, None, out) for bm, out in zip(mine[t], outs)]
                                            + [(v, 0, 16, bytearray(16)) for v in victims])
                        if codes[:16] != [0] * 16 or outs != data or not set(codes[16:]) <= {0, FREED}:
                            errors.append(f"thread {t} read: {codes[:16]} {outs == data}")
                except Exception as exc:      # the test's own failure, reported below
                    errors.append(f"thread {t}: {exc!r}")

            def churner() -> None:
                while not stop.is_set():
                    victim = churn.pop(0)
                    victim.free()
                    churn.append(ns.alloc(4 * KiB))
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            turner = threading.Thread(target=churner)
            for thread in threads + [turner]:
                thread.start()
            for thread in threads:
                thread.join(60)
            stop.set()
            turner.join(WAIT_S)
            assert not any(thread.is_alive() for thread in threads + [turner])
            assert not errors, errors[:5]
        finally:
            ns.destroy()


@contextlib.contextmanager
def file_pool_over_rpc(medium: str):
    """A server with a `keep` pool of `medium` that also listens for RPC; yields (the
    server, the path of a remote.toml for it)."""
    from .test_persistence import PersistentServer
    srv = PersistentServer(medium)
    token = os.path.join(srv.dir, "token")
    with open(token, "w") as f:
        f.write("t" * 64 + "\n")
    os.chmod(token, 0o600)
    with open(srv.config) as f:
        config = f.read()
    config = config.replace("[server]\n", '[server]\nrpc_listen = "127.0.0.1:0"\n')
    config = config.replace("[cluster]\n", f'[cluster]\ntoken_file = "{token}"\n')
    with open(srv.config, "w") as f:
        f.write(config)
    srv.proc = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", srv.config],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        wait_for_line(srv.proc, " ready ", 30, lines)
        address = next(part.split("=", 1)[1] for part in lines[-1].split() if part.startswith("rpc="))
        remote = os.path.join(srv.dir, "remote.toml")
        with open(remote, "w") as f:
            f.write(f'[cluster]\ntoken_file = "{token}"\n\n[[servers]]\nrpc_address = "{address}"\n')
        yield srv, remote
    finally:
        srv.cleanup()


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_batches_over_rpc_to_file_segments(medium):
    """A server never maps its file segments: a batch's spans there go through buffers
    (read before the reply, written after the payload), with the same bytes as single calls."""
    with file_pool_over_rpc(medium) as (_, remote):
        with memfabric.init(remote) as s:
            assert not s.local.is_local
            ns = s.create_namespace("files", sec_id="k", pool="keep")
            objs = [ns.alloc(size) for size in (4 * KiB, 10_000, 2 * MiB + 3)]
            data = [random_bytes(bm.size, i) for i, bm in enumerate(objs)]
            items = [(bm, 0, None, d) for bm, d in zip(objs, data)] + [(objs[2], 5, 7, b"seven77")]
            assert s.write_many(items[:3]) == [0, 0, 0]
            assert all(bm.read() == d.tobytes() for bm, d in zip(objs, data))
            outs = [bytearray(bm.size) for bm in objs]
            assert s.read_many([(bm, 0, None, out) for bm, out in zip(objs, outs)]) == [0, 0, 0]
            assert all(out == d.tobytes() for out, d in zip(outs, data))
            assert s.write_many(items[3:]) == [0] and objs[2].read(5, 7) == b"seven77"


def test_a_file_cut_short_fails_its_spans_and_the_connection_goes_on():
    """A same-host client of a ramdisk pool truncates a segment file it was handed: a remote
    batch read of an object there gets IO_ERROR for that item (the others are read), a lone
    remote read gets IO_ERROR, and the connection serves on."""
    with file_pool_over_rpc("ramdisk") as (srv, remote):
        with memfabric.init(srv.config) as here, memfabric.init(remote) as there:
            ns = here.create_namespace("cut", sec_id="k", pool="keep")
            cut = ns.alloc(4 * KiB)
            whole = ns.alloc(1 * MiB)            # a segment of its own
            cut.write(b"c" * 4096)
            whole.write(b"w" * MiB)
            (server, segment, _, _), = cut._described.raw_extents
            assert segment not in {e[1] for e in whole._described.raw_extents}
            os.ftruncate(here.link(server).segment_fd(ns.creds, segment), 0)
            theirs = there.namespace("cut", sec_id="k", pool="keep")
            far_cut, far_whole = theirs.open(cut.bm_id), theirs.open(whole.bm_id)
            outs = [bytearray(4096), bytearray(4096)]
            assert there.read_many([(far_cut, 0, None, outs[0]), (far_whole, 0, None, outs[1])]) \
                == [int(BmError.IO_ERROR), 0]
            assert outs[1] == b"w" * 4096
            with pytest.raises(memfabric.errors.IOError_):
                far_cut.read(0, 16)
            assert far_whole.read(MiB - 4, 4) == b"wwww" and not there.local.closed



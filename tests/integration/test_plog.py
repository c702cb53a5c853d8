"""MemPlog through the public API, from a client on the servers' host (IPC) and from one that
reaches them over RPC only: every operation, records of every size, full and sealed plogs,
wrong secIds, dram pools, bad arguments."""

from __future__ import annotations

import os

import numpy as np
import pytest

import memfabric
from memfabric import BmError
from memfabric.errors import (InvalidArgument, NoSuchObject, OutOfRange, OutOfSpace, PermissionDenied, Sealed)
from memfabric.launcher import LocalFabric
from memfabric.limits import MAX_PLOG_BATCH, MAX_PLOG_RECORD_BYTES
from memfabric.plog.record import HEADER_BYTES, frame_bytes

from ..conftest import short_tmp_dir
from ..helpers import ns_name

MiB = 1 << 20


@pytest.fixture(scope="module")
def plog_fabric():
    """Two servers, each with a dram pool (default) and a ramdisk pool (logs)."""
    fab = LocalFabric(short_tmp_dir("mf-plog-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:96MiB"]).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def session(fab: LocalFabric, where: str) -> memfabric.Session:
    if where == "same-host":
        return memfabric.init(fab.directory)
    return memfabric.init(os.path.join(fab.directory, "remote.toml"))


@pytest.fixture(params=["same-host", "remote"])
def where(request):
    return request.param


@pytest.fixture
def ns(plog_fabric, where, request):
    with session(plog_fabric, where) as s:
        assert s.home().is_local == (where == "same-host")
        yield s.create_namespace(ns_name(request), sec_id="plog-secret", pool="logs")


def test_every_operation(ns):
    log = ns.create_plog("wal", 1 * MiB)
    info = log.info()
    assert {k: info[k] for k in ("name", "capacity", "length", "records", "state", "replicas", "dead_replicas")} \
        == {"name": "wal", "capacity": MiB, "length": 0, "records": 0, "state": "open", "replicas": 1,
            "dead_replicas": []}
    payloads = [b"first", b"", b"x" * 1000, np.arange(100, dtype=np.int64), bytearray(b"ba"), memoryview(b"mv")]
    offsets = [log.append(p) for p in payloads]
    assert offsets[0] == HEADER_BYTES
    assert all(a < b for a, b in zip(offsets, offsets[1:]))
    expected = [bytes(memoryview(p).cast("B")) if not isinstance(p, np.ndarray) else p.tobytes() for p in payloads]
    for i, (offset, data) in enumerate(zip(offsets, expected)):
        assert log.record(i) == data
        assert log.read(offset, len(data)) == data
    assert list(log.records()) == expected
    assert list(log.records(2, 2)) == expected[2:4]
    assert list(log.records(len(expected))) == []
    more = log.append_many([b"a", b"bb", np.uint8([1, 2, 3])])
    assert more[0] > offsets[-1] and more == sorted(more)
    assert log.record(len(expected) + 2) == b"\x01\x02\x03"
    out = bytearray(10)
    assert log.read(more[1], 2, into=out) is None and out[:2] == b"bb"
    info = log.info()
    assert info["records"] == len(expected) + 3
    assert info["length"] == more[-1] - HEADER_BYTES + frame_bytes(3)
    # Raw bytes: the whole log so far reads back, headers and all.
    raw = log.read(0, info["length"])
    assert raw[offsets[0]:offsets[0] + 5] == b"first"
    again = ns.plog("wal")
    assert again.record(0) == b"first" and again.info() == info
    assert [p["name"] for p in ns.plogs()] == ["wal"] and ns.plogs()[0]["records"] == info["records"]
    sealed = log.seal()
    assert sealed["state"] == "sealed" and sealed["records"] == info["records"]
    assert again.seal()["state"] == "sealed"            # sealing twice is no error
    with pytest.raises(Sealed):
        again.append(b"late")
    assert log.record(0) == b"first"                    # reads go on
    log.delete()
    with pytest.raises(NoSuchObject):
        log.info()
    with pytest.raises(NoSuchObject):
        ns.plog("wal")
    assert ns.plogs() == []


def test_large_records_and_batches(ns):
    rng = np.random.default_rng(5)
    log = ns.create_plog("big", 40 * MiB)
    sizes = [192 << 10, (192 << 10) + 1, 1 * MiB, 3 * MiB + 5]
    records = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    offsets = [log.append(r) for r in records]
    for i, (offset, r) in enumerate(zip(offsets, records)):
        assert log.record(i) == r.tobytes()
        out = np.empty(r.size, np.uint8)
        log.read(offset, r.size, into=out)
        assert np.array_equal(out, r)
    batch = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(300)]   # 1.2 MiB: staged on this host
    batch_offsets = log.append_many(batch)
    assert len(batch_offsets) == 300 and batch_offsets == sorted(batch_offsets)
    got = list(log.records(len(records)))
    assert got == [b.tobytes() for b in batch]
    assert log.info()["records"] == len(records) + 300
    log.delete()


def test_full_plog_writes_nothing(ns):
    capacity = 10 * frame_bytes(100)
    log = ns.create_plog("small", capacity)
    fits = 8
    log.append_many([b"r" * 100] * fits)
    before = log.info()
    with pytest.raises(OutOfSpace) as err:
        log.append_many([b"r" * 100] * 3)               # two would fit, three do not: none goes in
    assert err.value.code == BmError.OUT_OF_SPACE
    assert log.info() == before
    log.append_many([b"r" * 100] * 2)
    with pytest.raises(OutOfSpace):
        log.append(b"")
    assert log.info()["length"] == capacity
    assert list(log.records()) == [b"r" * 100] * (fits + 2)
    log.delete()


def test_wrong_sec_id_reveals_nothing(plog_fabric, where, request):
    with session(plog_fabric, where) as s:
        name = ns_name(request)
        ns = s.create_namespace(name, sec_id="right", pool="logs")
        log = ns.create_plog("secret-log", 64 << 10)
        log.append(b"private")
        wrong = s.namespace(name, "wrong", pool="logs")
        for call in (lambda: wrong.plog("secret-log"), lambda: wrong.plog("no-such-log"), lambda: wrong.plogs(),
                     lambda: wrong.create_plog("other", 4096)):
            with pytest.raises(PermissionDenied) as err:
                call()
            assert "secret-log" not in str(err.value) and "private" not in str(err.value)
        forged = memfabric.Plog(wrong, "secret-log", log.home)
        for call in (lambda: forged.read(0, 8), lambda: forged.record(0), lambda: forged.append(b"x"),
                     forged.seal, forged.delete, forged.info, lambda: list(forged.records())):
            with pytest.raises(PermissionDenied):
                call()
        assert log.info()["state"] == "open" and log.record(0) == b"private"
        log.delete()


def test_dram_pool_refused(plog_fabric, where, request):
    with session(plog_fabric, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")         # the default pool: dram
        with pytest.raises(InvalidArgument, match="dram.*pmem or ramdisk"):
            ns.create_plog("wal", 4096)
        assert ns.plogs() == []
        # pool=: the namespace of this name in another pool (which must exist).
        with pytest.raises(memfabric.NoSuchNamespace):
            ns.create_plog("wal", 4096, pool="logs")
        s.create_namespace(ns.name, sec_id="k", pool="logs")
        log = ns.create_plog("wal", 4096, pool="logs")
        assert log.namespace.pool == "logs" and ns.plog("wal", pool="logs").info()["capacity"] == 4096
        log.delete()


def test_bad_arguments_get_precise_errors(ns):
    with pytest.raises(InvalidArgument):
        ns.create_plog("bad name!", 4096)
    with pytest.raises(InvalidArgument):
        ns.create_plog("wal", "4096")
    with pytest.raises(InvalidArgument):
        ns.create_plog("wal", 0)
    with pytest.raises(InvalidArgument):
        ns.create_plog("wal", 4096, replicas=0)
    log = ns.create_plog("wal", np.int64(8192))                       # numpy ints are integers
    with pytest.raises(InvalidArgument, match="already exists"):
        ns.create_plog("wal", 4096)
    log.append_many([b"abc", b"defg"])
    assert log.read(np.int32(HEADER_BYTES), np.uint8(3)) == b"abc"
    assert log.record(np.int64(1)) == b"defg"
    length = log.info()["length"]
    for offset, length_ in [(-1, 1), (0, -1), (0, length + 1), (length, 1), (1 << 50, 1)]:
        with pytest.raises(OutOfRange):
            log.read(offset, length_)
    assert log.read(length, 0) == b""
    for index in (-1, 2, 1 << 40):
        with pytest.raises(OutOfRange):
            log.record(index)
    for bad in (1.5, "0", None, True):
        with pytest.raises(InvalidArgument):
            log.record(bad)
        with pytest.raises(InvalidArgument):
            log.read(bad, 1)
    for bad in (42, "text", [1, 2], None):
        with pytest.raises(InvalidArgument):
            log.append(bad)
    for bad in (b"one buffer", 7, [b"ok", 7], []):
        with pytest.raises(InvalidArgument):
            log.append_many(bad)
    with pytest.raises(InvalidArgument):
        log.append(np.zeros(MAX_PLOG_RECORD_BYTES + 1, np.uint8))
    with pytest.raises(InvalidArgument):
        log.read(0, 3, into=b"read-only")
    with pytest.raises(InvalidArgument):
        log.read(HEADER_BYTES, 3, into=bytearray(2))
    assert log.info()["records"] == 2                                  # nothing bad got in
    log.delete()


def test_a_plog_made_on_one_server_is_found_from_the_other(plog_fabric, request):
    name = ns_name(request)
    with memfabric.init(plog_fabric.directory, server=1) as s:
        ns = s.create_namespace(name, sec_id="k", pool="logs")
        log = ns.create_plog("wal", 64 << 10)
        log.append(b"from server 2's client")
        home = log.home
    with memfabric.init(plog_fabric.directory, server=0) as s:
        ns = s.namespace(name, "k", pool="logs")
        assert s.home().server_id != home
        found = ns.plog("wal")
        assert found.home == home and found.record(0) == b"from server 2's client"
        found.append(b"from server 1's client")
        with pytest.raises(InvalidArgument, match="already exists"):
            ns.create_plog("wal", 4096)
        assert [p["name"] for p in ns.plogs()] == ["wal"]
        found.delete()


def test_delete_frees_the_memory(plog_fabric, where, request):
    with session(plog_fabric, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        # 3 x 40 MiB fits only if each delete gives its memory back (the pool has 96 MiB).
        for i in range(3):
            log = ns.create_plog(f"l{i}", 40 * MiB)
            log.append(b"x")
            log.delete()
        audit = s.home().call("audit")["pools"]["logs"]
        assert audit["live_bytes"] == audit["accounted_bytes"]


PLOG_OPS = ["plog_create", "plog_info", "plog_list", "plog_append", "plog_share_stage", "plog_drop_stage", "plog_read",
            "plog_records", "plog_seal", "plog_delete"]


@pytest.mark.parametrize("where, seed", [("same-host", 11), ("remote", 12)])
def test_fuzzed_plog_requests_get_precise_errors(plog_fabric, where, seed, request):
    """Random and wrong fields for every plog operation, aimed at a real plog of a ramdisk
    namespace (tests/fuzz_doors.py aims at a dram namespace, where plogs are refused early):
    never INTERNAL_ERROR, and the plog's records stay whole."""
    from .. import fuzz_doors
    with session(plog_fabric, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="fuzz-secret", pool="logs")
        values = fuzz_doors.Values()
        values.pool, values.ns, values.sec = "logs", ns.name, ns.sec_id
        maker = fuzz_doors.Maker(seed, "ipc" if where == "same-host" else "rpc", values)
        link = s.home()
        ops = PLOG_OPS + ([] if link.is_local else ["plog_append_payload"])
        codes: dict[str, int] = {}
        for i in range(1500):
            if i % 300 == 0:
                try:
                    ns.create_plog("fuzz", 1 << 20)
                except memfabric.MemfabricError:
                    pass
            op = maker.rng.choice(ops)
            message = maker.structured(op, maker.rng.choice([0.0, 0.05, 0.2, 0.5]))
            del message["op"], message["id"]
            try:
                if op == "plog_append_payload":
                    lengths = message.get("lengths")
                    n = sum(lengths) if isinstance(lengths, list) and all(type(x) is int and 0 <= x < 1 << 20
                                                                          for x in lengths) else 7
                    request_id, pending = link.submit(op, message, payload=memoryview(bytes(n)) if n else None)
                    link.wait(request_id, pending, op)
                else:
                    link.call(op, **message)
                codes["OK"] = codes.get("OK", 0) + 1
            except memfabric.MemfabricError as exc:
                assert exc.code != BmError.INTERNAL_ERROR, f"{op} {message!r:.300}: {exc}"
                codes[exc.code.name] = codes.get(exc.code.name, 0) + 1
        assert codes.get("OK", 0) > 50, codes            # the fuzz reached past the checks
        for info in ns.plogs():
            log = ns.plog(info["name"])
            assert sum(1 for _ in log.records()) == log.info()["records"]


def test_many_small_records_come_back_in_replies_that_fit(ns):
    """4,096 records of 40 bytes (the most a batch asks for, and near the inline budget):
    the records reply is split to stay one message."""
    log = ns.create_plog("many", 1 << 20)
    records = [b"%039d" % i + b"\n" for i in range(4096)]
    log.append_many(records)
    assert list(log.records()) == records
    assert list(log.records(4000, 200)) == records[4000:]
    log.delete()


def test_threads_of_one_session_append_small_and_staged_records_at_once(ns):
    """One session's link shared by threads: inline appends and staged (large) ones interleave
    on the connection, each stage kept apart by its token."""
    import threading
    log = ns.create_plog("threads", 24 * MiB)
    errors: list[BaseException] = []

    def work(tag: int) -> None:
        try:
            for i in range(6):
                size = 300_000 if (tag + i) % 3 == 0 else 100          # 300 KB: staged on this host
                log.append(bytes([tag]) * size + b"%d" % i)
        except BaseException as exc:        # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(tag,)) for tag in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    seen: dict[int, list[int]] = {}
    for payload in log.records():
        tag = payload[0]
        body_size = 300_000 if (tag + len(seen.get(tag, []))) % 3 == 0 else 100
        assert payload[:body_size] == bytes([tag]) * body_size
        seen.setdefault(tag, []).append(int(payload[body_size:]))
    assert seen == {tag: list(range(6)) for tag in range(6)}
    log.delete()


def test_record_reads_of_this_host_and_a_deleted_plog(ns):
    """Same host, record(i) reads committed records from the mapped segments (no round trip)
    once their places are known; a handle of a deleted plog gets NO_SUCH_OBJECT, never the
    old records (the memory is zeroed at delete)."""
    log = ns.create_plog("indexed", 4 * MiB)
    records = [bytes([i % 251]) * (i * 37 % 5000) for i in range(600)]
    log.append_many(records[:300])
    for i in (0, 299, 150, 7):
        assert log.record(i) == records[i]
    log.append_many(records[300:])
    assert [log.record(i) for i in range(600)] == records
    other = ns.plog("indexed")
    assert other.record(599) == records[599]
    log.delete()
    for handle in (log, other):
        with pytest.raises(NoSuchObject):
            handle.record(5)
    again = ns.create_plog("indexed", 4 * MiB)          # may take the same memory back
    again.append(b"new")
    with pytest.raises(NoSuchObject):
        other.record(0)
    assert again.record(0) == b"new"
    again.delete()


def test_the_most_plogs_a_namespace_has_on_a_server_list_in_one_reply(plog_fabric, request):
    from memfabric.errors import LimitExceeded
    from memfabric.limits import MAX_PLOGS_PER_NAMESPACE
    with memfabric.init(plog_fabric.directory, server=0) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        link = s.home()
        names = [f"{i:04d}-" + "n" * 59 for i in range(MAX_PLOGS_PER_NAMESPACE)]    # 64 characters each
        for name in names:
            link.call("plog_create", **ns.wire_creds, name=name, capacity=16, replicas=1)
        with pytest.raises(LimitExceeded):
            link.call("plog_create", **ns.wire_creds, name="one-more", capacity=16, replicas=1)
        listed = link.call("plog_list", **ns.wire_creds)["plogs"]       # one message, under the limit
        assert [p["name"] for p in listed] == names
        ns.destroy()


def test_a_pool_no_server_has_is_no_such_pool(ns):
    """ns.plog(name, pool="nosuch") said NO_SUCH_OBJECT (no such plog): the pool is what is
    missing, and the error says so, for every plog call that takes a pool."""
    for call in (lambda: ns.plog("p", pool="nosuch"), lambda: ns.plogs(pool="nosuch"),
                 lambda: ns.create_plog("p", 4096, pool="nosuch")):
        with pytest.raises(memfabric.NoSuchPool, match="nosuch"):
            call()


# ---- large batches from this host: the shared stage ------------------------------------------


@pytest.fixture
def local_ns(plog_fabric, request):
    """A same-host session and a namespace of the logs pool, destroyed after (the pool is
    small, and the module's tests share it)."""
    with session(plog_fabric, "same-host") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        yield s, ns
        ns.destroy()


def test_large_batches_from_this_host_go_through_one_shared_stage(local_ns):
    """Batches too large for one message are written into memory the server maps: one
    request each, the stage kept for the next batches, a larger one made when one does not
    fit; every record comes back whole, at the offsets returned."""
    s, ns = local_ns
    log = ns.create_plog("big", 12 << 20)
    link = s.home()
    rng = np.random.default_rng(5)
    batches = [[rng.bytes(int(n)) for n in rng.integers(0, 8192, count)] for count in (100, 300, 50)]
    batches.append([rng.bytes(3 << 20)])           # larger than the first stage: a new one
    offsets, expected = [], []
    for batch in batches:
        offsets += log.append_many(batch)
        expected += batch
    holder = link.attached[("", "", "plog_stage")]
    assert holder.mapped is not None and holder.mapped.size >= 3 << 20
    large = rng.bytes(5 << 20)           # past PLOG_SHARED_STAGE_KEPT_BYTES: a stage of its own, for it only
    offsets += log.append_many([large])
    expected.append(large)
    assert holder.mapped is None
    assert list(log.records()) == expected
    for offset, record in zip(offsets, expected):
        assert log.read(offset, len(record)) == record


def test_a_shared_stage_cannot_be_shrunk_under_the_server(local_ns):
    """The stage is a sealed memfd: a client cannot truncate it (which would make the server's
    read of it a SIGBUS); it can only write it."""
    s, ns = local_ns
    log = ns.create_plog("sealed", 1 << 20)
    reply, fds = s.home().call_with_fds("plog_share_stage", **ns.wire_creds, length=4096)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fds[0], 0)
        os.pwrite(fds[0], b"abc", 0)
    finally:
        for fd in fds:
            os.close(fd)
    offsets = s.home().call("plog_append", **log._wire, shared=reply["stage"], lengths=[3])["offsets"]
    assert log.read(offsets[0], 3) == b"abc"


@pytest.mark.parametrize("bad", ["unknown stage", "longer than the stage", "lengths not a list", "negative length",
                                 "a bool", "a float", "a huge int", "past 2**64", "mixed", "over-long", "a str",
                                 "past the largest record", "empty"])
def test_bad_shared_batches_are_invalid_argument_and_append_nothing(local_ns, bad):
    """(The lengths are checked in one compiled call, _framing.c lengths_total, and by Python
    where it says no: the same INVALID_ARGUMENT for each.)"""
    s, ns = local_ns
    log = ns.create_plog("bad", 1 << 20)
    reply, fds = s.home().call_with_fds("plog_share_stage", **ns.wire_creds, length=4096)
    for fd in fds:
        os.close(fd)
    stage, size = reply["stage"], reply["size"]
    args = {"unknown stage": {"shared": stage + 1000, "lengths": [1]},
            "longer than the stage": {"shared": stage, "lengths": [size, 1]},
            "lengths not a list": {"shared": stage, "lengths": 5},
            "negative length": {"shared": stage, "lengths": [-1, 2]},
            "a bool": {"shared": stage, "lengths": [1, True]},
            "a float": {"shared": stage, "lengths": [1.0]},
            "a huge int": {"shared": stage, "lengths": [1 << 63]},
            "past 2**64": {"shared": stage, "lengths": [(1 << 64) - 1, 1]},
            "mixed": {"shared": stage, "lengths": [1, "2", None]},
            "over-long": {"shared": stage, "lengths": [0] * (MAX_PLOG_BATCH + 1)},
            "a str": {"shared": stage, "lengths": ["3"]},
            "past the largest record": {"shared": stage, "lengths": [MAX_PLOG_RECORD_BYTES + 1]},
            "empty": {"shared": stage, "lengths": []}}[bad]
    with pytest.raises(InvalidArgument):
        s.home().call("plog_append", **log._wire, **args)
    assert log.info()["records"] == 0
    log.append(b"still works")
    assert list(log.records()) == [b"still works"]


def test_shared_stages_are_same_host_only(plog_fabric, request):
    with session(plog_fabric, "remote") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        with pytest.raises(InvalidArgument, match="same-host"):
            s.home().call("plog_share_stage", **ns.wire_creds, length=4096)


def test_a_client_scribbling_on_its_stage_during_appends_leaves_the_log_whole(local_ns):
    """The client may write its stage while the server reads it. The server copies a batch
    out before it checks and frames it (plog/service.py _shared_batch), so each record is
    framed over the bytes it writes: whatever the client had there at that moment, the log
    holds every record of every batch, of its length, and the server goes on."""
    import threading
    s, ns = local_ns
    log = ns.create_plog("scribbled", 16 << 20)
    log.append_many([b"x" * 4096] * 100)            # makes the stage
    holder = s.home().attached[("", "", "plog_stage")]
    view = holder.mapped.view
    stop = threading.Event()

    def scribble():
        i = 0
        while not stop.is_set():
            view[(i * 4096) % (400 * 1024):(i * 4096) % (400 * 1024) + 4096] = bytes([i % 251]) * 4096
            i += 1
    t = threading.Thread(target=scribble)
    t.start()
    try:
        for _ in range(30):
            log.append_many([b"y" * 4096] * 100)
    finally:
        stop.set()
        t.join(30)
    records = list(log.records())
    assert len(records) == log.info()["records"] == 3100
    assert all(len(r) == 4096 for r in records)


def test_threads_sharing_a_session_append_large_batches_at_once(local_ns):
    import threading
    s, ns = local_ns
    log = ns.create_plog("threads", 8 << 20)
    errors = []

    def writer(tag: int):
        try:
            for i in range(20):
                log.append_many([bytes([tag, i]) * 512] * 60)
        except Exception as exc:      # noqa: BLE001 - the test looks at it
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    records = list(log.records())
    assert len(records) == 4 * 20 * 60
    batches = [records[i:i + 60] for i in range(0, len(records), 60)]
    assert all(len(set(b)) == 1 for b in batches), "a batch's records stay together, whole"
    assert sorted(b[0][:2] for b in batches) == sorted(bytes([k, i]) for k in range(4) for i in range(20))


def test_large_batches_of_more_namespaces_than_a_connection_has_stages(plog_fabric, request):
    """One shared stage serves every namespace of a link: a process appending large batches to
    plogs of more namespaces than a connection may have stages gets no LIMIT_EXCEEDED."""
    from memfabric.limits import MAX_PLOG_STAGES_PER_CLIENT, PLOG_INLINE_BYTES
    with session(plog_fabric, "same-host") as s:
        spaces = [s.create_namespace(f"{ns_name(request)}-{i}", sec_id="k", pool="logs")
                  for i in range(MAX_PLOG_STAGES_PER_CLIENT + 2)]
        try:
            batch = [b"s" * 4096] * (PLOG_INLINE_BYTES // 4096 + 10)
            for ns in spaces:
                log = ns.create_plog("wal", 1 << 20)
                log.append_many(batch)
                assert log.info()["records"] == len(batch)
        finally:
            for ns in spaces:
                ns.destroy()


def test_append_many_takes_any_buffer_as_its_bytes(ns):
    """Each record is its buffer's bytes, whatever the object: numpy scalars and 0-d arrays
    too, which bytes() reads as an int (bytes(np.int64(7)) is seven zero bytes), arrays of
    other item types, 2-D and Fortran-ordered ones, array.array, a memoryview cast to words.
    Small batches (sent inline), a batch through the shared stage, and records() read back."""
    import array
    grid = np.arange(24, dtype=np.int32).reshape(4, 6)
    records = [np.int64(7), np.array(7), np.float32(1.5), np.array([True, False]), grid, grid.T, grid[::2],
               np.asfortranarray(grid), np.zeros(0, np.int64), array.array("d", [1.5, 2.5]),
               memoryview(b"abcdefgh").cast("Q"), bytearray(b"ba"), b"plain"]
    expected = [np.ascontiguousarray(r).tobytes() if isinstance(r, np.ndarray | np.generic) else bytes(memoryview(r))
                for r in records]
    assert expected[0] == (7).to_bytes(8, "little")
    log = ns.create_plog("buffers", 2 * MiB)
    contiguous = [r for r in records if memoryview(r).c_contiguous]      # measured in one compiled call
    assert len(contiguous) < len(records)
    offsets = log.append_many(contiguous) + log.append_many(records)
    expected = [e for r, e in zip(records, expected) if memoryview(r).c_contiguous] + expected
    large = [np.full(3000, i, dtype=np.int64) if i % 2 else np.int64(i) for i in range(100)]    # the shared stage
    offsets += log.append_many(large)
    expected += [np.asarray(r).tobytes() for r in large]
    assert list(log.records()) == expected
    assert [log.read(o, len(e)) for o, e in zip(offsets, expected)] == expected
    log.delete()


def _switch_at(function: str, then):
    """A tracer that runs `then` once, as another thread would, when `function` is called."""
    import sys

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == function:
            sys.settrace(None)
            then()
        return None
    return tracer


def test_append_many_of_a_list_changed_meanwhile_appends_whole_records(ns):
    """Another thread changes the list (or a record of it) while append_many sends it, after
    its lengths were taken: each record appended is one whole record of the list as it was
    called with, or the append is refused; never a record cut at another one's length. (The
    switch is made at a fixed point, with a tracer, as a thread switch there would.)"""
    import sys
    log = ns.create_plog("changed", 4 * MiB)
    records = [bytes([i]) * 4096 for i in range(100)]        # > PLOG_INLINE_BYTES: the shared stage, or RPC
    original = list(records)

    def swap() -> None:
        records[0], records[1] = b"X" * 2048, b"Y" * 6144    # the same total, other boundaries
    sys.settrace(_switch_at("_append_shared" if ns.session.home().is_local else "request", swap))
    try:
        offsets = log.append_many(records)
    finally:
        sys.settrace(None)
    assert records[0] == b"X" * 2048                          # the switch happened
    assert [log.read(o, 4096) for o in offsets] == original
    assert list(log.records()) == original
    # A record shrunk meanwhile: refused (nothing appended), or appended as it was.
    grown = [bytearray(b"g" * 4096) for _ in range(100)]
    sys.settrace(_switch_at("_append_shared" if ns.session.home().is_local else "request", grown[0].clear))
    try:
        log.append_many(grown)
    except (InvalidArgument, BufferError):
        pass
    else:
        assert list(log.records(100)) == [b"g" * 4096] * 100
    finally:
        sys.settrace(None)
    assert len(list(log.records())) in (100, 200)
    log.append(b"after")
    log.delete()


def test_a_buffer_that_cannot_be_read_is_an_invalid_argument(ns):
    """A released memoryview, a closed mmap: INVALID_ARGUMENT from append and append_many (any
    path: inline, shared stage, RPC), not the ValueError of Python's buffer protocol, and
    nothing appended."""
    import mmap

    def released():
        view = memoryview(b"abc")
        view.release()
        return view

    def closed():
        m = mmap.mmap(-1, 10)
        m.close()
        return m
    log = ns.create_plog("unreadable", 2 * MiB)
    log.append(b"first")
    for make in (released, closed):
        with pytest.raises(InvalidArgument):
            log.append(make())
        for batch in ([make()], (b"a", make()), [b"x" * 4096] * 60 + [make()]):
            with pytest.raises(InvalidArgument):
                log.append_many(batch)
    assert list(log.records()) == [b"first"]
    log.delete()


def test_append_many_of_records_resized_meanwhile_appends_no_torn_record(ns):
    """Two records resized by another thread (one grows as the other shrinks: the same total)
    after append_many measured them and before it sent them: refused, or each record appended
    whole as it was when sent; never one cut at the other's old length."""
    import sys
    log = ns.create_plog("resized", 4 * MiB)
    records = [bytearray(bytes([i]) * 4096) for i in range(100)]

    def resize() -> None:
        records[0].extend(b"+" * 100)
        del records[1][:100]
    sys.settrace(_switch_at("call_timeout_s", resize))     # on each path, between measuring and sending
    try:
        log.append_many(records)
    except InvalidArgument:
        assert list(log.records()) == []
    else:
        assert list(log.records()) == [bytes(r) for r in records]
    finally:
        sys.settrace(None)
    assert len(records[0]) == 4196                           # the switch happened
    log.delete()

"""The compiled same-host append_many (_plogserve.c append_batch, plog/fast_append.py) against the
Python path it stands in for, with real servers: a batch from the connection's shared stage
served in its receive loop (no operation in Python's histogram, every record counted), the same
frames as Python's to the byte, across extents; every case it leaves to Python (pmem, a full
plog, a stage dropped or too large to keep, bad lengths, a wrong secId after the grant, a seal
or a delete mid-stream) answered as before; several processes at once; a client writing its
stage while batches are appended."""

from __future__ import annotations

import os
import struct
import threading

import pytest

import memfabric
from memfabric.errors import InvalidArgument, NoSuchObject, OutOfSpace, PermissionDenied, Sealed
from memfabric.limits import MAX_PLOG_BATCH, MAX_PLOG_RECORD_BYTES, PLOG_SHARED_STAGE_KEPT_BYTES
from memfabric.plog import record as rec
from memfabric.plog.client import _stage_holder

from ..helpers import ns_name
from .test_metrics import ops, scrape, value
from .test_plog_compiled import frames_check, plog_fabric, records_of, run_writers

MiB = 1 << 20
BATCH = [bytes([i]) * 4096 for i in range(100)]        # 400 KiB: past the inline limit, so staged


@pytest.fixture(scope="module")
def fab():
    fabric = plog_fabric("mf-plogmany-")
    yield fabric
    assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


@pytest.fixture(params=["ram", "disk"])
def pool(request):
    return request.param


def counters(fab) -> tuple[float, float, float, float]:
    """Python's plog_append operations, and the plog counters: appends, bytes, compiled appends."""
    got = scrape(fab.metrics)
    return (ops(got, "plog_append"), value(got, "memfabric_plog_appends_total"),
            value(got, "memfabric_plog_appended_bytes_total"), value(got, "memfabric_plog_compiled_appends_total"))


def delta(after, before):
    return tuple(a - b for a, b in zip(after, before))


def all_frames_check(log, link) -> int:
    """Every frame from the log's start to its length checks (magic, index, CRC); how many."""
    info = link.call("plog_info", **log._wire, layout=True)
    length = log.info()["length"]
    raw = log.read(0, length)
    found = list(rec.scan(lambda at, n: raw[at:at + n], length, info["nonce"], MAX_PLOG_RECORD_BYTES))
    assert (found[-1][0] + rec.frame_bytes(found[-1][1]) if found else 0) == length
    return len(found)


def test_a_ramdisk_batch_is_answered_in_the_receive_loop_and_counted(fab, pool, request):
    """On ramdisk a granted connection's staged batch is served in its receive loop: Python's
    histogram does not see it, the counters count every record and byte. On pmem (a flush)
    Python serves each. Fails without append_batch: Python serves every batch."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool=pool)
        log = ns.create_plog("wal", 6 * MiB)
        log.append_many(BATCH)                 # Python's: it grants the rest
        before = counters(fab)
        batches = 12
        offsets = [log.append_many(BATCH) for _ in range(batches)]
        in_python, appends, appended, compiled = delta(counters(fab), before)
        assert appends == batches * len(BATCH) and appended == batches * sum(map(len, BATCH))
        if pool == "ram":
            assert (in_python, compiled) == (0, batches * len(BATCH))
        else:
            assert (in_python, compiled) == (batches, 0)
        flat = [o for batch in offsets for o in batch]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)
        assert [log.read(o, 4096) for o in offsets[-1]] == BATCH
        assert list(log.records()) == BATCH * (batches + 1)
        assert all_frames_check(log, s.link(log.home)) == len(BATCH) * (batches + 1)
        ns.destroy()


def test_compiled_batches_are_the_python_paths_to_the_byte(fab, request):
    """Records of every length (0, odd: padding), batches across the pool's 1 MiB extents (each
    ~300 KB: one in four spans two): the frames are record.encode's, and the offsets those
    Python gives (a remote client's batches)."""
    name = ns_name(request)
    payloads = [records_of(120, seed) for seed in range(8)]
    # Records long enough for the CRC's three 8 KiB streams (24 KiB and more), odd lengths.
    payloads.append([bytes(range(256)) * (n // 256) + b"t" * (n % 256) for n in (24_577, 70_001, 3, 49_152, 100_003)])
    with memfabric.init(fab.directory) as s, memfabric.init(os.path.join(fab.directory, "remote.toml")) as r:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        fast, slow = ns.create_plog("fast", 4 * MiB), ns.create_plog("slow", 4 * MiB)
        remote_slow = r.namespace(name, "k", pool="ram").plog("slow")     # RPC: always Python
        fast.append_many(payloads[0])
        remote_slow.append_many(payloads[0])
        before = counters(fab)
        fast_offsets = [fast.append_many(p) for p in payloads[1:]]
        assert delta(counters(fab), before)[3] == sum(map(len, payloads[1:]))     # every batch compiled
        slow_offsets = [remote_slow.append_many(p) for p in payloads[1:]]
        assert fast_offsets == slow_offsets
        flat = [p for batch in payloads for p in batch]
        assert list(fast.records()) == list(slow.records()) == flat
        link = s.link(fast.home)
        frames_check(fast, link, flat)
        frames_check(slow, link, flat)
        ns.destroy()


def test_batches_python_serves_are_answered_as_before(fab, request):
    """A full plog (OUT_OF_SPACE, nothing of the batch written), a batch whose frames pass
    1 MiB, one on a stage too large to keep, a stage replaced by a larger one, one dropped:
    each as Python answers it, and the batches after them compiled again."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("wal", 3 * MiB)
        log.append_many(BATCH)
        link = s.link(log.home)
        holder = _stage_holder(link)
        before = counters(fab)
        log.append_many(BATCH)
        assert delta(counters(fab), before)[0] == 0
        # Frames past 1 MiB (the stage kept, 2 MiB): Python's.
        big = [b"x" * 8192] * 200
        before = counters(fab)
        log.append_many(big)
        assert delta(counters(fab), before)[:2] == (1, 200)
        # Full: nothing of the batch written, OUT_OF_SPACE from Python; a smaller one fits.
        length = log.info()["length"]
        with pytest.raises(OutOfSpace):
            while True:
                length = log.info()["length"]
                log.append_many(BATCH)
        assert log.info()["length"] == length
        records = log.info()["records"]
        log.append_many([b"s" * 4096] * 50)
        assert log.info()["records"] == records + 50
        # A stage larger than kept serves one batch (Python, then dropped); the next asks again.
        other = ns.create_plog("other", 8 * MiB)
        other.append_many(BATCH)
        huge = [b"h" * MiB] * (PLOG_SHARED_STAGE_KEPT_BYTES // MiB + 1)
        before = counters(fab)
        other.append_many(huge)
        other.append_many(BATCH)
        other.append_many(BATCH)
        in_python, appends, _, compiled = delta(counters(fab), before)
        # Python's: the huge one; the two after it compiled (on a new stage: the grant holds).
        assert (in_python, appends, compiled) == (1, len(huge) + 2 * len(BATCH), 2 * len(BATCH))
        # Dropped by the client's own drop: the server has no such stage (Python says so).
        token = holder.token
        link.call("plog_drop_stage", **ns.wire_creds, stage=token)
        with pytest.raises(InvalidArgument, match="no shared stage"):
            link.call("plog_append", **other._wire, shared=token, lengths=[4096] * 100)
        holder.discard()
        assert len(other.append_many(BATCH)) == 100
        assert list(other.records()) == BATCH + huge + BATCH * 3
        ns.destroy()


def test_bad_lengths_and_a_wrong_sec_id_after_the_grant(fab, request):
    """Requests naming the granted stage with lengths that do not fit it, or are not lengths,
    or with another secId: Python's answers, nothing appended."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("wal", 4 * MiB)
        log.append_many(BATCH)
        log.append_many(BATCH)
        link = s.link(log.home)
        token = _stage_holder(link).token
        size = _stage_holder(link).mapped.size
        length = log.info()["length"]
        before = counters(fab)
        bad = [[size + 1], [4096] * (size // 4096) + [1], [-1], [MAX_PLOG_RECORD_BYTES + 1], [],
               [1] * (MAX_PLOG_BATCH + 1), [1.5], ["1"], [None], None, 7]
        for lengths in bad:
            with pytest.raises(InvalidArgument):
                link.call("plog_append", **log._wire, shared=token, lengths=lengths)
        with pytest.raises(PermissionDenied):
            link.call("plog_append", **{**log._wire, "sec": b"wrong"}, shared=token, lengths=[4096])
        with pytest.raises(InvalidArgument):
            link.call("plog_append", **log._wire, shared=token + 1000, lengths=[4096])
        assert delta(counters(fab), before)[:2] == (len(bad) + 2, 0)
        assert log.info()["length"] == length
        # And the connection still serves the next batch compiled.
        before = counters(fab)
        log.append_many(BATCH)
        assert delta(counters(fab), before)[::3] == (0, len(BATCH))
        ns.destroy()


def test_sealed_or_deleted_mid_stream(fab, request):
    name = ns_name(request)
    with memfabric.init(fab.directory) as s, memfabric.init(fab.directory) as other:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("wal", 2 * MiB)
        log.append_many(BATCH)
        log.append_many(BATCH)
        other.namespace(name, "k", pool="ram").plog("wal").seal()
        with pytest.raises(Sealed):
            log.append_many(BATCH)
        assert log.info()["records"] == 200 and log.info()["state"] == "sealed"
        second = ns.create_plog("second", 2 * MiB)
        second.append_many(BATCH)
        second.append_many(BATCH)
        other.namespace(name, "k", pool="ram").plog("second").delete()
        with pytest.raises(NoSuchObject):
            second.append_many(BATCH)
        ns.destroy()


APPENDER = r"""
import struct, sys
import memfabric
ock, ns_name, pool, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with memfabric.init(ock) as s:
    log = s.namespace(ns_name, "k", pool=pool).plog("shared")
    for seq in range(count):
        batch = [struct.pack("<III", tag, seq, i) * (300 + (seq + i + tag) % 200) for i in range(60)]
        print(" ".join(map(str, log.append_many(batch))), flush=True)
"""


def test_batches_from_several_processes_never_interleave(fab, pool, request):
    """Each batch's records lie together, in its order; each process's batches in its order;
    every offset acknowledged is where its record is."""
    name = ns_name(request)
    writers, count = 4, 15
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool=pool)
        log = ns.create_plog("shared", 24 * MiB)
        before = counters(fab)
        acked = {}
        for tag, out in enumerate(run_writers(APPENDER, lambda t: [fab.directory, name, pool, str(t), str(count)],
                                              writers)):
            acked[tag] = [[int(x) for x in line.split()] for line in out.splitlines()]
            assert len(acked[tag]) == count
        compiled = delta(counters(fab), before)[3]
        assert compiled == (writers * (count - 1) * 60 if pool == "ram" else 0)
        at, seen = 0, {t: 0 for t in range(writers)}
        records = list(log.records())
        assert len(records) == writers * count * 60
        for first in range(0, len(records), 60):
            tag, seq, _ = struct.unpack_from("<III", records[first])
            assert seq == seen[tag]
            for i in range(60):
                payload = records[first + i]
                assert payload == struct.pack("<III", tag, seq, i) * (300 + (seq + i + tag) % 200)
                assert acked[tag][seq][i] == at + rec.HEADER_BYTES
                at += rec.frame_bytes(len(payload))
            seen[tag] += 1
        assert seen == {t: count for t in range(writers)}
        ns.destroy()


def test_a_client_writing_its_stage_meanwhile_never_leaves_a_frame_that_does_not_check(fab, request):
    """The client may write its stage at any moment (another thread, here, all the time): each
    record is copied before its CRC is computed, so every frame in the log checks, whatever
    bytes it holds."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("wal", 10 * MiB)
        log.append_many(BATCH)
        link = s.link(log.home)
        view = _stage_holder(link).mapped.view
        stop = threading.Event()

        def scribble() -> None:
            n = 0
            while not stop.is_set():
                n = (n + 1) % 251
                view[:len(view)] = bytes([n]) * len(view)

        before = counters(fab)
        writer = threading.Thread(target=scribble, daemon=True)
        writer.start()
        try:
            for _ in range(20):
                log.append_many(BATCH)
        finally:
            stop.set()
            writer.join(timeout=10)
        assert not writer.is_alive()
        assert delta(counters(fab), before)[3] == 20 * len(BATCH)
        assert all_frames_check(log, link) == 21 * len(BATCH)
        ns.destroy()

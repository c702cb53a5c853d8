"""MemPlog under crashes and contention, with real processes: appenders in several processes
at once, a server SIGKILLed in the middle of a stream of appends and restarted, torn and
garbage frames written into a plog's file on purpose, metadata (state) across restarts."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest

import memfabric
from memfabric.errors import NoSuchObject, Sealed
from memfabric.launcher import LocalFabric
from memfabric.plog import record as rec
from memfabric.plog.log import first_ready, next_reach, pieces

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, ns_name, wait_until
from .test_persistence import MF, PersistentServer

APPENDER = r"""
import struct, sys
import memfabric
ock, ns_name, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with memfabric.init(ock) as s:
    log = s.namespace(ns_name, "k", pool=sys.argv[5]).plog("shared")
    for seq in range(count):
        # A record names its writer and its number, and is long enough to tear.
        body = struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300)
        offset = log.append(body)
        print("ack", seq, offset, flush=True)
"""



def acknowledged_are_whole(records: list[bytes], acked: list[tuple], whole) -> int:
    """After a crash and a restart: every acknowledged append `(seq, offset, ...)` is there, in
    order, at its offset, and every record (acknowledged or not) is `whole(seq, payload)`.
    Returns where the last record ends."""
    assert len(records) >= len(acked)
    at = 0
    for seq, payload in enumerate(records):
        assert whole(seq, payload), f"record {seq} is not whole"
        if seq < len(acked):
            assert tuple(acked[seq][:2]) == (seq, at + rec.HEADER_BYTES)
        at += rec.frame_bytes(len(payload))
    return at


def _check_record(payload: bytes) -> tuple[int, int]:
    """(writer, seq) of a record the appender made; asserts it is whole and unmixed."""
    assert len(payload) % 8 == 0 and payload
    tag, seq = struct.unpack_from("<II", payload)
    assert payload == struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300), "a record is not whole"
    return tag, seq


@pytest.fixture(scope="module")
def two_servers():
    fab = LocalFabric(short_tmp_dir("mf-plogc-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:64MiB"]).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.mark.parametrize("where", ["same-host", "mixed"])
def test_concurrent_appenders_in_several_processes(two_servers, where, request):
    name = ns_name(request)
    writers, count = 4, 150
    with memfabric.init(two_servers.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="logs")
        log = ns.create_plog("shared", 32 << 20)
        remote = os.path.join(two_servers.directory, "remote.toml")
        procs = []
        for tag in range(writers):
            # mixed: half the writers come over RPC, half over IPC (through either server's link)
            ock = remote if where == "mixed" and tag % 2 else two_servers.directory
            procs.append(subprocess.Popen([sys.executable, "-c", APPENDER, ock, name, str(tag), str(count), "logs"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        acked: dict[int, list[int]] = {}
        for tag, proc in enumerate(procs):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            offsets = [int(line.split()[2]) for line in out.splitlines()]
            assert len(offsets) == count
            assert offsets == sorted(offsets), "one writer's offsets only grow"
            acked[tag] = offsets
        everyone = sorted(o for offsets in acked.values() for o in offsets)
        assert len(set(everyone)) == writers * count
        records = list(log.records())
        assert len(records) == writers * count
        next_seq = {tag: 0 for tag in range(writers)}
        at = 0
        for payload in records:
            tag, seq = _check_record(payload)
            assert seq == next_seq[tag], "each writer's records are in its order, none lost"
            next_seq[tag] += 1
            # The record's place is one its writer was told, in log order.
            assert acked[tag][seq] == at + rec.HEADER_BYTES
            at += rec.frame_bytes(len(payload))
        assert log.info()["length"] == at
        log.delete()


@pytest.fixture(params=["ramdisk", "pmem"])
def server(request):
    srv = PersistentServer(request.param).start()
    yield srv
    srv.cleanup()


def acks_around_a_kill(server, proc, least: int, parse, wait_s: float = 60) -> list:
    """What `proc` acknowledged (its "ack ..." lines, each parsed by `parse`) while `server` was
    SIGKILLed under it: at least `least` read first, then the kill while it still appends, then
    the rest up to its end (bounded by `wait_s`). `proc` is ended whatever happens."""
    acked = []
    try:
        deadline = time.monotonic() + wait_s
        while len(acked) < least and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(parse(line))
        assert len(acked) >= least, proc.stderr.read()
        server.kill()                      # SIGKILL while the appender is still appending
        # The rest through the same reader: communicate() reads the pipe itself and would lose
        # the lines readline() already buffered (acks seen missing). A timer bounds the wait.
        stop = threading.Timer(wait_s, proc.kill)
        stop.start()
        try:
            out = proc.stdout.read()
            proc.wait(10)
        finally:
            stop.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return acked + [parse(line) for line in out.splitlines() if line.startswith("ack")]


def test_sigkill_mid_stream_keeps_every_acknowledged_append(server, request):
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        s.create_namespace(name, sec_id="k", pool="keep").create_plog("shared", 6 << 20)
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, server.config, name, "7", "1000000", "keep"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = acks_around_a_kill(server, proc, 300, lambda line: tuple(int(x) for x in line.split()[1:]))
    assert proc.returncode != 0            # it lost its server mid-stream
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("shared")
        records = list(log.records())
        # Every acknowledged record is there, whole, where it was acknowledged; what is after
        # them (appended, not yet acknowledged) is whole too, and in order.
        at = acknowledged_are_whole(records, acked, lambda seq, payload: _check_record(payload) == (7, seq))
        assert log.info()["length"] == at and log.info()["state"] == "open"
        # The log goes on where it stopped.
        offset = log.append(b"after the crash")
        assert offset == at + rec.HEADER_BYTES and log.record(len(records)) == b"after the crash"


def _plog_file(server: PersistentServer) -> tuple[dict, list[tuple[int, int, int]]]:
    directory = os.path.join(server.pool_dir, "plogs")
    (name,) = [n for n in os.listdir(directory) if n.endswith(".plog")]
    with open(os.path.join(directory, name), "rb") as f:
        meta = msgpack.unpackb(f.read())
    return meta, [tuple(e) for e in meta["extents"]]


def _write_log(server: PersistentServer, extents: list, offset: int, data: bytes) -> None:
    """Write into a plog's bytes behind the server's back, as a crash or a disk might."""
    at = 0
    for segment, seg_offset, length in pieces(extents, offset, len(data)):
        with open(os.path.join(server.pool_dir, f"segment-{segment}.mem"), "r+b") as f:
            f.seek(seg_offset)
            f.write(data[at:at + length])
        at += length


@pytest.mark.parametrize("damage", ["torn record", "garbage", "bit flip in the last record", "valid frame, wrong index"])
def test_a_damaged_tail_is_cut_off_cleanly_at_restart(server, request, damage):
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 1 << 20)
        kept = [b"record %d " % i * (i + 1) for i in range(50)]
        log.append_many(kept[:25])
        for r in kept[25:]:
            log.append(r)
        end = log.info()["length"]
    server.stop()
    meta, extents = _plog_file(server)
    nonce = meta["nonce"]
    if damage == "torn record":        # a whole header, half of its payload: the crash mid-append
        frame = rec.encode(nonce, 50, b"T" * 5000)
        _write_log(server, extents, end, frame[:2000])
    elif damage == "garbage":
        _write_log(server, extents, end, os.urandom(3000))
    elif damage == "bit flip in the last record":
        last_start = end - rec.frame_bytes(len(kept[-1]))
        _write_log(server, extents, last_start + rec.HEADER_BYTES + 3, b"\xff")
        kept = kept[:-1]
    else:                              # a frame that checks, but for index 60: not the next record
        _write_log(server, extents, end, rec.encode(nonce, 60, b"out of place"))
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert list(log.records()) == kept
        length = log.info()["length"]
        assert length == sum(rec.frame_bytes(len(r)) for r in kept)
        log.append(b"new")
    server.stop()
    server.start()                     # the tail was zeroed: nothing of the damage comes back
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert list(log.records()) == kept + [b"new"]
        log.delete()


def _read_log(server: PersistentServer, extents: list, offset: int, length: int) -> bytes:
    out = b""
    for segment, seg_offset, n in pieces(extents, offset, length):
        with open(os.path.join(server.pool_dir, f"segment-{segment}.mem"), "rb") as f:
            f.seek(seg_offset)
            out += f.read(n)
    return out


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_restart_reads_a_large_plog_only_as_far_as_it_was_ever_written(medium, request):
    """A restart scanned and zeroed a plog's whole capacity (a 100 GiB log read 100 GiB, however
    short). The log now says on disk how far it may have been written (raised before any byte
    goes past it), and a restart reads and zeroes up to there only: bytes past it are never
    touched. Appends that go past it raise it first, durably, so a SIGKILL then a restart
    finds every record."""
    server = PersistentServer(medium, capacity="160MiB").start()
    try:
        name = ns_name(request)
        capacity = 150 << 20
        with memfabric.init(server.config) as s:
            log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", capacity)
            kept = [bytes([i]) * 100_000 for i in range(10)]
            log.append_many(kept)
            end = log.info()["length"]
        server.stop()
        meta, extents = _plog_file(server)
        far = 120 << 20                      # never written by the log
        _write_log(server, extents, end, b"torn" * 1000)
        _write_log(server, extents, far, b"never scanned" * 100)
        server.start()
        assert _read_log(server, extents, end, 4000) == bytes(4000), "the tail the log may have written is zeroed"
        assert _read_log(server, extents, far, 1300) == b"never scanned" * 100, \
            "a restart touched bytes the log never reached"
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            assert list(log.records()) == kept
            more = [bytes([100 + i % 100]) * (1 << 20) for i in range(140)]     # past the far bytes
            for r in more:
                log.append(r)
        server.kill()
        server.start()
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            assert list(log.records()) == kept + more
            log.delete()
    finally:
        server.cleanup()


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_plog_whose_metadata_had_no_reach_gets_one_after_a_restart(medium, request):
    """Metadata written before there was a reach (an earlier version) costs a restart a scan
    of the whole capacity: that one restart zeroes all past the log. A plog created then kept
    the whole capacity as its reach in memory, so its metadata never got one and every
    restart read all of it, however short the log."""
    server = PersistentServer(medium, capacity="160MiB").start()
    try:
        name = ns_name(request)
        with memfabric.init(server.config) as s:
            log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 150 << 20)
            kept = [bytes([i]) * 100_000 for i in range(10)]
            log.append_many(kept)
        server.stop()
        meta, extents = _plog_file(server)
        del meta["reach"]                    # as an earlier version wrote it
        (path,) = [os.path.join(server.pool_dir, "plogs", n)
                   for n in os.listdir(os.path.join(server.pool_dir, "plogs")) if n.endswith(".plog")]
        with open(path, "wb") as f:
            f.write(msgpack.packb(meta, use_bin_type=True))
        server.start()                       # the whole capacity read, once
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            assert list(log.records()) == kept
            kept.append(b"after the upgrade")
            log.append(kept[-1])
        server.kill()
        far = 120 << 20                      # never written by the log
        _write_log(server, extents, far, b"never scanned" * 100)
        server.start()
        assert _read_log(server, extents, far, 1300) == b"never scanned" * 100, \
            "a restart read the whole capacity again"
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            assert list(log.records()) == kept
            log.delete()
    finally:
        server.cleanup()


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_records_past_the_reach_written_by_a_server_that_kept_none_come_back(medium, request):
    """A server of an earlier version (one rolled back to) reads this metadata, ignores its
    reach and appends past it; started again at this version, the restore stopped its scan at
    the reach: every record acknowledged past it lost, and overwritten by the next appends.
    The scan costs the log and no more whatever bound it is given (it stops at the first frame
    that does not check), so it goes as far as the records do; the reach bounds the zeroing."""
    server = PersistentServer(medium, capacity="160MiB").start()
    try:
        name = ns_name(request)
        with memfabric.init(server.config) as s:
            log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 150 << 20)
            kept = [b"first"]
            log.append(kept[0])
        server.stop()
        meta, extents = _plog_file(server)
        assert meta["reach"] < 100 << 20
        # That server's appends: 90 records of 1 MiB, from the log's end to past the reach.
        at = rec.frame_bytes(len(kept[0]))
        for index in range(1, 91):
            kept.append(bytes([index]) * (1 << 20))
            frame = rec.encode(meta["nonce"], index, kept[-1])
            _write_log(server, extents, at, frame)
            at += len(frame)
        _write_log(server, extents, at, rec.encode(meta["nonce"], 91, b"T" * 5000)[:3000])   # torn: its last
        assert at > meta["reach"]
        server.start()
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            assert log.info()["records"] == len(kept) and log.info()["length"] == at
            assert list(log.records()) == kept
        _one_more_survives_a_kill(server, name, kept)
    finally:
        server.cleanup()


def test_the_compiled_appends_raise_the_reach_before_they_write_past_it(request):
    """Same-host appends and batches are written by the compiled receive loop, with no Python
    on the way: past the reach it hands them to Python, which raises it in the metadata first.
    Had it written on, the metadata's reach would lag the log, and a restart would leave old
    frames past it unzeroed. Appends and batches crossing the reach, then a SIGKILL: the reach
    on disk covers the whole log."""
    server = PersistentServer("ramdisk", capacity="160MiB").start()
    try:
        name = ns_name(request)
        record = b"c" * ((16 << 10) - rec.HEADER_BYTES)      # frames of 16 KiB: none across two extents
        with memfabric.init(server.config) as s:
            log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 150 << 20)
            while log.info()["length"] < 70 << 20:          # past the first reach (64 MiB), one by one
                for _ in range(256):
                    log.append(record)
            while log.info()["length"] < 135 << 20:         # past the next (about 128 MiB), in batches
                log.append_many([record] * 64)
            length = log.info()["length"]
        server.kill()
        meta, _ = _plog_file(server)
        assert length <= meta["reach"] <= meta["capacity"], (length, meta["reach"])
    finally:
        server.cleanup()


def _one_more_survives_a_kill(server: PersistentServer, name: str, kept: list[bytes]) -> None:
    """The restored plog "wal" (holding `kept`) takes one more append, which a SIGKILL and a
    restart keep; then it is deleted."""
    with memfabric.init(server.config) as s:
        s.namespace(name, "k", pool="keep").plog("wal").append(b"after")
    server.kill()
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert list(log.records()) == kept + [b"after"]
        log.delete()


@pytest.mark.parametrize("reach", [-8, "far", None, "past the capacity"])
def test_a_damaged_reach_in_the_metadata_costs_a_full_scan_not_the_log(server, request, reach):
    """The reach only bounds how much of a log a restart reads and zeroes. A value no server
    writes (negative, past the capacity, not an integer) made the restore skip the plog as
    unreadable metadata, and the pool then discarded its segment files: every record gone,
    though its bytes were whole. It is read as an old file without one is: the whole
    capacity scanned."""
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 1 << 20)
        kept = [b"record %d " % i * (i + 1) for i in range(40)]
        for r in kept:
            log.append(r)
    server.stop()
    meta, _ = _plog_file(server)
    meta["reach"] = meta["capacity"] + 8 if reach == "past the capacity" else reach
    (path,) = [os.path.join(server.pool_dir, "plogs", n) for n in os.listdir(os.path.join(server.pool_dir, "plogs"))
               if n.endswith(".plog")]
    with open(path, "wb") as f:
        f.write(msgpack.packb(meta, use_bin_type=True))
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert list(log.records()) == kept
    _one_more_survives_a_kill(server, name, kept)


def test_seal_and_delete_survive_a_restart(server, request):
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        ns = s.create_namespace(name, sec_id="k", pool="keep")
        sealed = ns.create_plog("sealed", 64 << 10)
        sealed.append(b"before seal")
        sealed.seal()
        gone = ns.create_plog("gone", 64 << 10)
        gone.append(b"x")
        gone.delete()
        ns.create_plog("empty", 4096)
    server.kill()
    server.start()
    with memfabric.init(server.config) as s:
        ns = s.namespace(name, "k", pool="keep")
        infos = {p["name"]: p for p in ns.plogs()}
        assert set(infos) == {"sealed", "empty"}
        assert infos["sealed"]["state"] == "sealed" and infos["sealed"]["records"] == 1
        assert infos["empty"]["capacity"] == 4096 and infos["empty"]["records"] == 0
        with pytest.raises(Sealed):
            ns.plog("sealed").append(b"after")
        with pytest.raises(NoSuchObject):
            ns.plog("gone")
        assert ns.plog("sealed").record(0) == b"before seal"
        audit = s.home().call("audit")["pools"]["keep"]
        assert audit["live_bytes"] == audit["accounted_bytes"]
        ns.destroy()
    server.stop()
    assert not [n for n in os.listdir(os.path.join(server.pool_dir, "plogs")) if n.endswith(".plog")]
    server.start()
    with memfabric.init(server.config) as s:
        with pytest.raises(memfabric.NoSuchNamespace):
            s.namespace(name, "k", pool="keep").plogs()


def test_sigkill_of_an_idle_server_keeps_plogs(server, request):
    """The plain case, pmem and ramdisk: answered appends, then a SIGKILL, nothing lost."""
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 3 << 20)
        offsets = log.append_many([bytes([i]) * 40_000 for i in range(50)])
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert [log.read(o, 40_000) for o in offsets] == [bytes([i]) * 40_000 for i in range(50)]


_SLOW_RESTORE = """
import importlib, os, time
_slow = os.environ.get("MF_TEST_SLOW")          # module:attribute of memfabric.plog to slow down
if _slow:
    _module, _path = _slow.split(":")
    *_owner_path, _name = _path.split(".")
    _owner = importlib.import_module("memfabric.plog." + _module)
    for _part in _owner_path:
        _owner = getattr(_owner, _part)
    _real = getattr(_owner, _name)

    def _slowed(*args, **kwargs):          # each call: a line, then half a second
        with open(os.environ["MF_TEST_RESTORE_MARK"], "a") as f:
            f.write("call\\n")
        time.sleep(0.5)
        return _real(*args, **kwargs)

    setattr(_owner, _name, _slowed)
"""


@pytest.mark.parametrize("plogs, slowed", [(30, "record:scan"), (1, "store:LogBytes.read_bytes")],
                         ids=["between plogs", "within a plog"])
def test_a_stop_during_a_long_restore_of_plogs_ends_it_and_the_next_start_restores_all(plogs, slowed, tmp_path,
                                                                                      monkeypatch, request):
    """A restart scans every plog's log before the server is ready: thousands of plogs, or a
    large one, took longer than a stop waits before it kills (`up`: 15 s). A SIGTERM meanwhile
    ends the restore between two plogs and within one plog's scan (here each plog's scan, or
    each MiB read of one, takes half a second): the server exits saying why, never ready (before
    the fix, the restore ran to its end and the memory reserve after it saw the stop), and the
    next start restores every plog whole."""
    server = PersistentServer("ramdisk").start()
    try:
        name = ns_name(request)
        size = 100 if plogs > 1 else (1 << 20) - 64
        with memfabric.init(server.config) as s:
            ns = s.create_namespace(name, sec_id="k", pool="keep")
            for i in range(plogs):
                log = ns.create_plog(f"p{i}", 4096 if plogs > 1 else 7 << 20)
                log.append_many([bytes([i]) * size] * (1 if plogs > 1 else 6))
        server.stop()
        (tmp_path / "sitecustomize.py").write_text(_SLOW_RESTORE)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
        mark = tmp_path / "calls"
        monkeypatch.setenv("MF_TEST_RESTORE_MARK", str(mark))
        monkeypatch.setenv("MF_TEST_SLOW", slowed)
        proc = subprocess.Popen(MF + [server.config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(mark.exists, "the restore to begin", WAIT_S)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0 and "stopped while restoring the plogs" in out, out
        assert " ready " not in out
        monkeypatch.delenv("MF_TEST_SLOW")
        server.start()
        with memfabric.init(server.config) as s:
            ns = s.namespace(name, "k", pool="keep")
            assert sorted(p["name"] for p in ns.plogs()) == sorted(f"p{i}" for i in range(plogs))
            for i in range(plogs):
                assert list(ns.plog(f"p{i}").records()) == [bytes([i]) * size] * (1 if plogs > 1 else 6)
    finally:
        server.cleanup()


def test_a_stage_scribbled_on_while_its_batch_is_framed_leaves_whole_records(server, request):
    """The server frames a same-host batch straight from the client's shared stage, which the
    client may write at any moment: each payload is copied, then its CRC computed over the
    copy, so a client scribbling over its stage mid-append gets records of whatever bytes were
    there, every one whole: a restart's scan finds them all (a CRC of other bytes than its
    frame's would end the log there, losing every later append of every client)."""
    from memfabric.plog.client import _stage_holder

    name = ns_name(request)
    with memfabric.init(server.config) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("scribbled", 6 << 20)
        batch = [bytes([i]) * 4096 for i in range(50)]        # 200 KB: through the shared stage
        log.append_many(batch)
        view = _stage_holder(s.link(log.home)).mapped.view
        patterns = [os.urandom(len(view)), bytes(len(view))]
        stop = threading.Event()

        def scribble() -> None:
            for n in range(1_000_000):
                if stop.is_set():
                    return
                view[:] = patterns[n % 2]

        scribbler = threading.Thread(target=scribble)
        scribbler.start()
        try:
            for _ in range(25):
                log.append_many(batch)
        finally:
            stop.set()
            scribbler.join(WAIT_S)
        records = log.info()["records"]
        assert records == 26 * 50
    server.kill()
    server.start()
    with memfabric.init(server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("scribbled")
        assert log.info()["records"] == records
        assert all(len(r) == 4096 for r in log.records())


def test_seal_while_processes_append_fences_them_all(two_servers, request):
    """BookKeeper's fencing: once seal returns, no append from anyone succeeds, and every
    append that was acknowledged is in the sealed log."""
    name = ns_name(request)
    with memfabric.init(two_servers.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="logs")
        log = ns.create_plog("shared", 24 << 20)
        remote = os.path.join(two_servers.directory, "remote.toml")
        procs = [subprocess.Popen([sys.executable, "-c", APPENDER, remote if tag % 2 else two_servers.directory,
                                   name, str(tag), "1000000", "logs"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for tag in range(3)]
        try:
            deadline = time.monotonic() + 60
            while log.info()["records"] < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            sealed = log.seal()
            outputs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        assert sealed["state"] == "sealed" and sealed["records"] >= 200
        for (out, err), p in zip(outputs, procs):
            assert p.returncode != 0 and "Sealed" in err, err      # each appender was refused in the end
        records = list(log.records())
        assert len(records) == sealed["records"] == log.info()["records"]   # nothing got in after seal returned
        place = {}
        at = 0
        for payload in records:
            place[_check_record(payload)] = at + rec.HEADER_BYTES
            at += rec.frame_bytes(len(payload))
        for tag, (out, _) in enumerate(outputs):
            for line in out.splitlines():
                _, seq, offset = line.split()
                assert place[(tag, int(seq))] == int(offset)    # every acknowledged append is in
        log.delete()


def test_a_handle_outlives_a_restart_of_its_home(server, request):
    """The same Plog handle, across a SIGKILL and restart of its server: calls while it is
    down fail SERVER_UNAVAILABLE (not a hang, not a wrong answer); after it, the handle goes on."""
    name = ns_name(request)
    with memfabric.init(server.config, timeout_s=5) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 64 << 10)
        log.append(b"one")
        server.kill()
        with pytest.raises(memfabric.ServerUnavailable):
            log.append(b"lost")
        server.start()
        log.append(b"two")
        assert list(log.records()) == [b"one", b"two"]


def _bytes_written(pid: int) -> int:
    """What a process has written with write calls so far (/proc/PID/io wchar)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_a_pmem_plog_is_made_ready_as_its_log_grows_not_whole_at_create(request):
    """Creating a pmem plog wrote zeros over its whole capacity and flushed them (a 2 GiB one took
    4 s, a 100 GiB one minutes), so that appends' flushes carry data alone. Now only its first
    part is made ready at create; the rest is made ready ahead of the log as it grows, by a
    thread of the server, never where the log has written. Two
    processes append past several rounds of it, then a SIGKILL: every acknowledged record
    comes back, and the server wrote each byte of the log about twice (zeros, then records)."""
    server = PersistentServer("pmem", capacity="600MiB").start()
    try:
        name = ns_name(request)
        capacity = 512 << 20
        with memfabric.init(server.config) as s:
            before = _bytes_written(server.proc.pid)
            log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("shared", capacity)
            made = _bytes_written(server.proc.pid) - before
            assert made <= first_ready(capacity) + (16 << 20), f"creating {capacity >> 20} MiB wrote {made >> 20} MiB"
            more = [bytes([i]) * (1 << 20) for i in range(20)]
            proc = subprocess.Popen([sys.executable, "-c", APPENDER, server.config, name, "7", "400", "keep"],
                                    stdout=subprocess.PIPE, text=True)
            try:
                for _ in range(12):             # past 224 MiB: made ready for by rounds, when the
                    log.append_many(more[:10])      # flush was of the appender's small records
                    for r in more[10:]:
                        log.append(r)
                assert proc.wait(timeout=120) == 0
                acked = [tuple(map(int, line.split()[1:])) for line in proc.stdout]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            length = log.info()["length"]
            assert length > 240 << 20 and len(acked) == 400
        written = _bytes_written(server.proc.pid) - before
        assert written <= first_ready(capacity) + 2 * length + (64 << 20), \
            f"{written >> 20} MiB written for a log of {length >> 20} MiB"
        server.kill()
        meta, extents = _plog_file(server)
        assert length <= meta["reach"] <= next_reach(length, capacity), (length, meta["reach"])
        assert _read_log(server, extents, length, meta["reach"] - length).count(0) == meta["reach"] - length
        server.start()
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("shared")
            records = list(log.records())
            assert [r for r in records if len(r) == 1 << 20] == more * 12
            at, payloads = 0, {}
            for r in records:
                payloads[at + rec.HEADER_BYTES] = r
                at += rec.frame_bytes(len(r))
            assert [_check_record(payloads[offset]) for _, offset in acked] == [(7, seq) for seq, _ in acked]
            assert log.info()["length"] == length
            log.append(b"after")
            log.delete()
    finally:
        server.cleanup()

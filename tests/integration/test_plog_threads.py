"""Threads appending through one plog handle share requests and flushes (plog/combine.py),
with a real server: records queued while one request is under way go in one request, each
thread's records whole at the offsets it was given, in its order; a plog filling up under
them appends what fits and refuses the rest, on this host and over RPC."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

import memfabric
from memfabric.datapath import forks
from memfabric.errors import OutOfSpace
from memfabric.plog.combine import Combiner

from ..helpers import ns_name, stopped
from .test_metrics import scrape, value
from .test_plog_compiled import fab  # noqa: F401 - fab: the shared fabric (pools "ram", "disk")

WAIT_S = 30.0


def _record(tag: int, seq: int) -> bytes:
    return struct.pack("<II", tag, seq) * (1 + (seq * 5 + tag) % 200)


def _appenders(log, threads: int, count: int) -> tuple[list[threading.Thread], dict[int, object]]:
    out: dict[int, object] = {}

    def run(tag: int) -> None:
        offsets = []
        try:
            for seq in range(count):
                offsets.append(log.append(_record(tag, seq)))
        except BaseException as exc:          # noqa: BLE001 - reported below
            out[tag] = exc
            return
        out[tag] = offsets

    return [threading.Thread(target=run, args=(t,)) for t in range(threads)], out


def test_records_appended_while_a_request_is_under_way_go_in_one_request_and_one_flush(fab, request):  # noqa: F811
    """The server SIGSTOPped while one thread's append is under way: the 7 other threads'
    records queue, and go as one request once it answers. Two flushes for 8 records."""
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="disk").create_plog("wal", 4 << 20)
        log.append(b"first")                  # (the connection's first append: granted to the loop)
        before = scrape(fab.metrics)
        threads, out = _appenders(log, 8, 1)
        with stopped(pid):
            threads[0].start()
            time.sleep(0.2)                   # its request sent; the server stopped
            for t in threads[1:]:
                t.start()
            end = time.monotonic() + WAIT_S
            while log._combiner.waiting < 7:
                assert time.monotonic() < end, "the threads did not queue"
                time.sleep(0.005)
        for t in threads:
            t.join(WAIT_S)
        after = scrape(fab.metrics)
        assert all(type(v) is list for v in out.values()), out
        assert value(after, "memfabric_plog_appends_total") - value(before, "memfabric_plog_appends_total") == 8
        assert value(after, "memfabric_plog_flushes_total") - value(before, "memfabric_plog_flushes_total") == 2
        for tag, offsets in out.items():
            want = _record(tag, 0)
            assert log.read(offsets[0], len(want)) == want
        assert log.info()["records"] == 9


@pytest.mark.parametrize("where", ["same host", "remote"])
def test_threads_sharing_a_handle_each_get_their_records_whole_in_order(fab, request, where):  # noqa: F811
    name = ns_name(request)
    path = fab.directory if where == "same host" else os.path.join(fab.directory, "remote.toml")
    with memfabric.init(fab.directory) as admin:
        admin.create_namespace(name, sec_id="k", pool="disk").create_plog("wal", 16 << 20)
    with memfabric.init(path) as s:
        log = s.namespace(name, "k", pool="disk").plog("wal")
        threads, out = _appenders(log, 8, 120)
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 4)
        assert all(type(v) is list for v in out.values()), out
        assert log._combiner.batches > 0              # (they did go together)
        by_offset = {}
        for tag, offsets in out.items():
            assert offsets == sorted(offsets)
            for seq, offset in enumerate(offsets):
                by_offset[offset] = _record(tag, seq)
        assert len(by_offset) == 8 * 120
        for offset, want in by_offset.items():
            assert log.read(offset, len(want)) == want
        assert sorted(log.records()) == sorted(by_offset.values())


def test_threads_filling_a_plog_append_what_fits_and_the_rest_are_refused_whole(fab, request):  # noqa: F811
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="disk").create_plog("small", 64 << 10)
        got: dict[int, list] = {t: [] for t in range(6)}

        def run(tag: int) -> None:
            seq = 0
            while True:
                record = _record(tag, seq)
                try:
                    got[tag].append((log.append(record), record))
                except OutOfSpace:
                    got[tag].append((None, record))
                    if seq > 200:
                        return
                seq += 1
                if seq > 400:
                    return

        threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 4)
        appended = [(o, r) for v in got.values() for o, r in v if o is not None]
        assert appended and any(o is None for v in got.values() for o, _ in v)
        for offset, record in appended:
            assert log.read(offset, len(record)) == record
        assert sorted(log.records()) == sorted(r for _, r in appended)
        assert log.info()["records"] == len(appended)


def _combiners_made_since(before: list) -> list:
    """The combiners forks tracks (this process's live ones) not among `before` (held by the
    caller: none of them freed, its address taken by a new one)."""
    return [c for c in list(forks._states) if isinstance(c, Combiner) and not any(c is b for b in before)]


def test_a_handle_makes_its_combiner_at_its_first_append_one_for_threads_appending_first_at_once(fab, request):  # noqa: F811
    """A handle that only reads has no combiner, nor one tracked for forks (every handle made
    one); its first append makes it: one for the handle, whichever threads append first."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as admin:
        admin.create_namespace(name, sec_id="k", pool="disk").create_plog("wal", 1 << 20).append(b"first")
    with memfabric.init(fab.directory) as s:
        before = [c for c in list(forks._states) if isinstance(c, Combiner)]
        log = s.namespace(name, "k", pool="disk").plog("wal")
        assert list(log.records()) == [b"first"] and log.record(0) == b"first" and log.info()["records"] == 1
        assert log._combiner is None and _combiners_made_since(before) == []
        ready = threading.Barrier(8)
        out: dict[int, int] = {}

        def first_append(tag: int) -> None:
            ready.wait(WAIT_S)
            out[tag] = log.append(_record(tag, 0))

        threads = [threading.Thread(target=first_append, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert sorted(out) == list(range(8))
        assert sorted(log.records()) == sorted([b"first"] + [_record(t, 0) for t in range(8)])
        assert _combiners_made_since(before) == [log._combiner]

"""A pmem plog's group commit in the connections' receive loops (_commitgroup.c): appends the
loop wrote wait there for a flush, one waiter at a time calling Python's _flush_to, and are
answered from the loop. With real servers and processes: every acknowledged record durable and
whole, flushes shared, and a flush that fails (EIO at fdatasync, injected in the server's
process) failing every append it was to cover, through Python, with the server up."""

from __future__ import annotations

import os
import struct
import threading

import pytest

import memfabric
from memfabric.errors import IOError_
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import free_ports, ns_name
from .test_metrics import ops, scrape, value
from .test_plog_compiled import fab, run_writers  # noqa: F401 - fab: the shared fabric

MiB = 1 << 20

WRITER = r"""
import struct, sys
import memfabric
directory, ns, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with memfabric.init(directory) as s:
    log = s.namespace(ns, "k", pool="disk").plog("wal")
    offsets = []
    for seq in range(count):
        offsets.append(log.append(struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300)))
    print(" ".join(map(str, offsets)))
"""


def _record(tag: int, seq: int) -> bytes:
    return struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300)


def test_appenders_in_processes_share_flushes_answered_in_the_loop(fab, request):  # noqa: F811
    """Eight processes appending to one pmem plog: each record whole, at the offset its writer
    was given, in its writer's order; every append but each connection's first (Python's: it
    grants the rest, and one across two extents) answered in the loop, after a flush; fewer
    flushes than appends."""
    name = ns_name(request)
    writers, count = 8, 150
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="disk").create_plog("wal", 16 * MiB)
        before = scrape(fab.metrics)
        outs = run_writers(WRITER, lambda t: [fab.directory, name, str(t), str(count)], writers)
        after = scrape(fab.metrics)
        appends = value(after, "memfabric_plog_appends_total") - value(before, "memfabric_plog_appends_total")
        flushes = value(after, "memfabric_plog_flushes_total") - value(before, "memfabric_plog_flushes_total")
        assert appends == writers * count
        assert 0 < flushes < appends
        # Python's: each connection's first, and the few whose frame spans two extents (1 MiB each).
        assert writers <= ops(after, "plog_append") - ops(before, "plog_append") <= writers + 4
        by_offset = {}
        for tag, out in enumerate(outs):
            offsets = list(map(int, out.split()))
            assert len(offsets) == count and offsets == sorted(offsets)
            for seq, offset in enumerate(offsets):
                by_offset[offset] = _record(tag, seq)
        records = list(log.records())
        assert len(records) == writers * count
        for offset, want in by_offset.items():
            assert log.read(offset, len(want)) == want
        assert sorted(records) == sorted(by_offset.values())


SITECUSTOMIZE = r"""
import errno, os
_mark = os.environ.get("MF_TEST_FAIL_FLUSH_MARK")
if _mark:
    import memfabric.media.files as _files
    _real = _files._datasync_close

    def _failing(fd):
        if os.path.exists(_mark):        # the disk fails from now on
            os.close(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _real(fd)

    _files._datasync_close = _failing
"""


@pytest.fixture
def failing_disk(tmp_path, monkeypatch):
    """A one-server fabric whose server's fdatasync of a pool file fails with EIO once the
    returned marker file exists (a sitecustomize in its processes stands in for the disk)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    mark = tmp_path / "disk-failed"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MF_TEST_FAIL_FLUSH_MARK", str(mark))
    port = free_ports(1)
    fabric = LocalFabric(short_tmp_dir("mf-plogeio-"), servers=1, capacity="16MiB", segment_size="1MiB",
                         extra_args=["--pool", "disk:pmem:32MiB", "--metrics-port", str(port)]).start()
    fabric.metrics = f"127.0.0.1:{port}"
    try:
        yield fabric, mark
    finally:
        assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


def test_a_failed_flush_fails_the_appends_waiting_in_the_loop(failing_disk):
    """Four connections appending to a pmem plog when its flush starts failing: each append
    either returned an offset where its record lies whole, or failed with IO_ERROR (through
    Python: the loop hands back what its leader's flush raised); none succeeds after the
    first failure; the committed records stay readable and the server serves on."""
    fabric, mark = failing_disk
    sessions = [memfabric.init(fabric.directory) for _ in range(4)]
    try:
        sessions[0].create_namespace("eio", sec_id="k", pool="disk").create_plog("wal", 8 * MiB)
        logs = [s.namespace("eio", "k", pool="disk").plog("wal") for s in sessions]
        for tag, log in enumerate(logs):
            log.append(_record(tag, 0))           # Python's: it grants the rest to the loop
        failed_at = threading.Event()
        outcomes: list[list] = [[] for _ in logs]

        def append(tag: int) -> None:
            for seq in range(1, 400):
                if seq == 100 and tag == 0:
                    mark.touch()
                try:
                    outcomes[tag].append(("ok", seq, logs[tag].append(_record(tag, seq))))
                except IOError_ as exc:
                    failed_at.set()
                    outcomes[tag].append(("failed", seq, str(exc)))

        threads = [threading.Thread(target=append, args=(t,)) for t in range(len(logs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert failed_at.is_set()
        for tag, got in enumerate(outcomes):
            kinds = [k for k, _, _ in got]
            first = kinds.index("failed")
            assert set(kinds[first:]) == {"failed"}, "an append succeeded after a flush failed"
            assert any("flush failed" in why for k, _, why in got if k == "failed")
            for kind, seq, offset in got[:first]:
                assert logs[tag].read(offset, len(_record(tag, seq))) == _record(tag, seq)
        info = logs[0].info()
        assert info["records"] == 4 + sum(kinds.count("ok") for kinds in ([k for k, _, _ in g] for g in outcomes))
        with pytest.raises(IOError_, match="flush failed"):
            logs[1].append(b"after")
        assert logs[2].record(2) == _record(2, 0)      # the first four went in one by one
        assert value(scrape(fabric.metrics), "memfabric_plog_compiled_appends_total") > 0
        sessions[3].create_namespace("alive", sec_id="k", pool="disk")    # the server serves on
    finally:
        for s in sessions:
            s.close()

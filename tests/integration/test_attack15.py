"""Found by attacking the MemPlog shared stage, the compiled framing and the probe's counts."""

from __future__ import annotations

import pytest

import memfabric

from ..conftest import short_tmp_dir
from ..helpers import interrupt_at, ns_name
from memfabric.launcher import LocalFabric


@pytest.fixture(scope="module")
def plog_fabric():
    fab = LocalFabric(short_tmp_dir("mf-atk15-"), servers=1, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:96MiB"]).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.mark.parametrize("outcome", ["appended", "refused"])
def test_idle_sessions_that_once_appended_a_large_batch_do_not_starve_others(plog_fabric, outcome, request):
    """Before the fix: a same-host connection kept the shared stage of its largest batch for
    its whole life, counted against what the server holds being sent (256 MiB): after four
    processes had each appended one 64 MiB batch, every other large batch on that server
    (a fifth process's 1 MiB batch included) failed with LIMIT_EXCEEDED, 'try again soon',
    for as long as those four stayed connected, idle. The same when their batches were
    refused (a plog too small for them)."""
    from memfabric.limits import MAX_PLOG_BUFFERED_BYTES, MAX_PLOG_STAGED_BYTES
    batch = [b"b" * (4 << 20)] * (MAX_PLOG_STAGED_BYTES // (4 << 20))
    holders = []
    try:
        with memfabric.init(plog_fabric.directory) as owner:
            ns = owner.create_namespace(ns_name(request), sec_id="s", pool="logs")
            for _ in range(MAX_PLOG_BUFFERED_BYTES // MAX_PLOG_STAGED_BYTES):
                s = memfabric.init(plog_fabric.directory)
                holders.append(s)
                theirs = s.namespace(ns.name, sec_id="s", pool="logs")
                if outcome == "appended":
                    log = theirs.create_plog("big", MAX_PLOG_STAGED_BYTES + (1 << 20))
                    assert len(log.append_many(batch)) == len(batch)
                else:
                    log = theirs.create_plog("big", 1 << 20)
                    with pytest.raises(memfabric.errors.OutOfSpace):
                        log.append_many(batch)
                log.delete()
            log = ns.create_plog("small", 4 << 20)
            one_mib = [b"s" * 4096] * 256
            assert len(log.append_many(one_mib)) == 256
            assert list(log.records()) == one_mib
            ns.destroy()
    finally:
        for s in holders:
            s.close()


def _lines(function) -> list[int]:
    code = function.__code__
    return sorted({line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno})


@pytest.mark.parametrize("where", ["append_many", "_append_shared", "stage_for", "_keep_token", "discard"])
def test_ctrl_c_at_every_line_of_a_shared_append_leaves_whole_batches(plog_fabric, where, request):
    """Ctrl-C at each line of the same-host path of a large batch: the batch is appended
    whole or not at all, the link stays up, and the next large batches (of both sizes of
    stage) are appended as they were given; no stage is left behind (more interruptions
    than a connection has stages)."""
    import sys
    from memfabric.plog.client import Plog, _StageHolder
    function = getattr(Plog, where, None) or getattr(_StageHolder, where)
    with memfabric.init(plog_fabric.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="s", pool="logs")
        n = 0
        for line in _lines(function):
            for first in ("small", "large"):
                n += 1
                small = [bytes([n % 256]) * 4096] * 100        # the least stage, kept
                large = [bytes([n % 256]) * (5 << 20)]         # a stage for one batch
                batch = small if first == "small" else large
                log = ns.create_plog(f"ctrl-c-{n}", 24 << 20)
                tracer, fired = interrupt_at(function, line)
                sys.settrace(tracer)
                try:
                    log.append_many(batch)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                got = list(log.records())
                assert got in ([], batch), f"Ctrl-C at line {line}: {len(got)} records"
                assert not s.home().closed, f"Ctrl-C at line {line} closed the link"
                for again in (large, small, large, small):
                    log.append_many(again)
                    got += again
                assert list(log.records()) == got, f"after Ctrl-C at line {line}"
                log.delete()
        ns.destroy()

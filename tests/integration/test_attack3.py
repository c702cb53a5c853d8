"""Found by attacking MemPlog and the link under it: Ctrl-C at any point of an IPC call,
plog arguments too large for any plog, staged appends interrupted half-way, and one plog
name created from two servers at once."""

from __future__ import annotations

import sys

import pytest

import memfabric
from memfabric.datapath.link import ServerLink
from memfabric.errors import OutOfRange

from ..conftest import short_tmp_dir
from ..helpers import interrupt_at, ns_name
from memfabric.launcher import LocalFabric


@pytest.fixture(scope="module")
def plog_fabric():
    fab = LocalFabric(short_tmp_dir("mf-atk3-"), servers=1, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:32MiB"]).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def test_ctrl_c_at_any_line_of_an_ipc_call_leaves_the_link_working(plog_fabric):
    """Before the fix, a Ctrl-C landing just after the request was sent (between the send and
    the receive loop) left the request unmarked: the next call read its reply, failed with
    PROTOCOL_ERROR and the link was closed (its mappings revoked)."""
    code = ServerLink._exchange.__code__
    first = code.co_firstlineno
    last = max(line for _, _, line in code.co_lines() if line is not None)
    with memfabric.init(plog_fabric.directory) as s:
        link = s.link(s.home().server_id)
        interrupted = 0
        for line in range(first, last + 1):
            tracer, fired = interrupt_at(ServerLink._exchange, line)
            sys.settrace(tracer)
            try:
                link.call("stats")
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                sys.settrace(None)
            for _ in range(3):          # later calls answer, on the same link
                assert "id" in link.call("stats"), f"after Ctrl-C at line {line}"
            assert not link.closed, f"Ctrl-C at line {line} closed the link"
        assert interrupted > 5


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_offsets_and_indexes_past_any_plog_get_out_of_range(plog_fabric, where, request):
    """Before the fix: OverflowError (msgpack's, or bytearray's) for 2**64 and up."""
    import os
    config = plog_fabric.directory if where == "same-host" else os.path.join(plog_fabric.directory, "remote.toml")
    with memfabric.init(config) as s:
        ns = s.create_namespace(ns_name(request), sec_id="s", pool="logs")
        log = ns.create_plog("big", 4096)
        log.append(b"abc")
        huge = 1 << 70
        for call in (lambda: log.read(huge, 1), lambda: log.read(0, huge), lambda: log.read(huge, huge),
                     lambda: log.read(-huge, 1), lambda: log.record(huge), lambda: list(log.records(huge)),
                     lambda: log.read(0, huge, into=bytearray(4))):
            with pytest.raises((OutOfRange, memfabric.errors.InvalidArgument)):
                call()
        assert list(log.records(0, huge)) == [b"abc"]
        ns.destroy()


def _interrupt_where(function, text: str, nth: int, op: str | None = None):
    """A tracer raising KeyboardInterrupt the `nth` time (from 0) `function` reaches a line
    containing `text` (in a call of `op`, for ServerLink._exchange)."""
    import linecache
    code = function.__code__
    seen = []

    def local(frame, event, arg):
        if event == "line" and text in linecache.getline(code.co_filename, frame.f_lineno) \
                and (op is None or frame.f_locals.get("op") == op):
            seen.append(frame.f_lineno)
            if len(seen) == nth + 1:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None
    return tracer


@pytest.mark.parametrize("where_interrupted", ["making the stage", "writing the batch"])
def test_staged_appends_interrupted_half_way_leave_no_stage_behind(plog_fabric, where_interrupted, request):
    """Each append_many of a large batch interrupted (Ctrl-C) while its shared stage was made
    (the server made it, its reply not taken yet) or while the batch was written into it leaves
    no stage behind: a stage whose reply came late is dropped (late_replies.py), one given up
    on is replaced by the next. (Before the shared stages, a batch was staged in pieces, and
    each interrupted one left its stage: after 16, every large batch of the session failed
    with LIMIT_EXCEEDED.) Nothing of an interrupted batch is appended."""
    from memfabric.plog.client import Plog, _records
    from memfabric.limits import MAX_PLOG_STAGES_PER_CLIENT, PLOG_INLINE_BYTES
    with memfabric.init(plog_fabric.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="s", pool="logs")
        log = ns.create_plog("staged", 16 << 20)
        record = b"r" * (3 * PLOG_INLINE_BYTES)
        for _ in range(MAX_PLOG_STAGES_PER_CLIENT + 2):
            if where_interrupted == "writing the batch":
                tracer = _interrupt_where(Plog._append_shared, "_records.gather_into(stage.view, views"
                                          if _records is not None else "stage.view[at:at + v.nbytes] = v", 0)
            else:
                # Its reply read (the compiled call sends and receives in one) and not taken yet.
                tracer = _interrupt_where(ServerLink._exchange, "sending = False", 0, op="plog_share_stage")
            sys.settrace(tracer)
            try:
                with pytest.raises(KeyboardInterrupt):
                    log.append_many([record])
            finally:
                sys.settrace(None)
        assert log.info()["records"] == 0
        assert len(log.append_many([record, record])) == 2
        assert list(log.records()) == [record, record]
        ns.destroy()


def test_two_servers_creating_one_plog_name_at_once_leave_one_plog(request):
    """Before the fix: clients of two servers creating the same name at once both succeeded
    (28 times in 30), each on its own server: two plogs of one name, ns.plog(name) opening
    either, two writers of one "log" each writing its own."""
    import threading
    from memfabric.errors import MemfabricError
    fab = LocalFabric(short_tmp_dir("mf-atk3-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:16MiB"]).start()
    try:
        with memfabric.init(fab.directory, server=0) as s0, memfabric.init(fab.directory, server=1) as s1:
            assert s0.home().server_id != s1.home().server_id
            name = ns_name(request)
            namespaces = [s0.create_namespace(name, sec_id="s", pool="logs"),
                          s1.create_namespace(name, sec_id="s", pool="logs", exist_ok=True)]
            for round_ in range(20):
                made: list[object] = [None, None]

                def create(k: int) -> None:
                    try:
                        made[k] = namespaces[k].create_plog(f"race{round_}", 4096)
                    except MemfabricError as exc:
                        made[k] = exc
                threads = [threading.Thread(target=create, args=(k,)) for k in (0, 1)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                logs = [m for m in made if not isinstance(m, MemfabricError)]
                assert len(logs) <= 1, f"round {round_}: both created it"
                for m in made:
                    if isinstance(m, MemfabricError):
                        assert isinstance(m, memfabric.errors.InvalidArgument) and "exists" in str(m)
                listed = [p["name"] for p in namespaces[0].plogs() if p["name"] == f"race{round_}"]
                assert len(listed) == len(logs)
                if logs:
                    logs[0].append(b"x")
                    assert namespaces[1 - made.index(logs[0])].plog(f"race{round_}").record(0) == b"x"
    finally:
        assert fab.stop() == 0

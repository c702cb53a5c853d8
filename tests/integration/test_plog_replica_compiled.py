"""A same-host home's forwards to a copy, served in the copy's receive loop (plog/fast_append.py
grant_replica, _plogserve.c replica_packet): the copy's Python operation histogram no longer sees
them on ramdisk, and every forward the loop cannot take (a copy on pmem, a record forwarded in
pieces, a sealed copy, a deleted then re-created plog) goes to Python, which keeps the rules."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import memfabric
from memfabric.errors import Sealed
from memfabric.limits import MAX_NAME_CHARS, MAX_SEC_ID_BYTES, PLOG_PULL_BYTES, PLOG_REPLICA_PIECE_BYTES

from ..helpers import ns_name, stop_process, wait_until
from .test_metrics import errors, ops, scrape, value
from .test_plog_replicas import MiB, _body, _copy, _fabric, _metrics


@pytest.fixture(scope="module", params=["ramdisk", "pmem"])
def pair(request):
    fab = _fabric(2, medium=request.param, metrics=True)
    fab.medium = request.param
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def _replicated(fab, s: memfabric.Session, request, name: str = "wal"):
    log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog(name, 4 * MiB, replicas=2)
    info = log.info()
    (other,) = info["replica_servers"]
    return log, info["home"], other


def _in_python(fab, server_id: int) -> float:
    return ops(scrape(_metrics(fab, server_id)), "plog_replica_append")


def test_forwards_of_whole_records_are_served_in_the_copys_receive_loop(pair, request):
    """Without the compiled copy side each forward is one plog_replica_append in the copy's
    histogram; with it, on ramdisk only the first (which grants the rest). On pmem a copy
    flushes before it answers, in Python: each one is counted."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        log.append(_body(0))                   # Python's on both servers: each grants the next ones
        log.append(_body(1))
        before = _in_python(pair, other)
        for i in range(2, 60):
            log.append(_body(i))
        log.append_many([_body(i) for i in range(60, 70)])      # one forward of ten records
        in_python = _in_python(pair, other) - before
        assert in_python == (0 if pair.medium == "ramdisk" else 59)
        copy = _copy(log, other)
        assert copy.info()["length"] == log.info()["length"] and copy.info()["records"] == 70
        length = log.info()["length"]
        assert copy.read(0, length) == _copy(log, home).read(0, length)     # byte for byte
        assert list(copy.records()) == [_body(i) for i in range(70)]
        assert log.info()["dead_replicas"] == []


def test_a_record_past_one_piece_is_read_by_the_copy_from_the_homes_files_in_one_message(pair, request):
    """A record past one forward piece (PLOG_REPLICA_PIECE_BYTES) goes to a same-host copy as
    one message naming where its bytes lie in the home's segment files, which the copy reads
    itself (in pieces it took two messages, each a round trip through both sides' Python).
    That message is not the loop's; the loop takes the next. The copy stays in step."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        log.append(b"a")
        log.append(b"b")
        before = _in_python(pair, other)
        big = bytes(range(256)) * ((PLOG_REPLICA_PIECE_BYTES + (64 << 10)) // 256)      # two pieces
        log.append(big)
        assert _in_python(pair, other) - before == 1
        log.append(b"c")
        assert _in_python(pair, other) - before == (1 if pair.medium == "ramdisk" else 2)
        assert list(_copy(log, other).records()) == [b"a", b"b", big, b"c"] == list(log.records())
        assert log.info()["dead_replicas"] == []


def test_a_forward_past_what_one_pull_reads_takes_several_and_lands_whole(pair, request):
    """A forward of more than PLOG_PULL_BYTES (one record of it, and a batch of records around
    it, over several 1 MiB segments) takes one message per PLOG_PULL_BYTES; the copy commits
    with the last, byte for byte the home's log."""
    with memfabric.init(pair.directory, server=0) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 2 * PLOG_PULL_BYTES + 4 * MiB, replicas=2)
        (other,) = log.info()["replica_servers"]
        log.append(b"first")
        before = _in_python(pair, other)
        big = os.urandom(PLOG_PULL_BYTES + 4096)
        log.append(big)
        assert _in_python(pair, other) - before == 2
        batch = [os.urandom(n) for n in (1, 300 << 10, PLOG_PULL_BYTES - (100 << 10), 7)]     # past one pull
        log.append_many(batch)
        assert _in_python(pair, other) - before == 4
        length = log.info()["length"]
        copy = _copy(log, other)
        assert copy.info()["length"] == length and copy.info()["records"] == 6
        assert list(copy.records()) == [b"first", big, *batch] == list(log.records())
        assert log.info()["dead_replicas"] == []
        ns.destroy()      # room in the module's pools


_NO_SEGMENT_FDS = """
from memfabric.datapath import link
from memfabric.errors import LimitExceeded
def _out_of_fds(self, creds, segment):
    raise LimitExceeded("no fd for segment %d (a test: out of fds)" % segment)
link.ServerLink.segment_fd = _out_of_fds
"""


def test_a_copy_that_cannot_read_its_homes_files_gets_pieces_and_stays_in_step(tmp_path, monkeypatch, request):
    """A copy that cannot read the home's files (here: no fds left for them) answers the first
    such forward `pulled: False`; the home sends that forward in pieces, and only pieces to
    that copy from then on. No append fails and the copy is not dead."""
    (tmp_path / "sitecustomize.py").write_text(_NO_SEGMENT_FDS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    fab = _fabric(2, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            log, home, other = _replicated(fab, s, request)
            log.append(b"a")
            before = _in_python(fab, other)
            big = [os.urandom(PLOG_REPLICA_PIECE_BYTES + 1000 * i) for i in (1, 2)]     # two pieces each
            log.append(big[0])
            assert _in_python(fab, other) - before == 3          # refused, then two pieces
            log.append(big[1])
            assert _in_python(fab, other) - before == 5          # pieces at once
            assert list(_copy(log, other).records()) == [b"a", *big] == list(log.records())
            assert log.info()["dead_replicas"] == []
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_two_servers_each_forwarding_large_records_to_the_other_both_go_on(request):
    """Each server homes a plog whose copy is on the other, and both forward records past one
    piece at once, each record on segments the copy has not read from yet: each copy asks its
    home for their fds while its home waits on it. Asked on the servers' main links, that
    closed a circle (each copy's request queued behind its own server's forward to the other)
    until the peer timeout ended the copy's request (and the home sent pieces from then on)."""
    fab = _fabric(2, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s0, memfabric.init(fab.directory, server=1) as s1:
            name = ns_name(request)
            logs = [s0.create_namespace(name, sec_id="k", pool="logs").create_plog("one", 11 * MiB, replicas=2),
                    s1.namespace(name, sec_id="k", pool="logs").create_plog("two", 11 * MiB, replicas=2)]
            assert sorted(log.info()["home"] for log in logs) == [1, 2]
            # past a 1 MiB segment each: every forward names segments new to the copy
            records = [[os.urandom(MiB + 4096 * (i + 1)) for i in range(8)] for _ in logs]
            together = threading.Barrier(2, timeout=30)
            failures: list = []

            def append(log, mine):
                try:
                    for record in mine:
                        together.wait()
                        log.append(record)
                except BaseException as exc:      # noqa: BLE001 -- reported below
                    failures.append(exc)

            threads = [threading.Thread(target=append, args=both) for both in zip(logs, records)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not any(t.is_alive() for t in threads) and failures == []
            for log, mine in zip(logs, records):
                assert log.info()["dead_replicas"] == []
                (other,) = log.info()["replica_servers"]
                assert list(_copy(log, other).records()) == mine
                assert _in_python(fab, other) == len(mine)       # one pull each, none refused
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_a_record_of_200_KiB_is_forwarded_in_one_piece_the_copys_loop_serves(pair, request):
    """A forward piece holds 240 KiB: a record of 200 KiB (past what rides inline from a
    client, so the home's Python forwards it) goes to the copy in one message, whole records
    that its receive loop checks and writes on ramdisk. (With 128 KiB pieces it took two
    messages, both served by the copy's Python, and cost 7x a single copy's append.)"""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        log.append(b"a")
        log.append(b"b")
        before = _in_python(pair, other)
        big = bytes(range(256)) * 800                # 200 KiB
        log.append(big)
        log.append(b"c")
        assert _in_python(pair, other) - before == (0 if pair.medium == "ramdisk" else 2)
        assert list(_copy(log, other).records()) == [b"a", b"b", big, b"c"] == list(log.records())
        assert log.info()["dead_replicas"] == []
        log.namespace.destroy()      # room in the module's pools


def test_records_around_one_piece_reach_the_copy_with_the_longest_names_and_secid(pair, request):
    """A piece and the request's other fields fit one message (MAX_MESSAGE_BYTES) however long
    the names and the secId: records whose frames fill a piece exactly, fall one byte short of
    it and pass it by one, in a namespace and plog with the longest names and secId."""
    with memfabric.init(pair.directory, server=0) as s:
        name = (ns_name(request) + "n" * MAX_NAME_CHARS)[:MAX_NAME_CHARS]
        ns = s.create_namespace(name, sec_id="k" * MAX_SEC_ID_BYTES, pool="logs")
        log = ns.create_plog("p" * MAX_NAME_CHARS, MiB, replicas=2)
        (other,) = log.info()["replica_servers"]
        fill = PLOG_REPLICA_PIECE_BYTES - 16       # a 16-byte header, padded to 8
        records = [bytes([i]) * n for i, n in enumerate((fill, fill - 1, fill + 1, fill - 8, 1))]
        for record in records:
            log.append(record)
        assert list(_copy(log, other).records()) == records == list(log.records())
        assert log.info()["dead_replicas"] == []
        ns.destroy()      # room in the module's pools


def test_a_copy_sealed_after_its_grant_fences_the_home(pair, request):
    """The seal is Python's (under the plog's lock); the loop reads the state under that lock
    and leaves the next forward to Python, which refuses it SEALED: the home is fenced and
    the append not committed anywhere."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        for i in range(5):
            log.append(_body(i))
        copy = _copy(log, other)
        assert copy.seal()["state"] == "sealed"
        before = scrape(_metrics(pair, other))
        # (the same words whether the home's loop or Python forwarded it: the copy that refused)
        with pytest.raises(Sealed, match=f"its copy on server {other} was: a client sealed it there"):
            log.append(b"after the seal")
        after = scrape(_metrics(pair, other))
        assert errors(after, "plog_replica_append", "SEALED") - errors(before, "plog_replica_append", "SEALED") == 1
        assert log.info()["state"] == "sealed"
        assert list(log.records()) == [_body(i) for i in range(5)] == list(copy.records())
        with pytest.raises(Sealed):
            log.append(b"nor this")


def test_a_plog_deleted_and_made_again_is_not_served_through_the_old_grant(pair, request):
    """The grant holds the old copy's object: deleted, so Python serves the first forward to the
    new copy (and grants it); the new copy holds only its own records."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        for i in range(5):
            log.append(b"old %d" % i)
        log.delete()
        again = log.namespace.create_plog("wal", 4 * MiB, replicas=2)
        assert again.info()["replica_servers"] == [other]
        for i in range(5):
            again.append(b"new %d" % i)
        assert list(_copy(again, other).records()) == [b"new %d" % i for i in range(5)] == list(again.records())
        assert again.info()["dead_replicas"] == []


def test_a_same_host_homes_forwards_go_out_in_one_compiled_call(pair, request):
    """The home's side (fast_append.send_forward): each piece to a same-host copy is sent and
    answered by one compiled call on the idle peer link, on any medium; its replies, errors
    too, as call() gives them (test_a_copy_sealed_after_its_grant_fences_the_home). A forward
    past one piece is one message that the copy reads from (the home's files), sent by call()."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        before = scrape(_metrics(pair, home))
        for i in range(30):
            log.append(_body(i))
        log.append(bytes(PLOG_REPLICA_PIECE_BYTES + (64 << 10)))      # two pieces: one pull
        after = scrape(_metrics(pair, home))
        sent = value(after, "memfabric_plog_forwards_total") - value(before, "memfabric_plog_forwards_total")
        compiled = value(after, "memfabric_plog_compiled_forwards_total") - value(
            before, "memfabric_plog_compiled_forwards_total")
        assert (sent, compiled) == (31, 30)
        assert list(_copy(log, other).records()) == list(log.records())
        assert log.info()["dead_replicas"] == []


def test_a_homes_forwards_to_its_one_live_copy_are_served_in_its_receive_loop(pair, request):
    """The home's side of the common case (_plogforward.c forward_served): once Python forwarded
    an append to the plog's only live copy, the next appends are written, forwarded, committed
    and answered in the home's receive loop; its Python plog_append (fast_finish) sees none on
    ramdisk (but when the loop finds the cluster's view too old: Python reads it again, about
    every VIEW_TTL_S). On pmem the home flushes in Python: each is Python's."""
    with memfabric.init(pair.directory, server=0) as s:
        log, home, other = _replicated(pair, s, request)
        log.append(_body(0))
        log.append(_body(1))
        before = scrape(_metrics(pair, home))
        for i in range(2, 52):
            log.append(_body(i))
        after = scrape(_metrics(pair, home))
        in_python = ops(after, "plog_append") - ops(before, "plog_append")
        assert in_python <= 2 if pair.medium == "ramdisk" else in_python == 50
        sent = value(after, "memfabric_plog_forwards_total") - value(before, "memfabric_plog_forwards_total")
        compiled = value(after, "memfabric_plog_compiled_forwards_total") - value(
            before, "memfabric_plog_compiled_forwards_total")
        assert sent == compiled == 50
        copy = _copy(log, other)
        length = log.info()["length"]
        assert copy.info()["length"] == length and copy.info()["records"] == 52
        assert copy.read(0, length) == _copy(log, home).read(0, length)
        assert list(copy.records()) == [_body(i) for i in range(52)]
        assert log.info()["dead_replicas"] == []


def test_a_copy_stopped_under_the_homes_loop_forward_is_dropped_after_the_peer_timeout(request):
    """SIGSTOP the only copy once the home's loop forwards to it: the append waits for the peer
    link's timeout (limits.PEER_TIMEOUT_S), then the copy is dead (the link's rules: the request given
    up on) and reported, and appends go on without it; the home holds every acknowledged one."""
    fab = _fabric(2, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            log, home, other = _replicated(fab, s, request)
            acked = [log.append(_body(i)) for i in range(10)]
            before = scrape(_metrics(fab, home))
            pid = fab.server_pids()[other]
            stop_process(pid)
            try:
                acked.append(log.append(_body(10)))
                assert log.info()["dead_replicas"] == [other]
                acked += [log.append(_body(i)) for i in range(11, 20)]
            finally:
                os.kill(pid, signal.SIGCONT)
            after = scrape(_metrics(fab, home))
            assert ops(after, "plog_append") - ops(before, "plog_append") >= 1     # the one that timed out
            assert list(log.records()) == [_body(i) for i in range(20)]
            assert log.info()["state"] == "open" and log.info()["records"] == 20
    finally:
        assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def _gens_fds(pid: int, server_id: int, ns: str) -> int:
    """The server's fds on its generation table (a memfd) of namespace `ns`."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue                   # closed meanwhile
        count += target.startswith(f"/memfd:memfabric-s{server_id}-gens-{ns} ")
    return count


def test_a_destroyed_namespace_whose_plog_the_homes_loop_forwarded_leaves_no_fd_behind(pair, request):
    """The forwarder the home leaves on a plog (fast_append.Forwarder) must not keep the plog
    alive once the plog is dropped: a namespace destroyed lets go of its generation table's
    memfd at once, as it does for a plog never forwarded in the loop (before the fix the two
    referred to each other and only a cyclic GC, whenever it ran, closed the fd)."""
    name = ns_name(request)
    with memfabric.init(pair.directory, server=0) as s:
        log = s.create_namespace(name, sec_id="k", pool="logs").create_plog("wal", 4 * MiB, replicas=2)
        home = log.info()["home"]
        for i in range(5):
            log.append(_body(i))              # the first forward Python's, then the loop's
    pid = pair.server_pids()[home]
    assert _gens_fds(pid, home, name) >= 1
    with memfabric.init(pair.directory, server=0) as s:
        s.destroy_namespace(name, sec_id="k", pool="logs")
        wait_until(lambda: _gens_fds(pid, home, name) == 0, "the home to close the destroyed namespace's memfd", 10)


def test_a_destroyed_namespace_lets_go_of_its_memory_while_the_connections_that_appended_stay(pair, request):
    """The receive loops' grants (fast_append.FastGrant) keep their plog, and with it the
    namespace's memory: destroyed, they must go at once on both servers, though the client's
    connection to the home and the home's peer connection to the copy (which lives as long as
    the servers) stay open. Before the fix the copy kept its grant, so the namespace's memfd,
    until 64 later plogs pushed it out."""
    name = ns_name(request)
    pids = pair.server_pids()
    with memfabric.init(pair.directory, server=0) as s:
        log = s.create_namespace(name, sec_id="k", pool="logs").create_plog("wal", 4 * MiB, replicas=2)
        info = log.info()
        home, (other,) = info["home"], info["replica_servers"]
        for i in range(5):
            log.append(_body(i))              # grants on the client's connection and the peer's
        assert _gens_fds(pids[home], home, name) >= 1 and _gens_fds(pids[other], other, name) >= 1
        s.destroy_namespace(name, sec_id="k", pool="logs")
        for server_id in (home, other):
            wait_until(lambda: _gens_fds(pids[server_id], server_id, name) == 0,
                       f"server {server_id} to close the destroyed namespace's memfd", 10)


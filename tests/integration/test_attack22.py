"""Attacks on a replicated plog's same-host appends (written by the compiled path, committed
by Python after the forward: plog/fast_append.py, PlogService.fast_finish): fencing by a
sealed copy under concurrent appenders, a copy stopped, the home killed and restarted, a
delete or a namespace destroyed meanwhile, Ctrl-C and per-call bounds, exact counts."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest

import memfabric
from memfabric.datapath.deadline import serving_until
from memfabric.errors import MemfabricError, MemfabricIOError, NoSuchNamespace, NoSuchObject, Sealed
from memfabric.launcher import LocalFabric
from memfabric.plog.record import HEADER_BYTES, frame_bytes

from ..conftest import short_tmp_dir
from ..helpers import ns_name, stop_process, stopped, wait_until
from ..transport.paths import interrupted_after
from .test_metrics import scrape, value
from . import test_plog_replicas as _replicas
from .test_plog_replicas import WAIT_S, _assert_holds, _body, _copy, _fabric, _metrics, _replicated

MiB = 1 << 20
two_persistent = _replicas.two_persistent      # (the fixture)


def _by_offset(handle) -> dict[int, bytes]:
    """The log's records by the offset of their payload (what append returns)."""
    at, found = 0, {}
    for payload in handle.records():
        found[at + HEADER_BYTES] = payload
        at += frame_bytes(len(payload))
    return found


def _tagged(tag: int, seq: int) -> bytes:
    return struct.pack("<II", tag, seq) * (1 + seq % 50)


class _Tagged(threading.Thread):
    def __init__(self, log, tag: int) -> None:
        super().__init__(daemon=True)
        self.log, self.tag = log, tag
        self.acked: list[tuple[int, bytes]] = []
        self.error: Exception | None = None
        self.stop_now = False

    def run(self) -> None:
        try:
            for seq in range(100000):
                if self.stop_now:
                    return
                body = _tagged(self.tag, seq)
                self.acked.append((self.log.append(body), body))
        except MemfabricError as exc:
            self.error = exc


def seal_a_copy_under(writer, request, medium: str, replicas: int, capacity: int, least: int,
                      metrics: bool = False) -> tuple[LocalFabric, dict[int, bytes], list[int]]:
    """Four same-host sessions appending to a replicated plog with `writer` (a thread class:
    `acked` pairs of offset and record, `error`), a copy sealed by a client once each has
    `least` acknowledged: every appender is fenced (SEALED), the home and every copy are
    sealed and hold exactly the acknowledged records, at their offsets, byte for byte the
    same. Returns the fabric (running: the caller stops it), the acknowledged records and the
    plog's home, for the caller's own checks."""
    fab = _fabric(replicas, medium, metrics=metrics)
    sessions = []
    try:
        s0 = memfabric.init(fab.directory, server=0)
        sessions.append(s0)
        name = ns_name(request)
        log = s0.create_namespace(name, sec_id="k", pool="logs").create_plog("wal", capacity, replicas=replicas)
        *others, copy = log.info()["replica_servers"]
        writers = []
        for tag in range(4):
            s = memfabric.init(fab.directory, server=0)
            sessions.append(s)
            writers.append(writer(s.namespace(name, sec_id="k", pool="logs").plog("wal"), tag))
        for w in writers:
            w.start()
        wait_until(lambda: all(len(w.acked) >= least for w in writers), "appends", WAIT_S)
        assert _copy(log, copy).seal()["state"] == "sealed"
        for w in writers:
            w.join(WAIT_S)
            assert not w.is_alive()
            assert isinstance(w.error, Sealed), w.error
        home_id = log.info()["home"]
        home, replica = _copy(log, home_id), _copy(log, copy)
        assert home.info()["state"] == "sealed"
        length = replica.info()["length"]
        assert home.info()["length"] == length
        assert home.read(0, length) == replica.read(0, length)
        seen = _by_offset(replica)
        assert _by_offset(home) == seen
        for other in others:         # (fenced by the home: none holds an append answered SEALED)
            assert _copy(log, other).info()["state"] == "sealed"
            assert _by_offset(_copy(log, other)) == seen
        acked = {off: body for w in writers for off, body in w.acked}
        for off, body in acked.items():
            assert seen.get(off) == body
        assert len(seen) == len(acked), "a record on the copy no append acknowledged"
    except BaseException:
        for s in sessions:
            s.close()
        fab.stop()
        raise
    for s in sessions:
        s.close()
    return fab, acked, home_id


@pytest.mark.parametrize("medium, replicas", [("ramdisk", 2), ("pmem", 2), ("ramdisk", 3)])
def test_a_copy_sealed_under_concurrent_same_host_appenders_fences_them_all(medium, replicas, request):
    fab, _, _ = seal_a_copy_under(_Tagged, request, medium, replicas, 8 * MiB, 30)
    assert fab.stop() == 0, "".join(fab.output[-30:])


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_copy_stopped_under_concurrent_same_host_appenders_is_dead_and_the_counts_are_exact(medium, request):
    fab = _fabric(2, medium, metrics=True)
    sessions = []
    try:
        s0 = memfabric.init(fab.directory, server=0)
        sessions.append(s0)
        name = ns_name(request)
        log = s0.create_namespace(name, sec_id="k", pool="logs").create_plog("wal", 8 * MiB, replicas=2)
        info = log.info()
        (copy,) = info["replica_servers"]
        home_metrics = _metrics(fab, info["home"])
        appends0 = value(scrape(home_metrics), "memfabric_plog_appends_total")
        writers = []
        for tag in range(3):
            s = memfabric.init(fab.directory, server=0)
            sessions.append(s)
            writers.append(_Tagged(s.namespace(name, sec_id="k", pool="logs").plog("wal"), tag))
        for w in writers:
            w.start()
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers), "appends", WAIT_S)
        pid = fab.server_pids()[copy]
        stop_process(pid)
        try:
            wait_until(lambda: log.info()["dead_replicas"] == [copy], "the copy to be dead", WAIT_S)
            counts = [len(w.acked) for w in writers]
            wait_until(lambda: all(len(w.acked) >= c + 20 for w, c in zip(writers, counts)), "appends", WAIT_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        for w in writers:
            w.stop_now = True
        for w in writers:
            w.join(WAIT_S)
            assert not w.is_alive() and w.error is None, w.error
        acked = {off: body for w in writers for off, body in w.acked}
        assert _by_offset(log) == acked
        assert value(scrape(home_metrics), "memfabric_plog_appends_total") - appends0 == len(acked)
    finally:
        for s in sessions:
            s.close()
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_a_home_restarted_in_step_with_its_copy_keeps_forwarding_compiled_appends(two_persistent, request):
    home_server, replica_server = two_persistent
    name = ns_name(request)
    with memfabric.init(home_server.config) as s:
        log = _replicated(s, name)
        acked = [log.append(_body(i)) for i in range(30)]
    home_server.kill()
    home_server.start()
    with memfabric.init(home_server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        acked += [log.append(_body(i)) for i in range(30, 90)]
        assert log.info()["dead_replicas"] == []
        copy = _copy(log, replica_server.server_id)
        assert copy.info()["records"] == 90
        length = log.info()["length"]
        assert copy.read(0, length) == _copy(log, home_server.server_id).read(0, length)
        _assert_holds(log, acked)
        _assert_holds(copy, acked)


def test_a_home_killed_under_compiled_appenders_restarts_with_every_acknowledged_record(two_persistent, request):
    home_server, replica_server = two_persistent
    name = ns_name(request)
    sessions = [memfabric.init(home_server.config) for _ in range(3)]
    try:
        log = _replicated(sessions[0], name)
        writers = [_Tagged(s.namespace(name, "k", pool="keep").plog("wal"), tag) for tag, s in enumerate(sessions)]
        for w in writers:
            w.start()
        wait_until(lambda: all(len(w.acked) >= 30 for w in writers), "appends", WAIT_S)
        home_server.kill()
        for w in writers:
            w.join(WAIT_S)
            assert not w.is_alive() and w.error is not None
    finally:
        for s in sessions:
            s.close()
    home_server.start()
    acked = {off: body for w in writers for off, body in w.acked}
    with memfabric.init(home_server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        last = log.append(b"after the restart")
        info = log.info()
        home, copy = _copy(log, home_server.server_id), _copy(log, replica_server.server_id)
        seen = _by_offset(home)
        for off, body in acked.items():
            assert seen.get(off) == body
        assert seen[last] == b"after the restart"
        if info["dead_replicas"] == []:
            length = info["length"]
            assert copy.info()["length"] == length
            assert copy.read(0, length) == home.read(0, length)
        else:
            assert info["dead_replicas"] == [replica_server.server_id]


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_one_connection_appends_to_a_replicated_and_an_unreplicated_plog_in_turn(medium, request):
    fab = _fabric(2, medium, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
            replicated = ns.create_plog("r", 4 * MiB, replicas=2)
            info = replicated.info()
            single = ns.create_plog("u", 4 * MiB)
            assert single.info()["home"] == info["home"]
            home_metrics = _metrics(fab, info["home"])
            replicated.append(_body(0))
            single.append(_body(0))
            before = scrape(home_metrics)
            for i in range(1, 80):
                replicated.append(_body(i))
                single.append(_body(i))
            after = scrape(home_metrics)
            for metric in ("memfabric_plog_compiled_appends_total", "memfabric_plog_appends_total"):
                assert value(after, metric) - value(before, metric) == 158
            (other,) = info["replica_servers"]
            expected = [_body(i) for i in range(80)]
            assert list(_copy(replicated, other).records()) == expected == list(replicated.records())
            assert list(single.records()) == expected
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_ctrl_c_and_timeouts_while_a_compiled_replicated_append_waits_for_a_stopped_copy(request):
    fab = LocalFabric(short_tmp_dir("mf-plogr-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:ramdisk:32MiB"]).start()
    try:
        with memfabric.init(fab.directory, server=0, timeout_s=30.0) as s:
            log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog("wal", 4 * MiB,
                                                                                             replicas=2)
            (copy,) = log.info()["replica_servers"]
            log.append(b"first")
            log.append(b"second")
            link = s.link(log.home)
            calls = link.compiled_calls
            with stopped(fab.server_pids()[copy]):
                with interrupted_after(0.3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
                    log.append(b"interrupted")
                assert link.compiled_calls == calls + 1
                with serving_until(time.monotonic() + 0.5), pytest.raises(memfabric.Timeout):
                    log.append(b"timed out")
            log.append(b"next")
            expected = [b"first", b"second", b"interrupted", b"timed out", b"next"]
            assert list(log.records()) == expected
            if log.info()["dead_replicas"] == []:        # (stopped for less than the peer timeout)
                assert list(_copy(log, copy).records()) == expected
            calls = link.compiled_calls
            log.append(b"compiled again")
            assert link.compiled_calls == calls + 1
            # A shorter bound for one call, on an idle link: the compiled call gives up at it.
            with stopped(fab.server_pids()[copy]):
                with serving_until(time.monotonic() + 0.5), pytest.raises(memfabric.Timeout):
                    log.append(b"bounded")
            assert link.compiled_calls == calls + 2
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_replicated_plog_deleted_or_its_namespace_destroyed_under_compiled_appenders(medium, request):
    fab = LocalFabric(short_tmp_dir("mf-plogr-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", f"logs:{medium}:32MiB"]).start()
    try:
        for how in ("delete", "destroy"):
            name = f"{ns_name(request)}-{how}"
            sessions = [memfabric.init(fab.directory, server=0) for _ in range(4)]
            try:
                ns = sessions[0].create_namespace(name, sec_id="k", pool="logs")
                log = ns.create_plog("wal", 2 * MiB, replicas=2)
                log.append(b"x")
                writers = [_Tagged(s.namespace(name, "k", pool="logs").plog("wal"), tag)
                           for tag, s in enumerate(sessions[1:])]
                for w in writers:
                    w.start()
                wait_until(lambda: all(len(w.acked) >= 5 for w in writers), "appends", WAIT_S)
                if how == "delete":
                    log.delete()
                    other = ns.create_plog("other", 2 * MiB, replicas=2)
                    expected = [_body(i) for i in range(100)]
                    for body in expected:
                        other.append(body)
                    (copy,) = other.info()["replica_servers"]
                    assert list(other.records()) == expected == list(_copy(other, copy).records())
                else:
                    sessions[0].destroy_namespace(name, sec_id="k", pool="logs")
                for w in writers:
                    w.join(WAIT_S)
                    assert not w.is_alive()
                    assert isinstance(w.error, (NoSuchObject, NoSuchNamespace, MemfabricIOError)), w.error
            finally:
                for s in sessions:
                    s.close()
        assert not any("bug in" in line for line in fab.output)
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_a_sealed_copy_fences_the_home_and_the_other_copies_alike(request):
    """Three replicas, the last copy sealed by a client: the next append's forward reaches the
    first copy (which commits it) before the sealed one refuses it. The home drops it and
    answers SEALED ("not committed"), so the first copy must not keep it either: every copy
    ends sealed, holding the same records as the home."""
    fab = _fabric(3)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog("wal", 4 * MiB,
                                                                                             replicas=3)
            info = log.info()
            first, last = info["replica_servers"]
            acked = [log.append(_body(i)) for i in range(2)] + [log.append(_body(2))]   # compiled too
            assert _copy(log, last).seal()["state"] == "sealed"
            with pytest.raises(Sealed):
                log.append(b"after the seal")
            with pytest.raises(Sealed):
                log.append(b"after the seal, again")
            expected = [_body(i) for i in range(3)]
            for server_id in (info["home"], first, last):
                handle = _copy(log, server_id)
                assert handle.info()["state"] == "sealed", server_id
                assert list(handle.records()) == expected, server_id
            _assert_holds(log, acked)
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])

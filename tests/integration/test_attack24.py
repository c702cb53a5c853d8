"""Attacks on the revocation of receive-loop grants when a plog goes (fast_append.GrantHolders,
PlogService.dropped and op_plog_delete) and on the words of an append a copy's seal fenced."""

from __future__ import annotations

import os
import sys
import threading
from array import array
from types import SimpleNamespace

import pytest

import memfabric
from memfabric.errors import MemfabricError, NoSuchNamespace, NoSuchObject
from memfabric.limits import MAX_PLOG_FAST_GRANTS_PER_CONNECTION as MOST
from memfabric.media.files import FileSegment
from memfabric.plog import fast_append
from memfabric.server.requests import Connection

from ..helpers import ns_name, wait_until
from .test_plog_replicas import WAIT_S, MiB, _copy, _fabric

_SEGMENT = FileSegment.__new__(FileSegment)     # (only its type is looked at by _give)


def _plog(i: int) -> SimpleNamespace:
    """What _give and FastGrant read of a plog homed here, on ramdisk, in one extent."""
    return SimpleNamespace(role="home", deleted=False, id=i, core=SimpleNamespace(capacity=4096),
                           data=SimpleNamespace(flushes=False, _ends=[4096], extents=[(1, 0, 4096)],
                                                pool=SimpleNamespace(segments={1: _SEGMENT})),
                           replica_servers=[], commit_group=None)


def _request(i: int) -> dict:
    return {"pool": "logs", "ns": "n", "name": f"wal{i}", "sec": b"k"}


@pytest.mark.skipif(fast_append._records is None, reason="the compiled part is not built")
def test_a_grant_revoked_from_another_thread_while_its_connection_pushes_out_its_oldest():
    """A connection holding MOST grants pushes out its oldest to take a new one (_give). A
    plog deleted, or its namespace destroyed, revokes its grants from every connection
    (GrantHolders.revoke) from the thread that deleted it, at any moment of that. A thread
    switch after _give saw the connection full: here the revoking thread runs at each
    builtin call _give returns from after that (as the GIL may let it). The new grant must be
    given and the one revoked gone, and nothing raised: _give runs after Python appended
    (or a copy took a forward), so what it raises answers a written append INTERNAL_ERROR
    (or marks a live copy dead). It raised 'dictionary changed size during iteration'
    (reproduced too with two real threads and sys.setswitchinterval(1e-6), ~1 in 20,000)."""
    conn = Connection(carries_fds=True)
    conn.verified[("logs", "n")] = (1, b"k")
    holders = fast_append.GrantHolders()
    counts = array("Q", [0, 0, 0, 0])
    plogs = [_plog(i) for i in range(MOST + 1)]
    for i in range(MOST):
        fast_append._give(conn, plogs[i], _request(i), b"", counts, None, holders)
    grants = conn.services[fast_append.GRANTS]
    assert len(grants) == MOST
    full_seen = []
    revoked = []

    def revoke_elsewhere() -> None:
        thread = threading.Thread(target=holders.revoke, args=([plogs[0]],))
        thread.start()
        thread.join(2)              # (a fix that makes it wait for _give: it goes on after)
        revoked.append(thread)

    def profile(frame, event, arg):
        if frame.f_code is not fast_append._give.__code__ or event != "c_return":
            return
        if full_seen and not revoked:
            revoke_elsewhere()
        if arg is len:
            full_seen.append(True)

    sys.setprofile(profile)
    try:
        fast_append._give(conn, plogs[MOST], _request(MOST), b"", counts, None, holders)
    finally:
        sys.setprofile(None)
    assert full_seen and revoked, "the race was not set up"
    revoked[0].join(10)
    assert not revoked[0].is_alive()
    key = fast_append.grant_key("logs", "n", f"wal{MOST}")
    assert grants[key].plog is plogs[MOST]
    assert all(g.plog is not plogs[0] for g in grants.values())
    assert len(grants) <= MOST


class _Reader(threading.Thread):
    """Reads the plog's records through `handle` again and again until it is refused: every
    payload it was given, in `seen`."""

    def __init__(self, handle) -> None:
        super().__init__(daemon=True)
        self.handle = handle
        self.seen: set[bytes] = set()
        self.rounds = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.seen.update(self.handle.records())
                self.rounds += 1
        except MemfabricError as exc:
            self.error = exc


def test_records_read_while_their_plog_is_deleted_are_its_own_or_refused(request):
    """A client deletes a plog (home and copy) while others read its records from the home and
    from the copy, each on its own connection. A read either gets records that were appended
    or NO_SUCH_OBJECT; never the zeros the delete wrote over the plog's memory before giving
    it back to the namespace (op_plog_records took the records' places, let go of the plog's
    lock, the delete freed the memory, then _read read it: up to the fix, one delete in five
    or so handed a reader a record of zeros)."""
    fab = _fabric(2)
    try:
        name = ns_name(request)
        with memfabric.init(fab.directory, server=0) as s, memfabric.init(fab.directory, server=0) as r, \
                memfabric.init(fab.directory, server=1) as r2:
            ns = s.create_namespace(name, sec_id="k", pool="logs")
            for attempt in range(60):
                log = ns.create_plog("wal", MiB, replicas=2)
                (other,) = log.info()["replica_servers"]
                bodies = {b"record %d of attempt %d" % (i, attempt) for i in range(4)}
                for body in sorted(bodies):
                    log.append(body)
                at_home = r.namespace(name, "k", pool="logs").plog("wal")
                readers = [_Reader(at_home), _Reader(_copy(r2.namespace(name, "k", pool="logs").plog("wal"), other))]
                for reader in readers:
                    reader.start()
                wait_until(lambda: all(x.rounds or x.error for x in readers), "the readers to read", WAIT_S)
                log.delete()
                for reader in readers:
                    reader.stop.set()
                    reader.join(WAIT_S)
                    assert not reader.is_alive()
                    assert reader.error is None or isinstance(reader.error, NoSuchObject), reader.error
                    assert reader.seen <= bodies, f"attempt {attempt}: records never appended: " \
                                                  f"{sorted(reader.seen - bodies)[:3]}"
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_seal_of_the_home_that_a_copys_seal_fences_meanwhile_succeeds(medium, request):
    """Appends stream to a replicated plog; one client seals a copy, another the home at once.
    The home's seal flushes what was written before it, whose forward the sealed copy refuses:
    the plog is fenced (sealed at what was committed). Sealing a sealed plog is no error, so
    the home's seal answers its info, sealed, like any other; it raised SEALED, with the
    words of a refused append ('this append was not committed'), about one time in three."""
    fab = _fabric(2, medium)
    try:
        name = ns_name(request)
        with memfabric.init(fab.directory, server=0) as s, memfabric.init(fab.directory, server=1) as on_copy:
            ns = s.create_namespace(name, sec_id="k", pool="logs")
            for attempt in range(40):
                log = ns.create_plog(f"wal{attempt}", 2 * MiB, replicas=2)
                (other,) = log.info()["replica_servers"]
                stop = threading.Event()

                def append(handle) -> None:
                    try:
                        while not stop.is_set():
                            handle.append(b"x" * 100)
                    except MemfabricError:
                        pass
                sessions = [memfabric.init(fab.directory, server=0) for _ in range(3)]
                appenders = [threading.Thread(target=append, args=(x.namespace(name, "k", pool="logs").plog(
                    f"wal{attempt}"),), daemon=True) for x in sessions]
                for a in appenders:
                    a.start()
                wait_until(lambda: log.info()["records"] > 20, "appends", WAIT_S)
                copy = _copy(on_copy.namespace(name, "k", pool="logs").plog(f"wal{attempt}"), other)
                sealed: dict[str, object] = {}

                def seal(key, handle) -> None:
                    try:
                        sealed[key] = handle.seal()
                    except MemfabricError as exc:
                        sealed[key] = exc
                sealers = [threading.Thread(target=seal, args=("copy", copy)),
                           threading.Thread(target=seal, args=("home", log))]
                for t in sealers:
                    t.start()
                for t in sealers:
                    t.join(WAIT_S)
                stop.set()
                for a in appenders:
                    a.join(WAIT_S)
                for x in sessions:
                    x.close()
                for key in ("copy", "home"):
                    assert isinstance(sealed[key], dict), f"attempt {attempt}: the {key}'s seal raised {sealed[key]!r}"
                    assert sealed[key]["state"] == "sealed"
                assert log.info()["length"] == copy.info()["length"]
                log.delete()
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


# In a server: a request of op MF_TEST_STALL_OP that found its plog (PlogService._plog) waits
# there while the mark MF_TEST_STALL_MARK exists, after making MARK.found (bounded: 10 s).
_STALL_AFTER_LOOKUP = r"""
import os, time
_mark, _op = os.environ.get("MF_TEST_STALL_MARK"), os.environ.get("MF_TEST_STALL_OP")
if _mark and _op:
    from memfabric.plog import service as _service
    _real = _service.PlogService._plog

    def _stalling(self, conn, m):
        plog = _real(self, conn, m)
        if m.get("op") == _op and os.path.exists(_mark):
            open(_mark + ".found", "w").close()
            deadline = time.monotonic() + 10
            while os.path.exists(_mark) and time.monotonic() < deadline:
                time.sleep(0.01)
        return plog

    _service.PlogService._plog = _stalling
"""


def _stall_after_lookup(tmp_path, monkeypatch, op: str):
    """The mark that, while it exists, stalls requests of `op` in the servers started from now
    on between finding their plog and taking its lock (_STALL_AFTER_LOOKUP)."""
    (tmp_path / "sitecustomize.py").write_text(_STALL_AFTER_LOOKUP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MF_TEST_STALL_MARK", str(tmp_path / "stall"))
    monkeypatch.setenv("MF_TEST_STALL_OP", op)
    return tmp_path / "stall"


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_a_forward_that_found_its_copy_before_a_client_deleted_it_is_refused(medium, tmp_path, monkeypatch, request):
    """A forward looks the copy up, then takes its lock to write. A client that deletes the
    copy in between frees its memory (zeroed, given back to the namespace): the forward must
    find it deleted under the lock and refuse (the home then marks the copy dead and the
    append goes on without it), not write into memory the namespace may have given to
    another plog and tell the home the copy holds the append (before the fix it did, and the
    home counted a deleted copy as live)."""
    mark = _stall_after_lookup(tmp_path, monkeypatch, "plog_replica_append")
    fab = _fabric(2, medium=medium)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog("wal", MiB, replicas=2)
            (other,) = log.info()["replica_servers"]
            mark.touch()
            outcome: list = []
            appender = threading.Thread(target=lambda: outcome.append(_outcome(log.append, b"stalled at the copy")))
            appender.start()
            wait_until(lambda: os.path.exists(f"{mark}.found"), "the copy to find its plog for the forward", WAIT_S)
            _copy(log, other).delete()
            mark.unlink()
            appender.join(WAIT_S)
            assert not appender.is_alive()
            assert len(outcome) == 1 and type(outcome[0]) is int, outcome      # its payload's offset
            assert log.info()["dead_replicas"] == [other]
            assert list(log.records()) == [b"stalled at the copy"]
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def _outcome(call, *args):
    try:
        return call(*args)
    except MemfabricError as exc:
        return exc


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_an_append_that_found_its_plog_before_its_namespace_was_destroyed_is_told_so(medium, tmp_path, monkeypatch,
                                                                                   request):
    """An append looks its plog up, then takes its lock. The namespace destroyed in between
    drops the plog (PlogService.dropped): the append is refused NO_SUCH_NAMESPACE, as one
    that came a moment later is, not NO_SUCH_OBJECT "was deleted" (no client deleted it)."""
    mark = _stall_after_lookup(tmp_path, monkeypatch, "plog_append")
    fab = _fabric(1, medium=medium)
    try:
        name = ns_name(request)
        with memfabric.init(fab.directory, server=0) as s:
            log = s.create_namespace(name, sec_id="k", pool="logs").create_plog("wal", MiB)
            mark.touch()            # (the first append is Python's: the loop has no grant yet)
            outcome: list = []
            appender = threading.Thread(target=lambda: outcome.append(_outcome(log.append, b"caught in the destroy")))
            appender.start()
            wait_until(lambda: os.path.exists(f"{mark}.found"), "the append to find its plog", WAIT_S)
            with memfabric.init(fab.directory, server=0) as other:     # (s's connection is the append's)
                other.destroy_namespace(name, sec_id="k", pool="logs")    # dropped on the server when it returns
            mark.unlink()
            appender.join(WAIT_S)
            assert not appender.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], NoSuchNamespace), outcome
            with pytest.raises(NoSuchNamespace):
                log.append(b"after the destroy")
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])

"""A pmem plog's memory made ready ahead of its log by the server's thread (plog/preparer.py),
with real processes: rounds held up (a sitecustomize keeps the thread's writes waiting while a
file exists, as a slow or stuck disk would), appends that pass the reach meanwhile, then a
SIGKILL and a restart that find every acknowledged record and zeros past the log."""

from __future__ import annotations

import os
import subprocess
import threading

import msgpack
import pytest

import memfabric
from memfabric.errors import IOError_
from memfabric.launcher import LocalFabric
from memfabric.plog.log import pieces

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, ns_name, wait_until
from .test_persistence import PersistentServer

MiB = 1 << 20
PLOG_BYTES = 320 * MiB         # made ready at create: its first 256 MiB; a round: 32 MiB more
RECORD = b"r" * (128 << 10)    # small enough that its log is made ready for (its flushes carry one or two)
TO_A_ROUND = 1800              # records: past 224 MiB, 32 MiB from what is ready, a round starts
INTO_IT = 300                  # then past 256 MiB: into the round's 32 MiB

_HELD_ROUNDS = """
import os, threading, time
_gate = os.environ.get("MF_TEST_HOLD_ROUNDS")
if _gate:
    from memfabric.plog import service as _service
    _real = _service.PlogService._ready_piece      # each piece a round makes ready (held outside the lock)

    def _held(*args, **kwargs):
        # the server's rounds (its plog-prepare thread) write nothing while the file exists
        if threading.current_thread().name == "plog-prepare":
            if os.path.exists(_gate):
                with open(_gate + ".held", "a") as f:
                    f.write("held\\n")
                while os.path.exists(_gate):
                    time.sleep(0.02)
        try:
            return _real(*args, **kwargs)
        finally:
            if threading.current_thread().name == "plog-prepare":
                with open(_gate + ".done", "a") as f:
                    f.write("done\\n")

    _service.PlogService._ready_piece = _held
"""


def _site(tmp_path, monkeypatch, code: str) -> None:
    """Python processes started from now on (servers) run `code` first (a sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))


def _hold_rounds(tmp_path, monkeypatch):
    """Servers started from now on hold their rounds while the returned file exists."""
    _site(tmp_path, monkeypatch, _HELD_ROUNDS)
    gate = tmp_path / "gate"
    gate.touch()
    monkeypatch.setenv("MF_TEST_HOLD_ROUNDS", str(gate))
    return gate


@pytest.fixture
def held_rounds(tmp_path, monkeypatch):
    """A pmem server whose rounds wait while the returned file exists (remove it to let them go)."""
    gate = _hold_rounds(tmp_path, monkeypatch)
    server = PersistentServer("pmem", capacity="700MiB").start()
    try:
        yield server, gate
    finally:
        gate.unlink(missing_ok=True)
        server.cleanup()


def _metas(server: PersistentServer) -> dict[str, dict]:
    directory = os.path.join(server.pool_dir, "plogs")
    metas = {}
    for name in os.listdir(directory):
        if name.endswith(".plog"):
            with open(os.path.join(directory, name), "rb") as f:
                meta = msgpack.unpackb(f.read())
            metas[meta["name"]] = meta
    return metas


def _read_log(server: PersistentServer, meta: dict, offset: int, length: int) -> bytes:
    out = b""
    for segment, seg_offset, n in pieces([tuple(e) for e in meta["extents"]], offset, length):
        with open(os.path.join(server.pool_dir, f"segment-{segment}.mem"), "rb") as f:
            f.seek(seg_offset)
            out += f.read(n)
    return out


def _append_until_refused(log, most: int) -> tuple[int, BaseException | None]:
    """Appends of RECORD, up to `most`: how many were taken, and what refused the next."""
    for taken in range(most):
        try:
            log.append(RECORD)
        except memfabric.MemfabricError as exc:
            return taken, exc
    return most, None


def _round_held(gate) -> None:
    wait_until((gate.parent / "gate.held").exists, "a round to be under way (held)", WAIT_S)


def _rounds_written(gate) -> int:
    """How many writes the server's rounds made so far."""
    try:
        return (gate.parent / "gate.done").read_text().count("done")
    except FileNotFoundError:
        return 0


def _killed_and_restarted_whole(server: PersistentServer, name: str, expected: dict[str, list[bytes]]) -> None:
    """A SIGKILL, then: each plog's reach on disk covers its log with zeros past it, and after a
    restart each holds exactly `expected` and takes appends."""
    lengths = {}
    with memfabric.init(server.config) as s:
        ns = s.namespace(name, "k", pool="keep")
        for plog_name in expected:
            lengths[plog_name] = ns.plog(plog_name).info()["length"]
    server.kill()
    for plog_name, meta in _metas(server).items():
        length = lengths[plog_name]
        assert meta["reach"] >= length, (plog_name, meta["reach"], length)
        tail = _read_log(server, meta, length, meta["reach"] - length)
        assert tail.count(0) == len(tail), f"{plog_name}: bytes past its log that are not zero"
    server.start()
    with memfabric.init(server.config) as s:
        ns = s.namespace(name, "k", pool="keep")
        for plog_name, records in expected.items():
            log = ns.plog(plog_name)
            assert list(log.records()) == records, plog_name
            assert log.info()["length"] == lengths[plog_name]
            log.append(b"after")


def test_appends_go_past_a_round_under_way_and_it_never_writes_over_them(held_rounds, request):
    """A round makes memory ready past the log's end while the log grows into it. Appends that
    reached it waited for the round to end (a slow disk: the whole round; a stuck one: until they
    were refused SERVER_UNAVAILABLE), though the round only writes zeros where the log has not
    been: they go on now, and the round, let go, writes no zero over a record they wrote."""
    server, gate = held_rounds
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        log = s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", PLOG_BYTES)
        assert _append_until_refused(log, TO_A_ROUND) == (TO_A_ROUND, None)     # its round, held
        _round_held(gate)
        assert _append_until_refused(log, INTO_IT) == (INTO_IT, None)
        written = _rounds_written(gate)
        gate.unlink()
        log.append(RECORD)
        wait_until(lambda: _rounds_written(gate) > written, "the round to write", WAIT_S)
    _killed_and_restarted_whole(server, name, {"wal": [RECORD] * (TO_A_ROUND + INTO_IT + 1)})


def test_an_append_over_rpc_goes_past_a_round_under_way(tmp_path, monkeypatch, request):
    """As above, from a client on another host: its records come as the RPC payload
    (plog_append_payload), served outside the request's deadline, so a wait there was 30 s."""
    gate = _hold_rounds(tmp_path, monkeypatch)
    fabric = LocalFabric(short_tmp_dir("mf-plogprep-"), servers=1, capacity="16MiB", segment_size="1MiB",
                         extra_args=["--pool", "logs:pmem:400MiB"]).start()
    try:
        with memfabric.init(os.path.join(fabric.directory, "remote.toml")) as s:
            log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog("wal", PLOG_BYTES)
            assert _append_until_refused(log, TO_A_ROUND) == (TO_A_ROUND, None)
            _round_held(gate)
            assert _append_until_refused(log, INTO_IT) == (INTO_IT, None)
            gate.unlink()
            log.append(RECORD)
            assert list(log.records()) == [RECORD] * (TO_A_ROUND + INTO_IT + 1)
    finally:
        gate.unlink(missing_ok=True)
        assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


def test_appends_do_not_wait_for_a_round_queued_behind_another_plogs(held_rounds, request):
    """The server makes plogs' memory ready one round at a time: a plog's round queued behind
    another plog's (a slow disk, or hundreds of plogs appended at once) held its appends past the
    reach until it ran, and refused them after a while, though nothing was under way in their
    path. They make their memory ready themselves, as when no round is queued."""
    server, gate = held_rounds
    name = ns_name(request)
    with memfabric.init(server.config) as s:
        ns = s.create_namespace(name, sec_id="k", pool="keep")
        first, second = ns.create_plog("first", PLOG_BYTES), ns.create_plog("second", PLOG_BYTES)
        assert _append_until_refused(first, TO_A_ROUND) == (TO_A_ROUND, None)
        _round_held(gate)
        # The second's round is queued behind it, and its appends go past its first 256 MiB.
        assert _append_until_refused(second, TO_A_ROUND + INTO_IT) == (TO_A_ROUND + INTO_IT, None)
        written = _rounds_written(gate)
        gate.unlink()
        first.append(RECORD)
        wait_until(lambda: _rounds_written(gate) > written, "the rounds to write", WAIT_S)
    _killed_and_restarted_whole(server, name, {"first": [RECORD] * (TO_A_ROUND + 1),
                                                "second": [RECORD] * (TO_A_ROUND + INTO_IT)})


def test_a_delete_during_a_round_frees_the_plogs_memory_before_it_is_answered(tmp_path, monkeypatch, request):
    """A round holds its plog's memory (a delete must not free it under the round's writes).
    The delete was answered at once, and the memory freed only when the round ended: a create
    right after it, in a pool with room for one such plog (as `memfabric bench --plog` does),
    was refused OUT_OF_MEMORY. The delete now calls the round off and waits for it to end."""
    gate = _hold_rounds(tmp_path, monkeypatch)
    server = PersistentServer("pmem", capacity="400MiB").start()
    try:
        with memfabric.init(server.config) as s:
            ns = s.create_namespace(ns_name(request), sec_id="k", pool="keep")
            log = ns.create_plog("first", PLOG_BYTES)
            assert _append_until_refused(log, TO_A_ROUND) == (TO_A_ROUND, None)
            _round_held(gate)
            opener = threading.Timer(1.0, gate.unlink)       # the disk goes on a moment later
            opener.start()
            try:
                log.delete()
                second = ns.create_plog("second", PLOG_BYTES)      # the pool holds one at a time
            finally:
                opener.join()
            second.append(b"whole")
            assert list(second.records()) == [b"whole"]
    finally:
        gate.unlink(missing_ok=True)
        server.cleanup()


_OUTRUN_THEN_EIO = r"""
import errno, os, threading, time
_dir = os.environ.get("MF_TEST_OUTRUN_DIR")
if _dir:
    from memfabric.plog import service as _service
    import memfabric.media.files as _files
    _real_piece, _real_sync = _service.PlogService._ready_piece, _files._datasync_close
    _pieces = []

    def _piece(*args, **kwargs):
        # a round's first piece is written; from its second it waits while `hold` exists
        if threading.current_thread().name == "plog-prepare":
            _pieces.append(1)
            if len(_pieces) >= 2 and os.path.exists(os.path.join(_dir, "hold")):
                open(os.path.join(_dir, "held"), "a").close()
                while os.path.exists(os.path.join(_dir, "hold")):
                    time.sleep(0.02)
        return _real_piece(*args, **kwargs)

    def _sync(fd):
        # the disk fails a round's fdatasync (EIO) once, when `eio` exists
        if threading.current_thread().name == "plog-prepare" and os.path.exists(os.path.join(_dir, "eio")):
            os.unlink(os.path.join(_dir, "eio"))
            open(os.path.join(_dir, "failed"), "a").close()
            os.close(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _real_sync(fd)

    _service.PlogService._ready_piece, _files._datasync_close = _piece, _sync
"""


def test_a_round_outrun_whose_flush_fails_with_eio_stops_the_appends(tmp_path, monkeypatch, request):
    """A round that wrote zeros, was outrun by the log, then took EIO (once) at its fdatasync:
    the segment file's error state is shared with the appends' flushes (theirs would not see the
    EIO it took), so the plog takes no more appends, as after an EIO in a round not outrun.
    Fails: _prepare_round's `outran` branch came before its failure's, so the plog was not
    marked broken and took appends (answered as durable) after the EIO."""
    _site(tmp_path, monkeypatch, _OUTRUN_THEN_EIO)
    monkeypatch.setenv("MF_TEST_OUTRUN_DIR", str(tmp_path))
    server = PersistentServer("pmem", capacity="400MiB").start()
    try:
        name = ns_name(request)
        with memfabric.init(server.config) as s:
            s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", PLOG_BYTES).append(b"first")
        # Restored, nothing of it is known ready: its next commit queues a round from its end.
        server.kill()
        (tmp_path / "hold").touch()
        server.start()
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            log.append(b"second")
            wait_until((tmp_path / "held").exists, "the round's second piece to be held", WAIT_S)
            # The log passes the held piece's end: the round is outrun there.
            assert _append_until_refused(log, 5) == (5, None)
            (tmp_path / "eio").touch()
            (tmp_path / "hold").unlink()
            wait_until((tmp_path / "failed").exists, "the round's flush to fail", WAIT_S)
            refused: list[BaseException] = []

            def _refused() -> bool:
                try:
                    log.append(b"more")
                except memfabric.MemfabricError as exc:
                    refused.append(exc)
                return bool(refused)

            wait_until(_refused, "an append to be refused after the round's EIO", WAIT_S)
            assert isinstance(refused[0], IOError_), refused[0]
    finally:
        server.cleanup()
        subprocess.run(["rm", "-rf", server.dir], check=False)


_OUTRUN_LOGGED = r"""
import os, threading, time
_dir = os.environ.get("MF_TEST_OUTRUN_DIR")
if _dir:
    from memfabric.plog import service as _service
    _real_piece = _service.PlogService._ready_piece
    _pieces = []

    def _piece(self, plog, at, n, touched):
        # a round's first piece is written; from its second it waits while `hold` exists
        _pieces.append(1)
        if len(_pieces) >= 2 and os.path.exists(os.path.join(_dir, "hold")):
            open(os.path.join(_dir, "held"), "a").close()
            while os.path.exists(os.path.join(_dir, "hold")):
                time.sleep(0.02)
        got = _real_piece(self, plog, at, n, touched)
        with open(os.path.join(_dir, "pieces"), "a") as f:
            f.write(f"{plog.core.name} {at} {int(got)}\n")
        return got

    _service.PlogService._ready_piece = _piece
"""


def test_a_round_queued_while_its_plogs_round_was_outrun_does_not_chase_the_log(tmp_path, monkeypatch, request):
    """A log that outran a round is not made ready again until it has grown by
    PLOG_PREPARE_SKIP_BYTES (prepare_from). Fails: a round queued by appends while the outrun
    one was under way (its `preparing` flag is cleared when a round starts) ran right after it,
    from the log's end, without looking at prepare_from."""
    _site(tmp_path, monkeypatch, _OUTRUN_LOGGED)
    monkeypatch.setenv("MF_TEST_OUTRUN_DIR", str(tmp_path))
    server = PersistentServer("pmem", capacity="700MiB").start()
    try:
        name = ns_name(request)
        with memfabric.init(server.config) as s:
            ns = s.create_namespace(name, sec_id="k", pool="keep")
            ns.create_plog("wal", PLOG_BYTES).append(b"first")
            ns.create_plog("other", PLOG_BYTES).append(b"first")
        # Restored, nothing of them is known ready: their next commits queue rounds from their ends.
        server.kill()
        (tmp_path / "hold").touch()
        server.start()
        with memfabric.init(server.config) as s:
            ns = s.namespace(name, "k", pool="keep")
            log = ns.plog("wal")
            log.append(b"second")
            wait_until((tmp_path / "held").exists, "the round's second piece to be held", WAIT_S)
            assert _append_until_refused(log, 5) == (5, None)     # past the held piece's end
            (tmp_path / "hold").unlink()

            def _pieces() -> list[tuple[str, int, int]]:
                rows = (tmp_path / "pieces").read_text().split("\n")[:-1]
                return [(row.split()[0], int(row.split()[1]), int(row.split()[2])) for row in rows]

            wait_until(lambda: any(not got for _, _, got in _pieces()), "the round to be outrun", WAIT_S)
            # Another plog's round, queued now, runs after any round of wal's queued before.
            ns.plog("other").append(b"second")
            wait_until(lambda: any(plog == "other" for plog, _, _ in _pieces()), "the other plog's round", WAIT_S)
            pieces_ = _pieces()
            outrun = next(i for i, (_, _, got) in enumerate(pieces_) if not got)
            assert [p for p in pieces_[outrun + 1:] if p[0] == "wal"] == []
            assert [r[0] for r in pieces_[:outrun + 1]] == ["wal", "wal"]
            assert list(log.records()) == [b"first", b"second"] + [RECORD] * 5
    finally:
        server.cleanup()
        subprocess.run(["rm", "-rf", server.dir], check=False)

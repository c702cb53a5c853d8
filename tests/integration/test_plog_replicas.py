"""MemPlog replicas on one host's servers (issue 11): appends land on every copy at the same
offsets; a copy killed mid-stream is reported dead and appends go on; the home killed, the plog
is sealed and read whole (every acknowledged record) from a copy; a copy that restarts is
stale and never serves a shorter log as if whole; a sealed copy fences its home; more replicas
than live servers is refused. (tests/multihost/test_plog_hosts.py does the kill across hosts.)"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import memfabric
from memfabric.datapath.connect import connect_to
from memfabric.errors import InvalidArgument, NoSuchObject, PermissionDenied, Sealed, ServerUnavailable
from memfabric.launcher import LocalFabric
from memfabric.limits import MAX_PLOG_PULL_PLACES, PLOG_PULL_BYTES
from memfabric.plog import record as rec
from memfabric.plog.client import Plog
from memfabric.plog.record import HEADER_BYTES, frame_bytes

from ..conftest import short_tmp_dir
from ..helpers import free_ports, ns_name, stop_process, wait_until
from .test_metrics import scrape, value
from .test_persistence import PersistentServer

MiB = 1 << 20
WAIT_S = 60


def _body(seq: int) -> bytes:
    return struct.pack("<I", seq) * (1 + seq % 200)


def _check(payload: bytes) -> int:
    seq = struct.unpack_from("<I", payload)[0]
    assert payload == _body(seq), "a record is whole"
    return seq


def _fabric(servers: int, medium: str = "ramdisk", metrics: bool = False) -> LocalFabric:
    """`servers` servers with a pool "logs" of `medium`; with `metrics`, server i's metrics on
    _metrics(fab, i)."""
    extra = ["--pool", f"logs:{medium}:32MiB"]
    port = free_ports(servers) if metrics else None
    if port is not None:
        extra += ["--metrics-port", str(port)]
    fab = LocalFabric(short_tmp_dir("mf-plogr-"), servers=servers, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=extra).start()
    fab.metrics_port = port
    return fab


def _metrics(fab: LocalFabric, server_id: int) -> str:
    return f"127.0.0.1:{fab.metrics_port + server_id - 1}"


@pytest.fixture(scope="module")
def three_servers():
    fab = _fabric(3)
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.fixture
def fresh():
    fabs = []

    def make(servers: int = 3) -> LocalFabric:
        fabs.append(_fabric(servers))
        return fabs[-1]

    yield make
    for fab in fabs:
        fab.stop()


def _session(fab: LocalFabric, where: str) -> memfabric.Session:
    if where == "remote":
        return memfabric.init(os.path.join(fab.directory, "remote.toml"))
    return memfabric.init(fab.directory, server=0)


def _copy(log: Plog, server_id: int) -> Plog:
    """A handle that talks to this one server only (home or copy): its copy, read directly."""
    handle = Plog(log.namespace, log.name, server_id, log.plog_id)
    handle._fail_over = lambda: False       # type: ignore[method-assign]   # never another server
    return handle


def _info_once_up(handle: Plog) -> dict:
    """info() from the handle's server, once its link (broken by the server's restart) is made
    again."""
    def ask():
        try:
            return handle.info()
        except ServerUnavailable:
            return None
    return wait_until(ask, "the restarted server to answer", WAIT_S)


def _kill(fab: LocalFabric, server_id: int) -> None:
    pid = fab.server_pids()[server_id]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the server to die")


class _Appender(threading.Thread):
    """Appends _body(0), _body(1), ... until stopped or an append fails; `acked` holds the
    offsets appends returned, in order. It pauses after `most` acks (a test may raise it): a
    stream left to run while a server is killed and reaped must not fill the plog (3,000 of
    these take under 2.5 MiB), however fast appends go."""

    def __init__(self, log: Plog, most: int = 3000) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.most = most
        self.acked: list[int] = []
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if len(self.acked) >= self.most:
                    self.stop.wait(0.01)       # paused until `most` is raised, or stopped
                    continue
                self.acked.append(self.log.append(_body(len(self.acked))))
        except Exception as exc:       # noqa: BLE001 - the test looks at it
            self.error = exc

    def wait_for(self, count: int) -> None:
        wait_until(lambda: len(self.acked) >= count or self.error is not None, f"{count} appends", WAIT_S)
        assert self.error is None, self.error

    def end(self) -> None:
        self.stop.set()
        self.join(WAIT_S)
        assert not self.is_alive(), "the appender did not stop"


def _assert_holds(log: Plog, acked: list[int]) -> None:
    """The log's records start with every acknowledged one, whole, at the offsets returned."""
    records = list(log.records())
    assert len(records) >= len(acked)
    at = 0
    for seq, payload in enumerate(records):
        assert _check(payload) == seq
        if seq < len(acked):
            assert acked[seq] == at + HEADER_BYTES
        at += frame_bytes(len(payload))


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_appends_land_on_both_copies(three_servers, where, request):
    with _session(three_servers, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 4 * MiB, replicas=2)
        info = log.info()
        assert info["replicas"] == 2 and info["dead_replicas"] == [] and info["role"] == "home"
        (other,) = info["replica_servers"]
        assert other != info["home"]
        offsets = [log.append(_body(i)) for i in range(50)]
        offsets += log.append_many([_body(i) for i in range(50, 150)])
        big = b"L" * (600 << 10)                          # forwarded in several pieces
        offsets.append(log.append(big))
        home_copy, replica_copy = _copy(log, info["home"]), _copy(log, other)
        length = log.info()["length"]
        assert replica_copy.info()["length"] == length and replica_copy.info()["records"] == 151
        assert replica_copy.info()["role"] == "replica" and replica_copy.info()["stale"] is False
        assert replica_copy.read(0, length) == home_copy.read(0, length)      # byte for byte
        assert replica_copy.record(150) == big
        assert [replica_copy.record(i) for i in (0, 77, 149)] == [_body(0), _body(77), _body(149)]
        assert list(replica_copy.records(0, 150)) == [_body(i) for i in range(150)]
        # One plog in the listing (not its copy too), and appends go to the home only.
        assert [p["name"] for p in ns.plogs()] == ["wal"]
        with pytest.raises(ServerUnavailable, match="appends go to its home"):
            replica_copy.append(b"not here")
        # Seal reaches the copy; delete takes the copy away too.
        assert log.seal()["state"] == "sealed"
        assert replica_copy.info()["state"] == "sealed"
        log.delete()
        with pytest.raises(NoSuchObject):
            replica_copy.info()
        assert ns.create_plog("wal", MiB, replicas=3).info()["replicas"] == 3     # the name is free again


def test_a_same_host_append_to_a_replicated_plog_is_written_compiled_and_forwarded_before_it_is_answered(request):
    """The home writes a same-host append in its receive loop (plog/fast_append.py) as for one
    copy, but never commits it there: Python forwards it to the copy first (_flush_to). So the
    compiled counter counts them, and the copy holds every record acknowledged."""
    fab = _fabric(2, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s:
            log = s.create_namespace(ns_name(request), sec_id="k", pool="logs").create_plog("wal", 4 * MiB, replicas=2)
            info = log.info()
            home_metrics = _metrics(fab, info["home"])
            log.append(_body(0))                 # Python's: it grants the rest
            before = value(scrape(home_metrics), "memfabric_plog_compiled_appends_total")
            for i in range(1, 60):
                log.append(_body(i))
                (other,) = info["replica_servers"]
                if i % 20 == 0:                  # each acknowledged one is on the copy already
                    assert _copy(log, other).info()["records"] == i + 1
            assert value(scrape(home_metrics), "memfabric_plog_compiled_appends_total") - before == 59
            copy = _copy(log, other)
            assert list(copy.records()) == [_body(i) for i in range(60)] == list(log.records())
    finally:
        assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def test_more_replicas_than_live_servers_is_refused(three_servers, request):
    with _session(three_servers, "same-host") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        with pytest.raises(InvalidArgument, match=r"replicas=4 needs 4 live servers .* it has 3"):
            ns.create_plog("wal", MiB, replicas=4)
        with pytest.raises(InvalidArgument, match="at most 8 replicas"):
            ns.create_plog("wal", MiB, replicas=9)
        assert ns.plogs() == []
        with pytest.raises(NoSuchObject):
            ns.plog("wal")
        assert ns.create_plog("wal", MiB, replicas=3).info()["dead_replicas"] == []


def test_a_copy_slower_to_make_ready_than_the_peer_timeout_still_gets_its_plog(request):
    """Making a large plog's memory ready takes time in proportion to its size (a pmem file
    zeroed and flushed: seconds on a disk under load). A copy that takes longer than the
    peer timeout (3 s; here it is stopped for 4.5 s) still gets its copy made within the
    time allowed for the size, and the create succeeds: before, the home gave up on it with
    TIMEOUT "cannot make a copy" (as `memfabric bench --plog` did for 400 MiB on a loaded
    disk). The request goes to the home directly: create_plog itself first asks every server
    whether the name is taken, which would wait for the stopped copy before the home is asked."""
    fab = LocalFabric(short_tmp_dir("mf-plogr-"), servers=2, capacity="16MiB", segment_size="4MiB",
                      liveness_timeout_s=30.0, extra_args=["--pool", "logs:ramdisk:200MiB"]).start()
    try:
        with _session(fab, "same-host") as s:
            ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
            small = ns.create_plog("first", MiB, replicas=2)    # the home's link to its copy is made
            home, copy = small.home, small.info()["replica_servers"][0]
            pid = fab.server_pids()[copy]
            stop_process(pid)
            timer = threading.Timer(4.5, os.kill, (pid, signal.SIGCONT))
            timer.start()
            try:   # 192 MiB: 6 s allowed for the copy; the home's request has the client's 10 s
                info = s.link(home).call("plog_create", **ns.wire_creds, name="large", capacity=192 * MiB,
                                         replicas=2)["info"]
            finally:
                timer.join()
                os.kill(pid, signal.SIGCONT)
            assert info["replica_servers"] == [copy] and info["dead_replicas"] == []
            log = ns.plog("large")
            at = log.append(b"kept on both")
            assert _copy(log, copy).read(at, 12) == b"kept on both"
    finally:
        assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


APPENDER = r"""
import struct, sys
import memfabric
ock, ns_name, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with memfabric.init(ock) as s:
    log = s.namespace(ns_name, "k", pool="logs").plog("shared")
    for seq in range(count):
        log.append(struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300))
"""


def test_appenders_in_several_processes_leave_identical_copies(three_servers, request):
    name = ns_name(request)
    writers, count = 4, 100
    with _session(three_servers, "same-host") as s:
        log = s.create_namespace(name, sec_id="k", pool="logs").create_plog("shared", 8 * MiB, replicas=3)
        remote = os.path.join(three_servers.directory, "remote.toml")
        procs = [subprocess.Popen([sys.executable, "-c", APPENDER, remote if tag % 2 else three_servers.directory,
                                   name, str(tag), str(count)], stderr=subprocess.PIPE, text=True)
                 for tag in range(writers)]
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=120)
            finally:
                proc.kill()
            assert proc.returncode == 0, err
        info = log.info()
        assert info["records"] == writers * count and info["dead_replicas"] == []
        whole = log.read(0, info["length"])
        for server_id in info["replica_servers"]:
            copy = _copy(log, server_id)
            assert copy.info()["records"] == writers * count
            assert copy.read(0, info["length"]) == whole
        seen = {tag: 0 for tag in range(writers)}
        for payload in log.records():
            tag, seq = struct.unpack_from("<II", payload)
            assert seq == seen[tag] and payload == struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 300)
            seen[tag] += 1


@contextlib.contextmanager
def _forwards_by_hand(fab: LocalFabric, request) -> Iterator[SimpleNamespace]:
    """A plog of two replicas holding b"one", and what a server of the cluster may send its
    copy: a peer link over RPC (the cluster token makes a peer). Yields the session, the plog,
    its copy's server and a handle on the copy, the plog's nonce and extents, the peer link,
    a forward's args and the log's end. Then: nothing refused was kept, the home's next
    append lands on the copy, in step."""
    with _session(fab, "remote") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", MiB, replicas=2)
        log.append(b"one")
        (server_id,) = log.info()["replica_servers"]
        copy = _copy(log, server_id)
        layout = log._call("plog_info", layout=True)
        where = next(x for x in s.servers() if x["server_id"] == server_id)
        peer = connect_to(server_id, where["host"], "", where["rpc_address"], local_host=None, token=s._token,
                          tls=None, timeout_s=10, role="peer")
        try:
            yield SimpleNamespace(s=s, log=log, server_id=server_id, copy=copy, nonce=layout["nonce"],
                                  extents=layout["extents"], peer=peer, end=log.info()["length"],
                                  args={**ns.wire_creds, "name": "wal", "plog_id": log.plog_id})
        finally:
            peer.close()
        log.append(b"two")
        assert log.info()["dead_replicas"] == []
        assert list(copy.records()) == [b"one", b"two"]


def test_a_copy_takes_bytes_only_at_its_end_and_only_records_that_check(three_servers, request):
    with _forwards_by_hand(three_servers, request) as f:
        peer, args, end, nonce = f.peer, f.args, f.end, f.nonce
        with pytest.raises(InvalidArgument, match="no gaps"):
            peer.call("plog_replica_append", **args, at=end + 8, data=rec.encode(nonce, 1, b"two"), last=True)
        for bad in (rec.encode(nonce, 5, b"two"),                   # out of place
                    rec.encode(nonce ^ 1, 1, b"two"),               # another plog's
                    rec.encode(nonce, 1, b"two")[:-8],              # torn
                    rec.encode(nonce, 1, b"two") + b"\1" * 8):      # garbage after it
            with pytest.raises(InvalidArgument, match="not whole records"):
                peer.call("plog_replica_append", **args, at=end, data=bad, last=True)
        for bad_nonce in (-1, "1", None):
            with pytest.raises(InvalidArgument):
                peer.call("plog_replica_create", **{**args, "name": "other"}, capacity=4096, nonce=bad_nonce,
                          home=1, replica_servers=[f.server_id], replicas=2)
        frame = rec.encode(nonce, 1, b"two")
        peer.call("plog_replica_append", **args, at=end, data=frame[:8], last=False)   # a forward cut off
        assert f.copy.info()["records"] == 1 and list(f.copy.records()) == [b"one"]
        with pytest.raises(PermissionDenied):                 # a client is no server of the cluster
            f.s.link(f.server_id).call("plog_replica_append", **args, at=0, data=b"", last=True)


def test_a_copy_reads_from_its_home_only_whole_places_and_keeps_only_records_that_check(three_servers, request):
    """A forward that names where its bytes lie in the home's files (`source`, a same-host
    home's forward past one piece): the copy reads them from its own home, whoever sends it.
    A malformed source is INVALID_ARGUMENT; places it cannot read (a segment the namespace
    does not hold, past a segment's end) are answered `pulled: False` (the home then sends
    pieces); bytes that are not the next records of this plog are refused. Nothing of any of
    them is kept."""
    with _forwards_by_hand(three_servers, request) as f:
        peer, args, end = f.peer, f.args, f.end
        (segment, offset, _), *_ = f.extents
        for bad in ([], [[segment, offset]], [[segment, offset, -1]], [["1", offset, 8]], [[segment, offset, 0]],
                    [[segment, offset, 8]] * (MAX_PLOG_PULL_PLACES + 1), [[segment, offset, PLOG_PULL_BYTES + 1]],
                    "x", [[segment, offset, True]],
                    [[segment, 1 << 63, 16]], [[segment, (1 << 64) - 1, 16]]):     # past an off_t (was INTERNAL_ERROR)
            with pytest.raises(InvalidArgument, match="source must be"):
                peer.call("plog_replica_append", **args, at=end, source=bad, last=True)
        with pytest.raises(InvalidArgument, match="data .bytes. or source"):
            peer.call("plog_replica_append", **args, at=end, data=b"x", source=[[segment, offset, 8]], last=True)
        for unreadable in ([[10 ** 9, 0, 16]], [[segment, (1 << 40), 16]]):
            reply = peer.call("plog_replica_append", **args, at=end, source=unreadable, last=True)
            assert reply["pulled"] is False and reply["why"], reply
        # The home's first record, offered as the second: not the next record of the log.
        with pytest.raises(InvalidArgument, match="not whole records"):
            peer.call("plog_replica_append", **args, at=end, source=[[segment, offset, end]], last=True)
        assert f.copy.info()["length"] == end and list(f.copy.records()) == [b"one"]


def test_a_forward_as_an_rpc_payload_is_taken_from_peers_only_and_by_the_copys_rules(three_servers, request):
    """plog_replica_payload (a home on another host's forward past one piece, its bytes as the
    RPC payload) is a server's: a client gets PERMISSION_DENIED. From a peer, a payload that
    is empty or past PLOG_PULL_BYTES is INVALID_ARGUMENT, and its bytes are held to the rules
    of every forward (no gaps, only the next records that check); nothing refused is kept, and
    the connection goes on serving."""
    with _forwards_by_hand(three_servers, request) as f:
        peer, args, end, nonce = f.peer, f.args, f.end, f.nonce
        with pytest.raises(PermissionDenied):
            f.s.link(f.server_id).request("plog_replica_payload", {**args, "at": end, "last": True},
                                          payload=[memoryview(rec.encode(nonce, 1, b"two"))])
        with pytest.raises(InvalidArgument, match="bytes of payload"):
            peer.request("plog_replica_payload", {**args, "at": end, "last": True})
        with pytest.raises(InvalidArgument, match="bytes of payload"):
            peer.request("plog_replica_payload", {**args, "at": end, "last": True},
                         payload=[memoryview(bytes(PLOG_PULL_BYTES + 8))])
        with pytest.raises(InvalidArgument, match="no gaps"):
            peer.request("plog_replica_payload", {**args, "at": end + 8, "last": True},
                         payload=[memoryview(rec.encode(nonce, 1, b"two"))])
        for bad in (rec.encode(nonce, 5, b"two"), rec.encode(nonce ^ 1, 1, b"two"), rec.encode(nonce, 1, b"two")[:-8]):
            with pytest.raises(InvalidArgument, match="not whole records"):
                peer.request("plog_replica_payload", {**args, "at": end, "last": True}, payload=[memoryview(bad)])
        assert f.copy.info()["length"] == end and list(f.copy.records()) == [b"one"]
        assert peer.call("plog_info", **args)["info"]["length"] == end       # the connection goes on


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_a_replica_killed_mid_stream(fresh, where, request):
    fab = fresh()
    with _session(fab, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 8 * MiB, replicas=2)
        (victim,) = log.info()["replica_servers"]
        appender = _Appender(log)
        appender.start()
        try:
            appender.wait_for(100)
            _kill(fab, victim)
            at_kill = len(appender.acked)
            appender.most = at_kill + 100
            appender.wait_for(at_kill + 100)          # appends go on with the home alone
        finally:
            appender.end()
        assert appender.error is None
        info = log.info()
        assert info["dead_replicas"] == [victim] and info["state"] == "open"
        _assert_holds(log, appender.acked)
        assert log.info()["records"] == len(appender.acked)
        # Sealed and read from the survivor (the home here).
        assert log.seal()["state"] == "sealed"
        with pytest.raises(Sealed):
            log.append(b"after the seal")
        _assert_holds(ns.plog("wal"), appender.acked)


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_the_home_killed_mid_stream_sealed_and_read_from_the_copy(fresh, where, request):
    fab = fresh()
    with _session(fab, where) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 8 * MiB, replicas=2)
        home = log.info()["home"]
        (survivor,) = log.info()["replica_servers"]
        appender = _Appender(log)
        appender.start()
        try:
            appender.wait_for(100)
            _kill(fab, home)
            appender.most = 1 << 62                   # (if it paused meanwhile) its next append fails
            wait_until(lambda: appender.error is not None, "the appends to fail", WAIT_S)
        finally:
            appender.end()
        acked = appender.acked
        # The same handle: seal goes to the copy (its home does not answer), reads follow it.
        info = log.seal()
        assert info["state"] == "sealed" and info["server"] == survivor and info["role"] == "replica"
        # A copy reports its home dead once the cluster sees it dead (its liveness timeout).
        wait_until(lambda: home in log.info()["dead_replicas"], "the copy to report its home dead", WAIT_S)
        _assert_holds(log, acked)
        # A new handle finds the copy too, as the home is found.
        again = ns.plog("wal")
        assert again.home == survivor
        _assert_holds(again, acked)
        assert again.info()["state"] == "sealed"
        with pytest.raises(ServerUnavailable):
            again.append(b"no home to take it")
        assert [p["server"] for p in ns.plogs()] == [survivor]


def test_a_copy_stopped_mid_stream_is_dropped_then_told_it_is_stale(fresh, request):
    """SIGSTOP: the copy does not answer (the append waits for the peer timeout, then goes on
    without it); SIGCONT: the copy may have taken an append or two more than it was counted for,
    but fewer than the home: its home tells it it is stale, and it never serves its log as whole.
    The home killed then, the plog is read from the copy that kept up."""
    fab = fresh()
    with _session(fab, "same-host") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 4 * MiB, replicas=3)
        home, (stopped, kept_up) = log.info()["home"], log.info()["replica_servers"]
        acked = [log.append(_body(i)) for i in range(20)]
        pid = fab.server_pids()[stopped]
        stop_process(pid)
        try:
            acked += [log.append(_body(i)) for i in range(20, 40)]
            assert log.info()["dead_replicas"] == [stopped]
        finally:
            os.kill(pid, signal.SIGCONT)
        acked += [log.append(_body(i)) for i in range(40, 50)]
        stopped_copy = _copy(log, stopped)
        wait_until(lambda: stopped_copy.info()["stale"], "the stopped copy to be told it is stale", WAIT_S)
        assert stopped_copy.info()["records"] < 50
        with pytest.raises(ServerUnavailable, match="stale"):
            stopped_copy.read(0, 16)
        assert _copy(log, kept_up).info()["records"] == 50
        _kill(fab, home)
        again = ns.plog("wal")
        assert again.home == kept_up
        assert again.seal()["state"] == "sealed"
        _assert_holds(again, acked)


def test_a_dead_copy_sealed_later_fences_its_home(fresh, request):
    """The two sides of a cut: the home goes on without a copy it could not reach; a client
    that cannot reach the home seals that copy. Once the home reaches the copy again, it
    seals itself: no append succeeds after the seal."""
    fab = fresh()
    with _session(fab, "same-host") as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 4 * MiB, replicas=2)
        (copy,) = log.info()["replica_servers"]
        [log.append(_body(i)) for i in range(10)]
        pid = fab.server_pids()[copy]
        stop_process(pid)
        try:
            log.append(_body(10))                  # waits for the peer timeout, then goes on alone
        finally:
            os.kill(pid, signal.SIGCONT)
        assert log.info()["dead_replicas"] == [copy]
        assert _copy(log, copy).seal()["state"] == "sealed"
        wait_until(lambda: log.info()["state"] == "sealed", "the home to learn of the seal", WAIT_S)
        with pytest.raises(Sealed):
            log.append(b"after the seal")
        assert log.info()["records"] == 11


def test_reads_go_to_a_copy_while_the_home_is_stopped_and_appends_to_the_home_after(fresh, request):
    fab = fresh()
    with memfabric.init(fab.directory, server=0, timeout_s=2.0) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
        log = ns.create_plog("wal", 4 * MiB, replicas=2)
        home, (copy,) = log.info()["home"], log.info()["replica_servers"]
        acked = [log.append(_body(i)) for i in range(30)]
        pid = fab.server_pids()[home]
        stop_process(pid)
        try:
            assert list(log.records()) == [_body(i) for i in range(30)]      # from the copy
            assert log.home == copy and log.info()["server"] == copy
        finally:
            os.kill(pid, signal.SIGCONT)
        acked.append(log.append(_body(30)))               # to the home, not to the copy it reads
        assert log.info()["records"] == 31
        _assert_holds(_copy(log, home), acked)
        _assert_holds(log, acked)


# ---- restarts: servers of one cluster run one by one (PersistentServer) ------------------------

@pytest.fixture
def two_persistent():
    first = PersistentServer("ramdisk")
    second = PersistentServer("ramdisk", cluster_db=first.cluster_db)
    first.start()
    second.start()
    yield first, second
    second.cleanup()
    first.cleanup()


def _replicated(s: memfabric.Session, name: str) -> Plog:
    ns = s.create_namespace(name, sec_id="k", pool="keep")
    log = ns.create_plog("wal", 2 * MiB, replicas=2)
    assert log.info()["home"] == s.local.server_id
    return log


def test_a_restarted_replica_is_stale_never_short(two_persistent, request):
    home_server, replica_server = two_persistent
    with memfabric.init(home_server.config) as s:
        log = _replicated(s, ns_name(request))
        acked = [log.append(_body(i)) for i in range(20)]
        replica_server.kill()
        acked += [log.append(_body(i)) for i in range(20, 40)]      # the copy misses these
        assert log.info()["dead_replicas"] == [replica_server.server_id]
        replica_server.start()
        wait_until(lambda: any(x["alive"] for x in s.servers() if x["server_id"] == replica_server.server_id),
                   "the restarted server to be seen alive", WAIT_S)
        copy = _copy(log, replica_server.server_id)
        info = _info_once_up(copy)
        assert info["stale"] is True and info["records"] == 20, info        # shorter, and it says so
        for read in (lambda: copy.read(0, 16), lambda: copy.record(0), lambda: list(copy.records())):
            with pytest.raises(ServerUnavailable, match="stale"):
                read()
        # The home never forwards to it again; appends go on, the copy stays dead.
        acked += [log.append(_body(i)) for i in range(40, 50)]
        assert log.info()["dead_replicas"] == [replica_server.server_id]
        assert copy.info()["records"] == 20
        _assert_holds(log, acked)
        assert log.namespace.plog("wal").home == home_server.server_id        # found at its home
        log.delete()                               # the copy goes too: its server answers
        with pytest.raises(NoSuchObject):
            copy.info()


def test_a_replica_restarted_before_its_home_noticed_is_dropped_at_the_next_append(two_persistent, request):
    home_server, replica_server = two_persistent
    with memfabric.init(home_server.config) as s:
        log = _replicated(s, ns_name(request))
        acked = [log.append(_body(i)) for i in range(10)]
        replica_server.kill()
        replica_server.start()                     # back before any append went to it
        acked.append(log.append(_body(10)))        # the stale copy refuses it: dead, the append goes on
        assert log.info()["dead_replicas"] == [replica_server.server_id]
        copy = _copy(log, replica_server.server_id)
        info = _info_once_up(copy)
        assert info["stale"] is True and info["records"] == 10
        _assert_holds(log, acked)


def test_a_copy_sealed_while_its_home_was_away_fences_the_home(two_persistent, request):
    home_server, replica_server = two_persistent
    name = ns_name(request)
    with memfabric.init(home_server.config) as s:
        log = _replicated(s, name)
        acked = [log.append(_body(i)) for i in range(10)]
    home_server.kill()
    with memfabric.init(replica_server.config) as s:
        ns = s.namespace(name, "k", pool="keep")
        found = ns.plog("wal")
        assert found.home == replica_server.server_id
        assert found.seal()["state"] == "sealed"
        _assert_holds(found, acked)
    home_server.start()
    with memfabric.init(home_server.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        assert log.home == home_server.server_id
        with pytest.raises(Sealed):
            log.append(b"after the seal")
        assert log.info()["state"] == "sealed" and log.info()["records"] == 10
        with pytest.raises(Sealed):
            log.append(b"still sealed")
        _assert_holds(log, acked)

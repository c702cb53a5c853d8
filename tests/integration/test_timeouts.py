"""One request's TIMEOUT leaves its link in use, and a server answers TIMEOUT for a stuck peer
before its client gives up.

A link closes only when its stream is broken; closing one revokes every mapping made through
it, so a timeout that closed a healthy link used to break reads of mapped objects too. The
fabric here keeps a SIGSTOPped server "alive" (a long liveness timeout), so that placement
still asks it for memory and a server has to wait on it.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric.datapath.rpc_link import RpcLink
from memfabric.launcher import LocalFabric
from memfabric.limits import PEER_TIMEOUT_S
from memfabric.load import audit, leak_figures

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, KiB, MiB, ns_name, stop_process, wait_until
from .test_rpc_review import FakeServer, recv_frame_header, send_frame, send_head

CLIENT_TIMEOUT_S = 1.5      # below the servers' peer timeout: the case of the issue
assert CLIENT_TIMEOUT_S < PEER_TIMEOUT_S


@pytest.fixture(scope="module")
def patient_fabric():
    """Two servers that take a SIGSTOPped peer for alive for a minute."""
    fab = LocalFabric(short_tmp_dir("mf-to-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=60.0).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def _socket_of(session: memfabric.Session, server_id: int) -> str:
    return next(s["ipc_socket"] for s in session.servers() if s["server_id"] == server_id)


def _other_server(session: memfabric.Session) -> int:
    return next(s["server_id"] for s in session.servers() if s["server_id"] != session.local.server_id)


def _warm_up_peer_links(ns: memfabric.Namespace) -> None:
    """A spread object made and freed: the servers' links to each other are open, so the
    stuck call below is the allocation itself, not a first hello."""
    ns.alloc(4 * MiB, Affinity("spread")).free()


def _wait_for_no_leak(session: memfabric.Session, ns: memfabric.Namespace) -> None:
    wait_until(lambda: leak_figures(audit(session), ns.pool, [ns.name]) == (0, 0),
               f"namespace {ns.name} to hold nothing on any server")


@pytest.mark.parametrize("door", ["ipc", "rpc"])
def test_a_stuck_peer_costs_one_timeout_answered_by_the_server(patient_fabric, request, door):
    fab = patient_fabric
    path = fab.directory if door == "ipc" else os.path.join(fab.directory, "remote.toml")
    with memfabric.init(path, timeout_s=CLIENT_TIMEOUT_S) as s:
        ns = s.create_namespace(ns_name(request), "k")
        home = s.home()
        stuck = _other_server(s)
        stuck_socket = _socket_of(s, stuck)
        _warm_up_peer_links(ns)
        healthy = ns.alloc(64 * KiB, Affinity("server", home.server_id))
        healthy.write(b"before")
        mapped = ns.alloc(8 * KiB, Affinity("server", home.server_id))
        mapping = mapped.map()
        mapping.view[:6] = b"mapped"
        mapping.flush()
        pid = fab.server_pids()[stuck]
        stop_process(pid)
        try:
            with pytest.raises(memfabric.Timeout) as caught:
                ns.alloc(4 * MiB, Affinity("spread"))
            # The home's answer, naming its call to the stuck peer; not this client's deadline.
            assert stuck_socket in str(caught.value) and "extent_alloc" in str(caught.value), caught.value
            assert not home.closed and s.home() is home, "a timeout closed the link to a healthy server"
            healthy.write(b"after")
            assert healthy.read(0, 5) == b"after"
            assert bytes(mapping.view[:6]) == b"mapped", "the mapping was revoked"
            mapping.view[:6] = b"again!"
            mapping.flush()
            assert mapped.read(0, 6) == b"again!"
        finally:
            os.kill(pid, signal.SIGCONT)
        mapping.close()
        for bm in (healthy, mapped):
            bm.free()
        # The stuck peer reserved memory for the abandoned allocation once it ran again; the home
        # reads its late answer on its next call there and gives that memory back.
        _warm_up_peer_links(ns)
        _wait_for_no_leak(s, ns)
        ns.destroy()


def test_a_late_reply_on_ipc_is_dropped_and_its_allocation_undone(patient_fabric, request):
    """The client's own deadline passes (its server is stopped): TIMEOUT, the link stays;
    once the server runs again, its late reply is read past, and the object it allocated for
    no one is freed."""
    fab = patient_fabric
    with memfabric.init(fab.directory, server=0, timeout_s=1.0) as s:
        ns = s.create_namespace(ns_name(request), "k")
        other = _other_server(s)
        kept = ns.alloc(8 * KiB, Affinity("server", other))
        kept.write(b"kept")
        link = s.link(other)
        pid = fab.server_pids()[other]
        stop_process(pid)
        try:
            with pytest.raises(memfabric.Timeout) as caught:
                ns.alloc(8 * KiB, Affinity("server", other))
            assert "'alloc'" in str(caught.value)
            assert not link.closed
            assert kept.read(0, 4) == b"kept"          # mapped memory of the stopped server: still there
        finally:
            os.kill(pid, signal.SIGCONT)
        kept.free()                                    # the same link: reads past the late reply first
        assert s.link(other) is link and not link.closed
        _wait_for_no_leak(s, ns)
        ns.destroy()


def test_a_late_reply_on_rpc_never_lands_in_the_buffer_given_back(patient_fabric, request):
    """A remote read times out; the reply that comes once the server runs again is read past,
    its bytes discarded: the caller's buffer, its own again, is never written."""
    fab = patient_fabric
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=1.0) as s:
        ns = s.create_namespace(ns_name(request), "k")
        other = _other_server(s)
        bm = ns.alloc(64 * KiB, Affinity("server", other))
        bm.write(np.full(bm.size, 7, dtype=np.uint8))
        link = s.link(other)
        buffer = np.zeros(bm.size, dtype=np.uint8)
        pid = fab.server_pids()[other]
        stop_process(pid)
        try:
            with pytest.raises(memfabric.Timeout):
                bm.read(0, into=buffer)
            assert not link.closed
            buffer[:] = 1
        finally:
            os.kill(pid, signal.SIGCONT)
        bm.write(b"\x09" * 4)                          # the same link: reads past the late reply
        assert bm.read(0, 4) == b"\x09" * 4
        assert (buffer == 1).all(), "a late reply landed in a buffer its caller had back"
        assert s.link(other) is link and not link.closed
        bm.free()
        ns.destroy()


# ---- the receive side of an RPC link, against a scripted server ----------------------------------


def _late_then_answer(server: FakeServer, sock, request) -> None:
    """Answers the first request (a read of 8 bytes) only after the second came, and late;
    then the second at once."""
    second, _ = recv_frame_header(sock)
    send_frame(sock, {"id": request["id"]}, b"LATELATE")
    send_frame(sock, {"id": second["id"], "answer": 2})
    server.stopped.wait(WAIT_S)


def _stall_mid_payload(server: FakeServer, sock, request) -> None:
    """Half of the reply's payload, then the rest once the test says so."""
    send_head(sock, {"id": request["id"]}, 8)
    sock.sendall(b"HALF")
    server.release.wait(WAIT_S)
    try:
        sock.sendall(b"REST")
    except OSError:
        pass
    server.stopped.wait(WAIT_S)


def test_a_reply_after_the_deadline_is_read_past():
    server = FakeServer(_late_then_answer)
    link = RpcLink(server.address, FakeServer.TOKEN, timeout_s=0.5)
    try:
        buffer = bytearray(b"........")
        rid, pending = link.submit("seg_read", {}, into=memoryview(buffer))
        with pytest.raises(memfabric.Timeout):
            link.wait(rid, pending, "seg_read")
        assert link.call("describe")["answer"] == 2      # the late frame was read past
        assert buffer == b"........"
        assert not link.closed
    finally:
        server.stop()
        link.close()


def _answer_out_of_order(server: FakeServer, sock, request) -> None:
    """Answers the second request first: a connection's replies must come in order."""
    second, _ = recv_frame_header(sock)
    send_frame(sock, {"id": second["id"]}, b"SECOND!!")
    send_frame(sock, {"id": request["id"]}, b"FIRST!!!")
    server.stopped.wait(WAIT_S)


def test_a_reply_out_of_order_breaks_the_link():
    """A lone reader's payload may land with its header (_frames.c): the next frame must then
    be its reply. One that is not is a broken stream: every request fails, none succeeds with
    another's bytes."""
    server = FakeServer(_answer_out_of_order)
    link = RpcLink(server.address, FakeServer.TOKEN, timeout_s=WAIT_S)
    try:
        first, second = bytearray(8), bytearray(8)
        rid1, p1 = link.submit("seg_read", {}, into=memoryview(first))
        rid2, p2 = link.submit("seg_read", {}, into=memoryview(second))
        with pytest.raises(memfabric.ServerUnavailable):
            link.wait(rid1, p1, "seg_read")
        with pytest.raises(memfabric.ServerUnavailable):
            link.wait(rid2, p2, "seg_read")
        assert link.closed
        assert second == bytearray(8), "the second request's buffer was written by a broken stream"
    finally:
        server.stop()
        link.close()


def test_a_payload_stalled_part_way_breaks_the_link_and_never_lands_after():
    server = FakeServer(_stall_mid_payload)
    server.release = threading.Event()
    link = RpcLink(server.address, FakeServer.TOKEN, timeout_s=0.5)
    try:
        buffer = bytearray(b"........")
        rid, pending = link.submit("seg_read", {}, into=memoryview(buffer))
        with pytest.raises(memfabric.Timeout):
            link.wait(rid, pending, "seg_read")
        assert link.closed, "a stream stopped part way through a frame cannot go on"
        seen = bytes(buffer)
        server.release.set()                            # the rest of the payload goes out now
        assert bytes(buffer) == seen                    # no reader is left to take it
        with pytest.raises(memfabric.ServerUnavailable):
            link.call("describe")
    finally:
        server.release.set()
        server.stop()
        link.close()


def test_threads_waiting_on_one_link_see_one_timeout_each():
    """Two callers on one link, a server that never answers: each gets its own TIMEOUT, the
    link stays open, and nobody waits past a bound."""
    server = FakeServer(lambda srv, sock, req: srv.stopped.wait(WAIT_S))
    link = RpcLink(server.address, FakeServer.TOKEN, timeout_s=0.5)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            link.call("describe")
        except BaseException as exc:       # noqa: BLE001 - handed to the test
            errors.append(exc)
    try:
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads)
        assert len(errors) == 2 and all(isinstance(e, memfabric.Timeout) for e in errors), errors
        assert not link.closed
    finally:
        server.stop()
        link.close()


@pytest.mark.parametrize("budget", ["soon", -1.0, 0, float("nan"), True, [3]])
def test_a_bad_budget_is_an_invalid_argument(patient_fabric, budget):
    from memfabric.errors import BmError
    from memfabric.transport.ipc import IpcChannel
    with memfabric.init(patient_fabric.directory) as s:
        path = s.local.ipc_socket
    channel = IpcChannel.connect(path)
    try:
        channel.set_deadline(WAIT_S)
        channel.send({"op": "stats", "id": 1, "budget_s": budget})
        reply, fds = channel.recv()
        assert not fds and reply["error"] == BmError.INVALID_ARGUMENT and "budget_s" in reply["msg"], reply
    finally:
        channel.close()


def _stall_the_second_reply(server: FakeServer, sock, first) -> None:
    """Never answers the first request; answers the second with half its payload, then the
    rest once the test says so."""
    second, _ = recv_frame_header(sock)
    send_head(sock, {"id": second["id"]}, 8)
    sock.sendall(b"HALF")
    server.release.wait(WAIT_S)
    try:
        sock.sendall(b"REST")
    except OSError:
        pass
    server.stopped.wait(WAIT_S)


def test_a_caller_whose_reply_another_thread_is_reading_waits_for_it_to_stop():
    """Thread R reads for everyone; it is part way through C's reply, into C's buffer, when
    C's deadline passes. C must not have its buffer back while R may still write into it."""
    server = FakeServer(_stall_the_second_reply)
    server.release = threading.Event()
    link = RpcLink(server.address, FakeServer.TOKEN, timeout_s=1.0)
    reader_error: list[BaseException] = []

    def reader() -> None:
        try:
            link.call("describe")
        except BaseException as exc:        # noqa: BLE001 - handed to the test
            reader_error.append(exc)
    r = threading.Thread(target=reader)
    try:
        r.start()
        wait_until(lambda: not link._recv_lock.acquire(blocking=False) or link._recv_lock.release(),
                   "thread R to be the reader")     # an RLock: no locked()
        buffer = bytearray(b"........")
        rid, pending = link.submit("seg_read", {}, into=memoryview(buffer))
        with pytest.raises(memfabric.Timeout):
            link.wait(rid, pending, "seg_read")
        seen = bytes(buffer)
        server.release.set()                # the rest of C's payload goes out now
        r.join(WAIT_S)
        assert not r.is_alive()
        assert bytes(buffer) == seen, "bytes landed in a buffer its caller had back"
        assert reader_error and isinstance(reader_error[0], memfabric.MemfabricError)
    finally:
        server.release.set()
        server.stop()
        r.join(WAIT_S)
        link.close()


@pytest.mark.parametrize("timeout_s", [np.int64(2), np.float32(1.5), 2, 0.25])
def test_a_timeout_is_any_positive_number(patient_fabric, timeout_s):
    with memfabric.init(patient_fabric.directory, timeout_s=timeout_s) as s:
        assert s.servers() and type(s.timeout_s) is float


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), float("inf"), "3", True, None])
def test_a_timeout_that_is_not_a_positive_number_is_refused(patient_fabric, timeout_s):
    with pytest.raises(memfabric.InvalidArgument, match="timeout_s"):
        memfabric.init(patient_fabric.directory, timeout_s=timeout_s)


INTERRUPTED_CALL = r"""
import sys, time
import memfabric
from memfabric import Affinity
from memfabric.load import audit, leak_figures

s = memfabric.init(sys.argv[1], server=0, timeout_s=30)
ns = s.create_namespace(sys.argv[2], "k")
other = next(x["server_id"] for x in s.servers() if x["server_id"] != s.local.server_id)
kept = ns.alloc(4096, Affinity("server", other))
link = s.link(other)
print("ready", other, flush=True)
sys.stdin.readline()
try:
    ns.alloc(4096, Affinity("server", other))
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", link.closed, flush=True)
sys.stdin.readline()
kept.free()                     # reads past the interrupted request's late reply
deadline = time.monotonic() + 10
while leak_figures(audit(s), "default", [ns.name]) != (0, 0) and time.monotonic() < deadline:
    time.sleep(0.05)
print("after", s.link(other) is link, link.closed, leak_figures(audit(s), "default", [ns.name]), flush=True)
ns.destroy()
s.close()
"""


def test_ctrl_c_during_a_call_leaves_the_link_in_use(patient_fabric, request):
    """A call interrupted by SIGINT while its server is stopped: the link stays; once the
    server runs again its late reply is read past and the object it made for no one freed."""
    from ..helpers import Child
    child = Child(INTERRUPTED_CALL, patient_fabric.directory, ns_name(request))
    try:
        ready = child.expect()
        pid = patient_fabric.server_pids()[int(ready.split()[1])]
        stop_process(pid)
        try:
            child.send("go")
            wait_until(lambda: _blocked_in_a_call(child.proc.pid), "the child to wait for its reply")
            child.proc.send_signal(signal.SIGINT)
            assert child.expect() == "interrupted False"
        finally:
            os.kill(pid, signal.SIGCONT)
        child.send("go")
        assert child.expect() == "after True False (0, 0)"
    finally:
        child.close()


def _blocked_in_a_call(pid: int) -> bool:
    """The child's main thread sleeps waiting for a message on a socket (not for its stdin)."""
    with open(f"/proc/{pid}/wchan") as f:
        return "skb_wait" in f.read()

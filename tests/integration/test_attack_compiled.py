"""Attacks on the compiled receive path (_frames.c, rpc_link.py's lone-reader fast path,
ipc.py's recv_packet, wire.py's per-thread Packer), with real servers and real sockets.

Every wait is bounded; no test asserts how fast something was.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading

import numpy as np
import pytest

import memfabric

from ..helpers import WAIT_S, ns_name

THREADS = 8


def _remote(fab) -> memfabric.Session:
    return memfabric.init(os.path.join(fab.directory, "remote.toml"))


def test_threads_reading_spans_of_one_size_over_one_link_each_get_their_own_bytes(fabric, request):
    """Many threads share a session's link to a server and read spans of the same size (the
    fast path lands a reply's payload with its header when the reader's request is the oldest
    unanswered one). Request ids are taken before the send lock, so a later id may go out
    first: the fast path must not take the next frame for its own then. Every read must
    succeed with exactly its own bytes; none may fail the link."""
    span, spans, reads_per_thread = 4096, 64, 800
    with _remote(fabric) as s:
        ns = s.create_namespace(ns_name(request), "k")
        bm = ns.alloc(span * spans)
        data = np.random.default_rng(1).integers(0, 256, span * spans, dtype=np.uint8).tobytes()
        bm.write(data)
        errors: collections.Counter = collections.Counter()
        wrong: list[int] = []

        def reader(t: int) -> None:
            buf = bytearray(span)
            for i in range(reads_per_thread):
                k = (t * 13 + i * 7) % spans
                try:
                    bm.read(k * span, span, into=memoryview(buf))
                except memfabric.MemfabricError as exc:
                    errors[f"{exc.__class__.__name__}: {exc}"] += 1
                    continue
                if bytes(buf) != data[k * span:(k + 1) * span]:
                    wrong.append(k)

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 6)
        assert not any(t.is_alive() for t in threads), "a reader is still running"
        assert not wrong, f"{len(wrong)} reads returned another span's bytes"
        assert not errors, errors.most_common(5)
        ns.destroy()


_CTRL_C_STORM = r"""
import collections, os, random, signal, sys, time
import numpy as np
import memfabric

def interrupt(signum, frame):
    raise KeyboardInterrupt()

with memfabric.init(sys.argv[1]) as s:
    ns = s.create_namespace(sys.argv[2], "k")
    size = 4 << 20
    bm = ns.alloc(size)
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes()
    bm.write(data)
    bm.read(0, 1)
    fds_before = len(os.listdir("/proc/self/fd"))
    signal.signal(signal.SIGALRM, interrupt)
    rng = random.Random(int(sys.argv[3]))
    seen, wrong = collections.Counter(), 0
    end = time.monotonic() + 4
    while time.monotonic() < end:
        n = rng.choice([1, 100, 4096, 65536, 1 << 20])
        offset = rng.randrange(0, size - n)
        buf = bytearray(n)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.00005, 0.003))
                if rng.random() < 0.3:
                    bm.write(data[offset:offset + n], offset=offset)
                    seen["wrote"] += 1
                else:
                    bm.read(offset, n, into=buf)
                    wrong += bytes(buf) != data[offset:offset + n]
                    seen["read"] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            seen["interrupted"] += 1
        except memfabric.ServerUnavailable:
            seen["link lost"] += 1     # an interrupted request's link closes; the next reconnects
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    buf = bytearray(1 << 20)
    for attempt in range(2):           # the first may meet a link the storm left closed
        try:
            bm.read(0, len(buf), into=buf)
            break
        except memfabric.ServerUnavailable:
            pass
    print("after", bytes(buf) == data[:len(buf)], "wrong", wrong, dict(seen))
    fds_after = len(os.listdir("/proc/self/fd"))
    print("fds", "kept" if fds_after <= fds_before else f"leaked: {fds_before} then {fds_after}")
    ns.destroy()
"""


@pytest.mark.parametrize("door", ["rpc", "ipc"])
def test_ctrl_c_at_random_moments_of_reads_and_writes_leaves_a_working_session(fabric, request, door):
    """A signal whose handler raises (Ctrl-C) lands anywhere in reads and writes, remote or
    same-host, hundreds of times. No read may return wrong bytes, no call may hang (a lock
    taken just before the interruption must not stay taken), afterwards the session works,
    and the process holds no more fds than before (links closed on the way are closed)."""
    from ..conftest import run_client
    path = os.path.join(fabric.directory, "remote.toml") if door == "rpc" else fabric.directory
    for seed in (1, 2):
        done = run_client(_CTRL_C_STORM, path,
                          f"{ns_name(request)}-{seed}", str(seed), timeout_s=90)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "after True wrong 0" in done.stdout, done.stdout + done.stderr[-3000:]
        assert "fds kept" in done.stdout, done.stdout


def test_replies_late_past_a_sigstop_never_land_in_buffers_their_callers_got_back(request):
    """Threads read 64 KiB spans over one link while its server is SIGSTOPped past their
    timeout, then SIGCONTed: its replies come late. A read that raised TIMEOUT got its buffer
    back: no late reply may write into it. Reads that succeed have exactly their own bytes."""
    from memfabric import Affinity
    from memfabric.launcher import LocalFabric

    from ..conftest import short_tmp_dir
    from ..helpers import stop_process
    fab = LocalFabric(short_tmp_dir("mf-atk-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=60.0).start()
    try:
        with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=1.0) as s:
            ns = s.create_namespace(ns_name(request), "k")
            target = s.servers()[-1]["server_id"]
            span, spans = 64 << 10, 32
            bm = ns.alloc(span * spans, Affinity("server", target))
            data = np.random.default_rng(3).integers(0, 255, span * spans, dtype=np.uint8).tobytes()
            bm.write(data)
            stop, given_back, wrong = threading.Event(), [], []
            errors: collections.Counter = collections.Counter()

            def reader(t: int) -> None:
                i = 0
                while not stop.is_set():
                    k = (t * 5 + i) % spans
                    i += 1
                    buf = bytearray(b"\xff" * span)        # 0xff: no byte of the data
                    try:
                        bm.read(k * span, span, into=memoryview(buf))
                    except memfabric.MemfabricError as exc:
                        errors[exc.__class__.__name__] += 1
                        given_back.append(buf)
                        continue
                    if bytes(buf) != data[k * span:(k + 1) * span]:
                        wrong.append(k)

            threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            pid = fab.server_pids()[target]
            threading.Event().wait(0.3)
            stop_process(pid)
            try:
                threading.Event().wait(2.5)                # past every reader's timeout
            finally:
                os.kill(pid, signal.SIGCONT)
            threading.Event().wait(1.0)                    # late replies come and are read past
            stop.set()
            for t in threads:
                t.join(WAIT_S * 3)
            assert not any(t.is_alive() for t in threads)
            assert errors, "no read timed out while the server was stopped"
            assert not wrong, f"{len(wrong)} reads returned other bytes"
            assert all(buf == b"\xff" * span for buf in given_back), "a late reply wrote into a buffer given back"
            got = bytearray(span)
            bm.read(0, span, into=memoryview(got))
            assert bytes(got) == data[:span]
    finally:
        fab.stop()


def test_kill_9_of_a_server_mid_transfer_fails_reads_cleanly(fresh_fabric, request):
    """Threads read and write 1 MiB spans over one link when its server is killed (-9) part
    way through transfers: each call ends (no hang) with its own bytes or a clean
    ServerUnavailable/Timeout; no read returns other bytes."""
    from memfabric import Affinity
    fab = fresh_fabric(capacity="32MiB")
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=2.0) as s:
        ns = s.create_namespace(ns_name(request), "k")
        target = s.servers()[-1]["server_id"]
        span, spans = 1 << 20, 8
        bm = ns.alloc(span * spans, Affinity("server", target))
        data = np.random.default_rng(4).integers(0, 256, span * spans, dtype=np.uint8).tobytes()
        bm.write(data)
        stop, wrong, started = threading.Event(), [], threading.Barrier(5)
        errors: collections.Counter = collections.Counter()

        def worker(t: int) -> None:
            started.wait(WAIT_S)
            i = 0
            while not stop.is_set():
                k = (t + i) % spans
                i += 1
                buf = bytearray(span)
                try:
                    if t % 2:
                        bm.write(data[k * span:(k + 1) * span], offset=k * span)
                    else:
                        bm.read(k * span, span, into=memoryview(buf))
                        if bytes(buf) != data[k * span:(k + 1) * span]:
                            wrong.append(k)
                except (memfabric.ServerUnavailable, memfabric.Timeout) as exc:
                    errors[exc.__class__.__name__] += 1
                except memfabric.MemfabricError as exc:
                    errors[f"{exc.__class__.__name__}: {exc}"] += 1

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        started.wait(WAIT_S)
        threading.Event().wait(0.3)
        os.kill(fab.server_pids()[target], signal.SIGKILL)
        threading.Event().wait(1.0)
        stop.set()
        for t in threads:
            t.join(WAIT_S * 3)
        assert not any(t.is_alive() for t in threads), "a call hung after its server was killed"
        assert not wrong, f"{len(wrong)} reads returned other bytes"
        assert errors, "no call failed although the server was killed"


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_fds_a_same_host_server_is_sent_beyond_its_limits_do_not_stay_open_in_it(fabric):
    """A client sends a real same-host server more fds than a message takes, and fds with a
    message over the size limit, many times: the server drops each connection and keeps
    none of those fds (its fd count comes back to what it was)."""
    from memfabric.limits import MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES

    from ..helpers import wait_until
    with memfabric.init(fabric.directory) as s:
        server = next(x for x in s.servers() if x["server_id"] == s.local.server_id)
        pid = fabric.server_pids()[server["server_id"]]
        before = _fd_count(pid)
        r, w = os.pipe()
        try:
            for fds, message in (([r] * (MAX_FDS_PER_MESSAGE + 10), b"\x81\xa2id\x01"),
                                 ([r, w] * 8, b"x" * (MAX_MESSAGE_BYTES + 1))):
                for _ in range(20):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    sock.settimeout(WAIT_S)
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE_BYTES)
                        sock.connect(server["ipc_socket"])
                        socket.send_fds(sock, [message], fds)
                        assert sock.recv(1) == b""        # the server hangs up
                    finally:
                        sock.close()
        finally:
            os.close(r)
            os.close(w)
        wait_until(lambda: _fd_count(pid) <= before, f"server {pid} to hold no more fds than before")

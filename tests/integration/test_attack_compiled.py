"""Attacks on the compiled receive path (_frames.c, rpc_link.py's lone-reader fast path,
ipc.py's recv_packet, wire.py's per-thread Packer), with real servers and real sockets.

Every wait is bounded; no test asserts how fast something was.
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np

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
import collections, random, signal, sys, time
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
    ns.destroy()
"""


def test_ctrl_c_at_random_moments_of_remote_reads_and_writes_leaves_a_working_session(fabric, request):
    """A signal whose handler raises (Ctrl-C) lands anywhere in remote reads and writes,
    hundreds of times. No read may return wrong bytes, no call may hang (a lock taken just
    before the interruption must not stay taken), and afterwards the session works."""
    from ..conftest import run_client
    for seed in (1, 2):
        done = run_client(_CTRL_C_STORM, os.path.join(fabric.directory, "remote.toml"),
                          f"{ns_name(request)}-{seed}", str(seed), timeout_s=90)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "after True wrong 0" in done.stdout, done.stdout + done.stderr[-3000:]

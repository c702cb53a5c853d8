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

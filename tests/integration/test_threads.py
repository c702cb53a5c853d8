"""One session shared by threads: the session's own state (links, the handle cache), handles
used from several threads at once, and the compat API's process-wide session.

The broad hammering is test_load.py's; these play the particular races, each bounded in time.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric import compat as C
from memfabric.errors import BmError

from ..helpers import CHILD_WAIT_S, KiB, ns_name

RACE_S = 4.0


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(RACE_S + CHILD_WAIT_S)
    assert not any(t.is_alive() for t in threads), "a thread is still running"


def test_destroying_a_namespace_while_other_threads_make_handles(fabric, request):
    """destroy() walks the session's handle cache while other threads add to it."""
    name = ns_name(request)
    with memfabric.init(fabric.directory) as s:
        busy = s.create_namespace(name, "k")
        kept = [busy.alloc(4 * KiB) for _ in range(3000)]      # a cache long enough to walk slowly
        end = time.monotonic() + RACE_S
        errors: list[str] = []

        def make_handles() -> None:
            while time.monotonic() < end:
                try:
                    for bm in [busy.alloc(4 * KiB) for _ in range(20)]:
                        bm.free()
                except Exception as exc:                       # noqa: BLE001 - counted
                    errors.append(f"alloc: {exc!r}")

        def destroy_others() -> None:
            i = 0
            while time.monotonic() < end:
                try:
                    s.create_namespace(f"{name}-{i}", "k").destroy()
                except Exception as exc:                       # noqa: BLE001 - counted
                    errors.append(f"destroy: {exc!r}")
                i += 1
        _run([threading.Thread(target=make_handles) for _ in range(3)] + [threading.Thread(target=destroy_others)])
        assert not errors, errors[:5]
        assert all(busy.open(bm.bm_id) is bm for bm in kept)
        busy.destroy()


@pytest.mark.parametrize("door", ["ipc", "rpc"])
def test_an_older_description_never_replaces_a_newer_one(fabric, request, door):
    """Thread A's refresh() is answered before thread B's expand(), but adopts its answer
    after B did: the handle must keep B's size (an object never shrinks). Played in order."""
    path = fabric.directory if door == "ipc" else os.path.join(fabric.directory, "remote.toml")
    with memfabric.init(path) as s:
        ns = s.create_namespace(ns_name(request), "k")
        bm = ns.alloc(4 * KiB)
        older = bm._call("describe")                 # thread A, up to its reply
        bm.expand(64 * KiB)                           # thread B
        bm._adopt(older)                              # thread A goes on
        assert bm.size == 64 * KiB
        bm.write(b"end", offset=64 * KiB - 3)         # thread B writes where it just grew
        assert bm.read(64 * KiB - 3, 3) == b"end"
        ns.destroy()


def test_one_handle_read_written_expanded_and_refreshed_by_threads(fabric, request):
    """Threads share one handle of a spread object: writers of their own stripe, a grower,
    a refresher; every stripe reads back as written."""
    with memfabric.init(fabric.directory) as s:
        ns = s.create_namespace(ns_name(request), "k")
        bm = ns.alloc(3 << 20, Affinity("spread"))
        stripe = 256 * KiB
        end = time.monotonic() + RACE_S
        errors: list[str] = []

        def writer(i: int) -> None:
            value = np.full(stripe, i + 1, dtype=np.uint8)
            while time.monotonic() < end:
                try:
                    bm.write(value, offset=i * stripe)
                    got = np.frombuffer(bm.read(i * stripe, stripe), dtype=np.uint8)
                    if not (got == i + 1).all():
                        errors.append(f"stripe {i} read back {np.unique(got)[:4]}")
                except Exception as exc:                       # noqa: BLE001 - counted
                    errors.append(f"writer {i}: {exc!r}")

        def grower() -> None:
            while time.monotonic() < end and bm.size < (12 << 20):
                try:
                    bm.expand(bm.size + 64 * KiB)
                except Exception as exc:                       # noqa: BLE001 - counted
                    errors.append(f"expand: {exc!r}")

        def refresher() -> None:
            while time.monotonic() < end:
                try:
                    bm.refresh()
                except Exception as exc:                       # noqa: BLE001 - counted
                    errors.append(f"refresh: {exc!r}")
        _run([threading.Thread(target=writer, args=(i,)) for i in range(4)]
             + [threading.Thread(target=grower), threading.Thread(target=refresher)])
        assert not errors, errors[:5]
        ns.destroy()


EXPECTED = sorted(repr(x) for x in (0, int(BmError.INVALID_ARGUMENT)))


def test_compat_from_threads_unmapping_one_view_twice(fabric):
    """Two threads unmap the same view at once: one succeeds, the other gets INVALID_ARGUMENT
    (never an exception out of the C-style API)."""
    assert C.BM_Init(fabric.directory) == 0
    try:
        assert C.BM_CreateNSSec("default", "compat-threads", 0, "k") == 0
        info = C.BmInfo(ns="compat-threads", sec_id="k")
        assert C.BM_AllocSec(info, 64 * KiB, 0, None) == 0
        end = time.monotonic() + RACE_S
        results: list[object] = []
        while time.monotonic() < end:
            code, view = C.BM_MapSec(info, C.PROT_READ | C.PROT_WRITE, 0)
            assert code == 0
            start = threading.Barrier(2)
            outcome: list[object] = []

            def unmap() -> None:
                start.wait(CHILD_WAIT_S)
                try:
                    outcome.append(C.BM_Unmap(info.bm_id, view))
                except BaseException as exc:                   # noqa: BLE001 - handed to the test
                    outcome.append(exc)
            pair = [threading.Thread(target=unmap) for _ in range(2)]
            _run(pair)
            results.append(sorted(repr(x) for x in outcome))
            del view
            if results[-1] != EXPECTED:
                break
        assert results[-1] == EXPECTED, f"after {len(results)} tries: {results[-1]}"
        assert C.BM_FreeSec(info, 0) == 0
        assert C.BM_DestroyNSSec("default", "compat-threads", "k") == 0
    finally:
        C.BM_Exit()

"""A thread calling the fabric in a loop must leave the process's other threads their turns.

Same-host reads, writes and gets ask the kernel every 2 ms whether the server hung up
(HangUpWatch). That poll let the GIL go and took it back at once, and CPython hands the GIL
to a waiting thread only after 5 ms with no such switch: a thread that wanted the GIL (a
ticker back from a 1 ms sleep) got it about once a second, against once in ~6 ms beside a
pure-Python loop. The poll now keeps the GIL (it never waits).

Each case runs its call in a loop until a ticker thread has had TICKS turns, within a bound
a hundred times what that takes beside a pure-Python loop: the test asserts the ticker's
progress, not a speed.
"""

from __future__ import annotations

import threading
import time

import pytest

import memfabric

from ..helpers import ns_name

TICKS = 100
BOUND_S = 30.0


def _ticks_while(call) -> int:
    """`call()` over and over until a ticker thread (1 ms sleeps) has ticked TICKS times or
    BOUND_S passed; its ticks."""
    ticks, stop = [0], threading.Event()

    def ticker() -> None:
        while not stop.is_set() and ticks[0] < TICKS:
            time.sleep(0.001)
            ticks[0] += 1

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    end = time.monotonic() + BOUND_S
    try:
        while ticks[0] < TICKS and time.monotonic() < end:
            call()
    finally:
        stop.set()
        thread.join(BOUND_S)
    return ticks[0]


@pytest.mark.parametrize("what", ["read", "write", "kv get"])
def test_a_thread_calling_in_a_loop_leaves_other_threads_their_turns(fabric, request, what):
    with memfabric.init(fabric.directory) as session:
        ns = session.create_namespace(ns_name(request), sec_id="k")
        bm = ns.alloc(1 << 20)
        kv = ns.kv()
        kv.put(b"k", b"v" * 100)
        buf = bytearray(65536)
        call = {"read": lambda: bm.read(0, 65536, into=buf), "write": lambda: bm.write(buf),
                "kv get": lambda: kv.get(b"k")}[what]
        assert _ticks_while(lambda: sum(range(100))) == TICKS        # beside pure Python: its turns
        assert _ticks_while(call) == TICKS, f"another thread barely ran while {what} was called in a loop"

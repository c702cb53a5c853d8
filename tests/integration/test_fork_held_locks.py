"""A client forks while another of its threads holds one of the client's locks. The child has
no such thread to let it go: its next call that takes the lock waited for ever. This is not
rare: a thread reconnecting a session's link holds the session's lock for as long as the
server takes to answer (up to the session's timeout, a server stopped or restarting), and a
worker forked meanwhile hung on its first call. Each such lock is made anew in the child.

Each case holds one lock in a thread of this process, forks, and has the child make a call
that takes it; the child must answer within CHILD_WAIT_S. Every wait is bounded.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import memfabric
from memfabric import compat
from memfabric.bigmemory import client as bigmemory_client
from memfabric.plog import client as plog_client

from ..helpers import CHILD_WAIT_S, ns_name
from .test_plog_compiled import fab  # noqa: F401 - fab: the shared fabric (pools "ram", "disk")


def _kv_put(fabric, ns):
    ns["default"].kv().put(b"forked", b"child")
    return ns["default"].kv().get(b"forked") == b"child"


def _alloc(fabric, ns):
    bm = ns["default"].alloc(4096)
    bm.write(b"child")
    return bm.read(0, 5) == b"child"


def _append_many_staged(fabric, ns):
    big = b"s" * (plog_client.PLOG_INLINE_BYTES + 1)      # past what rides in a message: staged
    return len(ns["ram"].plog("wal").append_many([big, big])) == 2


def _compat_init(fabric, ns):
    return compat.BM_Init(fabric.directory) == 0 and compat.BM_Exit() == 0


# (what holds it, the lock's owner and name, the child's call that takes it)
CASES = {
    "the session's link lock": (lambda s, ns: s, "_lock", _kv_put),
    "the session's handles lock": (lambda s, ns: s, "_handles_lock", _alloc),
    "a KV handle's lock": (lambda s, ns: ns["default"].kv(), "_lock", _kv_put),
    "BigMemory's adopting lock": (lambda s, ns: bigmemory_client, "_ADOPTING", _alloc),
    "a plog link's stage holders lock": (lambda s, ns: plog_client, "_HOLDERS_LOCK", _append_many_staged),
    "compat's session lock": (lambda s, ns: compat, "_session_lock", _compat_init),
}


def _child_answer(pid: int, read_end: int) -> tuple[bytes, int | None]:
    """What the child wrote and its exit status; it is killed if it has not ended in time."""
    deadline = time.monotonic() + CHILD_WAIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.read(read_end, 4096), os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return os.read(read_end, 4096), None


@pytest.mark.parametrize("case", list(CASES))
def test_a_child_forked_while_another_thread_holds_a_lock_can_take_it(fab, request, case):  # noqa: F811
    owner_of, name, call = CASES[case]
    with memfabric.init(fab.directory) as session:
        ns = {pool: session.create_namespace(ns_name(request), sec_id="k", pool=pool) for pool in ("default", "ram")}
        ns["ram"].create_plog("wal", 4 << 20)
        assert call(fab, ns)                                 # the call works here, and the handles are made
        lock = getattr(owner_of(session, ns), name)
        held, go = threading.Event(), threading.Event()

        def holder() -> None:
            with lock:
                held.set()
                go.wait(CHILD_WAIT_S * 2)

        thread = threading.Thread(target=holder, daemon=True)
        thread.start()
        assert held.wait(CHILD_WAIT_S)
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:                                         # the child: no holder thread here
                try:
                    os.close(read_end)
                    os.write(write_end, b"right" if call(fab, ns) else b"wrong")
                except BaseException as exc:                     # noqa: BLE001 - told to the parent
                    os.write(write_end, f"{type(exc).__name__}: {exc}"[:300].encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            said, status = _child_answer(pid, read_end)
        finally:
            go.set()
            thread.join(CHILD_WAIT_S)
            os.close(read_end)
        assert status is not None, f"the child's call hung on {case} (it was killed after {CHILD_WAIT_S} s)"
        assert said == b"right", said

"""A call interrupted (Ctrl-C) anywhere between sending a request and taking its reply, over
real links to real servers.

Over RPC a reply's payload lands straight in the caller's buffer (rpc_link.py): once a call
has raised, its caller may reuse that buffer, so no late reply may land in it afterwards,
wherever the interruption came. A real SIGINT handler that raises is made to run at every
point, one at a time, where CPython runs a signal's handler in memfabric's code (at calls
into and back from C, function entries, loops, and inside waits): a trace hook marks SIGINT
pending before the n-th bytecode, and the interpreter delivers it at its next check. Then
the buffer is refilled, and the same call made again on the same link reads past the
interrupted request's late reply: the refilled buffer must stay as it is, and the session
must go on working (its link kept, or closed and reconnected).

Every wait is bounded; no test asserts how fast something was.
"""

from __future__ import annotations

import _thread
import collections
import os
import signal
import sys
import threading
from typing import Any, Callable

import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric.datapath.rpc_link import Pending, RpcLink
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, stop_process
from ..transport.paths import interrupted_after

PACKAGE_DIR = os.path.dirname(memfabric.__file__) + os.sep
SPAN = 64 << 10
MARK = 0xA5                 # a byte no datum here has
_OURS: set = set()          # memfabric's code objects seen so far


class CtrlC:
    """A trace hook that makes SIGINT pending just before the `at`-th run (code, offset,
    how many times before) of a bytecode in memfabric's code by the calling (main) thread,
    or before the first bytecode of `function` (of rpc_link.py), then stops tracing:
    `_on_sigint` runs where the interpreter next checks for signals. (Tracing must stop
    first: each call of a trace hook is such a check.) With `record`, it only lists the
    bytecodes run. Records every Pending made, to check afterwards that none still holds
    a buffer."""

    def __init__(self, at: tuple | None = None, function: str = "", record: list | None = None,
                 after: str = "") -> None:
        self.at, self.function, self.record = at, function, record
        self.after = after            # count (and record) only from the first bytecode of this function on
        self.seen = 0
        self.tripped = False
        self.delivered_at: str | None = None
        self.delivered: tuple | None = None       # (code, offset) where the handler ran
        self.made: list[Pending] = []
        self._trip = collections.defaultdict(_thread.interrupt_main)   # a lookup: no check follows it

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code not in _OURS:
            if not code.co_filename.startswith(PACKAGE_DIR):
                return None
            _OURS.add(code)
        if code is Pending.__init__.__code__:
            self.made.append(frame.f_locals["self"])
        frame.f_trace_opcodes = True
        return self._opcode

    def _opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "opcode":
            return self._opcode
        code = frame.f_code
        if self.after:
            if code.co_name != self.after:
                return self._opcode
            self.after = ""
        if self.record is not None:
            self.record.append((code, frame.f_lasti))
            return self._opcode
        if self.function:
            if code.co_name != self.function or not code.co_filename.endswith("rpc_link.py"):
                return self._opcode
        else:
            if code is not self.at[0] or frame.f_lasti != self.at[1]:
                return self._opcode
            self.seen += 1
            if self.seen < self.at[2]:
                return self._opcode
        sys.settrace(None)            # no hook runs from here on (a call: before the signal)
        self.tripped = True
        self._trip[0]                 # SIGINT pending, taken at the interpreter's next check
        return None


_hook: CtrlC | None = None


def _on_sigint(signum: int, frame: Any) -> None:
    hook = _hook
    if hook is not None:
        code = frame.f_code
        hook.delivered = (code, frame.f_lasti)
        hook.delivered_at = f"{code.co_filename.rsplit(os.sep, 2)[-1]}:{frame.f_lineno} ({code.co_name})"
    raise KeyboardInterrupt("Ctrl-C")


def run_interrupted(hook: CtrlC, call: Callable[[], Any]) -> BaseException | None:
    """Run `call` under `hook`; what it raised (None: nothing)."""
    global _hook
    _hook = hook
    before = signal.signal(signal.SIGINT, _on_sigint)
    try:
        try:
            sys.settrace(hook)
            call()
        finally:
            sys.settrace(None)        # a call: a SIGINT still pending is taken here at the latest
    except BaseException as exc:      # the interruption, or what it turned into
        return exc
    finally:
        signal.signal(signal.SIGINT, before)
        _hook = None
    return None


def holding(hook: CtrlC) -> list[str]:
    """Requests the interrupted call sent that are neither answered nor let go of: their
    buffer is still theirs to land a reply in (or a waiter for them would wait in vain).
    (One cut off half made, or never sent, is not: no reader can reach it.)"""
    return [f"{getattr(p, 'op', '?')!r}" for p in hook.made
            if not getattr(p, "done", True) and getattr(p, "into", None) is not None and getattr(p, "id", None) != 0]


def again(call: Callable[[], Any]) -> Any:
    """The follow-up call: once more if the interruption left its link closed (the session
    reconnects)."""
    try:
        return call()
    except memfabric.ServerUnavailable:
        return call()


def sweep(call: Callable[[Any], Any], size: int, check: Callable[[CtrlC, bytearray], None],
          after: str = "", ends: type[BaseException] | None = None, settle: Callable[[], Any] = lambda: None) -> int:
    """Interrupt `call(buffer)` at each point in turn (from the first bytecode of function
    `after` on), then run `check`; returns how many points there were. A run without
    interruption (which raises `ends`, or nothing) lists its bytecodes first; each try
    makes SIGINT pending before one of them, and the next try before the one after where
    that signal was taken (those between all lead there). `settle` runs after each run
    that `check` does not follow."""
    trace: list = []
    raised = run_interrupted(CtrlC(record=trace, after=after), lambda: call(bytearray(size)))
    settle()
    if (raised is None) != (ends is None) or (ends is not None and not isinstance(raised, ends)):
        pytest.fail(f"the call, not interrupted, raised {raised!r}")
    assert trace, f"the call never ran {after}()"
    runs: collections.Counter = collections.Counter()
    at = []
    for key in trace:
        runs[key] += 1
        at.append((*key, runs[key]))
    i, points = 0, 0
    while i < len(at):
        buf = bytearray(size)
        hook = CtrlC(at[i], after=after)
        raised = run_interrupted(hook, lambda: call(buf))
        if not hook.tripped:          # this run went another way, and never came there
            if raised is not None and not (ends is not None and isinstance(raised, ends)):
                raise raised
            settle()
            i += 1
            continue
        points += 1
        check(hook, buf)
        try:
            i = max(i, trace.index(hook.delivered, i)) + 1
        except ValueError:
            i += 1
    return points


@pytest.fixture(scope="module")
def remote_fabric():
    """Two servers (a dram pool and a ramdisk pool each), reached over RPC only, with a short
    request timeout: a call left waiting for nothing shows as TIMEOUT, soon."""
    fab = LocalFabric(short_tmp_dir("mf-int-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=60.0, extra_args=["--pool", "logs:ramdisk:16MiB"]).start()
    try:
        with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=2.0) as session:
            yield fab, session
    finally:
        fab.stop()


def _data(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, MARK, n, dtype=np.uint8).tobytes()


def _reads(session: memfabric.Session, name: str) -> dict[str, tuple[int, bytes, Callable[[Any], Any]]]:
    """name -> (buffer size, the bytes a call must put there, the call filling a buffer)."""
    ns = session.create_namespace(name, "k")
    last = session.servers()[-1]["server_id"]
    one = ns.alloc(SPAN, Affinity("server", last))
    one_data = _data(SPAN, 1)
    one.write(one_data)
    striped = ns.alloc(2 * (1 << 20) + 4096, Affinity("spread"))
    striped_data = _data(striped.size, 2)
    striped.write(striped_data)
    small = 4096
    kv = ns.kv()
    keys = [b"interrupted-%d" % i for i in range(8)]
    values = [_data(256 << 10, 10 + i) for i in range(len(keys))]
    for key, value in zip(keys, values):
        kv.put(key, value)
    log_ns = session.create_namespace(name, "k", pool="logs")
    plog = log_ns.create_plog("interrupted", 1 << 20)
    plog_data = _data(SPAN, 3)
    plog_at = plog.append(plog_data)

    def read_many(buf: Any) -> None:
        view = memoryview(buf)
        codes = session.read_many([(one, 0, SPAN, view[:SPAN]), (striped, 0, SPAN, view[SPAN:])])
        assert codes == [0, 0], codes

    def get_many(buf: Any) -> None:
        view = memoryview(buf)
        size = len(values[0])
        lengths = kv.get_many_into(keys, [view[i * size:(i + 1) * size] for i in range(len(keys))])
        assert lengths == [size] * len(keys), lengths

    return {
        "read 64KiB": (SPAN, one_data, lambda buf: one.read(0, SPAN, into=buf)),
        "read 4KiB": (small, one_data[:small], lambda buf: one.read(0, small, into=buf)),
        "read striped": (striped.size, striped_data, lambda buf: striped.read(0, striped.size, into=buf)),
        "read_many": (2 * SPAN, one_data + striped_data[:SPAN], read_many),
        "kv get_into": (len(values[0]), values[0], lambda buf: kv.get_into(keys[0], buf)),
        "kv get_many_into": (sum(map(len, values)), b"".join(values), get_many),
        "plog read": (SPAN, plog_data, lambda buf: plog.read(plog_at, SPAN, into=buf)),
    }


READS = ["read 64KiB", "read 4KiB", "read striped", "read_many", "kv get_into", "kv get_many_into", "plog read"]


@pytest.mark.parametrize("what", READS)
def test_a_read_interrupted_anywhere_never_writes_its_buffer_after_it_raised(remote_fabric, what):
    """At each point in turn: a read interrupted there raises; its buffer, refilled, stays
    as it is while the same read again (reading past the late reply) gets its bytes; no
    request of the interrupted read still holds its buffer."""
    fab, session = remote_fabric
    size, expected, read = _reads(session, f"int-{READS.index(what)}")[what]
    wrote_late, held = [], []

    def check(hook: CtrlC, buf: bytearray) -> None:
        buf[:] = bytes([MARK]) * size          # the caller has it back, and reuses it
        fresh = bytearray(size)
        again(lambda: read(fresh))
        assert fresh == expected, f"interrupted at {hook.delivered_at}, the next read got other bytes"
        if buf != bytes([MARK]) * size:
            wrote_late.append(hook.delivered_at)
        if holding(hook):
            held.append(f"{hook.delivered_at}: {holding(hook)}")

    points = sweep(read, size, check)
    assert points > 10
    assert not wrote_late, f"a late reply landed in the buffer after the read raised, interrupted at {wrote_late}"
    assert not held, f"requests still holding the buffer after the read raised: {held}"


def test_ctrl_c_as_a_read_begins_to_wait_for_a_stopped_server_leaves_its_buffer_alone(remote_fabric, request):
    """The request of a read went out to a server that is stopped (SIGSTOP): its reply
    comes only after SIGCONT. The caller is interrupted as it begins to wait; the call
    raises, and the caller reuses the buffer. The server goes on, and the next read on the
    same link reads past the late reply: it must not land in the reused buffer."""
    fab, session = remote_fabric
    ns = session.create_namespace("int-stopped", "k")
    target = session.servers()[-1]["server_id"]
    bm = ns.alloc(SPAN, Affinity("server", target))
    data = _data(SPAN, 4)
    bm.write(data)
    link = session.link(target)
    # A lone read on an idle link waits in compiled code (call_span), where a Ctrl-C shuts the
    # link (test_a_ctrl_c_while_a_compiled_read_waits_...); this one is Python's wait's.
    link._span_fd = -1
    pid = fab.server_pids()[target]
    buf = bytearray(SPAN)
    stop_process(pid)
    try:
        raised = run_interrupted(CtrlC(function="wait"), lambda: bm.read(0, SPAN, into=buf))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert isinstance(raised, KeyboardInterrupt), raised
    buf[:] = bytes([MARK]) * SPAN
    got = bytearray(SPAN)
    again(lambda: bm.read(0, SPAN, into=got))
    assert got == data
    assert buf == bytes([MARK]) * SPAN, "the late reply landed in the buffer the interrupted read gave back"
    assert session.link(target) is link, "the link was closed: an interruption before a frame is read need not"


def test_a_ctrl_c_while_a_compiled_read_waits_for_a_stopped_server_leaves_its_buffer_alone(remote_fabric, request):
    """The same through the compiled path (call_span): a real SIGINT-like signal while it
    polls for the reply of a stopped server raises at once; the link is shut (its stream's
    position is unknown), and the late reply never lands in the buffer given back."""
    fab, session = remote_fabric
    ns = session.create_namespace("int-stopped-c", "k")
    target = session.servers()[-1]["server_id"]
    bm = ns.alloc(SPAN, Affinity("server", target))
    data = _data(SPAN, 5)
    bm.write(data)
    link = session.link(target)
    pid = fab.server_pids()[target]
    buf = bytearray(SPAN)

    stop_process(pid)
    try:
        with interrupted_after(0.3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
            bm.read(0, SPAN, into=buf)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert session.link(target) is not link, "the link stayed: the read did not wait in call_span"
    buf[:] = bytes([MARK]) * SPAN
    got = bytearray(SPAN)
    again(lambda: bm.read(0, SPAN, into=got))
    assert got == data
    assert buf == bytes([MARK]) * SPAN, "the late reply landed in the buffer the interrupted read gave back"


def test_a_compiled_read_that_timed_out_interrupted_anywhere_leaves_its_buffer_alone(remote_fabric):
    """A lone read on an idle link waits in compiled code (call_span); its server stopped,
    the wait ends with nothing (TIMEOUT), and Python gives the request up. Interrupted at
    each point from there on: the call raises, and the late reply (once the server goes
    on) never lands in the buffer given back."""
    fab, _ = remote_fabric
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=0.3) as session:
        ns = session.create_namespace("int-span-timeout", "k")
        target = session.servers()[-1]["server_id"]
        bm = ns.alloc(SPAN, Affinity("server", target))
        data = _data(SPAN, 6)
        bm.write(data)
        pid = fab.server_pids()[target]
        wrote_late = []

        def read_stopped(buf: Any) -> None:
            assert not session.link(target)._pending, "the link is not idle: the read would not be compiled"
            stop_process(pid)
            try:
                bm.read(0, SPAN, into=buf)
            finally:
                os.kill(pid, signal.SIGCONT)

        def read_past_late_replies() -> bytearray:
            """A read that reads the late reply past (the link idle again after it)."""
            got = bytearray(SPAN)
            for _ in range(3):            # the late reply may come after this read's timeout
                try:
                    bm.read(0, SPAN, into=got)
                    break
                except (memfabric.ServerUnavailable, memfabric.Timeout):
                    continue
            return got

        def check(hook: CtrlC, buf: bytearray) -> None:
            buf[:] = bytes([MARK]) * SPAN
            assert read_past_late_replies() == data
            if buf != bytes([MARK]) * SPAN:
                wrote_late.append(hook.delivered_at)

        points = sweep(read_stopped, SPAN, check, after="_span_outcome", ends=memfabric.Timeout,
                       settle=read_past_late_replies)
        assert points > 3
        assert not wrote_late, f"a late reply landed in the buffer after the read raised, interrupted at {wrote_late}"


def test_other_threads_on_the_link_go_on_while_one_is_interrupted_at_every_line(remote_fabric):
    """Threads read over the link the main thread's reads use, while the main thread is
    interrupted at each line of its read in turn. Theirs get their own bytes, or fail with
    SERVER_UNAVAILABLE when an interruption mid-frame closed the link; none times out (a
    request its reader dropped, waited for in vain) and the main thread's refilled buffer
    is never written."""
    fab, session = remote_fabric
    size, expected, read = _reads(session, "int-threads")["read 64KiB"]
    stop = threading.Event()
    errors: list[str] = []
    wrong: list[int] = []

    def reader() -> None:
        mine = bytearray(size)
        while not stop.is_set():
            try:
                read(mine)
            except memfabric.ServerUnavailable:
                continue
            except memfabric.MemfabricError as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
                continue
            if mine != expected:
                wrong.append(1)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    wrote_late = []

    def check(hook: CtrlC, buf: bytearray) -> None:
        buf[:] = bytes([MARK]) * size
        fresh = bytearray(size)
        again(lambda: read(fresh))
        if buf != bytes([MARK]) * size:
            wrote_late.append(hook.delivered_at)

    try:
        points = sweep(read, size, check)
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert points > 10
    assert not wrote_late, wrote_late
    assert not wrong, f"{len(wrong)} reads of other threads got other bytes"
    assert not errors, errors[:5]


def test_cancel_of_a_request_given_up_on_returns_at_once(remote_fabric):
    """A request that timed out was given up on: its entry dropped, its buffer let go.
    Cancelling it (as a caller whose sibling failed does) has nothing to wait for: it must
    not wait for a reply no reader will hand it, nor close the link."""
    fab, session = remote_fabric
    ns = session.create_namespace("int-given-up", "k")
    target = session.servers()[-1]["server_id"]
    bm = ns.alloc(SPAN, Affinity("server", target))
    bm.write(_data(SPAN, 5))
    link = session.link(target)
    assert isinstance(link, RpcLink)
    buf = memoryview(bytearray(SPAN))
    pid = fab.server_pids()[target]
    stop_process(pid)
    try:
        _, _, segment, base = bm._described.layout.pieces[0]
        request_id, pending = link.submit_read(segment.creds, bm.bm_id, segment.segment, base, buf)
        with pytest.raises(memfabric.Timeout):
            link.wait(request_id, pending, "seg_read", timeout_s=0.2)
        link.cancel(request_id, pending)
        assert not link.closed, "cancelling a request given up on closed the link"
    finally:
        os.kill(pid, signal.SIGCONT)
    got = bytearray(SPAN)
    bm.read(0, SPAN, into=got)
    assert buf.tobytes() == bytes(SPAN), "the late reply landed in the buffer given up on"



def test_a_same_host_call_interrupted_anywhere_leaves_its_link_free(remote_fabric):
    """Over IPC (same host) a call holds the link's lock from its send to its reply. At
    each point in turn: interrupted there, the call raises and leaves the lock free (else
    every later call of every thread waits it out and times out), and the next call works;
    another thread calling over the same link all the while never fails."""
    fab, _ = remote_fabric
    with memfabric.init(fab.directory, timeout_s=2.0) as session:
        link = session.home()
        assert link.is_local
        session.servers()
        stop = threading.Event()
        errors: list[str] = []

        def caller() -> None:
            while not stop.is_set():
                try:
                    session.servers()
                except memfabric.MemfabricError as exc:
                    errors.append(f"{exc.__class__.__name__}: {exc}")
                    return

        def free_for_another_thread() -> bool:
            """Whether another thread gets the lock (the caller thread holds it only for
            a call: at most the link's timeout)."""
            free: list[bool] = []

            def try_it() -> None:
                free.append(link._lock.acquire(timeout=5 * session.timeout_s))
                if free[0]:
                    link._lock.release()
            helper = threading.Thread(target=try_it)
            helper.start()
            helper.join(WAIT_S)
            return free == [True]

        def check(hook: CtrlC, buf: bytearray) -> None:
            if not free_for_another_thread():
                pytest.fail(f"the link's lock stayed taken after a call interrupted at {hook.delivered_at}")
            again(session.servers)

        other = threading.Thread(target=caller)
        other.start()
        try:
            points = sweep(lambda buf: session.servers(), 0, check)
        finally:
            stop.set()
            other.join(WAIT_S)
        assert not other.is_alive()
        assert points > 10
        assert not errors, f"another thread's call failed: {errors}"

"""Attacks on threads appending through one plog handle (plog/combine.py), with a real server:
each thread must see what it would see alone, whatever another thread's record does."""

from __future__ import annotations

import os
import threading
import time

import memfabric

from ..helpers import ns_name, stopped
from .test_plog_compiled import fab  # noqa: F401 - fab: the shared fabric (pools "ram", "disk")

WAIT_S = 30.0          # how long a test waits for threads to reach a state; never reached when it passes


def _until(predicate) -> None:
    end = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < end, "not reached"
        time.sleep(0.002)


def _start(log, record, out: dict, tag: str) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            out[tag] = log.append(record)
        except BaseException as exc:          # noqa: BLE001 - the outcome under test
            out[tag] = exc
        out[tag + " took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _queue_behind_a_stopped_request(log, records: dict, out: dict) -> list[threading.Thread]:
    """(The server stopped.) The first record's thread sends it (held by the stopped server); the
    others queue behind it in the order given, so the second's thread sends them all next."""
    tags = list(records)
    threads = [_start(log, records[tags[0]], out, tags[0])]
    _until(lambda: log._combiner._sender is not None)
    for i, tag in enumerate(tags[1:], 1):
        threads.append(_start(log, records[tag], out, tag))
        _until(lambda: log._combiner.waiting == i)
    return threads


def test_a_record_released_while_queued_is_its_own_thread_s_error_not_its_batch_s(fab, request):  # noqa: F811
    """A memoryview released by its owner while its thread waits in a batch: the batch is
    refused whole (INVALID_ARGUMENT) and sent again one by one. The leader's record, appended,
    must be its thread's offset, and the record after it appended too; only the released one's
    thread gets an error. (Seen: the leader got ValueError although its record is in the log,
    the record after it was never sent and got TIMEOUT "may be in the log".)"""
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
        log.append(b"first")
        released = memoryview(bytearray(b"released"))
        out: dict = {}
        with stopped(pid):
            threads = _queue_behind_a_stopped_request(
                log, {"sender": b"sender", "leader": b"leader", "released": released, "after": b"after"}, out)
            released.release()
        for t in threads:
            t.join(WAIT_S)
            assert not t.is_alive()
        assert type(out["leader"]) is int, out
        assert type(out["after"]) is int, out
        assert not isinstance(out["released"], int), out
        assert log.read(out["leader"], 6) == b"leader" and log.read(out["after"], 5) == b"after"
        assert sorted(log.records()) == sorted([b"first", b"sender", b"leader", b"after"])


def test_a_handle_used_in_a_forked_child_starts_fresh_in_the_child_s_own_children(fab, request):  # noqa: F811
    """forks.tracked() combiners are reset in a forked child, then dropped from the tracking
    (forks._forked clears the set, as for links): a handle made before the first fork and used
    by threads in the child carries its sender (a thread of the child) into a grandchild, whose
    first append then waits the whole 2 x timeout_s + 1 s as if the sender were lost (and,
    forked while another thread holds the combiner's lock, would wait for ever)."""
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory) as admin:
        admin.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
    with memfabric.init(fab.directory) as s:
        log = s.namespace(name, "k", pool="ram").plog("wal")
        log.append(b"parent")
        from_child, to_parent = os.pipe()
        from_parent, to_child = os.pipe()
        child = os.fork()
        if child == 0:                                # the child: its own threads append
            code = 1
            try:
                os.close(from_child)
                os.close(to_child)
                log.append(b"child")
                os.write(to_parent, b"s")             # the parent stops the server...
                assert os.read(from_parent, 1) == b"k"
                thread = threading.Thread(target=lambda: log.append(b"child thread"), daemon=True)
                thread.start()
                _until(lambda: log._combiner._sender is not None)     # ...this thread sends, held
                grandchild = os.fork()
                if grandchild == 0:                   # the grandchild: no thread of the child here
                    os._exit(0 if log._combiner._sender is None and log._combiner.waiting == 0 else 3)
                _, status = os.waitpid(grandchild, 0)
                os.write(to_parent, b"c")             # the server goes on
                thread.join(WAIT_S)
                code = os.waitstatus_to_exitcode(status)
            finally:
                os._exit(code)
        os.close(to_parent)
        os.close(from_parent)
        try:
            assert os.read(from_child, 1) == b"s"
            with stopped(pid):
                os.write(to_child, b"k")
                os.read(from_child, 1)                # "c", or "" once the child is gone
        finally:
            os.close(from_child)
            os.close(to_child)
            _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the grandchild inherited the child's sender"
        assert sorted(log.records()) == sorted([b"parent", b"child", b"child thread"])


def _finally_line(text: str) -> int:
    """The line of Combiner._append (append's body)'s finally block holding `text`."""
    import inspect

    from memfabric.plog.combine import Combiner
    lines, first = inspect.getsourcelines(Combiner._append)
    after = next(i for i, line in enumerate(lines) if line.strip() == "finally:")
    return first + next(i for i, line in enumerate(lines) if i > after and text in line)


def _append_interrupted_at(log, function, line: int, record: bytes, out: dict, tag: str) -> bool:
    """log.append(record), a Ctrl-C (KeyboardInterrupt, as SIGINT's handler would raise) given
    it at `line` of `function` (Combiner's); its outcome in out[tag]. Whether it was given."""
    import sys

    from ..helpers import interrupt_at

    tracer, fired = interrupt_at(function, line)
    sys.settrace(tracer)
    try:
        out[tag] = log.append(record)
    except BaseException as exc:              # noqa: BLE001 - the outcome under test
        out[tag] = exc
    finally:
        sys.settrace(None)
    return bool(fired)


def _interrupted_append(log, line: int, out: dict, again: threading.Event, record_again: bytes) -> threading.Thread:
    """A thread whose append gets a Ctrl-C at `line` of Combiner._append; once `again` is set,
    it appends `record_again` (not interrupted)."""
    from memfabric.plog.combine import Combiner

    def run() -> None:
        out["fired"] = _append_interrupted_at(log, Combiner._append, line, b"interrupted", out, "first")
        if again.wait(WAIT_S):
            try:
                out["again"] = log.append(record_again)
            except BaseException as exc:      # noqa: BLE001
                out["again"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_thread_interrupted_as_it_hands_the_sending_on_sends_and_hands_on_when_it_appends_again(fab, request):  # noqa: F811
    """A Ctrl-C in the finally of the sender's append, at its _pass_on() (seen at ~1 Ctrl-C in
    100..450 with SIGINT every 1.1 ms, 8 threads): the sending stays with the interrupted
    thread. When that thread appends again it is taken for re-entered (a signal's handler)
    and sends alone, so the records queued meanwhile wait for the lost-sender takeover, 2 x
    timeout_s + 1 s (21 s at the default timeout): here, with timeout_s an hour, they must be
    sent by its next append."""
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory, timeout_s=3600.0) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
        log.append(b"first")
        out: dict = {}
        again = threading.Event()
        with stopped(pid):
            interrupted = _interrupted_append(log, _finally_line("self._pass_on()"), out, again, b"again")
            _until(lambda: log._combiner._sender is not None)     # it sends, held
            queued = [_start(log, b"queued-%d" % i, out, f"q{i}") for i in range(2)]
            _until(lambda: log._combiner.waiting == 2)
        _until(lambda: "fired" in out)
        assert out["fired"] and isinstance(out["first"], KeyboardInterrupt), out
        again.set()
        interrupted.join(WAIT_S)
        for t in queued:
            t.join(WAIT_S)
            assert not t.is_alive(), "the records queued behind the interrupted sender were not sent"
        assert type(out["again"]) is int and type(out["q0"]) is int and type(out["q1"]) is int, out
        assert sorted(log.records()) == sorted([b"first", b"interrupted", b"again", b"queued-0", b"queued-1"])


def test_a_thread_interrupted_as_it_leaves_a_batch_it_waited_in_queues_again_afterwards(fab, request):  # noqa: F811
    """A Ctrl-C in the finally of a waiter's append, at its `with self._lock:` (before it takes
    itself out of the threads waiting): from then on every append of that thread is taken for
    re-entered (a signal's handler) and goes alone, for good: it never queues (nor combines)
    again. Here it must queue behind a request under way (gone alone, it times out waiting for
    the connection)."""
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory, timeout_s=2.0) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
        log.append(b"first")
        out: dict = {}
        again = threading.Event()
        with stopped(pid):
            threads = [_start(log, b"sender", out, "sender")]
            _until(lambda: log._combiner._sender is not None)
            threads.append(_start(log, b"leader", out, "leader"))
            _until(lambda: log._combiner.waiting == 1)
            interrupted = _interrupted_append(log, _finally_line("with self._lock:"), out, again, b"again")
            _until(lambda: log._combiner.waiting == 2)          # in the leader's batch, next
        _until(lambda: "fired" in out)
        assert out["fired"] and isinstance(out["first"], KeyboardInterrupt), out
        for t in threads:
            t.join(WAIT_S)
        with stopped(pid):
            threads.append(_start(log, b"second sender", out, "second sender"))
            _until(lambda: log._combiner._sender is not None)
            again.set()
            _until(lambda: log._combiner.waiting == 1 or "again" in out)
            queued = log._combiner.waiting == 1
        interrupted.join(WAIT_S)
        for t in threads:
            t.join(WAIT_S)
        assert queued, "the interrupted thread's next append went alone instead of queuing"
        assert type(out["again"]) is int, out


def test_a_ctrl_c_as_a_batch_is_gathered_is_a_keyboard_interrupt_and_leaves_nothing_stuck(fab, request):  # noqa: F811
    """A Ctrl-C in _send_batch as a record is gathered: out of the queue and in the batch, not
    yet marked taken. Written when the batch took it before the queue gave it up: it was then
    in both (answered, its lock released, by _send_batch's finally, and called to send), and
    its lock released a second time gave the interrupted thread RuntimeError ("release
    unlocked lock") instead of its KeyboardInterrupt. The queue now gives it up first, so the
    Ctrl-C lands at the line after `batch.append(waiter)`: the interrupted thread gets its
    KeyboardInterrupt, the gathered record its copy, and the handle appends afterwards."""
    import inspect

    from memfabric.plog.combine import Combiner


    lines, first = inspect.getsourcelines(Combiner._send_batch)
    # (the line after the record goes into the batch: its popleft() there, at the time of writing)
    line = first + 1 + next(i for i, text in enumerate(lines) if text.strip() == "batch.append(waiter)")
    name = ns_name(request)
    pid = next(iter(fab.server_pids().values()))
    with memfabric.init(fab.directory, timeout_s=2.0) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
        log.append(b"first")
        out: dict = {}
        fired: list = []

        def leader() -> None:
            if _append_interrupted_at(log, Combiner._send_batch, line, b"leader", out, "leader"):
                fired.append(line)

        with stopped(pid):
            threads = [_start(log, b"sender", out, "sender")]
            _until(lambda: log._combiner._sender is not None)
            threads.append(threading.Thread(target=leader, daemon=True))
            threads[-1].start()
            _until(lambda: log._combiner.waiting == 1)
            threads.append(_start(log, b"queued", out, "queued"))
            _until(lambda: log._combiner.waiting == 2)
        for t in threads:
            t.join(WAIT_S)
        assert fired, "the Ctrl-C was not delivered where meant"
        assert isinstance(out["leader"], KeyboardInterrupt), out
        assert type(log.append(b"after")) is int


def test_an_append_from_a_signal_s_handler_run_while_its_thread_holds_the_combiner_s_lock(fab, request):  # noqa: F811
    """A signal's handler that appends runs between two bytecodes of its thread, which may be
    inside `with self._lock:` of Combiner._append at that moment. The lock is not re-entrant,
    and append takes it before it looks whether it was re-entered: the handler's append waited
    for its own thread for ever (seen with SIGALRM every 2 ms appending while the main thread
    appends: the process hung). (The handler played by a tracer at the line inside the lock, in
    the main thread: only it runs handlers.)"""
    import inspect
    import sys

    from memfabric.plog.combine import Combiner

    lines, first = inspect.getsourcelines(Combiner._append)
    line = first + next(i for i, text in enumerate(lines) if text.strip() == "if self._sender is None:")
    name = ns_name(request)
    with memfabric.init(fab.directory, timeout_s=5.0) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 1 << 20)
        out: dict = {}
        code = Combiner._append.__code__

        def handler() -> None:
            try:
                out["handler"] = log.append(b"handler")
            except BaseException as exc:      # noqa: BLE001 - the outcome under test
                out["handler"] = exc

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and "handler" not in out:
                out["handler"] = None         # (once)
                handler()
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code is code else None

        def run() -> None:
            sys.settrace(tracer)
            try:
                out["outer"] = log.append(b"outer")
            except BaseException as exc:      # noqa: BLE001
                out["outer"] = exc
            finally:
                sys.settrace(None)

        run()        # in the main thread, where signal handlers run (a hang: pytest-timeout's failure)
        assert type(out["handler"]) is int and type(out["outer"]) is int, out
        assert sorted(log.records()) == [b"handler", b"outer"]

"""plog/combine.py: threads appending through one handle share requests. With real threads and
a `send` that stands for the server (a list the records land in, a gate holding a request
under way): batches form behind a request under way, each thread gets its own record's
offset, and every way a batch can fail gives each record what it would have got alone."""

from __future__ import annotations

import os
import threading
import time

from memfabric.errors import OutOfSpace, Sealed, Timeout
from memfabric.plog.combine import Combiner

WAIT_S = 10.0          # how long a test waits for threads to reach a state; never reached when it passes


class Log:
    """What `send` appends to: records in order; `gate` (when set up) holds the next request
    until released; `fail` makes requests raise."""

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.records: list[bytes] = []
        self.requests: list[list[bytes]] = []
        self.capacity = capacity
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail: dict[int, BaseException] = {}      # request number (from 0) -> what it raises
        self.fail_all: BaseException | None = None

    def send(self, views: list, nbytes: int) -> list[int]:
        assert nbytes == sum(map(len, views)), "the combiner's count of the bytes sent"
        gate = self.gate
        self.entered.set()
        if gate is not None:
            assert gate.wait(WAIT_S)
        with self.lock:
            number = len(self.requests)
            self.requests.append([bytes(v) for v in views])
            failure = self.fail.get(number, self.fail_all)
            if failure is not None:
                raise type(failure)(*failure.args)      # each request its own, as a server's
            if sum(map(len, self.records)) + sum(map(len, views)) > self.capacity:
                raise OutOfSpace("full")
            offsets = []
            for v in views:
                offsets.append(sum(map(len, self.records)))
                self.records.append(bytes(v))
            return offsets


def until(predicate) -> None:
    end = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < end, "not reached"
        time.sleep(0.001)


def held_batch(log: Log, combiner: Combiner, records: list[bytes], wait_s: float = WAIT_S):
    """records[0]'s thread sends (held at the gate); the others queue behind it. Returns the
    threads, their outcomes (offset or exception) by index, and the gate to release."""
    outcomes: dict[int, object] = {}
    log.gate = threading.Event()
    log.entered.clear()

    def one(i: int) -> None:
        try:
            outcomes[i] = combiner.append(records[i], len(records[i]), log.send, wait_s)
        except BaseException as exc:          # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(0,))]
    threads[0].start()
    assert log.entered.wait(WAIT_S)
    for i in range(1, len(records)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    until(lambda: combiner.waiting == len(records) - 1)
    return threads, outcomes, log.gate


def finish(threads, log: Log, gate: threading.Event) -> None:
    log.gate = None
    gate.set()
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive()


def test_records_queued_behind_a_request_go_together_each_thread_given_its_own_offset():
    log, combiner = Log(), Combiner(100, 1 << 20)
    records = [bytes([i]) * (10 + i) for i in range(8)]
    threads, outcomes, gate = held_batch(log, combiner, records)
    finish(threads, log, gate)
    assert [len(r) for r in log.requests] == [1, 7]        # the one under way, then the rest together
    assert combiner.batches == 1
    for i, record in enumerate(records):
        offset = outcomes[i]
        assert type(offset) is int
        assert b"".join(log.records)[offset:offset + len(record)] == record


def test_a_thread_alone_sends_at_once_and_a_batch_keeps_its_limits():
    log, combiner = Log(), Combiner(3, 25)
    assert combiner.append(b"a", 1, log.send, WAIT_S) == 0
    assert log.requests == [[b"a"]]
    records = [b"x" * 10] * 7
    threads, outcomes, gate = held_batch(log, combiner, records)
    finish(threads, log, gate)
    # After the held one: at most 3 records, and past its first at most 25 bytes: 10 + 10 + 10 > 25.
    assert [len(r) for r in log.requests[1:]] == [1, 2, 2, 2]
    assert sorted(outcomes.values()) == [1 + 10 * i for i in range(7)]


def test_a_batch_that_does_not_fit_is_sent_again_one_by_one_and_what_fits_is_appended():
    log, combiner = Log(capacity=50), Combiner(100, 1 << 20)
    records = [bytes([65 + i]) * 10 for i in range(7)]     # 70 bytes; 50 fit
    threads, outcomes, gate = held_batch(log, combiner, records)
    finish(threads, log, gate)
    appended = [i for i in outcomes if type(outcomes[i]) is int]
    refused = [i for i in outcomes if isinstance(outcomes[i], OutOfSpace)]
    assert len(appended) == 5 and len(refused) == 2
    assert sorted(appended + refused) == list(range(7))
    for i in appended:
        assert b"".join(log.records)[outcomes[i]:outcomes[i] + 10] == records[i]
    assert len(log.records) == 5


def test_a_batch_refused_whole_is_sent_again_by_each_record_s_own_thread_alone():
    """Not by its sender, one record after another: that sender would wait out a timeout per
    other thread's record on a slow server (16 threads, timeout_s=0.5: 7.7 s), and get their
    errors."""
    log, combiner = Log(capacity=50), Combiner(100, 1 << 20)
    senders: dict[bytes, int] = {}
    send = log.send

    def by_thread(views: list, nbytes: int) -> list[int]:
        if len(views) == 1:
            senders[bytes(views[0])] = threading.get_ident()
        return send(views, nbytes)

    log.send = by_thread
    records = [bytes([65 + i]) * 10 for i in range(7)]
    threads, outcomes, gate = held_batch(log, combiner, records)
    idents = {records[i]: t.ident for i, t in enumerate(threads)}
    finish(threads, log, gate)
    assert [len(r) for r in log.requests[:2]] == [1, 6]        # the batch of 6, refused whole
    assert {r: senders[r] for r in records} == idents             # then each sent by its own thread
    assert sum(type(v) is int for v in outcomes.values()) == 5


def test_any_other_failure_of_a_batch_is_each_record_s_own_error():
    log, combiner = Log(), Combiner(100, 1 << 20)
    threads, outcomes, gate = held_batch(log, combiner, [b"r"] * 5)
    log.fail_all = Sealed("sealed")
    finish(threads, log, gate)
    errors = list(outcomes.values())
    assert all(isinstance(e, Sealed) for e in errors)
    assert len({id(e) for e in errors}) == 5              # each thread raises its own
    assert log.records == []


def test_a_record_still_queued_when_its_time_runs_out_is_taken_back_and_never_sent():
    """Batches of one record: the sending passes on (from 0 to 1, held), and 2, still queued
    behind 1 when its time runs out, is taken out: never sent."""
    log, combiner = Log(), Combiner(1, 1 << 20)
    got: dict[str, object] = {}
    first_gate, second_gate = threading.Event(), threading.Event()
    log.gate = first_gate
    threads = [threading.Thread(target=lambda: got.setdefault("0", combiner.append(b"0", 1, log.send, WAIT_S)))]
    threads[0].start()
    assert log.entered.wait(WAIT_S)
    log.gate = second_gate
    log.entered.clear()
    threads.append(threading.Thread(target=lambda: got.setdefault("1", combiner.append(b"1", 1, log.send, WAIT_S))))
    threads[1].start()
    until(lambda: combiner.waiting == 1)

    def late() -> None:
        try:
            got["2"] = combiner.append(b"2", 1, log.send, 0.5)
        except Timeout as exc:
            got["2"] = exc

    threads.append(threading.Thread(target=late))
    threads[2].start()
    until(lambda: combiner.waiting == 2)
    first_gate.set()                       # 0 answered: 1 sends, held; 2 waits on
    assert log.entered.wait(WAIT_S)
    threads[2].join(WAIT_S)
    assert isinstance(got["2"], Timeout) and "nothing of this record was appended" in str(got["2"])
    assert combiner.waiting == 0
    second_gate.set()
    for t in threads:
        t.join(WAIT_S)
    assert got["0"] == 0 and got["1"] == 1
    assert log.requests == [[b"0"], [b"1"]]
    log.gate = None
    assert combiner.append(b"next", 4, log.send, WAIT_S) == 2      # and the next one sends


def test_a_sender_lost_without_a_word_is_replaced_by_the_next_thread_once_its_time_runs_out():
    """(A Ctrl-C between a thread's claim of the sending and its try: played by a claim no
    thread holds.) Nothing passed on for the whole wait: the waiting thread sends, and the
    sending goes on from it."""
    log, combiner = Log(), Combiner(100, 1 << 20)
    combiner._sender = -1                    # no thread's
    assert combiner.append(b"a", 1, log.send, 0.3) == 0
    assert combiner._sender is None
    threads, outcomes, gate = held_batch(log, combiner, [b"b", b"c", b"d"])
    finish(threads, log, gate)
    assert sorted(outcomes.values()) == [1, 2, 3]


def test_a_record_whose_batch_is_under_way_when_its_time_runs_out_is_told_it_may_be_in_the_log():
    log, combiner = Log(), Combiner(100, 1 << 20)
    got: dict[str, object] = {}

    def one(name: str, wait_s: float) -> threading.Thread:
        def run() -> None:
            try:
                got[name] = combiner.append(name.encode(), 1, log.send, wait_s)
            except BaseException as exc:      # noqa: BLE001 - the outcome under test
                got[name] = exc
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    first_gate, second_gate = threading.Event(), threading.Event()
    log.gate = first_gate
    threads = [one("s", WAIT_S)]                 # sends alone, held
    assert log.entered.wait(WAIT_S)
    log.gate = second_gate                       # the next request (t's batch) will be held too
    threads.append(one("t", WAIT_S))
    until(lambda: combiner.waiting == 1)
    threads.append(one("u", 0.5))                # queued behind t: in t's batch
    until(lambda: combiner.waiting == 2)
    first_gate.set()
    threads[2].join(WAIT_S)                      # u's time runs out while its batch is held
    assert isinstance(got["u"], Timeout) and "may be in the log" in str(got["u"])
    second_gate.set()
    for t in threads:
        t.join(WAIT_S)
    assert got["s"] == 0 and got["t"] == 1
    assert log.requests == [[b"s"], [b"t", b"u"]] and log.records == [b"s", b"t", b"u"]    # it was


def test_a_sender_interrupted_leaves_its_batch_s_records_told_so_and_hands_the_sending_on():
    log, combiner = Log(), Combiner(100, 1 << 20)
    threads, outcomes, gate = held_batch(log, combiner, [b"0", b"1", b"2", b"3"])
    # Request 0 is 0's alone; request 1, [1, 2, 3], is interrupted in 1's thread (a Ctrl-C).
    log.fail = {1: KeyboardInterrupt()}
    finish(threads, log, gate)
    assert outcomes[0] == 0
    assert isinstance(outcomes[1], KeyboardInterrupt)
    for i in (2, 3):
        assert isinstance(outcomes[i], Timeout) and "may be in the log" in str(outcomes[i]), outcomes[i]
    assert combiner.append(b"after", 5, log.send, WAIT_S) == 1     # nothing left stuck
    assert log.requests == [[b"0"], [b"1", b"2", b"3"], [b"after"]]


def test_an_append_re_entered_while_its_thread_sends_goes_alone():
    """(As a signal's handler appending while its thread is inside append.) Queued, it would
    wait for the very call it interrupted."""
    log, combiner = Log(), Combiner(100, 1 << 20)
    inner: list[int] = []
    queued = threading.Event()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            if combiner.waiting:
                queued.set()
            time.sleep(0.001)

    def send(views: list, nbytes: int) -> list[int]:
        if not inner:
            inner.append(combiner.append(b"inner", 5, log.send, 2.0))
        return log.send(views, nbytes)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert combiner.append(b"outer", 5, send, 2.0) == 5
    finally:
        watching.set()
        watcher.join(WAIT_S)
    assert inner == [0] and not queued.is_set()


def test_a_forked_child_starts_with_no_sender():
    log, combiner = Log(), Combiner(100, 1 << 20)
    log.gate = threading.Event()
    sender = threading.Thread(target=lambda: combiner.append(b"p", 1, log.send, WAIT_S))
    sender.start()
    assert log.entered.wait(WAIT_S)
    pid = os.fork()
    if pid == 0:                                   # the child: the sending thread is not here
        code = 1
        try:
            combiner.forked()
            child = Log()
            code = 0 if combiner.append(b"c", 1, child.send, 2.0) == 0 and child.records == [b"c"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    finish([sender], log, log.gate)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_thread_called_to_send_as_it_leaves_hands_the_sending_on():
    """(A Ctrl-C in the wait of a thread that is called to send at that moment, played in order.)"""
    from memfabric.plog.combine import _Waiter
    combiner = Combiner(100, 1 << 20)
    leaving, next_one = _Waiter(b"late", 4, 1), _Waiter(b"next", 4, 2)
    combiner._sender = 99
    combiner._queue.extend([leaving, next_one])
    with combiner._lock:
        combiner._pass_on()                      # the sender done: `leaving` is called...
        assert combiner._sender == 1
        combiner._take_back(leaving)             # ...as it leaves
    assert next_one.lead and combiner._sender == 2 and combiner.waiting == 0

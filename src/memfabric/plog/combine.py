"""Appends from threads sharing a plog handle, sent together: one request and one flush for
what they appended meanwhile (group commit on the client's side). Client side, no I/O.

Why. A link carries one request at a time, so threads appending through one handle took
turns: one record per round trip and, on pmem, one flush per record. Eight threads then
appended fewer records per second than one process doing write + fsync. Now, while one
thread's request is under way, the others queue their records; when its answer comes, the
first of them sends everything queued as one batch (append_many: one request, one flush),
and each thread gets its own record's offset.

What each caller sees is what it would see alone:
- its record is appended whole, once, at the offset it is given, or it gets an error;
- a batch is all or nothing, and when it did not fit (OUT_OF_SPACE, or INVALID_ARGUMENT: a
  record resized or released while it was sent) nothing of it was written, so each of its
  records is sent again alone, by its own thread: those that fit are appended, the others get
  their own error, as they would have alone (and no thread waits for another's record);
- any other error of a batch is every record's error (SEALED, NO_SUCH_OBJECT and the like
  would refuse each alone; after a TIMEOUT or a lost server no one knows whether the batch
  was written, as for one record);
- a wait is bounded: a thread whose record is still queued when its time runs out (twice
  the session's timeout: a batch ahead of it, then its own) or that gets a Ctrl-C takes it
  out, and nothing of it is written; once its record is under way it gets TIMEOUT saying it
  may be in the log.

One sender at a time: the sending passes on under the lock, to the first record still queued,
never to a thread that left (its record is taken out, or the sending passed on for it). A
sender that passed nothing on for a whole wait is lost (a Ctrl-C between two lines, where no
try could catch it); the thread that waited sends in its place, so the handle never stays
stuck. A thread that re-enters append while it sends or waits (a signal's handler: an append
of this combiner further up its stack) sends its record alone, as before, without taking the
lock (its thread may hold it); one that appends again after such a Ctrl-C in its own append's
finally is not re-entered: it takes its place back (the sending, if still its own, sent and
passed on at once).
"""

from __future__ import annotations

import copy
import sys
import threading
from collections import deque
from typing import Any, Callable

from ..datapath.reentry import further_up
from ..errors import InvalidArgument, MemfabricError, OutOfSpace, ProtocolError, Timeout


Send = Callable[[list[Any], int], list[int]]       # (views, their bytes in all) -> their offsets


class _Waiter:
    """A record queued by a thread that is not sending: its outcome, or leadership, comes
    by `done` (a lock the waiting thread is blocked on, released once)."""

    __slots__ = ("view", "nbytes", "thread", "done", "offset", "error", "lead", "taken", "alone")

    def __init__(self, view: Any, nbytes: int, thread: int) -> None:
        self.view = view
        self.nbytes = nbytes
        self.thread = thread
        self.done = threading.Lock()
        self.done.acquire()
        self.offset: int | None = None
        self.error: BaseException | None = None
        self.lead = False          # woken to send the next batch, itself first
        self.taken = False         # in a batch under way
        self.alone = False         # its batch refused whole: its thread sends it again, alone


class Combiner:
    """Combining for one handle. `send(views, nbytes) -> offsets` appends views (`nbytes` in
    all, as measured by their threads: not measured again) in one request (one
    view: the single-record path); a batch holds at most `most_records` records and, past its
    first, `most_bytes` bytes."""

    def __init__(self, most_records: int, most_bytes: int) -> None:
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._sender: int | None = None       # the thread sending a batch, if any
        self._waiting: set[int] = set()       # threads whose record is queued or under way
        self._handed = 0                      # times the sending passed on: a sender that lives
        self._main_appends = 0                # the main thread's appends under way (re-entered: > 1)
        self._most_records = most_records
        self._most_bytes = most_bytes
        self.batches = 0                      # requests sent with more than one record

    @property
    def waiting(self) -> int:
        """Records queued behind the batch under way."""
        return len(self._queue)

    def forked(self) -> None:
        """In a forked child: the parent's threads are not here, nor is the batch one of them
        was sending; the child starts with none."""
        self._lock = threading.Lock()
        self._queue = deque()
        self._sender = None
        self._waiting = set()
        self._main_appends = 0

    def append(self, view: Any, nbytes: int, send: Send, wait_s: float,
               refuse_reentry: Callable[[], None] | None = None) -> int:
        """Appends `view` (`nbytes` long), alone or with other threads' records; its offset.
        `wait_s`: how long a record may wait for others' batches and its own (longer than a
        request may take: a sender that passes nothing on for that long is taken to be lost).
        `refuse_reentry`, on the main thread: raises BUSY when a signal's handler runs this
        while its thread is part way through a request on the connection `send` uses. Queued,
        the record would wait for a sender that waits for that connection; sent, its BUSY
        would fail the batch."""
        me = threading.get_ident()
        if me != threading.main_thread().ident:      # only the main thread runs signal handlers
            return self._append(view, nbytes, send, wait_s, me)
        if refuse_reentry is not None:
            refuse_reentry()
        # Re-entered (a signal's handler) while this thread is inside append: alone, as before,
        # and without the lock, which its thread may hold (not re-entrant); queued, it could
        # wait for the very thread it interrupted. Told by the stack, not by state a Ctrl-C
        # could leave behind; but the stack is walked (a microsecond or more) only when a count
        # of the main thread's appends under way says another may be further up (a count a
        # Ctrl-C left high costs a walk, and is set right by it).
        self._main_appends += 1
        try:
            if self._main_appends > 1:
                if self._inside():
                    return send([view], nbytes)[0]
                self._main_appends = 1
            return self._append(view, nbytes, send, wait_s, me)
        finally:
            self._main_appends -= 1

    def _append(self, view: Any, nbytes: int, send: Send, wait_s: float,
                me: int) -> int:
        waiter: _Waiter | None = None
        lead = False
        # Every step in one try: a Ctrl-C at any line leaves neither a record queued by a
        # thread that left nor the sending with one.
        try:
            with self._lock:
                if self._sender == me or me in self._waiting:
                    # Left so by a Ctrl-C in the finally of this thread's last append, where no
                    # try catches it (it is in no append now): its stale record (if any) out, the
                    # sending (if still its own) taken up again, and passed on once this is sent.
                    self._waiting.discard(me)
                    self._queue = deque(w for w in self._queue if w.thread != me)
                    if self._sender == me:
                        self._sender = None
                if self._sender is None:
                    lead = True
                    self._sender = me
                else:
                    waiter = _Waiter(view, nbytes, me)
                    self._waiting.add(me)
                    self._queue.append(waiter)
            if waiter is not None:
                lead = self._wait(waiter, wait_s)
                if not lead:
                    if waiter.alone:
                        return send([view], nbytes)[0]
                    if waiter.error is not None:
                        raise waiter.error
                    assert waiter.offset is not None
                    return waiter.offset
            return self._send_batch(view, nbytes, send)
        finally:
            if waiter is not None or lead:
                with self._lock:
                    if waiter is not None:
                        self._waiting.discard(me)
                        if not lead:
                            self._take_back(waiter)
                    if lead and self._sender == me:
                        self._pass_on()

    def _inside(self) -> bool:
        """(Called by append.) Whether this thread's stack holds another append of this
        combiner, further up: a signal's handler re-entered it (no state of ours to lose to a
        Ctrl-C, unlike a flag)."""
        return further_up(self, _APPEND_CODES, sys._getframe(2))     # from append's caller up

    def _wait(self, waiter: _Waiter, wait_s: float) -> bool:
        """Until `waiter` is answered (False) or called to send (True). Past `wait_s`: if the
        sending passed on meanwhile, raises TIMEOUT (the record taken back first, or said
        to be under way); if not, its sender is lost (gone with a Ctrl-C at the wrong
        moment) and this thread sends in its place (True)."""
        handed = self._handed
        if waiter.done.acquire(timeout=wait_s):
            return waiter.lead
        with self._lock:
            if waiter.done.acquire(False):       # answered or called just as its time ran out
                return waiter.lead
            if waiter.alone:                     # its batch refused, told so or about to be
                return False
            if waiter.taken:
                raise Timeout(f"other threads' appends to this plog were not answered within {wait_s:.3g}s; "
                              "this record was in a batch under way, so it may be in the log")
            if self._handed != handed:
                self._take_back(waiter)
                raise Timeout(f"other threads' appends to this plog went first for {wait_s:.3g}s: "
                              "nothing of this record was appended")
            self._take_back(waiter)
            waiter.lead = True
            self._sender = waiter.thread
            return True

    def _take_back(self, waiter: _Waiter) -> None:
        """(Under the lock.) A record whose thread leaves: out of the queue if still there; if
        it was called to send, the sending goes to the next one."""
        if waiter.taken:
            return
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass
        if waiter.lead and self._sender == waiter.thread:
            self._pass_on()

    def _pass_on(self) -> None:
        """(Under the lock.) The first queued record's thread sends next, else no one."""
        self._handed += 1
        if self._queue:
            nxt = self._queue.popleft()
            nxt.lead = True
            self._sender = nxt.thread
            nxt.done.release()
        else:
            self._sender = None

    def _send_batch(self, view: Any, nbytes: int, send: Send) -> int:
        """Send this thread's record with those queued behind it; answer each."""
        if not self._queue:      # (read without the lock: one queued just now is handed the next send)
            return send([view], nbytes)[0]
        batch: list[_Waiter] = []
        try:
            with self._lock:
                total = nbytes
                while self._queue and len(batch) + 1 < self._most_records \
                        and total + self._queue[0].nbytes <= self._most_bytes:
                    # Out of the queue before it is in the batch: a Ctrl-C between two of these
                    # lines must not leave it in both (answered, then called to send).
                    waiter = self._queue.popleft()
                    batch.append(waiter)
                    waiter.taken = True
                    total += waiter.nbytes
            return self._send(view, nbytes, batch, total, send)
        except BaseException as exc:
            for waiter in batch:
                if waiter.offset is None and waiter.error is None:
                    waiter.error = _theirs(exc)
            raise
        finally:
            for waiter in batch:
                waiter.done.release()

    def _send(self, view: Any, nbytes: int, batch: list[_Waiter], total: int, send: Send) -> int:
        """Sends the batch; sets each waiter's offset (or error); returns this thread's."""
        if not batch:
            return send([view], nbytes)[0]
        self.batches += 1
        try:
            offsets = send([view] + [w.view for w in batch], total)
        except (OutOfSpace, InvalidArgument):
            # Refused whole, none of it written (full; a record resized or released by another
            # thread while it was sent): each thread sends its own again, alone, for its own
            # answer, this one's included; none waits for another's (nor gets its error).
            refused = batch[:]
            for waiter in refused:
                waiter.alone = True
            batch.clear()                 # (answered: _send_batch has none of them to answer)
            for waiter in refused:
                waiter.done.release()
            return send([view], nbytes)[0]
        if len(offsets) != len(batch) + 1:
            raise ProtocolError(f"{len(batch) + 1} records appended, {len(offsets)} offsets answered")
        for waiter, offset in zip(batch, offsets[1:]):
            waiter.offset = offset
        return offsets[0]


_APPEND_CODES = frozenset({Combiner.append.__code__})


def _theirs(exc: BaseException) -> BaseException:
    """The error a record in another thread's failed batch gets: a copy of a memfabric error
    (each thread raises its own); anything else (a Ctrl-C of the sender) left the batch's
    outcome unknown."""
    if isinstance(exc, MemfabricError):
        mine = copy.copy(exc)
        mine.__traceback__ = None
        return mine
    return Timeout(f"the thread sending this record's batch stopped waiting for its answer ({type(exc).__name__}): "
                   "the record may be in the log")

"""Checking secIds at the cost of one slow hash per namespace, per server process.

The catalog keeps secIds only as slow, memory-hard hashes (core/namespaces.py: about 47 ms
and 16 MiB each). A server pays one when a namespace is created through it and once per
namespace incarnation after that: a secId that matched is remembered as an HMAC of it under
a random key of this process (never the secId itself, nothing that outlives the process),
and a later connection presenting it is let in after a constant-time compare.

A wrong secId still pays the slow hash, so guessing online stays as slow as offline; the same
wrong secId again (a misconfigured client retrying) is remembered too and refused at once,
since it tells a guesser nothing new. Connections presenting the same secId at once (a
fleet of clients starting) wait for one hash. And each client (as the kernel or the
transport names it, never as it claims) may fail only so often: SEC_ID_FAILURE_BURST
failures, then one more per 1/SEC_ID_FAILURES_PER_S seconds; meanwhile its unproven secIds
get LIMIT_EXCEEDED without being hashed, so a guesser cannot take the server's CPU. Only a
failure spends from that budget: many right secIds at once never lock a client out (nor do
remembered ones: a guesser cannot lock out a client whose secId this server already knows).
At most SEC_HASH_CONCURRENCY hashes run at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

from ..core.namespaces import NamespaceRecord, hash_sec_id, sec_id_matches
from ..errors import Busy, LimitExceeded
from ..limits import (MAX_NAMESPACES, SEC_HASH_CONCURRENCY, SEC_HASH_WAIT_S, SEC_ID_FAILURE_BURST,
                      SEC_ID_FAILURES_PER_S)

MAX_REMEMBERED = 4 * MAX_NAMESPACES     # namespace incarnations; the least recently used go first
MAX_CLIENTS_TRACKED = 4096              # failure budgets; a forgotten one starts full again
MAX_REFUSED_REMEMBERED = 4096           # wrong secIds (as HMACs), the least recently seen go first


class SecIdChecker:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._remembered: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._budgets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # client -> (tokens, at)
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._hashing = threading.BoundedSemaphore(SEC_HASH_CONCURRENCY)
        # (incarnation key, tag) -> set when the one hash of that secId under way is done.
        self._inflight: dict[tuple[tuple[str, str, int], bytes], threading.Event] = {}

    def matches(self, record: NamespaceRecord, sec: bytes, client: str | None) -> bool:
        """Whether `sec` is the namespace's secId. `client` names who asks, for its failure
        budget; None for this cluster's servers, which forward only secIds they checked."""
        tag = self._tag(record, sec)
        while True:
            known = self._known(record, tag)
            if known is not None:
                return known
            with self._lock:
                waiting = self._inflight.get((record.key, tag))
                if waiting is None:
                    mine = self._inflight[(record.key, tag)] = threading.Event()
            if waiting is None:
                break
            # Someone is hashing this very secId: its answer is ours.
            if not waiting.wait(SEC_HASH_WAIT_S):
                raise Busy("the server is still checking this secId for another connection; try again")
        try:
            if client is not None:
                self._check_budget(client)
            with self._slot():
                ok = sec_id_matches(sec, record)
            if ok:
                self._remember(record.key, tag)
            else:
                if client is not None:
                    self._charge(client)
                with self._lock:
                    self._refused[tag] = None
                    while len(self._refused) > MAX_REFUSED_REMEMBERED:
                        self._refused.popitem(last=False)
            return ok
        finally:
            with self._lock:
                del self._inflight[(record.key, tag)]
            mine.set()

    def _known(self, record: NamespaceRecord, tag: bytes) -> bool | None:
        """True: remembered as right; False: remembered as wrong; None: not known yet."""
        with self._lock:
            known = self._remembered.get(record.key)
            if known is not None:
                self._remembered.move_to_end(record.key)
            refused = tag in self._refused
            if refused:
                self._refused.move_to_end(tag)
        if known is not None and hmac.compare_digest(known, tag):
            return True
        return False if refused else None

    def hash(self, sec: bytes) -> tuple[str, str]:
        """(salt hex, stored hash) for a new namespace, in one of the bounded slots."""
        with self._slot():
            return hash_sec_id(sec)

    def remember(self, record: NamespaceRecord, sec: bytes) -> None:
        """A secId known to be right (its namespace was just created with it)."""
        self._remember(record.key, self._tag(record, sec))

    def _tag(self, record: NamespaceRecord, sec: bytes) -> bytes:
        message = b"\0".join([record.pool.encode(), record.ns.encode(), str(record.incarnation).encode(), sec])
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _remember(self, key: tuple[str, str, int], tag: bytes) -> None:
        with self._lock:
            self._remembered[key] = tag
            self._remembered.move_to_end(key)
            while len(self._remembered) > MAX_REMEMBERED:
                self._remembered.popitem(last=False)

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if not self._hashing.acquire(timeout=SEC_HASH_WAIT_S):
            raise Busy(f"the server is checking {SEC_HASH_CONCURRENCY} secIds at once and more wait; try again")
        try:
            yield
        finally:
            self._hashing.release()

    def _tokens(self, client: str, now: float) -> float:
        """The client's failure budget now (under the lock)."""
        tokens, at = self._budgets.pop(client, (float(SEC_ID_FAILURE_BURST), now))
        tokens = min(float(SEC_ID_FAILURE_BURST), tokens + (now - at) * SEC_ID_FAILURES_PER_S)
        self._budgets[client] = (tokens, now)
        while len(self._budgets) > MAX_CLIENTS_TRACKED:
            self._budgets.popitem(last=False)
        return tokens

    def _check_budget(self, client: str) -> None:
        """Refuse to hash for a client that failed too often lately."""
        with self._lock:
            tokens = self._tokens(client, self._clock())
        if tokens < 1.0:
            wait_s = (1.0 - tokens) / SEC_ID_FAILURES_PER_S
            raise LimitExceeded(f"{client} gave too many wrong secIds ({SEC_ID_FAILURE_BURST}, then more than "
                                f"{SEC_ID_FAILURES_PER_S:g} a second): the next can be checked in {wait_s:.1f} s")

    def _charge(self, client: str) -> None:
        """A failure: one token less (the hashes a client may run at once are bounded by the
        slots, so a burst of wrong guesses overshoots the budget by at most that many)."""
        with self._lock:
            now = self._clock()
            self._budgets[client] = (self._tokens(client, now) - 1.0, now)

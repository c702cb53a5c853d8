"""Checking secIds at the cost of one slow hash per namespace, per server process.

The catalog keeps secIds only as slow, memory-hard hashes (core/namespaces.py: about 47 ms
and 16 MiB each). A server pays one when a namespace is created through it and once per
namespace incarnation after that: a secId that matched is remembered as an HMAC of it under
a random key of this process (never the secId itself, nothing that outlives the process),
and a later connection presenting it is let in after a constant-time compare.

A wrong secId still pays the slow hash, so guessing online stays as slow as offline; the same
wrong secId again (a misconfigured client retrying) is remembered too and refused at once,
since it tells a guesser nothing new. And each
client (as the kernel or the transport names it, never as it claims) may fail only so often:
SEC_ID_FAILURE_BURST failures, then one more per 1/SEC_ID_FAILURES_PER_S seconds; meanwhile
its unproven secIds get LIMIT_EXCEEDED without being hashed, so a guesser cannot take the
server's CPU. (Remembered secIds are never refused: a guesser cannot lock out a client whose
secId this server already knows.) At most SEC_HASH_CONCURRENCY hashes run at once.
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

    def matches(self, record: NamespaceRecord, sec: bytes, client: str | None) -> bool:
        """Whether `sec` is the namespace's secId. `client` names who asks, for its failure
        budget; None for this cluster's servers, which forward only secIds they checked."""
        tag = self._tag(record, sec)
        with self._lock:
            known = self._remembered.get(record.key)
            if known is not None:
                self._remembered.move_to_end(record.key)
        if known is not None and hmac.compare_digest(known, tag):
            return True
        with self._lock:
            if tag in self._refused:
                self._refused.move_to_end(tag)
                return False
        if client is not None:
            self._spend(client)
        with self._slot():
            ok = sec_id_matches(sec, record)
        if ok:
            self._remember(record.key, tag)
            if client is not None:
                self._refund(client)
        else:
            with self._lock:
                self._refused[tag] = None
                while len(self._refused) > MAX_REFUSED_REMEMBERED:
                    self._refused.popitem(last=False)
        return ok

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

    def _spend(self, client: str) -> None:
        """Take one try from the client's budget before hashing; given back if it matched."""
        now = self._clock()
        with self._lock:
            tokens, at = self._budgets.pop(client, (float(SEC_ID_FAILURE_BURST), now))
            tokens = min(float(SEC_ID_FAILURE_BURST), tokens + (now - at) * SEC_ID_FAILURES_PER_S)
            if tokens < 1.0:
                self._budgets[client] = (tokens, now)
                wait_s = (1.0 - tokens) / SEC_ID_FAILURES_PER_S
                raise LimitExceeded(f"{client} gave too many wrong secIds ({SEC_ID_FAILURE_BURST}, then more than "
                                    f"{SEC_ID_FAILURES_PER_S:g} a second): the next can be checked in {wait_s:.1f} s")
            self._budgets[client] = (tokens - 1.0, now)
            while len(self._budgets) > MAX_CLIENTS_TRACKED:
                self._budgets.popitem(last=False)

    def _refund(self, client: str) -> None:
        with self._lock:
            if client in self._budgets:
                tokens, at = self._budgets[client]
                self._budgets[client] = (min(float(SEC_ID_FAILURE_BURST), tokens + 1.0), at)

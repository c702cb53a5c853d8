"""A namespace's keyspace on one server: its key index in shared memory, its records, its
limits and counters. The server's KV operations (service.py) work through this.

Three memfds per keyspace, each a different trust:

    index   the key table (index.py), written by the server only; same-host clients map it
            read-only (sealed with F_SEAL_FUTURE_WRITE) and look keys up without asking
    refs    one byte per index slot that clients set on a hit: recency for the CLOCK
            eviction (an approximation of LRU, as Redis's is). Clients may write it, and so
            can skew recency only within this namespace, whose secId they hold
    stats   a pair of counters (hits, misses) per client, which each client writes alone: the
            gets the server never sees still count in `stats()`

The index and refs are replaced together when the table fills (a new generation); stats stay.
Records (key and value, or key and the extents of a large value) live in the namespace's
segments: small ones in the record heap (heap.py), values too large for a heap chunk in
extents of their own. A record is never changed in place: a new value is a new record.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..core.allocator import Extent
from ..errors import InvalidArgument, LimitExceeded, OutOfMemory
from ..limits import MAX_KV_CLIENTS, REUSE_GRACE_S
from . import index as ix
from .heap import MAX_RECORD_BYTES, PAGE_BYTES, Chunk, RecordHeap
from .rules import NO_EXPIRY, expired

F_SEAL_FUTURE_WRITE = 0x0010
SEALS_READ_ONLY = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SEALS_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
EXTENT = struct.Struct("<QQQ")       # a large value's extent in its record: segment, offset, length
STATS_WORDS_PER_CLIENT = 2           # hits, misses


def _memfd(name: str, size: int, seals: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


@dataclass
class KvSettings:
    memory_limit: int | None = None       # bytes, the namespace's whole; each server keeps its share
    eviction: str = "lru"                 # "lru" (CLOCK) or "refuse"
    replicas: int = 1

    def to_wire(self) -> dict:
        return {"memory_limit": self.memory_limit, "eviction": self.eviction, "replicas": self.replicas}


@dataclass
class Counters:
    hits: int = 0                 # gets the server answered, and those clients counted
    misses: int = 0
    evictions: int = 0
    expired: int = 0
    retired: list[int] = field(default_factory=lambda: [0, 0])   # hits, misses of clients gone


class Table:
    """One generation of the index, with its reference bytes."""

    def __init__(self, label: str, ns: str, slots: int, generation: int) -> None:
        self.slots = slots
        self.generation = generation
        self.index_bytes = ix.words_for(slots) * 8
        self.index_fd, self._index_map = _memfd(f"memfabric-{label}-kv-{ns}-{generation}", self.index_bytes,
                                                SEALS_READ_ONLY)
        try:
            self.refs_fd, self._refs_map = _memfd(f"memfabric-{label}-kvrefs-{ns}-{generation}", slots, SEALS_SIZE)
        except BaseException:
            os.close(self.index_fd)
            raise
        self.words = memoryview(self._index_map).cast("Q")
        self.refs = memoryview(self._refs_map)
        self.writer = ix.IndexWriter(self.words, slots, generation)

    def close(self) -> None:
        # The mappings go with their last user (a copy racing a destroy may still read them).
        for fd in (self.index_fd, self.refs_fd):
            os.close(fd)


class KeySpace:
    def __init__(self, label: str, ns: str, grace_s: float = REUSE_GRACE_S) -> None:
        self.label, self.ns = label, ns
        self.lock = threading.RLock()         # one writer of this keyspace at a time
        self.heap = RecordHeap(grace_s)
        self.grace_s = grace_s
        self.table = Table(label, ns, ix.MIN_SLOTS, generation=1)
        self.stats_bytes = MAX_KV_CLIENTS * STATS_WORDS_PER_CLIENT * 8
        self.stats_fd, self._stats_map = _memfd(f"memfabric-{label}-kvstats-{ns}", self.stats_bytes, SEALS_SIZE)
        self.stats_words = memoryview(self._stats_map).cast("Q")
        self._free_client_slots = list(range(MAX_KV_CLIENTS - 1, -1, -1))
        self.settings = KvSettings()
        self.counters = Counters()
        self.large_bytes = 0                  # values in extents of their own
        self.primary_keys = 0                 # keys this server holds as their first home
        self.clock_hand = 0
        self.closed = False
        # Chunks (and large values) a transfer still reads: freed when it is done.
        self.busy: dict[tuple[int, int], int] = {}
        self.deferred: dict[tuple[int, int], list] = {}

    # ---- figures ----------------------------------------------------------------------------

    def used_bytes(self) -> int:
        return self.heap.record_bytes + self.large_bytes

    def keys(self) -> int:
        return self.table.writer.keys

    def stats(self) -> dict:
        hits, misses = self.counters.hits + self.counters.retired[0], self.counters.misses + self.counters.retired[1]
        words = self.stats_words
        for slot in range(MAX_KV_CLIENTS):
            hits += words[slot * 2]
            misses += words[slot * 2 + 1]
        return {"keys": self.primary_keys, "held_keys": self.keys(), "bytes": self.used_bytes(),
                "memory_limit": self.settings.memory_limit, "hits": hits, "misses": misses,
                "evictions": self.counters.evictions, "expired": self.counters.expired,
                "index_bytes": self.table.index_bytes + self.table.slots, "pages": self.heap.page_count}

    # ---- clients' counter slots ----------------------------------------------------------------

    def take_client_slot(self) -> int | None:
        return self._free_client_slots.pop() if self._free_client_slots else None

    def give_client_slot(self, slot: int) -> None:
        """A client went away: what it counted stays counted."""
        self.counters.retired[0] += self.stats_words[slot * 2]
        self.counters.retired[1] += self.stats_words[slot * 2 + 1]
        self.stats_words[slot * 2] = 0
        self.stats_words[slot * 2 + 1] = 0
        self._free_client_slots.append(slot)

    def close(self) -> None:
        self.closed = True
        self.table.close()
        os.close(self.stats_fd)


# ---- records: a key and its value, or a key and the extents its value lies in -----------------------

@dataclass(frozen=True, slots=True)
class Record:
    """Where a key's record is and what it holds (a slot's fields, decoded)."""
    chunk: Chunk
    key_length: int
    value_length: int
    expiry: int
    extents: int                      # 0: the value follows the key in the chunk
    version: int

    @property
    def inline(self) -> bool:
        return self.extents == 0


def record_size(key_length: int, value_length: int) -> tuple[int, bool]:
    """(bytes the record takes in the heap, whether the value is in it): a value that does not
    fit a heap chunk beside its key goes to extents of its own, listed in the record."""
    if key_length + value_length <= MAX_RECORD_BYTES:
        return max(1, key_length + value_length), True
    return key_length, False          # the extent table's size is added once it is known


def fits_limit(space: KeySpace, share: int | None, more: int) -> bool:
    return share is None or space.used_bytes() + more <= share


def is_expired(expiry: int, now_ms: int) -> bool:
    return expired(expiry, now_ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = ["Counters", "EXTENT", "KeySpace", "KvSettings", "NO_EXPIRY", "PAGE_BYTES", "Record", "Table",
           "fits_limit", "is_expired", "now_ms", "record_size", "Extent", "Callable", "InvalidArgument",
           "LimitExceeded", "OutOfMemory"]

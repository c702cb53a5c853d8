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

The index and refs are followed together by larger ones when the table fills (a new
generation, into which the old drains a few slots at a time: index.py); stats stay.
Records (key and value, or key and the extents of a large value) live in the namespace's
segments: small ones in the record heap (heap.py), values too large for a heap chunk in
extents of their own. A record is never changed in place: a new value is a new record.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.allocator import Extent
from ..limits import MAX_KV_CLIENTS, REUSE_GRACE_S
from . import index as ix
from .get_grants import Grantees
from .put_grants import close_space as close_put_grants, settle_all as settle_put_grants
from .heap import RecordHeap
from ..media.memfd import SEALS_READ_ONLY, SEALS_SIZE, sealed_memfd

EXTENT = struct.Struct("<QQQ")       # a large value's extent in its record: segment, offset, length
STATS_WORDS_PER_CLIENT = 2           # hits, misses
KEY_LOCK_STRIPES = 64
# Clients write their own counts, and may lie: a word counts at most this, so that the sum
# stays a 64-bit number whatever they write (2**48 gets at 1 per ns: three days).
CLIENT_COUNT_MAX = 1 << 48
RETIRED_MAX = 1 << 60


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
        self.index_fd, self._index_map = sealed_memfd(f"memfabric-{label}-kv-{ns}-{generation}", self.index_bytes,
                                                SEALS_READ_ONLY)
        try:
            self.refs_fd, self._refs_map = sealed_memfd(f"memfabric-{label}-kvrefs-{ns}-{generation}", slots, SEALS_SIZE)
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
    def __init__(self, label: str, ns: str, grace_s: float | None = None, pool: str = "") -> None:
        self.label, self.ns = label, ns
        grace_s = REUSE_GRACE_S if grace_s is None else grace_s     # the module's, when made (tests set it)
        # RPC connections answering this keyspace's gets in compiled code (get_grants.py).
        self.get_grants = Grantees(pool, ns)
        # Same-host connections answering this keyspace's puts in compiled code (put_grants.py):
        # each grant and its connection's grants; the chunks they hold in stock, in bytes.
        self.put_grants: dict[Any, Any] = {}
        self.stocked_bytes = 0
        self.stock_lean_until = 0.0           # monotonic s: stocks grow slowly until then (put_grants.py)
        # Two levels: a key's writes (and their replication, which calls other servers) one
        # at a time under its stripe; the table and the heap under `lock`, never held while
        # calling out, so two servers replicating to each other cannot wait on each other.
        self.lock = threading.RLock()
        # The memfds' numbers: closed by a destroy, which holds the server's lock and so cannot
        # wait for `lock` (held while memory is reserved from the server). Taken for a dup, a
        # table's replacement and the close, and nothing is taken under it.
        self.fd_lock = threading.Lock()
        self.key_locks = [threading.RLock() for _ in range(KEY_LOCK_STRIPES)]
        self.heap = RecordHeap(grace_s)
        self.grace_s = grace_s
        self.table = Table(label, ns, ix.MIN_SLOTS, generation=1)
        self.draining: Table | None = None   # the table `table` followed, until drained into it
        self.drain_hand = 0                   # its slots below this are drained
        self.stats_bytes = MAX_KV_CLIENTS * STATS_WORDS_PER_CLIENT * 8
        self.stats_fd, self._stats_map = sealed_memfd(f"memfabric-{label}-kvstats-{ns}", self.stats_bytes, SEALS_SIZE)
        self.stats_words = memoryview(self._stats_map).cast("Q")
        self._free_client_slots = list(range(MAX_KV_CLIENTS - 1, -1, -1))
        self.settings = KvSettings()
        self.counters = Counters()
        # The extents of each large value, by its record's place: the server's own copy. The
        # table in the record is for same-host readers; the server never trusts memory a
        # client can write to say where bytes are.
        self.large: dict[tuple[int, int], list[Extent]] = {}
        self.large_bytes = 0                  # bytes of those extents
        self.reserved_bytes = 0               # extents reserved for large values being filled
        self.primary_keys = 0                 # keys this server holds as their first home
        self.clock_hand = 0
        self.sweep_hand = 0
        self._last_version = 0
        self.closed = False
        self.lease_ms = 0                     # the index's lease (index.py), renewed with each heartbeat
        self.store: Any = None                # its Store (store.py), made with it by the service
        # Records a transfer still reads (a hold), and whether they were let go meanwhile.
        self.busy: dict[tuple[int, int], int] = {}
        self.deferred: dict[tuple[int, int], tuple] = {}

    def next_version(self) -> int:
        """A write's version: a hybrid logical clock (ms << 20, then a counter), so that a
        key's versions grow even across a change of its first home (failover)."""
        self._last_version = max(self._last_version + 1, time.time_ns() // 1_000_000 << 20)
        return self._last_version

    def key_lock(self, key_hash: int) -> threading.RLock:
        return self.key_locks[key_hash % KEY_LOCK_STRIPES]

    # ---- figures ----------------------------------------------------------------------------

    def used_bytes(self) -> int:
        # Chunks stocked for compiled puts are the heap's, not yet any key's.
        return self.heap.record_bytes - self.stocked_bytes + self.large_bytes + self.reserved_bytes

    def keys(self) -> int:
        return self.table.writer.keys + (self.draining.writer.keys if self.draining is not None else 0)

    def stats(self) -> dict:
        if self.put_grants:     # records compiled puts replaced are no key's: freed, they count no more
            settle_put_grants(self)
        hits, misses = self.counters.hits + self.counters.retired[0], self.counters.misses + self.counters.retired[1]
        compiled = self.get_grants.counts()          # remote gets the RPC loop answered
        hits, misses = hits + compiled[0], misses + compiled[1]
        words = self.stats_words
        for slot in range(MAX_KV_CLIENTS):
            hits += min(words[slot * 2], CLIENT_COUNT_MAX)
            misses += min(words[slot * 2 + 1], CLIENT_COUNT_MAX)
        return {"keys": self.primary_keys, "held_keys": self.keys(), "bytes": self.used_bytes(),
                "memory_limit": self.settings.memory_limit, "hits": hits, "misses": misses,
                "evictions": self.counters.evictions, "expired": self.counters.expired,
                "index_bytes": sum(t.index_bytes + t.slots for t in (self.table, self.draining) if t is not None),
                "pages": self.heap.page_count, "put_stock_bytes": self.stocked_bytes}

    # ---- clients' counter slots ----------------------------------------------------------------

    def take_client_slot(self) -> int | None:
        return self._free_client_slots.pop() if self._free_client_slots else None

    def give_client_slot(self, slot: int) -> None:
        """A client went away: what it counted stays counted."""
        self.counters.retired[0] = min(self.counters.retired[0] + self.stats_words[slot * 2], RETIRED_MAX)
        self.counters.retired[1] = min(self.counters.retired[1] + self.stats_words[slot * 2 + 1], RETIRED_MAX)
        self.stats_words[slot * 2] = 0
        self.stats_words[slot * 2 + 1] = 0
        self._free_client_slots.append(slot)

    def set_lease(self, until_ms: int) -> None:
        with self.fd_lock:          # the table may be being replaced: the new one gets it too
            self.lease_ms = until_ms
            self.table.writer.set_lease(until_ms)

    def close(self) -> None:
        """The namespace is gone. Same-host readers that still map the index are sent to the
        server (which says so) rather than read a keyspace that is no more."""
        self.get_grants.revoke(close=True)
        close_put_grants(self)
        with self.fd_lock:
            if self.closed:
                return
            self.closed = True
            for table in (self.table, self.draining):
                if table is not None:
                    table.writer.moved_to(ix.CLOSED)
                    table.close()
            os.close(self.stats_fd)


def now_ms() -> int:
    """The wall clock in ms: expiry times are absolute, shared by the processes of a host."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    """CLOCK_MONOTONIC in ms, the clock of index leases: shared by the processes of a host
    (time.monotonic() is CLOCK_MONOTONIC on Linux) and unmoved when the wall clock jumps."""
    return time.monotonic_ns() // 1_000_000

"""A namespace's key index on one server: an open-addressing hash table in shared memory.
Pure: it works on a buffer of 64-bit words it is given, and knows nothing of segments.

The server writes the table; same-host clients map it read-only and look keys up without
asking the server (the idea of Pilaf and FaRM: a one-sided read replaces the server's CPU).

    header: MAGIC, VERSION, slot count, moved, keys, tombstones, generation, lease, draining,
            then words kept for later (HEADER_WORDS in all)
    slot i: seq, hash, segment, offset | key length << 32, value length, expiry, extents, version

A slot's `seq` is odd while the server writes it. A reader reads the seq, the slot, the key
and the value, then the seq again, and retries on a change (a seqlock). A slot's seq only
grows, so a change is never missed. Hash 0 marks an empty slot and 1 a deleted one (a
tombstone); key hashes are made >= 2. Linear probing with tombstones never moves an entry
within a table, so a reader walking a probe chain meets each entry before or after a
change, never elsewhere. A table whose keyspace is gone (its namespace destroyed) says
CLOSED in `moved`: readers ask the server, which says why.

Growth is incremental, so that no write waits for a whole table to be copied. A table that
fills (MAX_LOAD) is followed by a larger one, the server's from then on: new keys go there,
and the old table is drained into it a few slots at a time (each write moves at most
MIGRATE_SLOTS_PER_WRITE slots, and the server's keeper moves more in the background). While
it drains, the new table's `draining` names the old one's generation and the old one's `moved`
names the new one's; a key the server touches is moved first, so writes land in the new
table only, and the old one only loses entries. Moving an entry writes it into the new table,
then deletes it from the old (a tombstone). A reader of both (the server gives both tables'
memory while one drains) probes the old table first and the new one second: an entry it does
not meet in the old table (moved before the reader got there, or never there) is already in
the new one when the reader gets there, since it was written there first. Once drained, the
new table's `draining` goes back to 0 and readers forget the old table. A reader that maps
only a table whose `moved` is set opens the current ones again; a reader of two tables whose
new one starts draining itself (its `moved` is set) opens again too.

`lease` is the CLOCK_MONOTONIC ms (time.monotonic(), shared by the processes of a host and
blind to changes of the wall clock) until which the server vouches for the table: renewed with each
heartbeat that reaches the cluster, it runs out before the cluster could take the server for
dead (and give its keys' writes to others). A reader trusts the table only within its lease,
so a stopped or cut-off server's table is never read as current (see kv/service.py).

The record a slot names holds the key, then the value (`extents` == 0), or then a table of
`extents` (segment, offset, length) triples the value lies in, for values larger than one
segment. Writers never change a record in place: a new value is a new record, the slot
switches to it, and the old record rests (REUSE_GRACE_S) before its memory is reused.

Memory ordering: a reader relies on the stores of the server's thread becoming visible in
the order they were made, as x86-64's total store order guarantees. CPython puts no fences
around buffer stores, so on other architectures readers must ask the server instead
(`lock_free_reads()`).
"""

from __future__ import annotations

import platform
from typing import Callable

from ..errors import InvalidArgument, LimitExceeded

MAGIC = int.from_bytes(b"MFKVIDX1", "little")     # a table, not some other memory
VERSION = 2                # 2: 16 header words, `draining`, a monotonic lease

HEADER_WORDS = 16
H_MAGIC, H_VERSION, H_SLOTS, H_MOVED, H_KEYS, H_TOMBSTONES, H_GENERATION, H_LEASE, H_DRAINING = range(9)

SLOT_WORDS = 8
SEQ, HASH, SEGMENT, OFFSET_KLEN, VLEN, EXPIRY, EXTENTS, VERSION_WORD = range(8)

EMPTY, TOMBSTONE = 0, 1
MAX_LOAD = 0.5            # keys + tombstones per slot before a larger table follows
MIGRATE_SLOTS_PER_WRITE = 8   # old slots a write moves while a table drains (see growth_slots)
MIN_SLOTS = 1024
MAX_SLOTS = 1 << 26       # 4 GiB of table: far beyond any one namespace on one server
OFFSET_MASK = (1 << 32) - 1
CLOSED = (1 << 64) - 1    # in H_MOVED: no table follows this one (its keyspace is gone)


def lock_free_reads() -> bool:
    """Whether readers may read the table without the server (see the module's docstring)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def fix_hash(h: int) -> int:
    """A key's hash as the table stores it: never EMPTY or TOMBSTONE."""
    return h if h > TOMBSTONE else h + 2


def growth_slots(slots: int, keys: int) -> int:
    """The size of the table that follows a full one of `slots` holding `keys`: room for all
    of them plus a new key per write until the old table is drained (each write moves
    MIGRATE_SLOTS_PER_WRITE of its slots), so the new table never fills while the old drains."""
    need = keys + -(-slots // MIGRATE_SLOTS_PER_WRITE) + 1
    grown = max(slots, slots_for(need))
    if grown > MAX_SLOTS:
        raise LimitExceeded(f"an index of {keys} keys would need more than {MAX_SLOTS} slots")
    return grown


def words_for(slots: int) -> int:
    return HEADER_WORDS + slots * SLOT_WORDS


def slots_for(keys: int) -> int:
    """The smallest table (a power of two) that holds `keys` within MAX_LOAD."""
    slots = MIN_SLOTS
    while slots * MAX_LOAD < keys:
        slots *= 2
    if slots > MAX_SLOTS:
        raise LimitExceeded(f"an index of {keys} keys would need more than {MAX_SLOTS} slots")
    return slots


Fields = tuple[int, int, int, int, int, int, int]   # segment, offset, key length, value length, expiry, extents, version


class IndexWriter:
    """The server's side of one table. Single writer: the caller serializes calls."""

    __slots__ = ("words", "slots", "mask", "keys", "tombstones")

    def __init__(self, words: memoryview, slots: int, generation: int, fresh: bool = True) -> None:
        if slots & (slots - 1) or not MIN_SLOTS <= slots <= MAX_SLOTS:
            raise InvalidArgument(f"an index has a power of two of slots, {MIN_SLOTS} to {MAX_SLOTS}, got {slots}")
        if len(words) < words_for(slots):
            raise InvalidArgument(f"{len(words)} words cannot hold {slots} slots")
        self.words = words
        self.slots = slots
        self.mask = slots - 1
        self.keys = 0
        self.tombstones = 0
        if fresh:
            words[H_VERSION] = VERSION
            words[H_SLOTS] = slots
            words[H_MOVED] = 0
            words[H_GENERATION] = generation
            words[H_DRAINING] = 0
            words[H_MAGIC] = MAGIC       # last: a reader checks it before anything else

    # ---- finding ----------------------------------------------------------------------------

    def find(self, h: int, is_key: Callable[[int], bool]) -> int | None:
        """The slot holding the key whose hash is `h` (is_key(slot) compares the key), or None."""
        words = self.words
        i = h & self.mask
        for _ in range(self.slots):
            base = HEADER_WORDS + i * SLOT_WORDS
            stored = words[base + HASH]
            if stored == EMPTY:
                return None
            if stored == h and is_key(i):
                return i
            i = (i + 1) & self.mask
        return None

    def place(self, h: int, is_key: Callable[[int], bool]) -> tuple[int, bool]:
        """(slot, True) where the key already is, or (slot, False): the first free slot of its
        probe chain (a tombstone if one comes first), for a new entry."""
        words = self.words
        i = h & self.mask
        free = None
        for _ in range(self.slots):
            base = HEADER_WORDS + i * SLOT_WORDS
            stored = words[base + HASH]
            if stored == EMPTY:
                return (i if free is None else free), False
            if stored == TOMBSTONE:
                if free is None:
                    free = i
            elif stored == h and is_key(i):
                return i, True
            i = (i + 1) & self.mask
        if free is None:
            raise LimitExceeded("the key index is full")        # replaced long before: a bug
        return free, False

    def fields(self, slot: int) -> Fields:
        base = HEADER_WORDS + slot * SLOT_WORDS
        w = self.words
        packed = w[base + OFFSET_KLEN]
        return (w[base + SEGMENT], packed & OFFSET_MASK, packed >> 32, w[base + VLEN], w[base + EXPIRY],
                w[base + EXTENTS], w[base + VERSION_WORD])

    def hash_at(self, slot: int) -> int:
        return self.words[HEADER_WORDS + slot * SLOT_WORDS + HASH]

    def full(self) -> bool:
        """True once a new key would take the table past MAX_LOAD: replace it first."""
        return self.keys + self.tombstones + 1 > self.slots * MAX_LOAD

    # ---- writing (each change: seq odd, fields, seq even) ----------------------------------------

    def write(self, slot: int, h: int, fields: Fields, new: bool) -> None:
        segment, offset, klen, vlen, expiry, extents, version = fields
        if not (0 <= offset <= OFFSET_MASK and 0 < klen <= OFFSET_MASK):
            raise InvalidArgument(f"a record at offset {offset} with a key of {klen} bytes does not fit a slot")
        w = self.words
        base = HEADER_WORDS + slot * SLOT_WORDS
        seq = w[base + SEQ]
        assert not seq & 1, "a slot left half-written"
        was = w[base + HASH]
        w[base + SEQ] = seq + 1
        w[base + SEGMENT] = segment
        w[base + OFFSET_KLEN] = offset | klen << 32
        w[base + VLEN] = vlen
        w[base + EXPIRY] = expiry
        w[base + EXTENTS] = extents
        w[base + VERSION_WORD] = version
        w[base + HASH] = h
        w[base + SEQ] = seq + 2
        if new:
            self.keys += 1
            if was == TOMBSTONE:
                self.tombstones -= 1
            w[H_KEYS] = self.keys
            w[H_TOMBSTONES] = self.tombstones

    def set_expiry(self, slot: int, expiry: int) -> None:
        w = self.words
        base = HEADER_WORDS + slot * SLOT_WORDS
        seq = w[base + SEQ]
        w[base + SEQ] = seq + 1
        w[base + EXPIRY] = expiry
        w[base + SEQ] = seq + 2

    def delete(self, slot: int) -> None:
        w = self.words
        base = HEADER_WORDS + slot * SLOT_WORDS
        seq = w[base + SEQ]
        assert w[base + HASH] > TOMBSTONE, "deleting a slot that holds no key"
        w[base + SEQ] = seq + 1
        w[base + HASH] = TOMBSTONE
        for field in (SEGMENT, OFFSET_KLEN, VLEN, EXPIRY, EXTENTS, VERSION_WORD):
            w[base + field] = 0
        w[base + SEQ] = seq + 2
        self.keys -= 1
        self.tombstones += 1
        w[H_KEYS] = self.keys
        w[H_TOMBSTONES] = self.tombstones

    def set_lease(self, until_ms: int) -> None:
        self.words[H_LEASE] = until_ms

    def moved_to(self, generation: int) -> None:
        """This table is followed by the one of `generation` (or CLOSED): readers go there."""
        self.words[H_MOVED] = generation

    def set_draining(self, generation: int) -> None:
        """The table of `generation` drains into this one (0: none does, readers look here only)."""
        self.words[H_DRAINING] = generation

    def move_to(self, slot: int, into: "IndexWriter") -> int | None:
        """Move the entry at `slot` (if any) into the table `into` follows this one with: written
        there first, then deleted here, so a reader probing this table, then that one, meets it
        at least once (see the module's docstring). Its slot there, or None (nothing here)."""
        h = self.hash_at(slot)
        if h <= TOMBSTONE:
            return None
        target, exists = into.place(h, lambda _: False)
        assert not exists
        into.write(target, h, self.fields(slot), new=True)
        self.delete(slot)
        return target

    def occupied(self) -> list[int]:
        """Slots holding keys, in table order (a scan's cursor is a slot number)."""
        w = self.words
        return [i for i in range(self.slots) if w[HEADER_WORDS + i * SLOT_WORDS + HASH] > TOMBSTONE]


class Busy(Exception):
    """A slot stayed half-written through every retry: ask the server instead."""


class Moved(Exception):
    """The table was replaced: open the next one and look again."""


def read_slot(words: memoryview, slot: int) -> tuple[int, int, Fields]:
    """(seq, hash, fields) of a slot as a reader sees it; validate with `unchanged` after use."""
    base = HEADER_WORDS + slot * SLOT_WORDS
    seq = words[base + SEQ]
    packed = words[base + OFFSET_KLEN]
    return seq, words[base + HASH], (words[base + SEGMENT], packed & OFFSET_MASK, packed >> 32, words[base + VLEN],
                                     words[base + EXPIRY], words[base + EXTENTS], words[base + VERSION_WORD])


def unchanged(words: memoryview, slot: int, seq: int, draining: bool = False) -> bool:
    """After reading a slot and what it names: nothing changed meanwhile, and the table was
    not replaced (a replaced table is no longer written, so its answer may be old). A table
    read as the one `draining` into the current one (moved by design) checks the slot only."""
    return words[HEADER_WORDS + slot * SLOT_WORDS + SEQ] == seq and (draining or words[H_MOVED] == 0)


def probe(words: memoryview, h: int) -> int:
    """The first slot of `h`'s probe chain (the table's size read from its header)."""
    return h & (words[H_SLOTS] - 1)

"""What a write, a read, a delete, an eviction and an expiry do to one keyspace on its
server: records in the namespace's memory, slots in the index. The caller holds the
keyspace's lock for every call here; nothing here calls another server.

A record is the key, then the value (inline), or the key, then the table of the extents a
large value lies in. Records are written whole before a slot names them and are never
changed after: a new value is a new record, the slot switches to it (index.py), and the old
record rests before its memory serves again, so a same-host reader racing the change sees the
slot's sequence move, never another key's bytes. A record a transfer still reads (a hold) is
let go only when the transfer is over.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

from ..core.allocator import Extent
from ..errors import NoSuchNamespace, OutOfMemory
from ..media.base import SegmentMemory
from . import index as ix
from .put_grants import reclaim_stock, settle_all as settle_put_grants
from .heap import CLASSES, MAX_RECORD_BYTES, PAGE_BYTES, Chunk, RecordHeap
from .rules import check_value_length, expired
from .space import EXTENT, KeySpace, Table

try:           # the compiled lookup (src/memfabric/_native.c); without it, the same in Python
    from .. import _native
except ImportError:      # pragma: no cover - ./dev builds it
    _native = None

EVICTION_TRIES = 64          # keys the clock hand may evict to make room for one write
EVICTION_DRAIN_SLOTS = 256   # slots of a draining table one eviction looks at (moving the recently read)
# A scan's cursor in a draining table (index.py) is its slot | SCAN_DRAINING (slots < 2**26).
SCAN_DRAINING = 1 << 32

Fields = tuple[int, int, int, int, int, int, int]   # segment, offset, key length, value length, expiry, extents, version

# A slot's extents word: the count of a large value's extents, and above it the replicas the
# key was written with (0: the namespace's setting).
EXTENTS_MASK = (1 << 32) - 1


def extents_of(fields: Fields) -> int:
    return fields[5] & EXTENTS_MASK


def replicas_of(fields: Fields) -> int:
    return fields[5] >> 32


def record_key(fields: Fields) -> tuple[int, int]:
    return fields[0], fields[1]


def inline_fits(key_length: int, value_length: int) -> bool:
    """Whether a value lives in its record, beside its key (else in extents of its own)."""
    return key_length + value_length <= MAX_RECORD_BYTES


@functools.lru_cache(maxsize=4096)   # every write asks for one or two: a lookup, not a bisect
def chunk_bytes(size: int) -> int:
    return CLASSES[RecordHeap.class_of(max(1, size))]


class Store:
    """One keyspace's records and slots, with the pool's memory reached through the server."""

    def __init__(self, space: KeySpace, memory: Callable[[int], SegmentMemory],
                 reserve: Callable[[int], list[Extent]], release: Callable[[list[Extent]], None],
                 share: Callable[[], int | None], namespace: str) -> None:
        self.space = space
        self.memory = memory          # segment id -> its memory (NO_SUCH_OBJECT when gone)
        self.reserve = reserve        # bytes -> extents of the namespace's memory, zeroed
        self.release = release        # extents back to the pool (they rest first)
        self.share = share            # this server's part of the memory limit, None: no limit
        self.namespace = namespace
        self.evicted: list[bytes] = []  # keys evicted since the service last looked (their replicas follow)

    # ---- finding ----------------------------------------------------------------------------

    def is_key(self, key: bytes, writer: ix.IndexWriter | None = None) -> Callable[[int], bool]:
        writer = writer if writer is not None else self.space.table.writer

        def compare(slot: int) -> bool:
            segment, offset, klen, _, _, _, _ = writer.fields(slot)
            if klen != len(key):
                return False
            got = bytearray(klen)
            self.memory(segment).read(offset, memoryview(got))
            return got == key
        return compare

    def live(self, key: bytes, h: int, now_ms: int) -> tuple[int, Fields] | None:
        """(slot, fields) of `key`, or None when missing or expired (an expired key is deleted
        on sight, and counted). A key found was used: the eviction clock keeps it a round
        (as a same-host reader's hit does, see space.py's refs)."""
        slot = self.find(key, h)
        if slot is None:
            return None
        fields = self.space.table.writer.fields(slot)
        if expired(fields[4], now_ms):
            self.delete_slot(slot, counted="expired")
            return None
        self.space.table.refs[slot] = 1
        return slot, fields

    def find(self, key: bytes, h: int) -> int | None:
        """`key`'s slot in the current table. Found in the table draining into it, it is moved
        first: the server writes the current table only, and the draining one only shrinks."""
        space = self.space
        slot = self._find_current(key, h)
        old = space.draining
        if slot is None and old is not None:
            at = old.writer.find(h, self.is_key(key, old.writer))
            if at is not None:
                slot = self._move(at)
        return slot

    def _find_current(self, key: bytes, h: int) -> int | None:
        """`key`'s slot in the current table: compiled when it can be (every write and read of
        the server looks a key up first; in Python that was a tenth of a put's time)."""
        table = self.space.table
        writer = table.writer
        if _native is not None:
            got = _native.find_slot(table.words, h, key, self.memory)     # the words the writer writes
            if got >= 0:
                return got
            if got == _native.MISSING:
                return None
        return writer.find(h, self.is_key(key))         # a record it cannot read: Python says why

    # ---- growth: the draining table moves into the current one a few slots at a time -----------

    def _move(self, slot: int) -> int | None:
        old, new = self.space.draining, self.space.table
        assert old is not None
        target = old.writer.move_to(slot, new.writer)
        if target is not None and old.refs[slot]:
            new.refs[target] = 1
        return target

    def migrate(self, slots: int) -> int:
        """Move the entries of the draining table's next `slots` slots into the current table;
        once it is drained, let it go. How many entries moved."""
        space = self.space
        old = space.draining
        if old is None:
            return 0
        moved = 0
        end = min(old.slots, space.drain_hand + slots)
        for slot in range(space.drain_hand, end):
            if old.writer.hash_at(slot) > ix.TOMBSTONE:
                self._move(slot)
                moved += 1
        space.drain_hand = end
        if end >= old.slots:
            self._drained()
        return moved

    def _drained(self) -> None:
        space = self.space
        old = space.draining
        assert old is not None and old.writer.keys == 0, "a table let go with keys in it"
        space.table.writer.set_draining(0)       # from now readers look in the current table only
        with space.fd_lock:
            if not space.closed:                 # else closed with the keyspace
                old.close()
            space.draining = None
        space.drain_hand = 0

    # ---- writing ----------------------------------------------------------------------------

    def write_inline(self, key: bytes, h: int, value: memoryview, expiry: int, version: int,
                     replacing: tuple[int, Fields] | None, primary: bool, replicas: int = 0) -> Fields:
        """`key` = `value` (which fits a record beside it), in place of `replacing`."""
        klen, vlen = len(key), check_value_length(value.nbytes)
        assert inline_fits(klen, vlen)
        size = max(1, klen + vlen)
        self.make_room(chunk_bytes(size) - (self.cost(replacing[1]) if replacing else 0), key)
        chunk = self.chunk(size)
        mem = self.memory(chunk.segment)
        mem.write(chunk.offset, memoryview(key))
        if vlen:
            mem.write(chunk.offset + klen, value)
        fields = (chunk.segment, chunk.offset, klen, vlen, expiry, replicas << 32, version)
        self._publish(key, h, fields, replacing, primary)
        return fields

    def write_large(self, key: bytes, h: int, extents: list[Extent], length: int, expiry: int, version: int,
                    replacing: tuple[int, Fields] | None, primary: bool, replicas: int = 0) -> Fields:
        """`key` = the `length` bytes already in `extents` (reserved and filled for it: their
        bytes count from here as the value's, no longer as reserved)."""
        klen = len(key)
        table = b"".join(EXTENT.pack(e.segment, e.offset, e.length) for e in extents)
        size = klen + len(table)
        if size > MAX_RECORD_BYTES:
            raise OutOfMemory(f"free memory is too fragmented for a value of {length} bytes "
                              f"({len(extents)} pieces)")
        self.make_room(chunk_bytes(size) - (self.cost(replacing[1]) if replacing else 0), key)
        chunk = self.chunk(size)
        mem = self.memory(chunk.segment)
        mem.write(chunk.offset, memoryview(key))
        mem.write(chunk.offset + klen, memoryview(table))
        space = self.space
        space.large[(chunk.segment, chunk.offset)] = list(extents)
        moved = sum(e.length for e in extents)
        space.reserved_bytes -= moved
        space.large_bytes += moved
        fields = (chunk.segment, chunk.offset, klen, length, expiry, len(extents) | replicas << 32, version)
        self._publish(key, h, fields, replacing, primary)
        return fields

    def _publish(self, key: bytes, h: int, fields: Fields, replacing: tuple[int, Fields] | None,
                 primary: bool) -> None:
        space = self.space
        self.migrate(ix.MIGRATE_SLOTS_PER_WRITE)
        if replacing is None:
            if space.table.writer.full():
                self.grow()
            slot, exists = space.table.writer.place(h, self.is_key(key))
            assert not exists, "a key written as new is there already"   # nor in a draining table: live() moved it
        else:
            slot = replacing[0]
        space.table.writer.write(slot, h, fields, new=replacing is None)
        if replacing is None and primary:
            space.primary_keys += 1
        if replacing is not None:
            self.free_record(replacing[1])

    def set_expiry(self, slot: int, expiry: int) -> None:
        self.space.table.writer.set_expiry(slot, expiry)

    def chunk(self, size: int, reclaim: bool = True, wait_rest: bool = True) -> Chunk:
        """A chunk for a record of `size` bytes: from the heap, else from a new page, else from
        the chunks compiled puts hold in stock (`reclaim`), else one of its class that rests
        (`wait_rest`: waited for, a grace at most), else OUT_OF_MEMORY."""
        heap = self.space.heap
        now = time.monotonic()
        chunk = heap.allocate(size, now)
        if chunk is None:
            try:
                page = self.reserve(PAGE_BYTES)
                if len(page) != 1:          # a page must be one piece: give the pieces back
                    self.release(page)
                    raise OutOfMemory(f"no {PAGE_BYTES}-byte piece of memory is free for namespace "
                                      f"{self.namespace!r}'s keys")
            except OutOfMemory:
                # Memory stocked for compiled puts is no key's yet: a write must not fail for it.
                if reclaim and reclaim_stock(self.space):
                    return self.chunk(size, reclaim=False, wait_rest=wait_rest)
                # Records replaced a moment ago rest a grace before their memory serves again
                # (a stream of overwrites keeps rate x grace of it resting): a write waits for
                # the first of its class rather than be refused with memory about to free.
                rested_s = heap.rested_by_s(size) if wait_rest else None
                if rested_s is None or rested_s - time.monotonic() > self.space.grace_s:
                    raise
                time.sleep(max(0.0, rested_s - time.monotonic()))
                return self.chunk(size, reclaim=False, wait_rest=False)
            heap.add_page(page[0].segment, page[0].offset, size)
            chunk = heap.allocate(size, now)
            assert chunk is not None
        return chunk

    def chunks(self, size: int, count: int) -> list[Chunk]:
        """Up to `count` chunks for records of `size` bytes, for a compiled put's stock (at
        least one, or OUT_OF_MEMORY; never taken from other stocks). New pages as they are
        needed (a value's class may hold one chunk a page, 64 KiB values: a stock of one sends
        every other put to Python), but one at most for a while after memory ran short."""
        now = time.monotonic()
        out = self.space.heap.allocate_many(size, count, now)
        # Short of memory lately (stocks were taken back for a write): one new page at most,
        # or stocks and writes would take pages from each other round and round.
        pages = 1 if now < self.space.stock_lean_until else count
        while len(out) < count and pages > 0:
            try:
                out.append(self.chunk(size, reclaim=False, wait_rest=False))     # a new page, then what it holds
            except OutOfMemory:
                if out:
                    break
                raise
            pages -= 1
            out += self.space.heap.allocate_many(size, count - len(out), time.monotonic())
        return out

    def reserve_value(self, length: int) -> list[Extent]:
        """Extents for a large value's `length` bytes. Memory stocked for compiled puts is no
        key's yet: taken back before the value is refused, as it is for a record (chunk()).
        Takes the keyspace's lock for that (a reservation may come without it)."""
        try:
            return self.reserve(length)
        except OutOfMemory:
            with self.space.lock:
                if not reclaim_stock(self.space):
                    raise
        return self.reserve(length)        # its pages left empty go back first (_reserve_local)

    def give_back_chunks(self, chunks: list[tuple[int, int]], size: int, release_pages: bool = True) -> None:
        """Chunks of `size` bytes taken (chunk()) but never written a record into: free again
        at once (heap.unallocate). `release_pages`: pages left empty go back to the pool now
        (not when memory ran out: the pool would keep them resting, out of the write's reach)."""
        for segment, offset in chunks:
            self.space.heap.unallocate(Chunk(segment, offset, size))
        if release_pages:
            self.release_empty_pages(time.monotonic())

    def release_empty_pages(self, now: float, keep: bool = True) -> bool:
        """Heap pages left empty too long (or past the number kept: heap.empty_pages; `keep`
        False: all) go back to the pool. Every write's free asks, the keeper's tick (a keyspace
        no one writes), and a pool short of memory (all). Whether any did."""
        pages = self.space.heap.empty_pages(now, keep)
        if pages:
            self.release([Extent(s, o, PAGE_BYTES) for s, o in pages])
        return bool(pages)

    # ---- reading ----------------------------------------------------------------------------

    def pieces(self, fields: Fields) -> list[tuple[int, int, int]]:
        """Where a value's bytes are: (segment, offset, length) each, in order."""
        segment, offset, klen, vlen = fields[:4]
        if extents_of(fields) == 0:
            return [(segment, offset + klen, vlen)] if vlen else []
        out, left = [], vlen
        for e in self.space.large[(segment, offset)]:
            take = min(e.length, left)
            if take:
                out.append((e.segment, e.offset, take))
            left -= take
        return out

    def read_into(self, fields: Fields, into: memoryview) -> None:
        position = 0
        for segment, offset, length in self.pieces(fields):
            self.memory(segment).read(offset, into[position:position + length])
            position += length

    def read(self, fields: Fields) -> bytes:
        out = bytearray(fields[3])
        self.read_into(fields, memoryview(out))
        return bytes(out)

    def read_key(self, fields: Fields) -> bytes:
        got = bytearray(fields[2])
        self.memory(fields[0]).read(fields[1], memoryview(got))
        return bytes(got)

    # ---- holds: a record read by a transfer outlives a delete until the transfer is over -------------

    def hold(self, fields: Fields) -> tuple[int, int]:
        place = record_key(fields)
        self.space.busy[place] = self.space.busy.get(place, 0) + 1
        return place

    def let_go(self, place: tuple[int, int]) -> None:
        busy = self.space.busy
        left = busy.get(place, 0) - 1
        if left > 0:
            busy[place] = left
            return
        busy.pop(place, None)
        fields = self.space.deferred.pop(place, None)
        if fields is not None:
            self.free_record(fields)

    # ---- deleting -----------------------------------------------------------------------------

    def delete_slot(self, slot: int, counted: str | None = None, primary: bool = True,
                    writer: ix.IndexWriter | None = None) -> Fields:
        """Delete the key at `slot` of the current table (or of `writer`'s, the draining one)."""
        space = self.space
        writer = writer if writer is not None else space.table.writer
        fields = writer.fields(slot)
        writer.delete(slot)
        if primary:
            space.primary_keys = max(0, space.primary_keys - 1)
        self.free_record(fields)
        if counted == "expired":
            space.counters.expired += 1
        elif counted == "evictions":
            space.counters.evictions += 1
        return fields

    def cost(self, fields: Fields) -> int:
        """Bytes a record and its value take (what deleting it gives back)."""
        klen, vlen, n_extents = fields[2], fields[3], extents_of(fields)
        if n_extents == 0:
            return chunk_bytes(klen + vlen)
        return chunk_bytes(klen + EXTENT.size * n_extents) + sum(
            e.length for e in self.space.large.get(record_key(fields), ()))

    def free_records(self, records: list[Fields], rest_until_s: list[float] | None = None) -> None:
        """free_record of each, with one look for emptied pages at the end. `rest_until_s`: they
        rested since they left their slots (a compiled put's grant kept them), each until then
        (monotonic s, in order): what is left of that rest, not a new grace."""
        rested: list[tuple[Chunk, float]] = []
        busy = self.space.busy
        for i, fields in enumerate(records):
            if rest_until_s is not None and extents_of(fields) == 0 and not busy.get(record_key(fields)):
                rested.append((Chunk(fields[0], fields[1], chunk_bytes(fields[2] + fields[3])), rest_until_s[i]))
            else:
                self.free_record(fields, release_pages=False)
        now = time.monotonic()
        if rested:
            self.space.heap.free_rested(rested, now)
        self.release_empty_pages(now)

    def free_record(self, fields: Fields, release_pages: bool = True) -> None:
        """A record left its slot: it rests, then its memory serves again; a large value's
        extents and emptied heap pages go back to the pool (`release_pages`: now; else the caller
        looks for emptied pages itself). Held: when let go."""
        space = self.space
        place = record_key(fields)
        if space.busy.get(place):
            space.deferred[place] = fields
            return
        segment, offset, klen, vlen = fields[:4]
        n_extents = extents_of(fields)
        size = klen + vlen if n_extents == 0 else klen + EXTENT.size * n_extents
        now = time.monotonic()
        if n_extents:
            extents = space.large.pop(place)
            space.large_bytes -= sum(e.length for e in extents)
            self.release(extents)
        space.heap.free(Chunk(segment, offset, chunk_bytes(size)), now)
        if release_pages:
            self.release_empty_pages(now)

    # ---- room: the memory limit, eviction ----------------------------------------------------------

    def make_room(self, more: int, writing: bytes) -> None:
        """Keep the keyspace within its share of the namespace's memory limit: evict (CLOCK)
        or refuse, as configured."""
        share = self.share()
        space = self.space
        if share is None or more <= 0 or space.used_bytes() + more <= share:
            return
        if space.put_grants:    # records compiled puts replaced still count until freed
            settle_put_grants(space)
            if space.used_bytes() + more <= share:
                return
        if more > share:
            # No eviction can make room: refused before any key is lost for it.
            raise OutOfMemory(f"a write of {more} bytes is larger than namespace {self.namespace!r}'s share of "
                              f"its memory_limit {space.settings.memory_limit} on this server ({share} bytes: "
                              f"the limit is shared evenly by the pool's servers)")
        if space.settings.eviction == "refuse":
            raise OutOfMemory(f"namespace {self.namespace!r} holds {space.used_bytes()} bytes of keys and values "
                              f"on this server, its share of memory_limit {space.settings.memory_limit} is "
                              f"{share}; eviction is 'refuse'")
        evicted = 0
        while evicted < EVICTION_TRIES and self.evict_one(writing):
            evicted += 1
            if space.used_bytes() + more <= share:
                return
        raise OutOfMemory(f"{more} more bytes do not fit namespace {self.namespace!r}'s share of its "
                          f"memory_limit on this server ({share} bytes), even after evicting {evicted} keys")

    def evict_one(self, keep: bytes) -> bool:
        """The CLOCK hand: a key read since the hand last passed keeps its place (its byte is
        cleared); the first that was not is evicted. An approximation of LRU, as Redis's is."""
        space = self.space
        if space.draining is not None and self._evict_draining(keep):
            return True
        table = space.table
        writer = table.writer
        is_keep = self.is_key(keep)
        for _ in range(2 * table.slots):
            slot = space.clock_hand
            space.clock_hand = (slot + 1) % table.slots
            if writer.hash_at(slot) <= ix.TOMBSTONE:
                continue
            if table.refs[slot]:
                table.refs[slot] = 0
                continue
            if is_keep(slot):
                continue
            self.evicted.append(self.read_key(writer.fields(slot)))
            self.delete_slot(slot, counted="evictions")
            return True
        return False

    def _evict_draining(self, keep: bytes) -> bool:
        """The CLOCK hand over the draining table's next slots (at most EVICTION_DRAIN_SLOTS): a
        key used since it was last passed is moved on (its byte with it: the current table's
        hand passes it next), the first that was not is evicted."""
        space = self.space
        old = space.draining
        assert old is not None
        writer = old.writer
        is_keep = self.is_key(keep, writer)
        for _ in range(EVICTION_DRAIN_SLOTS):
            if space.drain_hand >= old.slots:
                self._drained()
                return False
            slot = space.drain_hand
            if writer.hash_at(slot) > ix.TOMBSTONE and not old.refs[slot] and not is_keep(slot):
                self.evicted.append(self.read_key(writer.fields(slot)))
                self.delete_slot(slot, counted="evictions", writer=writer)
                return True
            self._move(slot)
            space.drain_hand = slot + 1
        return False

    # ---- the table ------------------------------------------------------------------------------------

    def grow(self) -> None:
        """Follow the full table by a larger one (or one as large, when tombstones filled it),
        into which it drains a few slots per write (migrate): no write waits for the whole
        table to be copied. Records stay, only slots move. Readers of the old table alone are
        sent on (index.py)."""
        space = self.space
        space.get_grants.revoke()         # its gets read the table being followed
        if space.draining is not None:    # not expected (growth_slots leaves room): finish it first
            self.migrate(space.draining.slots)
        old = space.table
        new = Table(space.label, space.ns, ix.growth_slots(old.slots, old.writer.keys), old.generation + 1)
        new.writer.set_draining(old.generation)
        with space.fd_lock:
            if space.closed:            # destroyed meanwhile: its fds are closed, the new ones go too
                new.close()
                raise NoSuchNamespace(f"namespace {self.namespace!r} was destroyed meanwhile")
            new.writer.set_lease(space.lease_ms)
            space.table, space.draining, space.drain_hand = new, old, 0
            old.writer.moved_to(new.generation)
        space.clock_hand = 0
        space.sweep_hand = 0

    def resume(self, cursor: int, generation: int | None) -> int | None:
        """Where a scan at `cursor` of the table of `generation` (None: the current one) goes
        on now: the same cursor while that table is current; once it drains into a new table,
        the same slot of it as it drains (what it had before that slot was read, what it
        moved from after it is in the new table, read next, whole); None when that table is
        gone (two tables followed it): from the start. Generations grow by one a growth (26
        at most: slots < 2**26), so the door's 8 bits of one name it."""
        space = self.space
        mask = (1 << 8) - 1
        if generation is None or (space.table.generation ^ generation) & mask == 0:
            return cursor
        old = space.draining
        if old is not None and (old.generation ^ generation) & mask == 0:
            # Its cursor may be of the table that drained into it, gone now: from its start.
            return SCAN_DRAINING | (0 if cursor & SCAN_DRAINING else cursor)
        return None

    def scan(self, cursor: int, batch: int, looks: int) -> tuple[list[Fields], int]:
        """The fields of up to `batch` keys from `cursor` on (at most `looks` slots looked at),
        and the next cursor (0: the end). A draining table is read first (its cursors marked
        SCAN_DRAINING), then the current one: a key moved meanwhile is met again in the
        current table, never missed; a draining table gone meanwhile was moved whole into it."""
        space = self.space
        out: list[Fields] = []
        if cursor & SCAN_DRAINING or (cursor == 0 and space.draining is not None):
            slot = cursor & (SCAN_DRAINING - 1)
            old = space.draining
            if old is not None:
                writer = old.writer
                while slot < old.slots and len(out) < batch and looks > 0:
                    if writer.hash_at(slot) > ix.TOMBSTONE:
                        out.append(writer.fields(slot))
                    slot += 1
                    looks -= 1
                if slot < old.slots or len(out) >= batch or looks <= 0:
                    return out, SCAN_DRAINING | slot
            cursor = 0
        writer = space.table.writer
        slot = cursor
        while slot < writer.slots and len(out) < batch and looks > 0:
            if writer.hash_at(slot) > ix.TOMBSTONE:
                out.append(writer.fields(slot))
            slot += 1
            looks -= 1
        return out, 0 if slot >= writer.slots else slot

    def sweep(self, slots: int, now_ms: int) -> int:
        """Delete the expired keys among the next `slots` slots (memory back without waiting for
        a reader to trip on them); how many."""
        space = self.space
        writer = space.table.writer
        gone = 0
        for _ in range(min(slots, space.table.slots)):
            slot = space.sweep_hand
            space.sweep_hand = (slot + 1) % space.table.slots
            if writer.hash_at(slot) > ix.TOMBSTONE and expired(writer.fields(slot)[4], now_ms):
                self.delete_slot(slot, counted="expired")
                gone += 1
        return gone

    def flush(self) -> int:
        space = self.space
        space.get_grants.revoke()
        flushed = 0
        if space.draining is not None:
            old = space.draining.writer
            for slot in old.occupied():
                self.delete_slot(slot, writer=old)
                flushed += 1
            self._drained()
        writer = space.table.writer
        slots = writer.occupied()
        for slot in slots:
            self.delete_slot(slot)
        space.primary_keys = 0
        return flushed + len(slots)


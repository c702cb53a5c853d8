"""The object table of one namespace on its home server. Pure: no I/O, no clock.

A BigMemory object is a size and an ordered list of extents anywhere in the cluster.
Its id names its home server, a slot and a generation, so a handle to a freed object never
matches the object that reuses the slot: clients compare the generation against the home
server's shared table before and after each copy.

An id names one object forever. Generations come from one counter per server, which starts
each life of the server at `epoch << 32` (the epoch comes from the cluster service and never
repeats): no two objects of a server ever share a generation, across namespaces, restarts
and restores, so an id kept from before a restart can only ever name its own object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Hashable

from ..errors import InvalidArgument, LimitExceeded, NoSuchObject
from ..limits import MAX_EXTENTS_PER_OBJECT


@dataclass(frozen=True, slots=True)
class Placement:
    """One extent of an object, anywhere in the cluster."""
    server_id: int
    segment: int
    offset: int
    length: int


@dataclass(slots=True)
class ObjectRecord:
    bm_id: str
    slot: int
    generation: int
    size_bytes: int
    extents: list[Placement]
    pins: dict[Hashable, int] = field(default_factory=dict)
    # A server the object was asked to live on (Affinity("server", N)): it grows there too.
    required_server: int | None = None
    # Servers that came back without the bytes they held of it (DRAM restarts): its data is
    # gone there, and using it fails so, until it is freed.
    lost_on: set[int] = field(default_factory=set)
    created_s: float = 0.0       # wall-clock time of its allocation, as its caller gave it

    @property
    def reserved_bytes(self) -> int:
        return sum(e.length for e in self.extents)


def format_bm_id(server_id: int, slot: int, generation: int) -> str:
    return f"{server_id}-{slot}-{generation}"


def parse_bm_id(bm_id: object) -> tuple[int, int, int]:
    """(home server id, slot, generation); garbage is an INVALID_ARGUMENT."""
    if type(bm_id) is str:
        return _parse_bm_id(bm_id)     # pure, and on every data request: remembered
    raise InvalidArgument(f"bm_id must be a string like '1-0-1', got {bm_id!r}")


@functools.lru_cache(maxsize=1 << 16)
def _parse_bm_id(bm_id: str) -> tuple[int, int, int]:
    if not 5 <= len(bm_id) <= 64:
        raise InvalidArgument(f"bm_id must be a string like '1-0-1', got {bm_id!r}")
    parts = bm_id.split("-")
    # One spelling per object: no leading zeros, or "1-0-01" would alias "1-0-1".
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() and str(int(p)) == p for p in parts):
        raise InvalidArgument(f"bm_id {bm_id!r} is not of the form SERVER-SLOT-GENERATION")
    server_id, slot, generation = (int(p) for p in parts)
    if generation == 0:
        raise InvalidArgument(f"bm_id {bm_id!r} has generation 0, which no object has")
    return server_id, slot, generation


GENERATIONS_PER_EPOCH = 1 << 32


class Generations:
    """The one source of generations of a server's life: strictly increasing, shared by all
    its namespaces' tables."""

    __slots__ = ("_next", "_end")

    def __init__(self, epoch: int) -> None:
        if type(epoch) is not int or epoch < 0:
            raise InvalidArgument(f"an epoch is a non-negative int, got {epoch!r}")
        self._next = epoch * GENERATIONS_PER_EPOCH + 1
        self._end = (epoch + 1) * GENERATIONS_PER_EPOCH

    def take(self) -> int:
        if self._next >= self._end:
            raise LimitExceeded("this server made 2**32 objects in one life: restart it for a new epoch")
        generation = self._next
        self._next += 1
        return generation


class ObjectTable:
    def __init__(self, server_id: int, max_objects: int, generations: Generations) -> None:
        self.server_id = server_id
        self.max_objects = max_objects
        self._generations = generations
        self._live: dict[int, ObjectRecord] = {}          # slot -> record
        self._slots = 0                                    # slots ever used
        self._claimed_generation: dict[int, int] = {}     # slot -> generation, claimed not created
        self._free_slots: list[int] = []
        # Freed while a client still maps it: its extents wait for the last unpin.
        self._pinned_dead: dict[str, ObjectRecord] = {}
        # Kept as things change, so that a client going away or a usage figure does not walk
        # every object under the server's lock.
        self._pinned_by: dict[Hashable, set[str]] = {}
        self._live_bytes = 0

    def __len__(self) -> int:
        return len(self._live)

    def records(self) -> list[ObjectRecord]:
        return list(self._live.values())

    def live_bytes(self) -> int:
        return self._live_bytes

    def claim(self) -> str:
        """Take an id before the object's memory is reserved, so that servers holding its
        extents can know whose bytes they hold. `create` or `unclaim` must follow."""
        if self._free_slots:
            slot = self._free_slots.pop()
        elif self._slots < self.max_objects:
            slot = self._slots
            self._slots += 1
        else:
            raise LimitExceeded(f"namespace holds {self.max_objects} objects on this server, the most it may")
        generation = self._generations.take()
        self._claimed_generation[slot] = generation
        return format_bm_id(self.server_id, slot, generation)

    def unclaim(self, bm_id: str) -> None:
        """Give a claimed id back unused; its generation is spent and never becomes live."""
        _, slot, _ = parse_bm_id(bm_id)
        del self._claimed_generation[slot]
        self._free_slots.append(slot)

    def create(self, size_bytes: int, extents: list[Placement], claimed: str | None = None,
               created_s: float = 0.0) -> ObjectRecord:
        if size_bytes <= 0:
            raise InvalidArgument(f"size must be positive, got {size_bytes}")
        if sum(e.length for e in extents) < size_bytes:
            raise InvalidArgument("extents do not cover the object")
        if len(extents) > MAX_EXTENTS_PER_OBJECT:
            raise LimitExceeded(f"an object may have at most {MAX_EXTENTS_PER_OBJECT} extents")
        bm_id = claimed if claimed is not None else self.claim()
        _, slot, generation = parse_bm_id(bm_id)
        assert self._claimed_generation.get(slot) == generation, f"{bm_id} was not claimed"
        del self._claimed_generation[slot]
        record = ObjectRecord(bm_id, slot, generation, size_bytes, list(extents), created_s=created_s)
        self._live[slot] = record
        self._live_bytes += size_bytes
        return record

    def restore(self, bm_id: str, size_bytes: int, extents: list[Placement],
                created_s: float = 0.0) -> ObjectRecord:
        """Bring back an object that lived before a restart, with its very id."""
        server_id, slot, generation = parse_bm_id(bm_id)
        if server_id != self.server_id or slot >= self.max_objects or slot in self._live:
            raise InvalidArgument(f"cannot restore {bm_id} into this table")
        while self._slots <= slot:
            self._free_slots.append(self._slots)
            self._slots += 1
        self._free_slots.remove(slot)
        record = ObjectRecord(bm_id, slot, generation, size_bytes, list(extents), created_s=created_s)
        self._live[slot] = record
        self._live_bytes += size_bytes
        return record

    def page(self, after_slot: int, limit: int) -> tuple[list[ObjectRecord], int | None]:
        """Up to `limit` live records in slot order, from the slot after `after_slot`; and
        the slot to continue after, or None at the end. Pages walk slots, not a sorted copy:
        a whole listing costs one pass over the table however many pages it takes."""
        if type(after_slot) is not int or type(limit) is not int or limit < 1:
            raise InvalidArgument(f"a page starts after a slot (an int) and has at least one record, "
                                  f"got after {after_slot!r}, limit {limit!r}")
        records: list[ObjectRecord] = []
        slot = max(after_slot + 1, 0)
        while slot < self._slots:
            record = self._live.get(slot)
            if record is not None:
                records.append(record)
                if len(records) == limit:
                    return records, slot if slot + 1 < self._slots else None
            slot += 1
        return records, None

    def is_live(self, bm_id: str) -> bool:
        try:
            self.lookup(bm_id)
            return True
        except (NoSuchObject, InvalidArgument):
            return False

    def is_known(self, bm_id: str) -> bool:
        """Live, claimed by an allocation under way, or freed while still mapped: an id whose
        extents, wherever they lie, are still this object's."""
        try:
            _, slot, generation = parse_bm_id(bm_id)
        except InvalidArgument:
            return False
        return (self.is_live(bm_id) or self._claimed_generation.get(slot) == generation
                or bm_id in self._pinned_dead)

    def lookup(self, bm_id: str) -> ObjectRecord:
        server_id, slot, generation = parse_bm_id(bm_id)
        record = self._live.get(slot)
        if server_id != self.server_id or record is None or record.generation != generation:
            raise NoSuchObject(f"no object {bm_id} in this namespace (freed, or never existed)")
        return record

    def live(self, slot: int, generation: int) -> ObjectRecord | None:
        """The live object of a parsed id's slot and generation, or None (a batch looks up
        many objects at once and fails each on its own)."""
        record = self._live.get(slot)
        return record if record is not None and record.generation == generation else None

    def free(self, bm_id: str) -> list[Placement]:
        """Forget the object; returns the extents to release now (none while pinned)."""
        record = self.lookup(bm_id)
        del self._live[record.slot]
        self._live_bytes -= record.size_bytes
        self._free_slots.append(record.slot)
        if record.pins:
            self._pinned_dead[bm_id] = record
            return []
        return record.extents

    def expand(self, bm_id: str, new_size_bytes: int, more_extents: list[Placement]) -> ObjectRecord:
        record = self.lookup(bm_id)
        if new_size_bytes < record.size_bytes:
            raise InvalidArgument(f"expand cannot shrink: {record.size_bytes} -> {new_size_bytes}")
        if len(record.extents) + len(more_extents) > MAX_EXTENTS_PER_OBJECT:
            raise LimitExceeded(f"an object may have at most {MAX_EXTENTS_PER_OBJECT} extents")
        if record.reserved_bytes + sum(e.length for e in more_extents) < new_size_bytes:
            raise InvalidArgument("extents do not cover the expanded object")
        record.extents.extend(more_extents)
        self._live_bytes += new_size_bytes - record.size_bytes
        record.size_bytes = new_size_bytes
        return record

    def pin(self, bm_id: str, holder: Hashable) -> ObjectRecord:
        record = self.lookup(bm_id)
        record.pins[holder] = record.pins.get(holder, 0) + 1
        self._pinned_by.setdefault(holder, set()).add(bm_id)
        return record

    def unpin(self, bm_id: str, holder: Hashable) -> list[Placement]:
        """Drop one pin; returns extents that are now free to release."""
        record = self._pinned_dead.get(bm_id)
        if record is None:
            record = self.lookup(bm_id)
        count = record.pins.get(holder, 0)
        if count == 0:
            raise InvalidArgument(f"object {bm_id} is not mapped by this client")
        if count == 1:
            del record.pins[holder]
            mine = self._pinned_by.get(holder)
            if mine is not None:
                mine.discard(bm_id)
                if not mine:
                    del self._pinned_by[holder]
        else:
            record.pins[holder] = count - 1
        if not record.pins and bm_id in self._pinned_dead:
            del self._pinned_dead[bm_id]
            return record.extents
        return []

    def unpin_all(self, holder: Hashable) -> list[Placement]:
        """A client went away: drop its pins; returns extents that are now free."""
        return [e for _, extents in self.unpin_all_by_object(holder) for e in extents]

    def unpin_all_by_object(self, holder: Hashable) -> list[tuple[str, list[Placement]]]:
        """Like unpin_all, with the id of the object each freed extent belonged to."""
        freed: list[tuple[str, list[Placement]]] = []
        for bm_id in self._pinned_by.pop(holder, ()):
            dead = self._pinned_dead.get(bm_id)
            if dead is not None:
                dead.pins.pop(holder, None)
                if not dead.pins:
                    del self._pinned_dead[bm_id]
                    freed.append((bm_id, dead.extents))
                continue
            _, slot, _ = parse_bm_id(bm_id)
            live = self._live.get(slot)
            if live is not None and live.bm_id == bm_id:
                live.pins.pop(holder, None)
        return freed

    def drop_all(self) -> list[ObjectRecord]:
        """The namespace is destroyed: every record, live or pinned-dead, goes."""
        records = list(self._live.values()) + list(self._pinned_dead.values())
        self._free_slots.extend(self._live)
        self._live.clear()
        self._pinned_dead.clear()
        self._pinned_by.clear()
        self._live_bytes = 0
        return records

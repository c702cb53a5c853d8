"""Segment leasing and extent carving for one server's pool. Pure: no I/O, no clock.

A segment is memory lent to one owner (a namespace incarnation) for the whole of its life:
made fresh for that owner, never lent to another, retired once given back, and its id is
never used again. Isolation rests on that, not on clients' good behaviour: a same-host
client maps whole segments, and an fd cannot be taken back from a process (it may keep it,
or fork). So memory once handed out under an fd must never hold another owner's bytes: the
server makes every segment from fresh memory and destroys (punches out) a retired one, so
that whoever still holds it sees zeros.

The pool is a byte budget, its capacity: the sizes of all segments that exist never add up
to more. Sizes vary. An owner's first segment is small (`min_segment_bytes`) and each next
one doubles its holding, up to `max_segment_bytes`, so a namespace with little data holds
little, and many small namespaces cannot starve the pool; a large object takes segments of
the largest size. Making memory is slow on a virtual machine (fresh pages cost ~0.5 ms per
MiB here, 15x a memset), so an owner keeps its emptied segments for its next allocations;
they are retired only when the budget is needed elsewhere or the owner goes. Segments made
ahead without an owner (spares) take the making off the allocation path.

Inside an owner's segments, objects get page-aligned extents, best fit, from an index of the
owner's free ranges by length: a small allocation costs a bisection, however many segments
the owner holds, and the figures are counters kept as things change, never a walk of the
pool under the server's lock. Freed extents rest for `grace_s` before reuse (see limits.REUSE_GRACE_S), and every byte handed
out again is listed in `Allocation.zero` for the caller to clear (bytes of a segment never
handed out since it was made are zero already).

The caller (the server) does the I/O the results ask for: memory for `Allocation.make`
before the extents are used (then `made`, or `abandon` if it failed), and destruction of
`Allocation.retire` and of `take_retiring()` (then `retired`).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

from ..errors import InvalidArgument, OutOfMemory
from ..limits import MAX_EXTENTS_PER_OBJECT, PAGE_SIZE_BYTES, REUSE_GRACE_S

MAKING, READY, RETIRING = "making", "ready", "retiring"
# Destroying a segment takes a few ms: an allocation short by segments being destroyed now
# is told to retry this much later.
RETIRE_WAIT_S = 0.01
SPARE_SLOT_MARGIN = 64      # segment slots (fds) spares leave free


@dataclass(frozen=True, slots=True)
class Extent:
    segment: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class Allocation:
    extents: list[Extent] = field(default_factory=list)
    # Ranges the caller must zero before anyone sees the extents.
    zero: list[Extent] = field(default_factory=list)
    # New segments (id, size): the caller makes their memory before the extents are used.
    make: list[tuple[int, int]] = field(default_factory=list)
    # Segments taken back for this allocation's budget: the caller destroys their memory first.
    retire: list[int] = field(default_factory=list)


class _Segment:
    __slots__ = ("id", "size", "owner", "state", "free", "live_bytes", "resting_bytes", "used_to", "holds",
                 "indexed")

    def __init__(self, segment_id: int, size: int, state: str) -> None:
        self.id = segment_id
        self.size = size
        self.owner: Hashable | None = None
        self.state = state
        self.free: list[tuple[int, int]] = [(0, size)]   # (offset, length), sorted, coalesced
        self.live_bytes = 0         # in live objects' extents
        self.resting_bytes = 0      # quarantined bytes inside this segment
        self.used_to = 0            # bytes at or past this offset were never handed out: still zero
        self.holds = 0              # server-side transfers using its memory: not destroyed meanwhile
        self.indexed = False        # its free ranges are in its owner's index (ready and owned)

    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)

    def empty(self) -> bool:
        """Reusable whole by its owner now (nothing live, nothing resting)."""
        return self.resting_bytes == 0 and self.free == [(0, self.size)]


class _Owner:
    """One owner's segments, and what keeps its allocations off a walk of them."""

    __slots__ = ("segments", "free_ranges", "room_bytes", "idle", "held_bytes", "live_bytes")

    def __init__(self) -> None:
        self.segments: dict[int, _Segment] = {}
        self.free_ranges: list[tuple[int, int, int]] = []   # (length, segment, offset) of ready segments
        self.room_bytes = 0          # the sum of free_ranges' lengths
        self.idle: dict[int, _Segment] = {}                 # ready, nothing live, no transfer
        self.held_bytes = 0          # sizes of all its segments: what the next one doubles
        self.live_bytes = 0


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


class SegmentAllocator:
    def __init__(self, capacity_bytes: int, max_segment_bytes: int, min_segment_bytes: int | None = None,
                 first_id: int = 1, page_size_bytes: int = PAGE_SIZE_BYTES,
                 grace_s: float = REUSE_GRACE_S, max_segments: int | None = None) -> None:
        min_segment_bytes = min(max_segment_bytes, min_segment_bytes or max_segment_bytes)
        for name, value in (("segment size", max_segment_bytes), ("smallest segment size", min_segment_bytes)):
            if type(value) is not int or value <= 0 or value % page_size_bytes:
                raise InvalidArgument(f"{name} must be a positive multiple of {page_size_bytes}, got {value!r}")
        if type(capacity_bytes) is not int or capacity_bytes < max_segment_bytes:
            raise InvalidArgument(f"a pool needs at least one segment: capacity {capacity_bytes!r} "
                                  f"is below the segment size {max_segment_bytes}")
        if type(first_id) is not int or first_id < 1:
            raise InvalidArgument(f"segment ids start at a positive int, got {first_id!r}")
        self.capacity_bytes = capacity_bytes
        # Each segment costs the server fds: at most this many at once (capacity.segment_slots),
        # so segments grow past the doubling rule when slots run short (_next_size).
        self.max_segments = max_segments if max_segments is not None else 1 << 62
        if self.max_segments * max_segment_bytes < capacity_bytes:
            raise InvalidArgument(f"{self.max_segments} segments of at most {max_segment_bytes} bytes cannot "
                                  f"hold a capacity of {capacity_bytes} bytes")
        self.max_segment_bytes = max_segment_bytes
        self.min_segment_bytes = min_segment_bytes
        self.page_size_bytes = page_size_bytes
        self.grace_s = grace_s
        self._next_id = first_id
        self._segments: dict[int, _Segment] = {}
        self._committed = 0                  # bytes of every segment in _segments: the budget in use
        self._owners: dict[Hashable, _Owner] = {}
        self._spares: dict[int, list[_Segment]] = {}        # size -> ready, ownerless
        self._spare_bytes = 0
        self._making_spares: dict[int, int] = {}            # size -> spares being made
        self._retiring: dict[int, _Segment] = {}            # to destroy, not yet taken
        self._destroying: dict[int, _Segment] = {}          # taken for destruction, not yet retired
        self._idle_bytes = 0                 # sizes of all owners' idle segments
        self._resting: deque[tuple[float, Hashable, Extent]] = deque()

    # ---- what the pool looks like ---------------------------------------------------------

    def committed_bytes(self) -> int:
        """Bytes of all segments that exist (lent, spare, being made or being retired)."""
        return self._committed

    def live_bytes(self, owner: Hashable | None = None) -> int:
        if owner is None:
            return sum(rec.live_bytes for rec in self._owners.values())
        rec = self._owners.get(owner)
        return rec.live_bytes if rec is not None else 0

    def free_bytes(self) -> int:
        """Bytes holding no object now (resting ones are free again within the grace)."""
        return self.capacity_bytes - self.live_bytes()

    def spare_bytes(self) -> int:
        return self._spare_bytes

    def lendable_bytes(self) -> int:
        """What a namespace with nothing here could get: budget never lent, spares, segments
        being retired, and other owners' empty segments (taken back when needed)."""
        return self.capacity_bytes - self._committed + self._reclaimable_bytes(owner=None)

    def available_bytes(self, owner: Hashable) -> int:
        """What `owner` could get now: the lendable bytes plus room in its own segments that
        hold something (its empty ones are counted as lendable already)."""
        rec = self._owners.get(owner)
        if rec is None:
            return self.lendable_bytes()
        room = rec.room_bytes - sum(s.size - s.resting_bytes for s in rec.idle.values())
        return self.lendable_bytes() + room

    def figures(self) -> dict[str, int]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.live_bytes(),
                "free_bytes": self.free_bytes(), "lendable_bytes": self.lendable_bytes(),
                "committed_bytes": self._committed, "spare_bytes": self._spare_bytes,
                "segments": len(self._segments)}

    def owner_of(self, segment: int) -> Hashable | None:
        """The owner of a live segment; None for a spare, a retired or an unknown id."""
        seg = self._segments.get(segment)
        return None if seg is None or seg.state == RETIRING else seg.owner

    def segments_of(self, owner: Hashable) -> list[int]:
        rec = self._owners.get(owner)
        return sorted(rec.segments) if rec is not None else []

    def unused_segments(self) -> list[int]:
        """Segments that hold nothing live (spares, empty, being retired): what a persistent
        pool need not keep when its server stops."""
        return [s.id for s in self._segments.values() if s.state != MAKING and (s.owner is None
                or s.state == RETIRING or s.live_bytes == 0)]

    # ---- server-side transfers -------------------------------------------------------------

    def hold(self, segment: int) -> None:
        """A server-side transfer uses this segment's memory: it is not destroyed meanwhile."""
        seg = self._segments[segment]
        seg.holds += 1
        self._refresh_idle(seg)

    def let_go(self, segment: int) -> None:
        seg = self._segments[segment]
        assert seg.holds > 0, f"segment {segment} let go more often than held"
        seg.holds -= 1
        self._refresh_idle(seg)

    # ---- allocate / release ------------------------------------------------------------------

    def allocate(self, owner: Hashable, size_bytes: int, now_s: float) -> Allocation:
        if owner is None:
            raise InvalidArgument("an allocation needs an owner")
        if type(size_bytes) is not int or size_bytes <= 0:
            raise InvalidArgument(f"size must be a positive int, got {size_bytes!r}")
        need = round_up(size_bytes, self.page_size_bytes)
        self._mature(now_s)
        rec = self._owners.get(owner)
        alloc = Allocation()
        top = self.max_segment_bytes
        if rec is not None and need < top:
            # The common case: a small object that fits in the owner's room, found by bisection.
            fit = self._best_fit(rec, need)
            if fit is not None:
                self._carve(fit[0], fit[1], need, alloc)
                rec.live_bytes += need
                return alloc

        room = rec.room_bytes if rec is not None else 0
        budget = self.capacity_bytes - self._committed + self._reclaimable_bytes(owner)
        if room + budget < need:
            raise OutOfMemory(f"pool has {room + budget} bytes free for this namespace, {need} asked",
                              retry_at_s=self._retry_time(need - room - budget, now_s))
        whole, new_sizes, tail, fragments = self._plan(owner, rec, need, budget)
        if len(self._segments) + len(new_sizes) > self.max_segments + self._reclaimable_count(owner):
            raise OutOfMemory(f"this server holds {len(self._segments)} segments, as many as its fd limit allows; "
                              "memory is free but in other namespaces' segments")
        extents = len(whole) + len(new_sizes) + (tail is not None) + len(fragments)
        if extents > MAX_EXTENTS_PER_OBJECT:      # refused before anything changed
            raise OutOfMemory(f"free memory is too fragmented: {extents} extents needed, "
                              f"at most {MAX_EXTENTS_PER_OBJECT} allowed")
        self._take_budget(owner, new_sizes, alloc)
        if rec is None:
            rec = self._owners[owner] = _Owner()
        new_segments = [self._new_segment(owner, size, alloc) for size in new_sizes]
        for seg in whole:
            self._carve(seg, 0, top, alloc)
        remaining = need - top * len(whole) - sum(n for _, _, n in fragments)
        for seg in new_segments:      # sized by the plan: only the last may be taken in part
            take = min(seg.size, remaining)
            self._carve(seg, 0, take, alloc)
            remaining -= take
        if tail is not None:
            self._carve(tail[0], tail[1], remaining, alloc)
            remaining = 0
        assert remaining == 0
        for seg, off, n in fragments:
            self._carve(seg, off, n, alloc)
        rec.live_bytes += need
        assert sum(e.length for e in alloc.extents) == need
        assert self._committed <= self.capacity_bytes
        return alloc

    def _plan(self, owner: Hashable, rec: _Owner | None, need: int, budget: int
              ) -> tuple[list[_Segment], list[int], tuple[_Segment, int] | None, list[tuple[_Segment, int, int]]]:
        """How to cover `need` bytes: (the owner's empty top-size segments, taken whole; sizes
        of new segments; a place in the owner's room for the tail; pieces of the owner's room,
        largest first, when the budget is short). Whole segments first, for few extents; new
        memory before fragments."""
        top = self.max_segment_bytes
        remaining = need
        whole: list[_Segment] = []
        if rec is not None and remaining >= top:
            for seg in rec.idle.values():
                if remaining < top:
                    break
                if seg.size == top and seg.empty():
                    whole.append(seg)
                    remaining -= top
        skip = {s.id for s in whole}
        new_sizes: list[int] = []
        while remaining >= top and budget >= top:
            new_sizes.append(top)
            remaining -= top
            budget -= top
        if not remaining:
            return whole, new_sizes, None, []
        tail = self._best_fit(rec, remaining, skip) if rec is not None else None
        if tail is not None:
            return whole, new_sizes, tail, []
        size = self._next_size(owner, remaining)
        if size > budget:
            # What is still uncommitted, up to the size wanted: a last segment slot must not
            # be spent on the need alone while capacity lies beside it (no slot may be left).
            free_now = (self.capacity_bytes - self._committed) // self.page_size_bytes * self.page_size_bytes
            size = max(round_up(remaining, self.page_size_bytes), min(size, free_now))
        if size <= budget:
            return whole, new_sizes + [size], None, []
        # Short of budget: the owner's fragments, largest first, and a new segment for what
        # they lack.
        fragments: list[tuple[_Segment, int, int]] = []
        for length, segment_id, offset in reversed(rec.free_ranges if rec is not None else []):
            if not remaining:
                break
            if segment_id in skip:
                continue
            take = min(length, remaining)
            fragments.append((self._segments[segment_id], offset, take))
            remaining -= take
        if remaining:
            assert remaining <= budget and remaining < top, "allocate checked the room and the budget first"
            new_sizes.append(remaining)
        return whole, new_sizes, None, fragments

    def made(self, alloc: Allocation) -> None:
        """The memory of `alloc.make` exists: its segments may be used by other allocations."""
        for segment_id, _ in alloc.make:
            seg = self._segments[segment_id]
            if seg.state == MAKING:
                seg.state = READY
                self._index(seg)
                self._refresh_idle(seg)
            else:       # its owner was dropped while it was being made: destroy it now
                assert seg.state == RETIRING
                self._retiring[segment_id] = seg

    def abandon(self, owner: Hashable, alloc: Allocation) -> None:
        """Undo an allocation whose memory could not be made: its extents go back at once
        (nobody saw them), its new segments cease to exist. Segments in `alloc.retire` stay
        retired: the caller destroys their memory all the same. Harmless after drop_owner."""
        rec = self._owners.get(owner)
        if rec is None:          # dropped meanwhile: its segments are being retired already
            for segment_id, _ in alloc.make:
                seg = self._segments.pop(segment_id)
                self._committed -= seg.size
                self._retiring.pop(segment_id, None)
            return
        for e in alloc.extents:
            seg = self._segments[e.segment]
            seg.live_bytes -= e.length
            rec.live_bytes -= e.length
            if seg.state == READY:
                self._put_range(seg, e.offset, e.length)
                self._refresh_idle(seg)
        for segment_id, _ in alloc.make:
            seg = self._segments.pop(segment_id)
            self._committed -= seg.size
            del rec.segments[segment_id]
            rec.held_bytes -= seg.size

    def release(self, owner: Hashable, extents: list[Extent], now_s: float) -> None:
        """Extents of a freed object go to rest; reusable after the grace."""
        rec = self._owners[owner]
        for e in extents:
            seg = self._segments.get(e.segment)
            assert seg is not None and seg.owner == owner and seg.state == READY, \
                f"extent {e} released by {owner!r}, segment is {seg and (seg.owner, seg.state)!r}"
            seg.resting_bytes += e.length
            seg.live_bytes -= e.length
            rec.live_bytes -= e.length
            self._refresh_idle(seg)
            self._resting.append((now_s + self.grace_s, owner, e))
        assert rec.live_bytes >= 0

    def drop_owner(self, owner: Hashable) -> list[int]:
        """The owner is gone (its namespace destroyed): every segment of it is to be retired.
        Returns those segments; their memory is destroyed by whoever takes them."""
        rec = self._owners.get(owner)
        if rec is None:
            return []
        for seg in rec.segments.values():
            self._unindex(seg)
            self._forget_idle(seg)
            if seg.state != MAKING:  # one being made is retired once made (see made())
                self._retiring[seg.id] = seg
            seg.state = RETIRING     # seg.owner stays, for the record: it is nobody else's either
        del self._owners[owner]
        self._resting = deque(r for r in self._resting if r[1] != owner)
        return sorted(rec.segments)

    def take_retiring(self) -> list[int]:
        """Segments to destroy now (not in use by a transfer); the taker destroys their memory
        and then calls `retired`."""
        taken = [sid for sid, seg in self._retiring.items() if seg.holds == 0]
        for sid in taken:
            self._destroying[sid] = self._retiring.pop(sid)
        return taken

    def retired(self, segment_ids: list[int]) -> None:
        """These segments' memory is destroyed: their budget is free again."""
        for sid in segment_ids:
            self._destroying.pop(sid, None)
            seg = self._segments.pop(sid, None)
            if seg is not None:
                self._committed -= seg.size

    # ---- spares: segments made ahead, off the allocation path ---------------------------------------

    def plan_spares(self, wanted: dict[int, int]) -> list[tuple[int, int]]:
        """New ownerless segments to make, up to `wanted[size]` spares of each size, from budget
        never lent (never by taking back another owner's segments). (id, size) each."""
        planned = []
        for size, count in sorted(wanted.items()):
            have = len(self._spares.get(size, [])) + self._making_spares.get(size, 0)
            for _ in range(count - have):
                # Spares never take the last slots: those must hold the rest of the capacity.
                if (self.capacity_bytes - self._committed < size
                        or self.max_segments - len(self._segments) <= SPARE_SLOT_MARGIN):
                    return planned
                seg = self._add_segment(size, owner=None, state=MAKING)
                self._making_spares[size] = self._making_spares.get(size, 0) + 1
                planned.append((seg.id, size))
        return planned

    def spares_made(self, segment_ids: list[int]) -> None:
        for sid in segment_ids:
            seg = self._segments[sid]
            assert seg.state == MAKING and seg.owner is None
            self._making_spares[seg.size] -= 1
            seg.state = READY
            self._spares.setdefault(seg.size, []).append(seg)
            self._spare_bytes += seg.size

    def spares_failed(self, segment_ids: list[int]) -> None:
        for sid in segment_ids:
            seg = self._segments.get(sid)
            if seg is not None:
                self._making_spares[seg.size] -= 1
        self.retired(segment_ids)

    # ---- after a restart -----------------------------------------------------------------------------

    def restore(self, owner: Hashable, segment_id: int, size: int, extents: list[Extent]) -> None:
        """Take back a segment that outlived a restart (file media) and its live extents. Its
        size is what it was made with: a segment size lowered since does not shrink it."""
        seg = self._segments.get(segment_id)
        if seg is None:
            if type(size) is not int or size <= 0 or size % self.page_size_bytes:
                raise InvalidArgument(f"segment {segment_id} of {size!r} bytes is not a whole number of pages")
            seg = self._add_segment(size, owner=owner, state=READY, segment_id=segment_id)
            seg.used_to = size      # its old bytes are anyone's guess: zero before reuse
        elif seg.owner != owner:
            raise InvalidArgument(f"segment {segment_id} holds extents of {seg.owner!r} and {owner!r}")
        for e in extents:
            if e.offset < 0 or e.length <= 0 or e.end > seg.size:
                raise InvalidArgument(f"extent {e} lies outside segment {segment_id} of {seg.size} bytes")
            i = bisect.bisect_right(seg.free, (e.offset, float("inf"))) - 1
            if i < 0 or seg.free[i][0] + seg.free[i][1] < e.end:
                raise InvalidArgument(f"extent {e} overlaps another restored extent")
            self._take_range(seg, e.offset, e.length, within=i)
            seg.live_bytes += e.length
            self._owners[owner].live_bytes += e.length
        self._refresh_idle(seg)

    def over_capacity_bytes(self) -> int:
        """After restores: by how much what the pool's files hold exceeds its capacity."""
        return max(0, self._committed - self.capacity_bytes)

    # ---- internals -------------------------------------------------------------------------------

    def _add_segment(self, size: int, owner: Hashable | None, state: str, segment_id: int | None = None) -> _Segment:
        if segment_id is None:
            segment_id = self._next_id
            self._next_id += 1
        else:
            self._next_id = max(self._next_id, segment_id + 1)
        seg = _Segment(segment_id, size, state)
        self._segments[segment_id] = seg
        self._committed += size
        if owner is not None:
            self._give(seg, owner)
        return seg

    def _give(self, seg: _Segment, owner: Hashable) -> None:
        """Make `owner` the segment's owner, for life."""
        assert seg.owner is None, f"segment {seg.id} would change owner"
        seg.owner = owner
        rec = self._owners.get(owner)
        if rec is None:
            rec = self._owners[owner] = _Owner()
        rec.segments[seg.id] = seg
        rec.held_bytes += seg.size
        self._index(seg)
        self._refresh_idle(seg)

    def _next_size(self, owner: Hashable, need: int) -> int:
        """An owner's next segment doubles its holding (from the smallest size), up to the
        largest; never smaller than the need."""
        rec = self._owners.get(owner)
        held = rec.held_bytes if rec is not None else 0
        grown = min(self.max_segment_bytes, max(self.min_segment_bytes, held))
        # Never so small that the segments left to make could not hold the rest of the capacity.
        slots_left = max(1, self.max_segments - len(self._segments))
        floor = round_up(-(-(self.capacity_bytes - self._committed) // slots_left), self.page_size_bytes)
        grown = max(grown, min(self.max_segment_bytes, floor))
        return min(self.max_segment_bytes, max(round_up(need, self.page_size_bytes), grown))

    def _reclaimable_bytes(self, owner: Hashable | None) -> int:
        """Budget to be had without anyone losing data: spares, segments to retire, other
        owners' idle segments. Counters: no walk of the pool."""
        rec = self._owners.get(owner) if owner is not None else None
        retiring = sum(s.size for s in self._retiring.values() if s.holds == 0)
        return self._spare_bytes + retiring + self._idle_bytes - (self._owner_idle_bytes(rec) if rec else 0)

    def _reclaimable_count(self, owner: Hashable) -> int:
        rec = self._owners.get(owner)
        idle = sum(len(r.idle) for r in self._owners.values()) - (len(rec.idle) if rec else 0)
        return sum(len(s) for s in self._spares.values()) + len(self._retiring) + idle

    @staticmethod
    def _owner_idle_bytes(rec: _Owner) -> int:
        return sum(s.size for s in rec.idle.values())

    def _take_budget(self, owner: Hashable, sizes: list[int], alloc: Allocation) -> None:
        """Free enough budget for new segments of `sizes`. A spare of a size we need is used as
        it is (_new_segment); the rest comes from budget never lent, then from spares, segments
        to retire and other owners' idle segments, largest first (the caller destroys their
        memory before making the new)."""
        keep: set[int] = set()            # spares _new_segment will take: it pops from the end
        for size in set(sizes):
            spares = self._spares.get(size, [])
            keep.update(s.id for s in spares[len(spares) - min(len(spares), sizes.count(size)):])
        short = sum(sizes) - sum(self._segments[i].size for i in keep) - (self.capacity_bytes - self._committed)
        if short <= 0:
            return
        spares = [s for size in sorted(self._spares) for s in self._spares[size] if s.id not in keep]
        retiring = [s for s in self._retiring.values() if s.holds == 0]
        idle = sorted((s for o, rec in self._owners.items() if o != owner for s in rec.idle.values()),
                      key=lambda s: -s.size)
        for seg in spares + retiring + idle:
            if short <= 0:
                break
            if seg.owner is None:
                self._spares[seg.size].remove(seg)
                self._spare_bytes -= seg.size
            elif seg.state == RETIRING:
                del self._retiring[seg.id]
            else:
                rec = self._owners[seg.owner]
                self._unindex(seg)
                self._forget_idle(seg)
                del rec.segments[seg.id]
                rec.held_bytes -= seg.size
            del self._segments[seg.id]
            self._committed -= seg.size
            alloc.retire.append(seg.id)
            short -= seg.size
        assert short <= 0, "budget promised by _reclaimable_bytes was not there"

    def _new_segment(self, owner: Hashable, size: int, alloc: Allocation) -> _Segment:
        spares = self._spares.get(size)
        if spares:
            seg = spares.pop()
            self._spare_bytes -= size
            self._give(seg, owner)
            return seg
        seg = self._add_segment(size, owner=owner, state=MAKING)
        alloc.make.append((seg.id, size))
        return seg

    # ---- the indexes ---------------------------------------------------------------------------------

    def _index(self, seg: _Segment) -> None:
        """A ready, owned segment's free ranges join its owner's index."""
        if seg.indexed or seg.state != READY or seg.owner is None:
            return
        rec = self._owners[seg.owner]
        for off, length in seg.free:
            bisect.insort(rec.free_ranges, (length, seg.id, off))
            rec.room_bytes += length
        seg.indexed = True

    def _unindex(self, seg: _Segment) -> None:
        if not seg.indexed:
            return
        rec = self._owners[seg.owner]
        for off, length in seg.free:
            self._index_remove(rec, (length, seg.id, off))
            rec.room_bytes -= length
        seg.indexed = False

    @staticmethod
    def _index_remove(rec: _Owner, key: tuple[int, int, int]) -> None:
        i = bisect.bisect_left(rec.free_ranges, key)
        assert rec.free_ranges[i] == key, f"free range {key} not in its owner's index"
        del rec.free_ranges[i]

    def _refresh_idle(self, seg: _Segment) -> None:
        """Keep the idle indexes true for this segment."""
        if seg.owner is None or seg.state == RETIRING:
            return
        rec = self._owners.get(seg.owner)
        if rec is None:
            return
        idle = seg.state == READY and seg.holds == 0 and seg.live_bytes == 0 and seg.id in self._segments
        if idle and seg.id not in rec.idle:
            rec.idle[seg.id] = seg
            self._idle_bytes += seg.size
        elif not idle and seg.id in rec.idle:
            del rec.idle[seg.id]
            self._idle_bytes -= seg.size

    def _forget_idle(self, seg: _Segment) -> None:
        rec = self._owners.get(seg.owner) if seg.owner is not None else None
        if rec is not None and rec.idle.pop(seg.id, None) is not None:
            self._idle_bytes -= seg.size

    def _best_fit(self, rec: _Owner, size: int, skip: set[int] | frozenset = frozenset()
                  ) -> tuple[_Segment, int] | None:
        ranges = rec.free_ranges
        i = bisect.bisect_left(ranges, (size, -1, -1))
        while i < len(ranges):
            _, segment_id, offset = ranges[i]
            if segment_id not in skip:
                return self._segments[segment_id], offset
            i += 1
        return None

    # ---- free ranges: every change goes through these two, so the index stays true --------------

    def _take_range(self, seg: _Segment, off: int, size: int, within: int | None = None) -> None:
        """Take [off, off + size) out of the free range that holds it."""
        i = within if within is not None else bisect.bisect_right(seg.free, (off, float("inf"))) - 1
        start, length = seg.free[i]
        assert start <= off and off + size <= start + length, f"[{off}, +{size}) is not free in {seg.id}"
        pieces = [(start, off - start), (off + size, start + length - off - size)]
        seg.free[i:i + 1] = [p for p in pieces if p[1]]
        if seg.indexed:
            rec = self._owners[seg.owner]
            self._index_remove(rec, (length, seg.id, start))
            for p_off, p_len in pieces:
                if p_len:
                    bisect.insort(rec.free_ranges, (p_len, seg.id, p_off))
            rec.room_bytes -= size

    def _put_range(self, seg: _Segment, off: int, length: int) -> None:
        """Give [off, off + length) back, coalesced with its free neighbours."""
        i = bisect.bisect_left(seg.free, (off, -1))
        assert i == len(seg.free) or seg.free[i][0] >= off + length, "double free"
        assert i == 0 or sum(seg.free[i - 1]) <= off, "double free"
        rec = self._owners[seg.owner] if seg.indexed else None
        start, total = off, length
        if i < len(seg.free) and seg.free[i][0] == off + length:
            right = seg.free.pop(i)
            total += right[1]
            if rec is not None:
                self._index_remove(rec, (right[1], seg.id, right[0]))
        if i > 0 and sum(seg.free[i - 1]) == off:
            left = seg.free.pop(i - 1)
            start, total = left[0], total + left[1]
            i -= 1
            if rec is not None:
                self._index_remove(rec, (left[1], seg.id, left[0]))
        seg.free.insert(i, (start, total))
        if rec is not None:
            bisect.insort(rec.free_ranges, (total, seg.id, start))
            rec.room_bytes += length

    def _carve(self, seg: _Segment, off: int, size: int, alloc: Allocation) -> None:
        self._take_range(seg, off, size)
        extent = Extent(seg.id, off, size)
        alloc.extents.append(extent)
        seg.live_bytes += size
        self._refresh_idle(seg)
        if off < seg.used_to:     # handed out before: an earlier object's bytes may be there
            alloc.zero.append(Extent(seg.id, off, min(size, seg.used_to - off)))
        seg.used_to = max(seg.used_to, off + size)

    def _mature(self, now_s: float) -> None:
        while self._resting and self._resting[0][0] <= now_s:
            _, owner, e = self._resting.popleft()
            seg = self._segments.get(e.segment)
            if seg is not None and seg.owner == owner and seg.state == READY:
                seg.resting_bytes -= e.length
                self._put_range(seg, e.offset, e.length)

    def _retry_time(self, shortfall: int, now_s: float) -> float | None:
        """When enough memory may be free to cover `shortfall` (a hint): segments another
        thread is destroying now, then resting memory (another owner's rest helps only once
        it empties whole segments)."""
        got = sum(s.size for s in self._destroying.values())
        if got >= shortfall:
            return now_s + RETIRE_WAIT_S
        for ready_at, _, e in self._resting:
            got += e.length
            if got >= shortfall:
                return ready_at
        return None

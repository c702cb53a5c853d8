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

Inside an owner's segments, objects get page-aligned extents from sorted free lists. Freed
extents rest for `grace_s` before reuse (see limits.REUSE_GRACE_S), and every byte handed
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
    __slots__ = ("id", "size", "owner", "state", "free", "live_bytes", "resting_bytes", "used_to", "holds")

    def __init__(self, segment_id: int, size: int, owner: Hashable | None, state: str) -> None:
        self.id = segment_id
        self.size = size
        self.owner = owner
        self.state = state
        self.free: list[tuple[int, int]] = [(0, size)]   # (offset, length), sorted, coalesced
        self.live_bytes = 0         # in live objects' extents
        self.resting_bytes = 0      # quarantined bytes inside this segment
        self.used_to = 0            # bytes at or past this offset were never handed out: still zero
        self.holds = 0              # server-side transfers using its memory: not destroyed meanwhile

    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)

    def empty(self) -> bool:
        """Reusable whole by its owner now (nothing live, nothing resting)."""
        return self.resting_bytes == 0 and self.free == [(0, self.size)]

    def unused(self) -> bool:
        """Nothing live in it: it may be destroyed (resting bytes are nobody's any more, and a
        late write into destroyed memory reaches no one)."""
        return self.live_bytes == 0


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


class SegmentAllocator:
    def __init__(self, capacity_bytes: int, max_segment_bytes: int, min_segment_bytes: int | None = None,
                 first_id: int = 1, page_size_bytes: int = PAGE_SIZE_BYTES,
                 grace_s: float = REUSE_GRACE_S) -> None:
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
        self.max_segment_bytes = max_segment_bytes
        self.min_segment_bytes = min_segment_bytes
        self.page_size_bytes = page_size_bytes
        self.grace_s = grace_s
        self._next_id = first_id
        self._segments: dict[int, _Segment] = {}
        self._committed = 0          # bytes of every segment in _segments: the budget in use
        # Each owner's segments by id, so an allocation looks at its own without walking the pool.
        self._owned: dict[Hashable, dict[int, _Segment]] = {}
        self._spares: dict[int, list[_Segment]] = {}        # size -> ready, ownerless
        self._retiring: dict[int, _Segment] = {}           # not yet taken for destruction
        # Owned segments with nothing live and no transfer: what other owners may take back.
        # Kept as things change, so no figure or allocation walks the whole pool.
        self._idle: dict[int, _Segment] = {}
        self._resting: deque[tuple[float, Hashable, Extent]] = deque()
        self._live_bytes_by_owner: dict[Hashable, int] = {}

    # ---- what the pool looks like ---------------------------------------------------------

    def committed_bytes(self) -> int:
        """Bytes of all segments that exist (lent, spare, being made or being retired)."""
        return self._committed

    def live_bytes(self, owner: Hashable | None = None) -> int:
        if owner is None:
            return sum(self._live_bytes_by_owner.values())
        return self._live_bytes_by_owner.get(owner, 0)

    def free_bytes(self) -> int:
        """Bytes holding no object now (resting ones are free again within the grace)."""
        return self.capacity_bytes - self.live_bytes()

    def spare_bytes(self) -> int:
        return sum(s.size for spares in self._spares.values() for s in spares)

    def lendable_bytes(self) -> int:
        """What a namespace with nothing here could get: budget never lent, spares, segments
        being retired, and other owners' empty segments (taken back when needed)."""
        return self.capacity_bytes - self._committed + self._reclaimable_bytes(owner=None)

    def available_bytes(self, owner: Hashable) -> int:
        """What `owner` could get now: the lendable bytes plus room in its own segments."""
        own_room = sum(s.free_bytes() for s in self._own(owner) if s.live_bytes)
        return self.lendable_bytes() + own_room

    def figures(self) -> dict[str, int]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.live_bytes(),
                "free_bytes": self.free_bytes(), "lendable_bytes": self.lendable_bytes(),
                "committed_bytes": self._committed, "spare_bytes": self.spare_bytes(),
                "segments": len(self._segments)}

    def owner_of(self, segment: int) -> Hashable | None:
        """The owner of a live segment; None for a spare, a retired or an unknown id."""
        seg = self._segments.get(segment)
        return None if seg is None or seg.state == RETIRING else seg.owner

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
        self._refresh(seg)

    def let_go(self, segment: int) -> None:
        seg = self._segments[segment]
        assert seg.holds > 0, f"segment {segment} let go more often than held"
        seg.holds -= 1
        self._refresh(seg)

    # ---- allocate / release ------------------------------------------------------------------

    def allocate(self, owner: Hashable, size_bytes: int, now_s: float) -> Allocation:
        if owner is None:
            raise InvalidArgument("an allocation needs an owner")
        if type(size_bytes) is not int or size_bytes <= 0:
            raise InvalidArgument(f"size must be a positive int, got {size_bytes!r}")
        need = round_up(size_bytes, self.page_size_bytes)
        self._mature(now_s)
        own = self._own(owner, ready_only=True)
        alloc = Allocation()
        top = self.max_segment_bytes
        if need < top:
            # The common case, a small object that fits in the owner's segments: no need to
            # look at the rest of the pool.
            fit = self._best_fit(own, need)
            if fit is not None:
                self._carve(fit[0], fit[1], need, alloc)
                self._count_live(owner, need)
                return alloc

        own_room = sum(s.free_bytes() for s in own)
        budget = self.capacity_bytes - self._committed + self._reclaimable_bytes(owner)
        if own_room + budget < need:
            raise OutOfMemory(f"pool has {own_room + budget} bytes free for this namespace, {need} asked",
                              retry_at_s=self._retry_time(need - own_room - budget, now_s))
        whole, new_sizes, tail, from_room = self._plan(owner, own, need, budget)
        self._take_budget(owner, new_sizes, alloc)
        new_segments = [self._new_segment(owner, size, alloc) for size in new_sizes]
        top = self.max_segment_bytes
        for seg in whole:
            self._carve(seg, 0, top, alloc)
        remaining = need - top * len(whole)
        for seg in new_segments:      # sized by the plan: only the last may be taken in part
            take = min(seg.size, remaining - from_room)
            self._carve(seg, 0, take, alloc)
            remaining -= take
        if tail is not None:
            self._carve(tail[0], tail[1], remaining, alloc)
            remaining = 0
        rest = [s for s in own if s not in whole]
        while remaining:     # the owner's fragments, largest first
            seg, off, length = max(((s, o, n) for s in rest for o, n in s.free), key=lambda t: t[2])
            take = min(length, remaining)
            self._carve(seg, off, take, alloc)
            remaining -= take
        self._count_live(owner, need)
        if len(alloc.extents) > MAX_EXTENTS_PER_OBJECT:
            self.abandon(owner, alloc)
            raise OutOfMemory(f"free memory is too fragmented: {len(alloc.extents)} extents needed, "
                              f"at most {MAX_EXTENTS_PER_OBJECT} allowed")
        assert sum(e.length for e in alloc.extents) == need
        assert self._committed <= self.capacity_bytes
        return alloc

    def _plan(self, owner: Hashable, own: list[_Segment], need: int,
              budget: int) -> tuple[list[_Segment], list[int], tuple[_Segment, int] | None, int]:
        """How to cover `need` bytes: (own empty top-size segments taken whole, sizes of new
        segments, a place in the owner's room for the tail, bytes taken from the owner's
        fragments). Whole segments first, for few extents; new memory before fragments."""
        top = self.max_segment_bytes
        remaining = need
        empties = [s for s in own if s.size == top and s.empty()]
        whole: list[_Segment] = []
        while remaining >= top and empties:
            whole.append(empties.pop())
            remaining -= top
        new_sizes: list[int] = []
        while remaining >= top and budget >= top:
            new_sizes.append(top)
            remaining -= top
            budget -= top
        rest = [s for s in own if s not in whole]
        tail = None
        if remaining:
            tail = self._best_fit(rest, remaining)
            if tail is not None:
                return whole, new_sizes, tail, 0
            size = self._next_size(owner, remaining)
            if size > budget:
                size = round_up(remaining, self.page_size_bytes)
            if size <= budget:
                return whole, new_sizes + [size], None, 0
        if not remaining:
            return whole, new_sizes, None, 0
        # Short of budget: the owner's fragments, and a new segment for what they lack.
        room = sum(s.free_bytes() for s in rest)
        if room >= remaining:
            return whole, new_sizes, None, remaining
        gap = remaining - room
        assert gap <= budget and gap < top, "allocate checked the room and the budget first"
        return whole, new_sizes + [gap], None, room

    def made(self, alloc: Allocation) -> None:
        """The memory of `alloc.make` exists: its segments may be used by other allocations."""
        for segment_id, _ in alloc.make:
            seg = self._segments[segment_id]
            if seg.state == MAKING:
                seg.state = READY
                self._refresh(seg)
            else:       # its owner was dropped while it was being made: destroy it now
                assert seg.state == RETIRING
                self._retiring[segment_id] = seg

    def abandon(self, owner: Hashable, alloc: Allocation) -> None:
        """Undo an allocation whose memory could not be made: its extents go back at once
        (nobody saw them), its new segments cease to exist. Segments in `alloc.retire` stay
        retired: the caller destroys their memory all the same."""
        for e in alloc.extents:
            seg = self._segments.get(e.segment)
            if seg is not None and seg.state != MAKING:
                self._insert_free(seg, e.offset, e.length)
                seg.live_bytes -= e.length
                self._refresh(seg)
        self._live_bytes_by_owner[owner] -= sum(e.length for e in alloc.extents)
        assert self._live_bytes_by_owner[owner] >= 0
        for segment_id, _ in alloc.make:
            seg = self._segments.pop(segment_id)
            self._committed -= seg.size
            self._set_owner(seg, None)
            self._idle.pop(segment_id, None)

    def release(self, owner: Hashable, extents: list[Extent], now_s: float) -> None:
        """Extents of a freed object go to rest; reusable after the grace."""
        total = 0
        for e in extents:
            seg = self._segments.get(e.segment)
            assert seg is not None and seg.owner == owner and seg.state != RETIRING, \
                f"extent {e} released by {owner!r}, segment is {seg and (seg.owner, seg.state)!r}"
            seg.resting_bytes += e.length
            seg.live_bytes -= e.length
            self._refresh(seg)
            self._resting.append((now_s + self.grace_s, owner, e))
            total += e.length
        self._live_bytes_by_owner[owner] = self._live_bytes_by_owner.get(owner, 0) - total
        assert self._live_bytes_by_owner[owner] >= 0

    def drop_owner(self, owner: Hashable) -> list[int]:
        """The owner is gone (its namespace destroyed): every segment of it is to be retired.
        Returns those segments; their memory is destroyed by whoever takes them."""
        dropped = []
        for seg in self._own(owner):
            self._set_owner(seg, None)
            seg.owner = owner        # kept for the record: a retiring segment is still not lendable
            if seg.state != MAKING:  # one being made is retired once made (see made())
                self._retiring[seg.id] = seg
            seg.state = RETIRING
            self._idle.pop(seg.id, None)
            dropped.append(seg.id)
        self._resting = deque(r for r in self._resting if r[1] != owner)
        self._live_bytes_by_owner.pop(owner, None)
        return dropped

    def take_retiring(self) -> list[int]:
        """Segments to destroy now (not in use by a transfer); the taker destroys their memory
        and then calls `retired`."""
        taken = [sid for sid, seg in self._retiring.items() if seg.holds == 0]
        for sid in taken:
            del self._retiring[sid]
        return taken

    def retired(self, segment_ids: list[int]) -> None:
        """These segments' memory is destroyed: their budget is free again."""
        for sid in segment_ids:
            seg = self._segments.pop(sid, None)
            if seg is not None:
                self._committed -= seg.size

    # ---- spares: segments made ahead, off the allocation path ---------------------------------------

    def plan_spares(self, wanted: dict[int, int]) -> list[tuple[int, int]]:
        """New ownerless segments to make, up to `wanted[size]` spares of each size, from budget
        never lent (never by taking back another owner's segments). (id, size) each."""
        planned = []
        for size, count in sorted(wanted.items()):
            have = len(self._spares.get(size, [])) + sum(
                1 for s in self._segments.values() if s.owner is None and s.state == MAKING and s.size == size)
            for _ in range(count - have):
                if self.capacity_bytes - self._committed < size:
                    return planned
                seg = self._add_segment(size, owner=None, state=MAKING)
                planned.append((seg.id, size))
        return planned

    def spares_made(self, segment_ids: list[int]) -> None:
        for sid in segment_ids:
            seg = self._segments[sid]
            assert seg.state == MAKING and seg.owner is None
            seg.state = READY
            self._spares.setdefault(seg.size, []).append(seg)

    def spares_failed(self, segment_ids: list[int]) -> None:
        self.retired(segment_ids)

    # ---- after a restart -----------------------------------------------------------------------------

    def restore(self, owner: Hashable, segment_id: int, size: int, extents: list[Extent]) -> None:
        """Take back a segment that outlived a restart (file media) and its live extents."""
        seg = self._segments.get(segment_id)
        if seg is None:
            if type(size) is not int or size <= 0 or size % self.page_size_bytes or size > self.max_segment_bytes:
                raise InvalidArgument(f"segment {segment_id} of {size} bytes does not fit this pool's "
                                      "segment sizes (was the segment size lowered?)")
            if self._committed + size > self.capacity_bytes:
                raise InvalidArgument(f"segment {segment_id} does not fit in the pool's capacity "
                                      "(was the capacity lowered?)")
            seg = self._add_segment(size, owner=owner, state=READY, segment_id=segment_id)
            seg.used_to = size      # its old bytes are anyone's guess: zero before reuse
        elif seg.owner != owner:
            raise InvalidArgument(f"segment {segment_id} holds extents of {seg.owner!r} and {owner!r}")
        for e in extents:
            if e.offset < 0 or e.length <= 0 or e.end > seg.size:
                raise InvalidArgument(f"extent {e} lies outside segment {segment_id} of {seg.size} bytes")
            i = next((i for i, (off, n) in enumerate(seg.free) if off <= e.offset and e.end <= off + n), None)
            if i is None:
                raise InvalidArgument(f"extent {e} overlaps another restored extent")
            off, n = seg.free.pop(i)
            for piece in reversed([r for r in ((off, e.offset - off), (e.end, off + n - e.end)) if r[1]]):
                seg.free.insert(i, piece)
            seg.live_bytes += e.length
            self._count_live(owner, e.length)
        self._refresh(seg)

    # ---- internals -------------------------------------------------------------------------------

    def _own(self, owner: Hashable, ready_only: bool = False) -> list[_Segment]:
        mine = self._owned.get(owner)
        if not mine:
            return []
        return [mine[i] for i in sorted(mine) if not ready_only or mine[i].state == READY]

    def _count_live(self, owner: Hashable, n: int) -> None:
        self._live_bytes_by_owner[owner] = self._live_bytes_by_owner.get(owner, 0) + n

    def _add_segment(self, size: int, owner: Hashable | None, state: str, segment_id: int | None = None) -> _Segment:
        if segment_id is None:
            segment_id = self._next_id
            self._next_id += 1
        else:
            self._next_id = max(self._next_id, segment_id + 1)
        seg = _Segment(segment_id, size, None, state)
        self._segments[segment_id] = seg
        self._committed += size
        self._set_owner(seg, owner)
        return seg

    def _next_size(self, owner: Hashable, need: int) -> int:
        """An owner's next segment doubles its holding (from the smallest size), up to the
        largest; never smaller than the need."""
        held = sum(s.size for s in self._own(owner))
        grown = min(self.max_segment_bytes, max(self.min_segment_bytes, held))
        return min(self.max_segment_bytes, max(round_up(need, self.page_size_bytes), grown))

    def _reclaimable(self, owner: Hashable | None) -> list[_Segment]:
        """Segments whose budget can be had without anyone losing data, cheapest first:
        spares, segments already being retired, then other owners' empty segments."""
        spares = [s for size in sorted(self._spares) for s in self._spares[size]]
        retiring = [s for s in self._retiring.values() if s.holds == 0]
        idle = sorted((s for s in self._idle.values() if s.owner != owner), key=lambda s: -s.size)
        return spares + retiring + idle

    def _reclaimable_bytes(self, owner: Hashable | None) -> int:
        return sum(s.size for s in self._reclaimable(owner))

    def _take_budget(self, owner: Hashable, sizes: list[int], alloc: Allocation) -> None:
        """Free enough budget for new segments of `sizes`. A spare of a size we need is used as
        it is (_new_segment); the rest comes from budget never lent, then from reclaimed
        segments (whose memory the caller destroys before making the new)."""
        keep: set[int] = set()            # spares _new_segment will take: it pops from the end
        for size in set(sizes):
            spares = self._spares.get(size, [])
            keep.update(s.id for s in spares[len(spares) - min(len(spares), sizes.count(size)):])
        short = sum(sizes) - sum(self._segments[i].size for i in keep) - (self.capacity_bytes - self._committed)
        for seg in self._reclaimable(owner):
            if short <= 0:
                break
            if seg.id in keep:
                continue
            if seg.owner is None:
                self._spares[seg.size].remove(seg)
            elif seg.state == RETIRING:
                del self._retiring[seg.id]
            else:
                self._set_owner(seg, None)
            del self._segments[seg.id]
            self._idle.pop(seg.id, None)
            self._committed -= seg.size
            alloc.retire.append(seg.id)
            short -= seg.size
        assert short <= 0, "budget promised by _reclaimable was not there"

    def _new_segment(self, owner: Hashable, size: int, alloc: Allocation) -> _Segment:
        spares = self._spares.get(size)
        if spares:
            seg = spares.pop()
            self._set_owner(seg, owner)
            return seg
        seg = self._add_segment(size, owner=owner, state=MAKING)
        alloc.make.append((seg.id, size))
        return seg

    def _set_owner(self, seg: _Segment, owner: Hashable | None) -> None:
        if seg.owner == owner and (owner is None or seg.id in self._owned.get(owner, {})):
            return
        if seg.owner is not None:
            previous = self._owned.get(seg.owner)
            if previous is not None:
                previous.pop(seg.id, None)
                if not previous:
                    del self._owned[seg.owner]
        assert seg.owner is None or owner is None, f"segment {seg.id} would change owner"
        seg.owner = owner
        if owner is not None:
            self._owned.setdefault(owner, {})[seg.id] = seg
        self._refresh(seg)

    def _refresh(self, seg: _Segment) -> None:
        """Keep _idle true for this segment."""
        if seg.state == READY and seg.owner is not None and seg.holds == 0 and seg.live_bytes == 0 \
                and seg.id in self._segments:
            self._idle[seg.id] = seg
        else:
            self._idle.pop(seg.id, None)

    def _best_fit(self, own: list[_Segment], size: int) -> tuple[_Segment, int] | None:
        best = None
        for seg in own:
            for off, length in seg.free:
                if length >= size and (best is None or length < best[2]):
                    best = (seg, off, length)
        return None if best is None else (best[0], best[1])

    def _carve(self, seg: _Segment, off: int, size: int, alloc: Allocation) -> None:
        i = bisect.bisect_left(seg.free, (off, -1))
        start, length = seg.free[i]
        assert start == off and length >= size
        if length == size:
            del seg.free[i]
        else:
            seg.free[i] = (off + size, length - size)
        extent = Extent(seg.id, off, size)
        alloc.extents.append(extent)
        seg.live_bytes += size
        self._idle.pop(seg.id, None)
        if off < seg.used_to:     # handed out before: an earlier object's bytes may be there
            alloc.zero.append(Extent(seg.id, off, min(size, seg.used_to - off)))
        seg.used_to = max(seg.used_to, off + size)

    def _insert_free(self, seg: _Segment, off: int, length: int) -> None:
        i = bisect.bisect_left(seg.free, (off, -1))
        assert i == len(seg.free) or seg.free[i][0] >= off + length, "double free"
        assert i == 0 or sum(seg.free[i - 1]) <= off, "double free"
        if i < len(seg.free) and seg.free[i][0] == off + length:
            length += seg.free[i][1]
            del seg.free[i]
        if i > 0 and sum(seg.free[i - 1]) == off:
            off, length = seg.free[i - 1][0], seg.free[i - 1][1] + length
            del seg.free[i - 1]
            i -= 1
        seg.free.insert(i, (off, length))

    def _mature(self, now_s: float) -> None:
        while self._resting and self._resting[0][0] <= now_s:
            _, owner, e = self._resting.popleft()
            seg = self._segments.get(e.segment)
            if seg is not None and seg.owner == owner and seg.state != RETIRING:
                seg.resting_bytes -= e.length
                self._insert_free(seg, e.offset, e.length)

    def _retry_time(self, shortfall: int, now_s: float) -> float | None:
        """When enough memory may be free to cover `shortfall` (a hint): segments another
        thread is destroying now, then resting memory (another owner's rest helps only once
        it empties whole segments)."""
        got = sum(s.size for s in self._segments.values() if s.state == RETIRING and s.id not in self._retiring)
        if got >= shortfall:
            return now_s + RETIRE_WAIT_S
        for ready_at, _, e in self._resting:
            got += e.length
            if got >= shortfall:
                return ready_at
        return None

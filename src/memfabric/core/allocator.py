"""Segment lending and extent carving for one server's pool. Pure: no I/O, no clock.

A pool is a row of fixed-size segments. A segment is lent to one owner (a namespace
incarnation) at a time, because a same-host client maps whole segments: handing a
client the fd of a segment shared by two namespaces would expose one to the other.
Inside an owner's segments, objects get page-aligned extents from sorted free lists.

Freed extents rest in a quarantine for `grace_s` before reuse (see limits.REUSE_GRACE_S),
and every byte handed out again is listed in `Allocation.zero` for the caller to clear.
A segment whose fd a client holds is never lent to another owner until it lets go.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

from ..errors import InvalidArgument, OutOfMemory
from ..limits import MAX_EXTENTS_PER_OBJECT, PAGE_SIZE_BYTES, REUSE_GRACE_S


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
    extents: list[Extent]
    # Ranges the caller must zero before anyone sees the extents.
    zero: list[Extent] = field(default_factory=list)
    # Segments lent by this allocation: already clean (fresh, or zeroed whole above).
    clean_segments: set[int] = field(default_factory=set)


class _Segment:
    __slots__ = ("index", "owner", "free", "dirty", "holders", "resting_bytes")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.owner: Hashable | None = None
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, coalesced
        self.dirty = False          # ever lent: may hold an earlier owner's bytes
        self.holders: set[Hashable] = set()
        self.resting_bytes = 0      # quarantined bytes inside this segment

    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


class SegmentAllocator:
    def __init__(self, segment_count: int, segment_size_bytes: int,
                 page_size_bytes: int = PAGE_SIZE_BYTES, grace_s: float = REUSE_GRACE_S) -> None:
        if segment_count <= 0:
            raise InvalidArgument("a pool needs at least one segment")
        if segment_size_bytes <= 0 or segment_size_bytes % page_size_bytes:
            raise InvalidArgument(f"segment size must be a positive multiple of {page_size_bytes}")
        self.segment_size_bytes = segment_size_bytes
        self.page_size_bytes = page_size_bytes
        self.grace_s = grace_s
        self._segments = [_Segment(i, segment_size_bytes) for i in range(segment_count)]
        # Each owner's segments by index: an allocation looks at its own segments without
        # walking the whole pool (16,384 segments in a 64 GiB pool) under the server's lock.
        self._owned: dict[Hashable, dict[int, _Segment]] = {}
        self._resting: deque[tuple[float, Hashable, Extent]] = deque()
        self._live_bytes_by_owner: dict[Hashable, int] = {}

    # ---- what the pool looks like -------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return len(self._segments) * self.segment_size_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def live_bytes(self, owner: Hashable | None = None) -> int:
        if owner is None:
            return sum(self._live_bytes_by_owner.values())
        return self._live_bytes_by_owner.get(owner, 0)

    def resting_bytes(self) -> int:
        return sum(e.length for _, _, e in self._resting)

    def free_bytes(self) -> int:
        """Bytes not live and not resting: what an allocation could get after the grace."""
        return self.capacity_bytes - self.live_bytes() - self.resting_bytes()

    def available_bytes(self) -> int:
        """What a new namespace may count on: free now or after the reuse grace, less empty
        segments a client still maps (they cannot change hands until it lets go)."""
        size = self.segment_size_bytes
        stuck = sum(size for s in self._segments
                    if s.holders and (s.owner is None or s.free_bytes() + s.resting_bytes == size))
        return self.capacity_bytes - self.live_bytes() - stuck

    def segments_to_give_back(self, owner: Hashable) -> list[int]:
        """Idle segments clients of `owner` should let go of: all of them once the owner has
        nothing live here, or when no segment is left to lend to anyone else. While the owner
        still has objects here it keeps them: its next allocations reuse them at no cost,
        where giving back and fetching again would cost every alloc/free cycle two round trips."""
        if self.live_bytes(owner) and any(self._lendable_to(s, object()) for s in self._segments):
            return []
        return self.idle_segments(owner)

    def idle_segments(self, owner: Hashable) -> list[int]:
        """The owner's segments that hold no live object (free or resting only)."""
        size = self.segment_size_bytes
        return [s.index for s in self._own(owner) if s.free_bytes() + s.resting_bytes == size]

    def owner_of(self, segment: int) -> Hashable | None:
        return self._segments[segment].owner

    def segments_of(self, owner: Hashable) -> list[int]:
        return [s.index for s in self._own(owner)]

    # ---- holders: clients that were handed a segment's fd -------------------------

    def hold(self, segment: int, holder: Hashable) -> None:
        self._segments[segment].holders.add(holder)

    def let_go(self, holder: Hashable, segments: list[int] | None = None) -> None:
        targets = self._segments if segments is None else [self._segments[i] for i in segments]
        for seg in targets:
            seg.holders.discard(holder)

    # ---- allocate / release ---------------------------------------------------------

    def allocate(self, owner: Hashable, size_bytes: int, now_s: float) -> Allocation:
        if owner is None:
            raise InvalidArgument("an allocation needs an owner")
        if size_bytes <= 0:
            raise InvalidArgument(f"size must be positive, got {size_bytes}")
        need = round_up(size_bytes, self.page_size_bytes)
        self._mature(now_s)
        own = self._own(owner)
        if need < self.segment_size_bytes:
            # The common case, a small object that fits in the owner's segments: no need to
            # look at the rest of the pool.
            fit = self._best_fit(own, need)
            if fit is not None:
                alloc = Allocation(extents=[])
                self._carve(fit[0], fit[1], need, alloc)
                self._live_bytes_by_owner[owner] = self._live_bytes_by_owner.get(owner, 0) + need
                return alloc
        lendable = [s for s in self._segments if self._lendable_to(s, owner)]
        available = sum(s.free_bytes() for s in own) + len(lendable) * self.segment_size_bytes
        if available < need:
            raise OutOfMemory(
                f"pool has {available} bytes free for this namespace, {need} asked",
                retry_at_s=self._retry_time(owner, need - available))

        alloc = Allocation(extents=[])
        remaining = need
        seg_size = self.segment_size_bytes
        # Whole segments first for large objects: one extent per segment, no fragmentation.
        while remaining >= seg_size:
            seg = next((s for s in own if s.free == [(0, seg_size)]), None)
            if seg is None and lendable:
                seg = self._lend(lendable.pop(), owner, alloc)
                own.append(seg)
            if seg is None:
                break
            self._carve(seg, 0, seg_size, alloc)
            remaining -= seg_size
        if remaining:
            fit = self._best_fit(own, remaining)
            if fit is None and lendable:
                seg = self._lend(lendable.pop(), owner, alloc)
                own.append(seg)
                fit = (seg, 0)
            if fit is not None:
                self._carve(fit[0], fit[1], remaining, alloc)
                remaining = 0
        # Last resort: fragments of the owner's segments, largest first.
        while remaining:
            seg, off, length = max(((s, o, n) for s in own for o, n in s.free), key=lambda t: t[2])
            take = min(length, remaining)
            self._carve(seg, off, take, alloc)
            remaining -= take
        if len(alloc.extents) > MAX_EXTENTS_PER_OBJECT:
            self._give_back(owner, alloc.extents)
            raise OutOfMemory(f"free memory is too fragmented: {len(alloc.extents)} extents needed, "
                              f"at most {MAX_EXTENTS_PER_OBJECT} allowed")
        self._live_bytes_by_owner[owner] = self._live_bytes_by_owner.get(owner, 0) + need
        assert sum(e.length for e in alloc.extents) == need
        return alloc

    def restore(self, owner: Hashable, extents: list[Extent]) -> None:
        """Take back extents that were live before a restart (from the server's journal)."""
        for e in extents:
            if not 0 <= e.segment < len(self._segments) or e.offset < 0 or e.end > self.segment_size_bytes:
                raise InvalidArgument(f"extent {e} lies outside this pool (was its capacity or segment "
                                      "size changed?)")
            seg = self._segments[e.segment]
            if seg.owner not in (None, owner):
                raise InvalidArgument(f"extent {e} of {owner!r} lies in a segment of {seg.owner!r}")
            self._set_owner(seg, owner)
            seg.dirty = True
            i = next((i for i, (off, n) in enumerate(seg.free) if off <= e.offset and e.end <= off + n), None)
            if i is None:
                raise InvalidArgument(f"extent {e} overlaps another restored extent")
            off, n = seg.free.pop(i)
            rest = [(off, e.offset - off), (e.end, off + n - e.end)]
            for piece in reversed([r for r in rest if r[1]]):
                seg.free.insert(i, piece)
            self._live_bytes_by_owner[owner] = self._live_bytes_by_owner.get(owner, 0) + e.length

    def mark_all_dirty(self) -> None:
        """After a restart on persistent media every segment may hold old bytes."""
        for seg in self._segments:
            seg.dirty = True

    def release(self, owner: Hashable, extents: list[Extent], now_s: float) -> None:
        """Extents of a freed object go to rest; reusable after the grace."""
        total = 0
        for e in extents:
            seg = self._segments[e.segment]
            assert seg.owner == owner, f"extent {e} released by {owner!r}, owned by {seg.owner!r}"
            seg.resting_bytes += e.length
            self._resting.append((now_s + self.grace_s, owner, e))
            total += e.length
        self._live_bytes_by_owner[owner] -= total
        assert self._live_bytes_by_owner[owner] >= 0

    def drop_owner(self, owner: Hashable) -> list[int]:
        """Take back every segment of `owner` (its namespace is gone). Returns those segments."""
        dropped = []
        for seg in self._own(owner):
            self._set_owner(seg, None)
            seg.free = [(0, self.segment_size_bytes)]
            seg.resting_bytes = 0
            dropped.append(seg.index)
        self._resting = deque(r for r in self._resting if r[1] != owner)
        self._live_bytes_by_owner.pop(owner, None)
        return dropped

    # ---- internals -------------------------------------------------------------------

    def _lendable_to(self, seg: _Segment, owner: Hashable) -> bool:
        if seg.holders:
            return False            # some client still maps it for its old owner
        if seg.owner is None:
            return True
        # An empty segment of another owner can be taken back.
        return (seg.owner != owner and seg.resting_bytes == 0
                and seg.free == [(0, self.segment_size_bytes)])

    def _lend(self, seg: _Segment, owner: Hashable, alloc: Allocation) -> _Segment:
        if seg.dirty:
            alloc.zero.append(Extent(seg.index, 0, self.segment_size_bytes))
        alloc.clean_segments.add(seg.index)
        self._set_owner(seg, owner)
        seg.dirty = True
        return seg

    def _own(self, owner: Hashable) -> list[_Segment]:
        """The owner's segments in pool order, as a walk of the whole pool would give them."""
        mine = self._owned.get(owner)
        return [mine[i] for i in sorted(mine)] if mine else []

    def _set_owner(self, seg: _Segment, owner: Hashable | None) -> None:
        if seg.owner == owner:
            return
        if seg.owner is not None:
            previous = self._owned[seg.owner]
            del previous[seg.index]
            if not previous:
                del self._owned[seg.owner]
        seg.owner = owner
        if owner is not None:
            self._owned.setdefault(owner, {})[seg.index] = seg

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
        extent = Extent(seg.index, off, size)
        alloc.extents.append(extent)
        if seg.index not in alloc.clean_segments:
            alloc.zero.append(extent)

    def _give_back(self, owner: Hashable, extents: list[Extent]) -> None:
        for e in extents:
            self._insert_free(self._segments[e.segment], e.offset, e.length)

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
            seg = self._segments[e.segment]
            if seg.owner == owner:
                seg.resting_bytes -= e.length
                self._insert_free(seg, e.offset, e.length)

    def _retry_time(self, owner: Hashable, shortfall: int) -> float | None:
        """When enough resting memory may be free to cover `shortfall` (a hint: another
        owner's rest helps only if it empties whole segments)."""
        got = 0
        for ready_at, _, e in self._resting:
            got += e.length
            if got >= shortfall:
                return ready_at
        return None

"""Property tests for memfabric.core.allocator.SegmentAllocator.

The stateful machine keeps its own model of the pool (live allocations, resting
extents, bytes ever written, holders) and checks the allocator against it after
every step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from memfabric import errors
from memfabric.core.allocator import Allocation, Extent, SegmentAllocator, round_up

PAGE = 4096
GRACE = 1.0
OWNERS = ("A", "B", "C")
HOLDERS = ("h1", "h2")
# Multiples of 1/4: exact in binary floating point, so clock sums are exact.
TICKS = (0.0, 0.25, 0.5)


def pages_of(extent: Extent) -> set[tuple[int, int]]:
    """(segment, page index) of every page an extent covers."""
    return {(extent.segment, p) for p in range(extent.offset // PAGE, extent.end // PAGE)}


def pages_of_all(extents: list[Extent]) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for e in extents:
        out |= pages_of(e)
    return out


# ---------------------------------------------------------------------------------------
# Stateful model
# ---------------------------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a: SegmentAllocator | None = None

    @initialize(segment_count=st.integers(1, 5), pages_per_segment=st.integers(1, 6),
                initial=st.lists(st.tuples(st.sampled_from(OWNERS), st.integers(1, 8 * PAGE)),
                                 max_size=4))
    def setup(self, segment_count: int, pages_per_segment: int,
              initial: list[tuple[str, int]]) -> None:
        self.seg_size = pages_per_segment * PAGE
        self.seg_count = segment_count
        self.a = SegmentAllocator(segment_count, self.seg_size, PAGE, GRACE)
        self.now = 0.0
        self.live: dict[int, tuple[str, int, Allocation]] = {}   # key -> (owner, size, alloc)
        self.next_key = 0
        self.written: set[tuple[int, int]] = set()      # pages any allocation ever covered
        self.holders: dict[int, set[str]] = {}          # segment -> holders (model)
        self.held_owner: dict[int, str | None] = {}     # owner seen while continuously held
        self.resting: list[tuple[float, str, Extent]] = []  # released, not yet matured
        # A few allocations up front, so that every rule has something to act on even
        # in runs where the generator leaves `allocate` out.
        for owner, size in initial:
            self._do_allocate(owner, size)

    # ---- helpers -----------------------------------------------------------------

    def _held(self, segment: int) -> bool:
        return bool(self.holders.get(segment))

    def _model_live_bytes(self, owner: str | None = None) -> int:
        return sum(round_up(size, PAGE) for o, size, _ in self.live.values()
                   if owner is None or o == owner)

    def _do_allocate(self, owner: str, size: int) -> Allocation | None:
        a = self.a
        need = round_up(size, PAGE)
        live_before = a.live_bytes()
        owner_live_before = a.live_bytes(owner)
        owners_before = [a.owner_of(s) for s in range(self.seg_count)]
        # The allocator matures rest by the clock on every allocate call.
        young = [r for r in self.resting if r[0] > self.now]
        self.resting = young
        # What the pool can give this owner, by the model: free bytes of its own segments,
        # plus every unheld segment that is unowned or is another owner's and empty.
        used = {s: 0 for s in range(self.seg_count)}
        for _, _, al in self.live.values():
            for e in al.extents:
                used[e.segment] += e.length
        for _, _, e in young:
            used[e.segment] += e.length
        available = 0
        for s in range(self.seg_count):
            if owners_before[s] == owner:
                available += self.seg_size - used[s]
            elif not self._held(s) and (owners_before[s] is None or used[s] == 0):
                available += self.seg_size
        try:
            alloc = a.allocate(owner, size, self.now)
        except errors.OutOfMemory as exc:
            assert available < need, (
                f"OutOfMemory for {need} bytes with {available} bytes available to {owner!r}")
            # Never a partial allocation.
            assert a.live_bytes() == live_before
            assert a.live_bytes(owner) == owner_live_before
            assert [a.owner_of(s) for s in range(self.seg_count)] == owners_before
            if exc.retry_at_s is not None:
                assert exc.retry_at_s > self.now, "retry hint must lie in the future"
            return None

        assert available >= need, f"{need} bytes allocated, model says {available} available"
        extents = alloc.extents
        assert sum(e.length for e in extents) == need
        assert a.live_bytes() == live_before + need
        assert a.live_bytes(owner) == owner_live_before + need
        for e in extents:
            assert 0 <= e.segment < self.seg_count
            assert e.length > 0
            assert e.offset % PAGE == 0 and e.length % PAGE == 0
            assert 0 <= e.offset and e.end <= self.seg_size
            assert a.owner_of(e.segment) == owner
        new_pages = pages_of_all(extents)
        assert len(new_pages) * PAGE == need, "extents of one allocation overlap each other"

        # No overlap with any other live allocation.
        for _, _, other in self.live.values():
            assert not (new_pages & pages_of_all(other.extents)), "extent handed out twice"

        # Memory freed less than the grace ago is not reused.
        for ready_at, _, e in young:
            assert not (new_pages & pages_of(e)), (
                f"extent {e} reused before its grace ended at {ready_at} (now {self.now})")

        # Reused (ever-written) bytes are all listed for zeroing.
        zero_pages: set[tuple[int, int]] = set()
        for z in alloc.zero:
            assert 0 <= z.segment < self.seg_count
            assert 0 <= z.offset and z.end <= self.seg_size and z.length > 0
            assert a.owner_of(z.segment) == owner, "zeroing a segment of another owner"
            zero_pages |= pages_of(z)
        dirty = new_pages & self.written
        assert dirty <= zero_pages, f"reused pages not zeroed: {sorted(dirty - zero_pages)}"
        # Zeroing must never clobber another live object.
        for _, _, other in self.live.values():
            assert not (zero_pages & pages_of_all(other.extents)), "zero range hits a live object"

        self.written |= new_pages
        self.live[self.next_key] = (owner, size, alloc)
        self.next_key += 1
        return alloc

    # ---- rules -------------------------------------------------------------------

    @rule(owner=st.sampled_from(OWNERS), dt=st.sampled_from(TICKS), data=st.data())
    def allocate(self, owner: str, dt: float, data: st.DataObject) -> None:
        self.now += dt
        size = data.draw(st.one_of(st.integers(1, 2 * PAGE),
                                   st.integers(1, 3 * self.seg_size)), label="size")
        self._do_allocate(owner, size)

    @precondition(lambda self: bool(self.live))
    @rule(dt=st.sampled_from(TICKS), data=st.data())
    def release(self, dt: float, data: st.DataObject) -> None:
        self.now += dt
        key = data.draw(st.sampled_from(sorted(self.live)), label="allocation")
        owner, size, alloc = self.live.pop(key)
        before = self.a.live_bytes(owner)
        self.a.release(owner, alloc.extents, self.now)
        assert self.a.live_bytes(owner) == before - round_up(size, PAGE)
        for e in alloc.extents:
            self.resting.append((self.now + GRACE, owner, e))

    @rule()
    def advance_past_grace(self) -> None:
        self.now += GRACE + 0.25

    @rule(owner=st.sampled_from(OWNERS))
    def drop_owner(self, owner: str) -> None:
        expected = [s for s in range(self.seg_count) if self.a.owner_of(s) == owner]
        assert self.a.segments_of(owner) == expected
        dropped = self.a.drop_owner(owner)
        assert sorted(dropped) == expected
        for s in expected:
            assert self.a.owner_of(s) is None
        self.live = {k: v for k, v in self.live.items() if v[0] != owner}
        self.resting = [r for r in self.resting if r[1] != owner]
        assert self.a.live_bytes(owner) == 0

    @rule(holder=st.sampled_from(HOLDERS), data=st.data())
    def hold(self, holder: str, data: st.DataObject) -> None:
        seg = data.draw(st.integers(0, self.seg_count - 1), label="segment")
        if not self._held(seg):
            self.held_owner[seg] = self.a.owner_of(seg)
        self.a.hold(seg, holder)
        self.holders.setdefault(seg, set()).add(holder)

    @rule(holder=st.sampled_from(HOLDERS), everything=st.booleans(), data=st.data())
    def let_go(self, holder: str, everything: bool, data: st.DataObject) -> None:
        if everything:
            segs = list(range(self.seg_count))
            self.a.let_go(holder)
        else:
            segs = data.draw(st.lists(st.integers(0, self.seg_count - 1), max_size=3,
                                      unique=True), label="segments")
            self.a.let_go(holder, segs)
        for s in segs:
            self.holders.get(s, set()).discard(holder)
            if not self._held(s):
                self.held_owner.pop(s, None)

    @rule(owner=st.sampled_from(OWNERS))
    def drain_and_fill(self, owner: str) -> None:
        """Everyone lets go, everything is released, the grace passes: the whole pool
        must then be allocatable to one owner (nothing leaked)."""
        for h in HOLDERS:
            self.a.let_go(h)
        self.holders.clear()
        self.held_owner.clear()
        for key in sorted(self.live):
            o, _, alloc = self.live.pop(key)
            self.a.release(o, alloc.extents, self.now)
            for e in alloc.extents:
                self.resting.append((self.now + GRACE, o, e))
        assert self.a.live_bytes() == 0
        self.now += GRACE + 0.25
        alloc = self._do_allocate(owner, self.a.capacity_bytes)
        assert alloc is not None, "full-capacity allocation failed after a full drain: leak"
        assert self.a.segments_of(owner) == list(range(self.seg_count))

    # ---- invariants --------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        if self.a is None:
            return
        a = self.a
        assert a.live_bytes() == self._model_live_bytes()
        for o in OWNERS:
            assert a.live_bytes(o) == self._model_live_bytes(o)
        assert a.resting_bytes() == sum(e.length for _, _, e in self.resting)
        assert a.live_bytes() + a.resting_bytes() <= a.capacity_bytes
        assert a.free_bytes() >= 0
        assert a.live_bytes() + a.resting_bytes() + a.free_bytes() == a.capacity_bytes
        assert a.capacity_bytes == self.seg_count * self.seg_size
        for o in OWNERS:     # the allocator's index of owners agrees with the segments
            assert a.segments_of(o) == [s for s in range(self.seg_count) if a.owner_of(s) == o]

    @invariant()
    def live_extents_disjoint_aligned_and_owned(self) -> None:
        if self.a is None:
            return
        seen: set[tuple[int, int]] = set()
        for owner, size, alloc in self.live.values():
            assert sum(e.length for e in alloc.extents) == round_up(size, PAGE)
            for e in alloc.extents:
                assert e.offset % PAGE == 0 and e.length % PAGE == 0
                assert 0 <= e.offset and e.end <= self.seg_size
                assert self.a.owner_of(e.segment) == owner
                p = pages_of(e)
                assert not (p & seen), f"live extents overlap at {sorted(p & seen)}"
                seen |= p

    @invariant()
    def held_segment_never_changes_hands(self) -> None:
        if self.a is None:
            return
        for seg in range(self.seg_count):
            if not self._held(seg):
                continue
            cur = self.a.owner_of(seg)
            was = self.held_owner[seg]
            # While held it may only be taken back (drop_owner), never given to another owner.
            assert cur is None or cur == was, (
                f"segment {seg} held by {self.holders[seg]} moved from {was!r} to {cur!r}")
            self.held_owner[seg] = cur


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase


# ---------------------------------------------------------------------------------------
# Plain tests
# ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(segment_count=st.integers(1, 4), pages_per_segment=st.integers(1, 4),
       early=st.sampled_from([0.0, 0.25, 0.5, 0.75]), other_owner=st.booleans())
def test_released_memory_rests_for_the_grace(segment_count, pages_per_segment, early, other_owner):
    seg_size = pages_per_segment * PAGE
    a = SegmentAllocator(segment_count, seg_size, PAGE, GRACE)
    cap = a.capacity_bytes
    first = a.allocate("A", cap, now_s=10.0)
    a.release("A", first.extents, now_s=10.0)
    assert a.resting_bytes() == cap and a.live_bytes() == 0
    asker = "B" if other_owner else "A"

    with pytest.raises(errors.OutOfMemory) as info:
        a.allocate(asker, cap, now_s=10.0 + early)
    assert info.value.retry_at_s is not None
    assert 10.0 + early < info.value.retry_at_s <= 10.0 + GRACE
    assert a.live_bytes() == 0 and a.resting_bytes() == cap

    # Once the hinted time comes, it fits.
    second = a.allocate(asker, cap, now_s=info.value.retry_at_s)
    assert sum(e.length for e in second.extents) == cap
    assert a.resting_bytes() == 0
    # Everything was written by "A" before: all of it must be zeroed.
    zero = pages_of_all(second.zero)
    assert pages_of_all(second.extents) <= zero


def test_partial_release_not_reused_before_grace_then_reused():
    a = SegmentAllocator(1, 4 * PAGE, PAGE, GRACE)
    x = a.allocate("A", 2 * PAGE, now_s=0.0)
    y = a.allocate("A", 2 * PAGE, now_s=0.0)
    a.release("A", x.extents, now_s=1.0)
    with pytest.raises(errors.OutOfMemory) as info:
        a.allocate("A", PAGE, now_s=1.5)
    assert info.value.retry_at_s == pytest.approx(2.0)
    z = a.allocate("A", 2 * PAGE, now_s=2.5)
    assert pages_of_all(z.extents) == pages_of_all(x.extents)
    assert pages_of_all(z.zero) >= pages_of_all(z.extents)
    assert not (pages_of_all(z.extents) & pages_of_all(y.extents))


def test_out_of_memory_without_resting_memory_has_no_retry_hint():
    a = SegmentAllocator(2, 2 * PAGE, PAGE, GRACE)
    a.allocate("A", 4 * PAGE, now_s=0.0)
    with pytest.raises(errors.OutOfMemory) as info:
        a.allocate("A", 1, now_s=0.0)
    assert info.value.retry_at_s is None
    assert a.live_bytes() == 4 * PAGE


def test_held_segment_is_not_lent_to_another_owner_until_let_go():
    a = SegmentAllocator(2, 2 * PAGE, PAGE, GRACE)
    x = a.allocate("A", 2 * PAGE, now_s=0.0)
    (seg,) = {e.segment for e in x.extents}
    a.hold(seg, "client-of-A")
    a.release("A", x.extents, now_s=0.0)
    # Past the grace the segment is empty, but a client of A still maps it.
    with pytest.raises(errors.OutOfMemory):
        a.allocate("B", 4 * PAGE, now_s=5.0)
    y = a.allocate("B", 2 * PAGE, now_s=5.0)
    assert {e.segment for e in y.extents} == {1 - seg}
    assert a.owner_of(seg) == "A"
    # A can still use its own held segment.
    z = a.allocate("A", 2 * PAGE, now_s=5.0)
    assert {e.segment for e in z.extents} == {seg}
    a.release("A", z.extents, now_s=5.0)
    a.let_go("client-of-A")
    w = a.allocate("B", 2 * PAGE, now_s=10.0)
    assert {e.segment for e in w.extents} == {seg}
    assert a.owner_of(seg) == "B"
    # Previously lent to A: B gets it zeroed whole.
    assert Extent(seg, 0, 2 * PAGE) in w.zero


def test_dropped_owner_segment_held_is_not_relent():
    a = SegmentAllocator(1, PAGE, PAGE, GRACE)
    x = a.allocate("A", PAGE, now_s=0.0)
    a.hold(x.extents[0].segment, "h")
    assert a.drop_owner("A") == [0]
    with pytest.raises(errors.OutOfMemory):
        a.allocate("B", PAGE, now_s=10.0)
    a.let_go("h", [0])
    y = a.allocate("B", PAGE, now_s=10.0)
    assert pages_of_all(y.zero) >= pages_of_all(y.extents)


def test_fresh_pool_needs_no_zeroing():
    a = SegmentAllocator(3, 2 * PAGE, PAGE, GRACE)
    alloc = a.allocate("A", 5 * PAGE, now_s=0.0)
    assert alloc.zero == []
    assert len(alloc.clean_segments) == 3


@pytest.mark.parametrize("owner,size", [(None, 1), ("A", 0), ("A", -5)])
def test_allocate_rejects_bad_arguments(owner, size):
    a = SegmentAllocator(1, PAGE, PAGE, GRACE)
    with pytest.raises(errors.InvalidArgument):
        a.allocate(owner, size, now_s=0.0)
    assert a.live_bytes() == 0


@pytest.mark.parametrize("count,size", [(0, PAGE), (-1, PAGE), (1, 0), (1, PAGE + 1), (1, -PAGE)])
def test_constructor_rejects_bad_geometry(count, size):
    with pytest.raises(errors.InvalidArgument):
        SegmentAllocator(count, size, PAGE, GRACE)

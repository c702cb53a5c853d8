"""Property tests for memfabric.core.allocator.SegmentAllocator.

The stateful machine drives the allocator as the server does (allocate, then make the new
segments' memory or abandon; release; drop owners; destroy what is retired; spares; holds
by transfers) and checks it against a model of every segment ever made after each step.
The isolation property above all: a segment belongs to one owner for its whole life, and a
retired segment's id never comes back.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memfabric import errors
from memfabric.core.allocator import Extent, SegmentAllocator, round_up

PAGE = 4096
GRACE = 1.0
OWNERS = ("A", "B", "C")
TICKS = (0.0, 0.25, 0.5)     # multiples of 1/4: clock sums stay exact


def pages(e: Extent) -> set[tuple[int, int]]:
    return {(e.segment, p) for p in range(e.offset // PAGE, e.end // PAGE)}


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(top_pages=st.integers(1, 4), min_pages=st.integers(1, 4), segments=st.integers(1, 6),
                first_id=st.integers(1, 10**12))
    def setup(self, top_pages: int, min_pages: int, segments: int, first_id: int) -> None:
        self.top = top_pages * PAGE
        self.capacity = segments * self.top + PAGE * (first_id % 3)   # not always a multiple
        self.a = SegmentAllocator(self.capacity, self.top, min_pages * PAGE, first_id=first_id,
                                  page_size_bytes=PAGE, grace_s=GRACE)
        self.now = 0.0
        self.owner_of: dict[int, str | None] = {}     # every segment ever seen -> its one owner
        self.size_of: dict[int, int] = {}
        self.destroyed: set[int] = set()              # retired: must never appear again
        self.to_destroy: list[int] = []               # taken for destruction, not yet retired
        self.live: list[tuple[str, list[Extent]]] = []
        self.written: set[tuple[int, int]] = set()    # pages ever handed out
        self.holds: dict[int, int] = {}
        self.dropped: set[str] = set()

    # ---- helpers ----------------------------------------------------------------------

    def _see_segment(self, segment: int, owner: str | None, size: int | None = None) -> None:
        assert segment not in self.destroyed, f"segment {segment} came back after it was retired"
        known = self.owner_of.get(segment, "unseen")
        if known == "unseen" or known is None:
            self.owner_of[segment] = owner
        else:
            assert known == owner or owner is None, f"segment {segment} of {known!r} given to {owner!r}"
        if size is not None:
            self.size_of[segment] = size

    def _live_bytes(self, owner: str | None = None) -> int:
        return sum(e.length for o, ext in self.live for e in ext if owner is None or o == owner)

    # ---- rules ------------------------------------------------------------------------

    @rule(owner=st.sampled_from(OWNERS), pages_=st.integers(1, 12), fail=st.booleans(),
          dt=st.sampled_from(TICKS))
    def allocate(self, owner: str, pages_: int, fail: bool, dt: float) -> None:
        self.now += dt
        size = pages_ * PAGE - (PAGE // 2 if pages_ > 1 else 0)
        committed_before, live_before = self.a.committed_bytes(), self.a.live_bytes()
        try:
            alloc = self.a.allocate(owner, size, self.now)
        except errors.OutOfMemory as exc:
            assert self.a.live_bytes() == live_before and self.a.committed_bytes() == committed_before
            if exc.retry_at_s is not None:
                assert exc.retry_at_s > self.now
            return
        assert sum(e.length for e in alloc.extents) == round_up(size, PAGE)
        for segment_id, seg_size in alloc.make:
            assert segment_id not in self.owner_of, f"new segment {segment_id} was seen before"
            assert 0 < seg_size <= self.top and seg_size % PAGE == 0
            self._see_segment(segment_id, owner, seg_size)
        for segment_id in alloc.retire:
            assert self.owner_of.get(segment_id) != owner or segment_id in self.to_destroy \
                or owner in self.dropped, "an allocation took back its own owner's segment"
            assert not any(e.segment == segment_id for _, ext in self.live for e in ext), \
                f"segment {segment_id} retired with live extents"
            assert not self.holds.get(segment_id), "a held segment was retired"
            self.destroyed.add(segment_id)
        zero = set().union(*(pages(z) for z in alloc.zero)) if alloc.zero else set()
        for e in alloc.extents:
            assert e.offset % PAGE == 0 and e.length % PAGE == 0 and e.length > 0
            self._see_segment(e.segment, owner)
            assert e.end <= self.size_of.get(e.segment, self.top)
            # Every page handed out before must be zeroed again.
            assert pages(e) & self.written <= zero, f"{e} reuses written pages without zeroing"
        if fail:     # the memory for new segments could not be made: all of it goes back
            self.a.abandon(owner, alloc)
            assert self.a.live_bytes() == live_before
            for segment_id, _ in alloc.make:
                self.destroyed.add(segment_id)
            return
        self.a.made(alloc)
        self.live.append((owner, alloc.extents))
        for e in alloc.extents:
            self.written |= pages(e)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), dt=st.sampled_from(TICKS))
    def release(self, data: st.DataObject, dt: float) -> None:
        self.now += dt
        owner, extents = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.a.release(owner, extents, self.now)

    @rule(owner=st.sampled_from(OWNERS))
    def drop_owner(self, owner: str) -> None:
        dropped = self.a.drop_owner(owner)
        for segment_id in dropped:
            assert self.owner_of.get(segment_id) == owner
        self.live = [(o, ext) for o, ext in self.live if o != owner]
        assert self.a.live_bytes(owner) == 0
        # The name comes back as a new incarnation in the server; here a new owner key.
        self.dropped.add(owner)

    @rule()
    def destroy_retiring(self) -> None:
        taken = self.a.take_retiring()
        for segment_id in taken:
            assert not self.holds.get(segment_id), "a held segment was taken for destruction"
            self.destroyed.add(segment_id)
        self.a.retired(taken)

    @rule(top=st.integers(0, 2), small=st.integers(0, 3), fail=st.booleans())
    def spares(self, top: int, small: int, fail: bool) -> None:
        planned = self.a.plan_spares({self.top: top, self.a.min_segment_bytes: small})
        for segment_id, size in planned:
            assert segment_id not in self.owner_of
            self._see_segment(segment_id, None, size)
        ids = [segment_id for segment_id, _ in planned]
        if fail:
            self.a.spares_failed(ids)
            self.destroyed.update(ids)
        else:
            self.a.spares_made(ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        _, extents = data.draw(st.sampled_from(self.live))
        segment = extents[0].segment
        self.a.hold(segment)
        self.holds[segment] = self.holds.get(segment, 0) + 1

    @precondition(lambda self: any(self.holds.values()))
    @rule(data=st.data())
    def let_go(self, data: st.DataObject) -> None:
        segment = data.draw(st.sampled_from(sorted(s for s, n in self.holds.items() if n)))
        self.a.let_go(segment)
        self.holds[segment] -= 1

    @rule()
    def advance_past_grace(self) -> None:
        self.now += GRACE

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def budget_is_never_exceeded(self) -> None:
        assert 0 <= self.a.committed_bytes() <= self.capacity
        assert self.a.live_bytes() == self._live_bytes()
        for owner in OWNERS:
            assert self.a.live_bytes(owner) == self._live_bytes(owner)
        figures = self.a.figures()
        assert figures["used_bytes"] + figures["free_bytes"] == self.capacity
        assert 0 <= figures["lendable_bytes"] <= self.capacity - figures["used_bytes"]

    @invariant()
    def the_indexes_are_what_a_walk_of_the_pool_finds(self) -> None:
        a = self.a
        idle_total = 0
        for owner, rec in a._owners.items():
            mine = [seg for seg in a._segments.values() if seg.owner == owner and seg.state != "retiring"]
            assert set(rec.segments) == {seg.id for seg in mine}
            assert rec.held_bytes == sum(seg.size for seg in mine)
            ready = [seg for seg in mine if seg.state == "ready"]
            assert sorted(rec.free_ranges) == rec.free_ranges
            assert rec.free_ranges == sorted((n, seg.id, o) for seg in ready for o, n in seg.free)
            assert rec.room_bytes == sum(n for n, _, _ in rec.free_ranges)
            walked_idle = {seg.id for seg in ready if seg.holds == 0
                           and seg.free_bytes() + seg.resting_bytes == seg.size}
            assert set(rec.idle) == walked_idle
            idle_total += sum(seg.size for seg in rec.idle.values())
        assert a._idle_bytes == idle_total
        assert a._spare_bytes == sum(seg.size for spares in a._spares.values() for seg in spares)
        assert a._committed == sum(seg.size for seg in a._segments.values())

    @invariant()
    def live_extents_are_disjoint_and_owned(self) -> None:
        seen: set[tuple[int, int]] = set()
        for owner, extents in self.live:
            for e in extents:
                assert not pages(e) & seen, f"{e} overlaps another live extent"
                seen |= pages(e)
                assert self.a.owner_of(e.segment) == owner
                assert e.segment not in self.destroyed


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# ---- examples of the rules ----------------------------------------------------------------------


def test_a_namespace_grows_by_doubling_from_the_smallest_segment():
    a = SegmentAllocator(64 * PAGE, 16 * PAGE, 2 * PAGE, page_size_bytes=PAGE)
    sizes = []
    for _ in range(12):
        alloc = a.allocate("A", PAGE, 0.0)
        a.made(alloc)
        sizes += [size for _, size in alloc.make]
    assert sizes[:4] == [2 * PAGE, 2 * PAGE, 4 * PAGE, 8 * PAGE]
    assert a.committed_bytes() <= 2 * a.live_bytes() + 2 * PAGE


def test_many_small_namespaces_do_not_starve_the_pool():
    """With fixed segments, one page per namespace took a whole segment each: 16 namespaces
    of 4 KiB starved a 64 MiB pool. Here each holds its smallest segment only."""
    a = SegmentAllocator(64 << 20, 4 << 20, 64 << 10)
    for i in range(16):
        a.made(a.allocate(f"ns{i}", 4096, 0.0))
    big = a.allocate("newcomer", 60 << 20, 0.0)
    assert sum(e.length for e in big.extents) == 60 << 20


def test_an_owners_empty_segments_are_taken_back_for_another_owner():
    a = SegmentAllocator(4 * PAGE, 2 * PAGE, 2 * PAGE, page_size_bytes=PAGE, grace_s=GRACE)
    first = a.allocate("A", 4 * PAGE, 0.0)
    a.made(first)
    mine = {e.segment for e in first.extents}
    with pytest.raises(errors.OutOfMemory):
        a.allocate("B", PAGE, 0.0)
    a.release("A", first.extents, 0.0)
    # Resting bytes are nobody's: the emptied segments may be destroyed at once for B.
    second = a.allocate("B", 4 * PAGE, 0.0)
    assert set(second.retire) == mine
    assert not {e.segment for e in second.extents} & mine, "B got a segment that was A's"


def test_a_held_segment_is_neither_retired_nor_taken_back():
    a = SegmentAllocator(2 * PAGE, 2 * PAGE, 2 * PAGE, page_size_bytes=PAGE)
    first = a.allocate("A", 2 * PAGE, 0.0)
    a.made(first)
    segment = first.extents[0].segment
    a.hold(segment)
    a.release("A", first.extents, 0.0)
    with pytest.raises(errors.OutOfMemory):
        a.allocate("B", PAGE, 10.0)
    a.drop_owner("A")
    assert a.take_retiring() == []
    a.let_go(segment)
    assert a.take_retiring() == [segment]


def test_a_segment_dropped_while_being_made_is_retired_once_made():
    a = SegmentAllocator(2 * PAGE, 2 * PAGE, 2 * PAGE, page_size_bytes=PAGE)
    alloc = a.allocate("A", PAGE, 0.0)
    a.drop_owner("A")
    assert a.take_retiring() == [], "its memory does not exist yet: nothing to destroy"
    a.made(alloc)
    [(segment, _)] = alloc.make
    assert a.take_retiring() == [segment]


def test_spares_are_used_as_they_are_and_reclaimed_when_the_budget_is_short():
    a = SegmentAllocator(4 * PAGE, 2 * PAGE, PAGE, page_size_bytes=PAGE)
    planned = a.plan_spares({2 * PAGE: 1, PAGE: 2})
    a.spares_made([i for i, _ in planned])
    assert a.committed_bytes() == 4 * PAGE and a.spare_bytes() == 4 * PAGE
    alloc = a.allocate("A", PAGE, 0.0)             # a first segment: the small spare, no making
    assert alloc.make == [] and alloc.retire == []
    big = a.allocate("B", 3 * PAGE, 0.0)           # the top spare, and the other small one
    assert big.make == [] and sum(e.length for e in big.extents) == 3 * PAGE


def test_fresh_segments_need_no_zeroing_but_reused_bytes_do():
    a = SegmentAllocator(4 * PAGE, 4 * PAGE, 4 * PAGE, page_size_bytes=PAGE, grace_s=GRACE)
    first = a.allocate("A", PAGE, 0.0)
    a.made(first)
    assert first.zero == []
    a.release("A", first.extents, 0.0)
    again = a.allocate("A", 2 * PAGE, 5.0)
    assert again.zero and sum(z.length for z in again.zero) == PAGE


def test_restore_takes_back_extents_and_refuses_what_does_not_fit():
    a = SegmentAllocator(4 * PAGE, 2 * PAGE, PAGE, first_id=100, page_size_bytes=PAGE)
    a.restore("A", 7, 2 * PAGE, [Extent(7, 0, PAGE)])
    assert a.owner_of(7) == "A" and a.live_bytes("A") == PAGE
    with pytest.raises(errors.InvalidArgument):
        a.restore("B", 7, 2 * PAGE, [Extent(7, PAGE, PAGE)])     # another owner's segment
    with pytest.raises(errors.InvalidArgument):
        a.restore("A", 7, 2 * PAGE, [Extent(7, 0, PAGE)])        # overlaps
    # A segment made when segments could be larger keeps its size (nothing persisted is lost);
    # what the files hold beyond the capacity is reported, for the server to refuse to start.
    a.restore("A", 8, 8 * PAGE, [Extent(8, 0, PAGE)])
    assert a.over_capacity_bytes() == 6 * PAGE
    with pytest.raises(errors.InvalidArgument):
        a.restore("A", 9, PAGE + 1, [])                         # not whole pages
    alloc = a.allocate("A", PAGE, 0.0)
    assert all(e.segment in (7, 8) for e in alloc.extents) and alloc.zero, "restored bytes are zeroed on reuse"


@pytest.mark.parametrize("owner,size", [(None, PAGE), ("A", 0), ("A", -1), ("A", 1.5), ("A", "4096")])
def test_allocate_rejects_bad_arguments(owner, size):
    a = SegmentAllocator(4 * PAGE, 2 * PAGE, page_size_bytes=PAGE)
    with pytest.raises(errors.InvalidArgument):
        a.allocate(owner, size, 0.0)


@pytest.mark.parametrize("capacity,top,small,first", [(PAGE, 2 * PAGE, PAGE, 1), (4 * PAGE, PAGE + 1, PAGE, 1),
                                                      (4 * PAGE, 0, PAGE, 1), (4 * PAGE, PAGE, 3, 1),
                                                      (4 * PAGE, PAGE, PAGE, 0)])
def test_constructor_rejects_bad_geometry(capacity, top, small, first):
    with pytest.raises(errors.InvalidArgument):
        SegmentAllocator(capacity, top, small, first_id=first, page_size_bytes=PAGE)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_out_of_memory_only_when_the_pool_lacks_the_bytes(sizes):
    """One owner, no frees: allocations succeed exactly while their sum fits the capacity
    (fragmentation cannot waste more than the smallest segment's slack per allocation)."""
    a = SegmentAllocator(64 * PAGE, 8 * PAGE, PAGE, page_size_bytes=PAGE)
    used = 0
    for n in sizes:
        try:
            alloc = a.allocate("A", n * PAGE, 0.0)
        except errors.OutOfMemory:
            assert used + n * PAGE > 64 * PAGE
            continue
        a.made(alloc)
        used += n * PAGE
        assert used <= 64 * PAGE


@settings(max_examples=50, deadline=None)
@given(st.integers(8, 16), st.lists(st.integers(1, 3), min_size=1, max_size=8))
@example(9, [1, 2, 3])       # its last slot went to a 1-page segment, 3 pages beside it never lent
def test_few_segment_slots_still_hold_the_whole_capacity(slots, sizes):
    """A server's fds bound its segments (capacity.segment_slots): segments grow past the
    doubling rule when slots run short, so the whole capacity can still be lent."""
    a = SegmentAllocator(64 * PAGE, 8 * PAGE, PAGE, page_size_bytes=PAGE, max_segments=slots)
    owners = [f"o{i}" for i in range(len(sizes))]
    lent = 0
    for _ in range(200):
        progress = False
        for owner, pages in zip(owners, sizes):
            try:
                a.made(a.allocate(owner, pages * PAGE, 0.0))
                lent += pages * PAGE
                progress = True
            except errors.OutOfMemory:
                pass
        if not progress:
            break
    assert len(a._segments) <= slots
    assert lent > 64 * PAGE - 3 * PAGE * len(sizes), f"only {lent // PAGE} of 64 pages lent in {slots} segments"

"""Attacks on the segment allocator (segments as leases): each test shows a defect found in
review and fails on the code it was written against.
"""

from __future__ import annotations

import sys

import pytest

from memfabric import errors
from memfabric.core import allocator as allocator_module
from memfabric.core.allocator import SegmentAllocator

PAGE = 4096


def test_a_too_fragmented_allocation_takes_nothing():
    """An allocation refused as too fragmented (more than MAX_EXTENTS_PER_OBJECT extents) must
    leave the pool as it was. It took another owner's empty segment for its budget first
    (Allocation.retire), then abandoned: that segment is gone from the allocator (its budget
    counted free again) but no caller ever learns to destroy its memory, since the exception
    carries no Allocation. On a server: the memory and fds of that segment leak for good, the
    reserve holds less than the allocator believes (later makes wait RESERVE_WAIT_S, then fail),
    and the segment's former owner is never told it is gone."""
    top = 512 * PAGE
    segments_of_a = 17                   # 8,704 pages: half of them freed leaves 4,352 holes
    a = SegmentAllocator((segments_of_a + 1) * top, top, top, page_size_bytes=PAGE, grace_s=0.0)
    pieces = []
    for _ in range(segments_of_a * (top // PAGE)):
        alloc = a.allocate("A", PAGE, 0.0)
        a.made(alloc)
        pieces.append(alloc)
    for alloc in pieces[::2]:            # one-page holes everywhere in A's segments
        a.release("A", alloc.extents, 0.0)
    b = a.allocate("B", PAGE, 0.0)       # B's one segment, emptied: reclaimable for A
    a.made(b)
    a.release("B", b.extents, 0.0)
    b_segment = b.extents[0].segment
    before = (a.committed_bytes(), a.segments_of("B"), a.figures()["segments"])

    with pytest.raises(errors.OutOfMemory, match="fragmented"):
        # One new segment (B's budget) and 4,100 one-page holes: 4,101 extents.
        a.allocate("A", top + 4100 * PAGE, 1.0)

    after = (a.committed_bytes(), a.segments_of("B"), a.figures()["segments"])
    assert after == before, (f"a refused allocation changed the pool: (committed, B's segments, segments) "
                             f"{before} -> {after}; segment {b_segment} is now known to no one "
                             f"(owner {a.owner_of(b_segment)!r}, to destroy: {a.take_retiring()})")


def test_abandon_after_the_owner_was_dropped():
    """The server makes a new segment's memory outside its lock; if that fails it calls
    abandon(). A namespace destroyed meanwhile (drop_owner) makes abandon raise KeyError: on a
    server, an INTERNAL_ERROR instead of the OUT_OF_MEMORY (or NO_SUCH_NAMESPACE) it should be,
    after RESERVE_WAIT_S of waiting for the reserve, a window a destroy easily falls in."""
    a = SegmentAllocator(8 * 16 * PAGE, 16 * PAGE, 16 * PAGE, page_size_bytes=PAGE, grace_s=0.0)
    alloc = a.allocate("A", PAGE, 0.0)
    assert alloc.make, "the first allocation of an owner makes a segment"
    a.drop_owner("A")
    a.abandon("A", alloc)           # the make failed: give it all back
    assert a.committed_bytes() == 0 and a.live_bytes() == 0


def _lines_run(fn) -> int:
    """Lines of allocator.py executed while `fn` runs: a count of the work, not of the time."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != allocator_module.__file__:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def _owner_with_segments(n: int) -> SegmentAllocator:
    """An owner holding n top-size segments: n - 1 full, the last with room."""
    top = 16 * PAGE
    a = SegmentAllocator(n * top, top, top, page_size_bytes=PAGE, grace_s=0.0)
    for _ in range(n - 1):
        a.made(a.allocate("A", top, 0.0))
    a.made(a.allocate("A", PAGE, 0.0))
    return a


def test_a_small_allocation_does_not_walk_the_owners_segments():
    """The hot path: a 4 KiB alloc + free in a namespace that has room. allocate() builds and
    sorts the list of all the owner's segments (_own) and best-fits over every free range of
    every one of them, so its cost grows with the namespace's size: 57 lines executed with 4
    segments, 3,117 with 1,024 (a 4 GiB namespace of 4 MiB segments); 11.5 us against 204 us
    per alloc+free measured here, where the server's whole alloc+free costs ~77 us of CPU."""
    costs = {}
    for n in (4, 1024):
        a = _owner_with_segments(n)

        def alloc_and_free(a=a):
            alloc = a.allocate("A", PAGE, 1.0)
            a.release("A", alloc.extents, 1.0)

        costs[n] = _lines_run(alloc_and_free)
    assert costs[1024] < 3 * costs[4], (f"a 4 KiB alloc+free ran {costs[4]} lines of the allocator in a "
                                        f"namespace of 4 segments, {costs[1024]} in one of 1,024")


def test_a_new_segment_from_never_lent_budget_does_not_walk_the_pool():
    """An allocation that needs a new segment (every namespace's first, and each growth) sums
    the reclaimable segments of the whole pool (_reclaimable_bytes) before it looks at the
    budget never lent, and _take_budget builds that list again even when nothing is short.
    Under the server's lock: 1.3 ms with 1,024 segments in the pool, 13 ms with 8,192 (a
    32 GiB pool of 4 MiB segments) measured here, for a pool with room to spare. figures()
    (every heartbeat) and lendable_bytes() walk it the same way (0.7 ms and 5.6 ms)."""
    top = 16 * PAGE
    costs = {}
    for n in (16, 1024):
        a = SegmentAllocator((n + 64) * top, top, top, page_size_bytes=PAGE, grace_s=0.0)
        for i in range(n):
            a.made(a.allocate(f"o{i % 16}", top, 0.0))      # 16 namespaces, all full

        def first_alloc(a=a):
            a.made(a.allocate("newcomer", PAGE, 1.0))

        costs[n] = _lines_run(first_alloc)
    assert costs[1024] < 3 * costs[16], (f"a new namespace's first 4 KiB ran {costs[16]} lines of the allocator "
                                         f"in a pool of 16 segments, {costs[1024]} in one of 1,024")

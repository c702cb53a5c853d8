"""Property tests of the KV record heap (kv/heap.py): chunks never overlap, stay in their
pages, rest before reuse (unless never written), and pages come back when empty."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memfabric.errors import InvalidArgument
from memfabric.kv.heap import (CLASSES, MAX_RECORD_BYTES, PAGE_BYTES, SPARE_IDLE_S, SPARE_PAGES_MAX, SPARE_PAGES_MIN,
                               SPARE_SHARE, RecordHeap)

GRACE = 1.0


class HeapMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.heap = RecordHeap(GRACE)
        self.now = 0.0
        self.live: list = []
        self.resting: list[tuple[float, object]] = []
        self.pages: dict[tuple[int, int], int] = {}     # page -> its class size
        self.next_page = 0

    @rule(size=st.one_of(st.integers(1, 300), st.integers(1, MAX_RECORD_BYTES)))
    def allocate(self, size: int) -> None:
        chunk = self.heap.allocate(size, self.now)
        if chunk is None:
            # Pages at odd 4 KiB offsets of few segments, as the pool lends them.
            segment, offset = self.next_page % 3, (self.next_page // 3) * (PAGE_BYTES + 4096)
            self.next_page += 1
            self.heap.add_page(segment, offset, size)
            self.pages[(segment, offset)] = CLASSES[RecordHeap.class_of(size)]
            chunk = self.heap.allocate(size, self.now)
        assert chunk is not None and chunk.size >= size and chunk.size == CLASSES[RecordHeap.class_of(size)]
        self._serves(chunk)
        fresh = [c for t, c in self.resting if t > self.now]
        assert all((c.segment, c.offset) != (chunk.segment, chunk.offset) for c in fresh), "reused within the grace"
        self.live.append(chunk)

    @rule(size=st.integers(1, 9000), count=st.integers(1, 40))
    def allocate_many(self, size: int, count: int) -> None:
        """A batch (a compiled put's stock): what allocate gives, up to `count` at once."""
        chunks = self.heap.allocate_many(size, count, self.now)
        assert len(chunks) <= count
        fresh = [c for t, c in self.resting if t > self.now]
        for chunk in chunks:
            assert chunk.size == CLASSES[RecordHeap.class_of(size)]
            assert all((c.segment, c.offset) != (chunk.segment, chunk.offset) for c in fresh), "reused within the grace"
            self._serves(chunk)
        self.live.extend(chunks)

    def _serves(self, chunk) -> None:
        """The chunk's page serves its class now: an empty page kept aside (empty_pages) may
        serve any class, a page with records in it only theirs (the invariant checks)."""
        page = [k for k in self.pages if k[0] == chunk.segment and k[1] <= chunk.offset < k[1] + PAGE_BYTES]
        assert len(page) == 1, "a chunk of no page the heap was given (or of one it gave back)"
        self.pages[page[0]] = chunk.size

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def unallocate(self, data) -> None:
        """A chunk given (a compiled put's stock) and given back unwritten: free again at once."""
        chunk = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.heap.unallocate(chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data) -> None:
        chunk = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.heap.free(chunk, self.now)
        self.resting.append((self.now + GRACE, chunk))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_rested(self, data) -> None:
        """Records a compiled put's grant kept since they were replaced (put_grants.settle):
        each rests what is left of its grace, no more, and never less."""
        batch = []
        for _ in range(data.draw(st.integers(1, min(5, len(self.live))))):
            chunk = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
            replaced = self.now - data.draw(st.sampled_from([0.0, 0.5, 1.0, 1.5]))
            batch.append((chunk, replaced + GRACE))
        batch.sort(key=lambda b: b[1])         # a grant's are oldest first
        self.heap.free_rested(batch, self.now)
        self.resting += [(until, chunk) for chunk, until in batch]

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(keep=st.booleans())
    def give_back(self, keep: bool) -> None:
        """Pages come back empty: those kept aside too long or too many (`keep`), or all."""
        for key in self.heap.empty_pages(self.now, keep=keep):
            assert not any(c.segment == key[0] and key[1] <= c.offset < key[1] + PAGE_BYTES
                           for c in self.live), "a page given back with records in it"
            assert not any(c.segment == key[0] and key[1] <= c.offset < key[1] + PAGE_BYTES
                           for t, c in self.resting if t > self.now), "a page given back with records resting"
            del self.pages[key]

    @invariant()
    def chunks_are_disjoint_and_inside_their_pages(self) -> None:
        spans = sorted((c.segment, c.offset, c.offset + c.size) for c in self.live)
        for a, b in zip(spans, spans[1:]):
            assert a[0] != b[0] or a[2] <= b[1], f"{a} overlaps {b}"
        for c in self.live:
            page = [k for k in self.pages if k[0] == c.segment and k[1] <= c.offset < k[1] + PAGE_BYTES]
            assert len(page) == 1 and c.offset + c.size <= page[0][1] + PAGE_BYTES
            assert self.pages[page[0]] == c.size, "a chunk of another class"
        assert self.heap.record_bytes == sum(c.size for c in self.live)


TestHeap = HeapMachine.TestCase
TestHeap.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("size", [0, -1, MAX_RECORD_BYTES + 1])
def test_sizes_outside_the_classes_are_refused(size):
    with pytest.raises(InvalidArgument):
        RecordHeap(1.0).allocate(size, 0.0)


def test_slack_is_at_most_a_fifth_of_a_chunk():
    for small, big in zip(CLASSES, CLASSES[1:]):
        assert (big - (small + 1)) / big <= 0.2 + 8 / big


def test_a_chunk_never_written_serves_again_at_once():
    heap = RecordHeap(1.0)
    heap.add_page(0, 0, 100)
    chunk = heap.allocate(100, 0.0)
    heap.unallocate(chunk)
    assert heap.record_bytes == 0
    assert heap.empty_pages(0.0, keep=False) == [(0, 0)]     # its page back, no rest


def test_an_empty_page_is_kept_for_any_class_then_goes_back_when_idle():
    """A page whose records all came back serves the next page a class needs (a stream of
    64 KiB overwrites, a record a page, gave a page back and took a new one for a quarter of
    its writes); kept SPARE_IDLE_S unused, it goes back to the pool."""
    heap = RecordHeap(1.0)
    heap.add_page(0, 0, 70_000)
    big = heap.allocate(70_000, 0.0)
    heap.free(big, 0.0)
    assert heap.empty_pages(1.0) == [] and heap.spare_count() == 1 and heap.page_count == 1
    small = heap.allocate(100, 1.0)              # another class, on the same page
    assert (small.segment, small.offset) == (0, 0) and heap.spare_count() == 0
    heap.free(small, 1.0)
    assert heap.empty_pages(2.0) == [] and heap.spare_count() == 1
    assert heap.empty_pages(2.0 + SPARE_IDLE_S - 0.1) == []
    assert heap.empty_pages(2.0 + SPARE_IDLE_S) == [(0, 0)] and heap.page_count == 0
    assert heap.allocate(100, 5.0) is None       # nothing kept: a new page is needed


def test_empty_pages_kept_are_bounded():
    """At most a quarter of the pages in use (SPARE_PAGES_MIN of an emptied keyspace: another
    namespace may need the pool), SPARE_PAGES_MAX at most."""
    heap = RecordHeap(0.0)
    count = 5 * SPARE_PAGES_MAX
    for i in range(count):
        heap.add_page(i, 0, 70_000)
    chunks = heap.allocate_many(70_000, count, 0.0)
    for chunk in chunks[:100]:
        heap.free(chunk, 0.0)
    assert len(heap.empty_pages(0.0)) == 0 and heap.spare_count() == 100
    for chunk in chunks[100:2 * SPARE_PAGES_MAX]:
        heap.free(chunk, 0.0)
    given = heap.empty_pages(0.0)
    assert heap.spare_count() + len(given) == 2 * SPARE_PAGES_MAX
    assert heap.spare_count() == int((count - 2 * SPARE_PAGES_MAX) * SPARE_SHARE)
    for chunk in chunks[2 * SPARE_PAGES_MAX:]:
        heap.free(chunk, 0.0)
    heap.empty_pages(0.0)
    assert heap.spare_count() == SPARE_PAGES_MIN and heap.page_count == SPARE_PAGES_MIN


def test_a_record_that_rested_elsewhere_serves_again_when_its_rest_ends():
    """A compiled put's grant kept a replaced record since it was replaced: freed after its
    grace, it serves again at once, and a younger one only when its own grace ends."""
    heap = RecordHeap(1.0)
    heap.add_page(0, 0, 100)
    old, young = heap.allocate(100, 0.0), heap.allocate(100, 0.0)
    heap.free(heap.allocate(100, 0.0), 5.0)               # a record freed here, resting till 6.0
    heap.free_rested([(old, 4.5), (young, 5.5)], 5.0)      # rested since 3.5 and 4.5
    assert heap.allocate(100, 5.0) == old
    assert heap.allocate(100, 5.0).offset not in (young.offset, old.offset)   # a fresh chunk
    assert heap.allocate(100, 5.5) == young


def test_a_page_emptying_serves_another_class_when_its_records_have_rested():
    """A write short of memory waits for what rests (Store.chunk): a page whose records rest
    and nothing else serves any class once they have, with no look for emptied pages between
    (the write that waited allocates next); a page that keeps a record serves its class only."""
    heap = RecordHeap(1.0)
    heap.add_page(0, 0, 70_000)
    big = heap.allocate(70_000, 0.0)
    heap.free(big, 0.5)
    assert heap.rested_by_s(100) == 1.5          # another class: when its page is empty
    assert heap.allocate(100, 1.0) is None       # not before
    small, stays = heap.allocate_many(100, 2, 1.5)
    assert (small.segment, small.offset) == (0, 0) and stays.segment == 0
    heap.free(small, 2.0)
    assert heap.rested_by_s(5_000) is None       # `stays` keeps the page its class's
    assert heap.rested_by_s(100) == 3.0

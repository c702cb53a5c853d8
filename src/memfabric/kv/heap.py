"""Where a namespace's KV records live on one server: a slab heap over pages of its segments.
Pure: no I/O, no clock.

A record is a key and its value (or a key and the table of extents a large value lies in).
Records are small and many, and the pool lends memory in 4 KiB pages, so records share pages:
each page (PAGE_BYTES, taken from the namespace's segments by the server) serves one size
class, and a record takes the smallest class that fits it (memcached's slabs: classes a
quarter apart, so at most a fifth of a record's chunk is slack). Freed records rest for
`grace_s` before reuse, as BigMemory's extents do, so a reader that raced a delete sees the
slot's sequence change before it could see another key's bytes where this record was. A
page whose records are all free again is kept aside, empty, for the next page any class needs
(up to a quarter of the pages in use, SPARE_PAGES_MAX at most); one kept SPARE_IDLE_S unused
goes back to the pool. Giving a page back and taking a new one costs the keyspace's same-host
grants (the server revokes them: a segment it left may be destroyed) and fresh memory's page
faults: a stream of overwrites of 64 KiB values, a record a page, did both for a quarter of
its writes.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from operator import itemgetter
from typing import NamedTuple

from ..errors import InvalidArgument

PAGE_BYTES = 128 << 10          # a record holds a key of 64 KiB and a large value's extent table
MIN_CHUNK_BYTES = 64
GROWTH = 1.25
SPARE_PAGES_MAX = 256           # 32 MiB of empty pages kept for reuse, at most,
SPARE_SHARE = 0.25              # and a quarter of the pages in use (an emptied keyspace keeps
SPARE_PAGES_MIN = 4             # this many: another namespace's writes may need the pool)
SPARE_IDLE_S = 2.0              # an empty page kept this long unused goes back to the pool


def _classes() -> list[int]:
    sizes = [MIN_CHUNK_BYTES]
    while sizes[-1] < PAGE_BYTES:
        nxt = min(PAGE_BYTES, max(sizes[-1] + 8, int(sizes[-1] * GROWTH) // 8 * 8))
        sizes.append(nxt)
    return sizes


CLASSES = _classes()             # chunk sizes, bytes; the last is a whole page
MAX_RECORD_BYTES = CLASSES[-1]


class Chunk(NamedTuple):        # not a frozen dataclass: a refill makes and frees dozens (3x the cost)
    segment: int
    offset: int
    size: int                    # the class's chunk size


class _Page:
    __slots__ = ("segment", "offset", "cls", "free", "used", "resting", "carved", "listed", "spare")

    def __init__(self, segment: int, offset: int, cls: int) -> None:
        self.segment, self.offset, self.cls = segment, offset, cls
        self.free: list[int] = []          # offsets of free chunks (reusable now)
        self.used = 0                      # chunks holding records
        self.resting = 0                   # chunks freed, within the grace
        self.carved = 0                    # chunks ever carved (the rest of the page is untouched)
        self.listed = True                 # in its class's list of pages with room
        self.spare = False                 # empty, kept aside for any class (RecordHeap._spare)


class RecordHeap:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._pages: dict[tuple[int, int], _Page] = {}       # (segment, offset) -> page
        self._starts: dict[int, list[int]] = {}               # segment -> its pages' offsets, sorted
        self._with_room: list[list[_Page]] = [[] for _ in CLASSES]
        self._resting: deque[tuple[float, _Page, int]] = deque()    # (until, page, offset)
        self._emptied: set[tuple[int, int]] = set()          # pages whose last chunk came back
        self._spare: deque[tuple[float, _Page]] = deque()    # (emptied at, page), oldest first
        self.record_bytes = 0                                 # chunks holding records
        self.page_count = 0

    @staticmethod
    def class_of(size: int) -> int:
        if not 0 < size <= MAX_RECORD_BYTES:
            raise InvalidArgument(f"a record of {size} bytes; records are 1 to {MAX_RECORD_BYTES} bytes")
        return bisect.bisect_left(CLASSES, size)

    def allocate(self, size: int, now_s: float) -> Chunk | None:
        """A chunk for a record of `size` bytes, or None: give the heap a page (add_page) first."""
        got = self.allocate_many(size, 1, now_s)
        return got[0] if got else None

    def allocate_many(self, size: int, count: int, now_s: float) -> list[Chunk]:
        """Up to `count` chunks for records of `size` bytes (fewer: give the heap a page)."""
        cls = self.class_of(size)
        self._mature(now_s)
        pages = self._with_room[cls]
        chunk_bytes = CLASSES[cls]
        out: list[Chunk] = []
        while len(out) < count:
            if not pages:            # an empty page kept aside serves this class now
                if not self._spare and self._emptied:
                    self._keep_emptied(now_s)       # one just emptied, too (another class's)
                if not self._spare:
                    break
                self._reuse_spare(cls)
            page = pages[-1]
            if page.free:
                offset = page.free.pop()
            elif (page.carved + 1) * chunk_bytes <= PAGE_BYTES:
                offset = page.offset + page.carved * chunk_bytes
                page.carved += 1
            else:
                pages.pop()
                page.listed = False
                continue
            page.used += 1
            out.append(Chunk(page.segment, offset, chunk_bytes))
        self.record_bytes += chunk_bytes * len(out)
        return out

    def add_page(self, segment: int, offset: int, size: int) -> None:
        """A page (PAGE_BYTES of the namespace's memory at segment, offset) for records of `size`
        bytes."""
        key = (segment, offset)
        assert key not in self._pages, f"page {key} given twice"
        page = _Page(segment, offset, self.class_of(size))
        self._pages[key] = page
        bisect.insort(self._starts.setdefault(segment, []), offset)
        self._with_room[page.cls].append(page)
        self.page_count += 1

    def unallocate(self, chunk: Chunk) -> None:
        """A chunk allocate() gave that no record was ever written into: free again at once
        (it rested before it was given; nobody can be reading it)."""
        page = self._page_of(chunk)
        page.used -= 1
        self.record_bytes -= chunk.size
        self._serves_again(page, chunk.offset)

    def _serves_again(self, page: _Page, offset: int) -> None:
        page.free.append(offset)
        if page.used == 0 and page.resting == 0:
            self._emptied.add((page.segment, page.offset))
        if not page.listed:
            self._with_room[page.cls].append(page)
            page.listed = True

    def free(self, chunk: Chunk, now_s: float) -> None:
        """A record is gone: its chunk rests, then serves again."""
        page = self._page_of(chunk)
        page.used -= 1
        page.resting += 1
        self.record_bytes -= chunk.size
        self._resting.append((now_s + self.grace_s, page, chunk.offset))

    def free_rested(self, chunks: list[tuple[Chunk, float]], now_s: float) -> None:
        """Records gone that have rested since they left their slots (a compiled put's grant
        kept them: put_grants.py), each until its own time (monotonic s, in order): they serve
        again then (a grace from now at the latest), not a new grace later."""
        entries = []
        for chunk, until_s in chunks:
            page = self._page_of(chunk)
            page.used -= 1
            page.resting += 1
            self.record_bytes -= chunk.size
            entries.append((min(until_s, now_s + self.grace_s), page, chunk.offset))
        if self._resting and entries and entries[0][0] < self._resting[-1][0]:    # in order of time
            self._resting = deque(heapq.merge(self._resting, entries, key=itemgetter(0)))
        else:
            self._resting.extend(entries)

    def empty_pages(self, now_s: float, keep: bool = True) -> list[tuple[int, int]]:
        """Pages for the server to give back to the pool, (segment, offset) each, forgotten
        here: those kept aside empty past SPARE_PAGES_MAX or SPARE_IDLE_S (`keep` False: every
        empty page)."""
        self._mature(now_s)
        if self._emptied:
            self._keep_emptied(now_s)
        spare = self._spare
        if not spare:                  # the common case: every write's free asks
            return []
        idle_before = now_s - SPARE_IDLE_S
        kept = min(SPARE_PAGES_MAX, max(SPARE_PAGES_MIN, int((self.page_count - len(spare)) * SPARE_SHARE)))
        empty = []
        while spare and (not keep or len(spare) > kept or spare[0][0] <= idle_before):
            _, page = spare.popleft()
            key = (page.segment, page.offset)
            del self._pages[key]
            starts = self._starts[page.segment]
            del starts[bisect.bisect_left(starts, page.offset)]
            if not starts:
                del self._starts[page.segment]
            self.page_count -= 1
            empty.append(key)
        return empty

    def _keep_emptied(self, now_s: float) -> None:
        """Pages whose last chunk came back (and are empty still) are kept aside for any class."""
        for key in self._emptied:
            page = self._pages.get(key)
            if page is not None and page.used == 0 and page.resting == 0 and not page.spare:
                if page.listed:
                    self._with_room[page.cls].remove(page)
                    page.listed = False
                page.spare = True
                self._spare.append((now_s, page))
        self._emptied.clear()

    def spare_count(self) -> int:
        return len(self._spare)

    def may_empty(self) -> bool:
        """Pages emptied or records resting: empty_pages may find pages to keep or give back."""
        return bool(self._emptied or self._resting)

    def _reuse_spare(self, cls: int) -> None:
        """The empty page kept aside last (its memory the warmest) serves class `cls`."""
        _, page = self._spare.pop()
        page.spare = False
        page.cls = cls
        page.free = []
        page.carved = 0
        page.listed = True
        self._with_room[cls].append(page)

    def rested_by_s(self, size: int) -> float | None:
        """When (monotonic s) a chunk for a `size`-byte record serves again, of those that rest:
        the first of its class, or the last of a page that holds no record (then empty, it
        serves any class); None: none rests."""
        cls = self.class_of(size)
        first: float | None = None
        emptied: dict[_Page, float] = {}            # a page holding no record -> its last rest's end
        for until, page, _ in self._resting:         # in order of time
            if first is None and page.cls == cls:
                first = until
            if page.used == 0:
                emptied[page] = until
        return min([*emptied.values(), *([] if first is None else [first])], default=None)

    def page_bytes(self) -> int:
        return self.page_count * PAGE_BYTES

    def _page_of(self, chunk: Chunk) -> _Page:
        starts = self._starts[chunk.segment]
        offset = starts[bisect.bisect_right(starts, chunk.offset) - 1]
        page = self._pages[(chunk.segment, offset)]
        assert offset <= chunk.offset < offset + PAGE_BYTES, f"chunk {chunk} of no page"
        return page

    def _mature(self, now_s: float) -> None:
        resting = self._resting
        while resting and resting[0][0] <= now_s:
            _, page, offset = resting.popleft()     # a page with chunks resting is never let go
            page.resting -= 1
            self._serves_again(page, offset)

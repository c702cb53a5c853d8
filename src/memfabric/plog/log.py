"""One plog's rules: where the next record goes, what is committed, which record is where,
open or sealed. Pure: no I/O, no locks, no clock (the service holds the plog's lock around
every call and does the writes and flushes these plan).

An append is planned (`plan`: the records' places, or OUT_OF_SPACE / SEALED with nothing
changed), written by the caller, then `mark_written` (the bytes are in the log; the next append
goes after them). The caller flushes and then `commit`s up to an end: readers see committed
bytes only. Appends are written in the order they were planned, so what is written is always
a prefix; a write that failed is `abandoned`, and the next append overwrites its bytes.

Offsets are of the log's logical bytes, 0 to `capacity`; `pieces` maps them onto the plog's
extents (segment, offset, length), which hold its bytes in order.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from itertools import accumulate

from ..errors import InvalidArgument, OutOfRange, OutOfSpace, Sealed
from ..limits import (MAX_PLOG_BATCH, PLOG_PREPARE_AHEAD_BYTES, PLOG_PREPARE_AT_CREATE_BYTES, PLOG_PREPARE_BYTES_PER_S, PLOG_PREPARE_ROUND_BYTES,
                      PLOG_REACH_STEP_BYTES, PLOG_REACH_STEP_MOST_BYTES)
from .record import ALIGN_BYTES, HEADER_BYTES, frame_bytes

try:    # a batch's starts in one call (_framing.c): ./dev builds it
    from .._records import frame_starts as _compiled_frame_starts
except ImportError:      # pragma: no cover
    _compiled_frame_starts = None

OPEN, SEALED = "open", "sealed"
STATES = (OPEN, SEALED)


def prepare_allowance_s(capacity: int, copies: int = 1) -> float:
    """The time beyond the usual timeouts that making `copies` copies of a plog of `capacity`
    bytes may take, one after another (a home's, then each of its copies'): their first part
    made ready (first_ready)."""
    return copies * first_ready(capacity) / PLOG_PREPARE_BYTES_PER_S


def first_ready(capacity: int) -> int:
    """How much of a new pmem plog is made ready at create (limits.PLOG_PREPARE_AT_CREATE_BYTES)."""
    return min(capacity, PLOG_PREPARE_AT_CREATE_BYTES)


class PlogLog:
    __slots__ = ("name", "capacity", "nonce", "state", "written", "committed", "starts", "_lengths",
                 "_committed_records")

    def __init__(self, name: str, capacity: int, nonce: int, state: str = OPEN) -> None:
        assert state in STATES and capacity > 0
        self.name = name
        self.capacity = capacity
        self.nonce = nonce
        self.state = state
        self.written = 0           # bytes holding records that were written (committed or not)
        self.committed = 0         # bytes readers may see: flushed as the medium needs
        self.starts = array("Q")   # frame start of every written record, in order
        self._lengths = array("Q")
        self._committed_records = 0

    # ---- appends ------------------------------------------------------------------------------

    def plan(self, lengths: list[int]) -> list[int]:
        """Frame starts for records of these payload lengths, after the written ones. Raises
        SEALED, or OUT_OF_SPACE when they do not all fit; nothing changes either way."""
        if self.state != OPEN:
            raise Sealed(f"plog {self.name!r} is sealed: no append succeeds after seal "
                         "(its records can still be read)")
        if not 0 < len(lengths) <= MAX_PLOG_BATCH:
            raise InvalidArgument(f"an append takes 1 to {MAX_PLOG_BATCH} records, got {len(lengths)}")
        starts, at = frame_starts(self.written, lengths)
        if at > self.capacity:
            raise OutOfSpace(f"plog {self.name!r} has {self.capacity - self.written} of {self.capacity} bytes "
                             f"free, these {len(lengths)} records need {at - self.written} "
                             f"({HEADER_BYTES} bytes of header each, padded to 8): nothing was written")
        return starts

    def mark_written(self, starts: list[int], lengths: list[int]) -> int:
        """The planned records are in the log: the next append goes after them. Their end."""
        assert starts and starts[0] == self.written, "appends are written in the order they were planned"
        self.starts.extend(starts)
        self._lengths.extend(lengths)
        self.written = starts[-1] + frame_bytes(lengths[-1])
        assert self.written <= self.capacity
        return self.written

    def commit(self, end: int) -> None:
        """Bytes up to `end` (a record's end) are flushed: readers may see them."""
        assert self.committed <= end <= self.written
        if end == self.committed:
            return
        self.committed = end
        self._committed_records = bisect_right(self.starts, end - 1)
        assert self._committed_records == len(self.starts) or self.starts[self._committed_records] == end

    def abandon(self) -> int:
        """Forget the records written but not committed (their append failed: a replica fenced
        the plog); the next append goes where they were. How many were forgotten."""
        kept = self._committed_records
        dropped = len(self.starts) - kept
        del self.starts[kept:]
        del self._lengths[kept:]
        self.written = self.committed
        return dropped

    def cut(self, end: int) -> int:
        """Forget every record from `end` on (a record's start, or the log's end), committed or
        not: a copy's records its home never committed (the home was fenced by another copy).
        How many were forgotten."""
        keep = bisect_right(self.starts, end - 1)        # the records that start before `end`
        boundary = self.starts[keep] == end if keep < len(self.starts) else end == self.written
        if not boundary:
            raise InvalidArgument(f"plog {self.name!r}: {end} is not where one of its records starts")
        dropped = len(self.starts) - keep
        del self.starts[keep:]
        del self._lengths[keep:]
        self.written = end
        self.committed = min(self.committed, end)
        self._committed_records = bisect_right(self.starts, self.committed - 1)
        return dropped

    @property
    def next_index(self) -> int:
        """The index the next planned record gets (records written so far)."""
        return len(self.starts)

    def seal(self) -> None:
        self.state = SEALED

    # ---- reads ------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        """Committed records."""
        return self._committed_records

    def check_read(self, offset: int, length: int) -> None:
        if type(offset) is not int or type(length) is not int:
            raise InvalidArgument(f"offset and length must be integers, got {offset!r:.40} and {length!r:.40}")
        if offset < 0 or length < 0:
            raise OutOfRange(f"offset {offset} and length {length} must not be negative")
        if offset + length > self.committed:
            raise OutOfRange(f"[{offset}, {offset + length}) reaches past plog {self.name!r}'s "
                             f"{self.committed} committed bytes")

    def record_at(self, index: int) -> tuple[int, int]:
        """(payload offset, payload length) of committed record `index`."""
        if type(index) is not int:
            raise InvalidArgument(f"a record index is an integer, got {index!r:.40}")
        if not 0 <= index < self._committed_records:
            raise OutOfRange(f"record {index} is not among plog {self.name!r}'s {self._committed_records} "
                             "committed records")
        return self.starts[index] + HEADER_BYTES, self._lengths[index]

    def info(self) -> dict[str, object]:
        return {"name": self.name, "capacity": self.capacity, "length": self.committed,
                "records": self._committed_records, "state": self.state}

    # ---- after a restart --------------------------------------------------------------------

    def recovered(self, records: list[tuple[int, int]]) -> None:
        """What a scan found (frame start, payload length), all of it committed."""
        assert self.written == 0 and not self.starts
        for start, length in records:
            self.mark_written([start], [length])
        self.commit(self.written)


def next_reach(end: int, capacity: int) -> int:
    """Where a log's reach (limits.PLOG_REACH_STEP_BYTES) goes when bytes up to `end` are to be
    written past it: ahead of `end` by as much again, within the step's bounds and the capacity."""
    return min(capacity, end + min(max(end, PLOG_REACH_STEP_BYTES), PLOG_REACH_STEP_MOST_BYTES))


def wants_round(written: int, ready_end: int, capacity: int) -> bool:
    """Whether a pmem log written up to `written`, its memory ready up to `ready_end`, should be
    made ready further now (limits.PLOG_PREPARE_AHEAD_BYTES)."""
    return ready_end < capacity and written + PLOG_PREPARE_AHEAD_BYTES > ready_end


def round_end(start: int, capacity: int) -> int:
    """Where a round that makes a pmem log's memory ready from `start` ends."""
    return min(capacity, start + PLOG_PREPARE_ROUND_BYTES)


def frame_starts(at: int, lengths: list[int]) -> tuple[list[int], int]:
    """Where the frames of records of these payload lengths (ints of 0..MAX_PLOG_RECORD_BYTES,
    checked by the caller) begin, the first at `at`, and where the last ends. Shifted by
    HEADER_BYTES: where their payloads begin."""
    if _compiled_frame_starts is not None:
        return _compiled_frame_starts(at, lengths)
    starts = []
    append = starts.append
    for n in lengths:
        append(at)
        at += HEADER_BYTES + ((n + ALIGN_BYTES - 1) & -ALIGN_BYTES)     # frame_bytes(n), inline
    return starts, at


def pieces(extents: list[tuple[int, int, int]], offset: int, length: int,
           ends: list[int] | None = None) -> list[tuple[int, int, int]]:
    """Where logical bytes [offset, offset + length) of a log laid over `extents` (segment,
    offset, length; in order) lie: (segment, offset in it, length) runs. `ends`: the
    extents' running ends (extent_ends), when the caller keeps them: an append then costs
    no walk over every extent of the log."""
    if ends is None:
        ends = extent_ends(extents)
    if offset < 0 or length < 0 or offset + length > (ends[-1] if ends else 0):
        raise OutOfRange(f"[{offset}, {offset + length}) is outside the log's {ends[-1] if ends else 0} bytes")
    out = []
    i = bisect_right(ends, offset)
    while length > 0:
        segment, seg_offset, extent_length = extents[i]
        extent_start = ends[i] - extent_length
        within = offset - extent_start
        take = min(extent_length - within, length)
        out.append((segment, seg_offset + within, take))
        offset += take
        length -= take
        i += 1
    return out


def extent_ends(extents: list[tuple[int, int, int]]) -> list[int]:
    """Where each extent ends in the log's logical bytes (what pieces() bisects)."""
    return list(accumulate(e[2] for e in extents))

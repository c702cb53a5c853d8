"""Property tests of MemPlog's pure core: record framing, the recovery scan, the log's rules.

The scan's promise: whatever happened to the log's bytes after the appends (a crash part way
through a record, garbage, bit flips), it returns exactly a prefix of the appended records,
each one whole, and never a record that was not appended."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfabric.errors import InvalidArgument, OutOfRange, OutOfSpace, Sealed
from memfabric.limits import (MAX_PLOG_RECORD_BYTES, PLOG_PREPARE_AHEAD_BYTES, PLOG_PREPARE_AT_CREATE_BYTES,
                              PLOG_PREPARE_ROUND_BYTES)
from memfabric.plog import record as rec
from memfabric.plog.log import PlogLog, first_ready, pieces, round_end, wants_round

NONCE = 0x1234_5678_9ABC_DEF0
payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=0, max_size=40)


def build(records: list[bytes], capacity: int, nonce: int = NONCE) -> bytearray:
    log = bytearray(capacity)
    at = 0
    for i, p in enumerate(records):
        frame = rec.encode(nonce, i, p)
        log[at:at + len(frame)] = frame
        at += len(frame)
    return log


def scanned(log: bytes | bytearray, nonce: int = NONCE) -> list[bytes]:
    view = memoryview(log)
    found = []
    for start, length in rec.scan(lambda o, n: view[o:o + n], len(log), nonce, MAX_PLOG_RECORD_BYTES):
        payload = bytes(view[start + rec.HEADER_BYTES:start + rec.HEADER_BYTES + length])
        found.append(payload)
    return found


def used(records: list[bytes]) -> int:
    return sum(rec.frame_bytes(len(p)) for p in records)


@given(payloads)
def test_a_whole_log_scans_back_to_its_records(records):
    log = build(records, used(records) + 64)
    assert scanned(log) == records


@given(payloads, st.data())
def test_a_log_cut_anywhere_scans_to_a_prefix(records, data):
    """A crash part way: the bytes after some point never made it (zeros, as fresh memory)."""
    log = build(records, used(records) + 64)
    cut = data.draw(st.integers(0, used(records)))
    zeroed = bytearray(log)
    zeroed[cut:] = bytes(len(log) - cut)
    found = scanned(zeroed)
    assert found == records[:len(found)]
    found = scanned(log[:cut])            # the bytes past the cut are not there at all
    whole = 0
    at = 0
    for p in records:                     # every record wholly before the cut survives
        at += rec.frame_bytes(len(p))
        if at <= cut:
            whole += 1
    assert found == records[:whole]


@given(payloads, st.data())
def test_bit_flips_and_garbage_never_make_a_record_that_was_not_appended(records, data):
    log = build(records, used(records) + 64)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            bit = data.draw(st.integers(0, len(log) * 8 - 1))
            log[bit // 8] ^= 1 << (bit % 8)
        else:
            at = data.draw(st.integers(0, len(log) - 1))
            junk = data.draw(st.binary(min_size=1, max_size=32))
            log[at:at + len(junk)] = junk[:len(log) - at]
    found = scanned(log)
    assert found == records[:len(found)]


@given(payloads)
def test_frames_of_another_plog_in_the_same_memory_do_not_check(records):
    """Memory reused within a namespace may hold an earlier plog's frames: another nonce."""
    log = build(records, used(records) + 64, nonce=NONCE + 1)
    assert scanned(log) == []


def test_zeros_and_a_zero_length_record():
    assert scanned(bytes(4096)) == []
    log = build([b"", b"x", b""], 4096)
    assert scanned(log) == [b"", b"x", b""]


def test_a_record_out_of_place_does_not_check():
    """A frame copied to where the next index belongs fails: the index is in the CRC."""
    first = rec.encode(NONCE, 0, b"hello")
    log = bytearray(4096)
    log[:len(first)] = first
    log[len(first):2 * len(first)] = first
    assert scanned(log) == [b"hello"]


def test_frame_sizes():
    assert rec.frame_bytes(0) == 16 and rec.frame_bytes(1) == 24 and rec.frame_bytes(8) == 24
    assert rec.frame_bytes(4096) == 16 + 4096


# ---- the log's rules -----------------------------------------------------------------------------

@given(st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=5), max_size=30),
       st.integers(16, 8192))
def test_appends_fill_a_log_in_order_and_the_full_one_changes_nothing(batches, capacity):
    log = PlogLog("l", capacity, NONCE)
    expected_starts = []
    for lengths in batches:
        before = (log.written, list(log.starts))
        try:
            starts = log.plan(lengths)
        except OutOfSpace:
            assert (log.written, list(log.starts)) == before
            assert log.written + sum(rec.frame_bytes(n) for n in lengths) > capacity
            continue
        assert starts[0] == log.written
        end = log.mark_written(starts, lengths)
        expected_starts += starts
        assert end <= capacity
        log.commit(end)
    assert list(log.starts) == expected_starts
    assert log.records == len(expected_starts)
    assert all(a < b for a, b in zip(expected_starts, expected_starts[1:]))


def test_commit_shows_only_flushed_records():
    log = PlogLog("l", 4096, NONCE)
    s1 = log.plan([10])
    log.mark_written(s1, [10])
    s2 = log.plan([20, 30])
    end = log.mark_written(s2, [20, 30])
    assert log.records == 0 and log.committed == 0
    with pytest.raises(OutOfRange):
        log.record_at(0)
    log.commit(rec.frame_bytes(10))
    assert log.records == 1 and log.record_at(0) == (16, 10)
    with pytest.raises(OutOfRange):
        log.check_read(0, rec.frame_bytes(10) + 1)
    log.commit(end)
    assert log.records == 3
    assert log.record_at(2) == (s2[1] + 16, 30)


def test_cut_forgets_committed_records_from_a_record_start_only():
    log = PlogLog("l", 4096, NONCE)
    starts = log.plan([10, 20, 30])
    end = log.mark_written(starts, [10, 20, 30])
    log.commit(end)
    for wrong in (1, starts[1] + 8, end + 8):
        with pytest.raises(InvalidArgument):
            log.cut(wrong)
    assert log.cut(end) == 0 and log.records == 3
    assert log.cut(starts[1]) == 2
    assert (log.records, log.committed, log.written, log.next_index) == (1, starts[1], starts[1], 1)
    assert log.plan([5]) == [starts[1]]
    assert log.cut(0) == 1 and (log.records, log.committed, log.written) == (0, 0, 0)


def test_a_sealed_log_plans_no_append():
    log = PlogLog("l", 4096, NONCE)
    log.seal()
    with pytest.raises(Sealed):
        log.plan([1])
    assert log.written == 0


def test_bad_reads_and_indexes():
    log = PlogLog("l", 4096, NONCE)
    log.mark_written(log.plan([8]), [8])
    log.commit(24)
    for offset, length in [(-1, 1), (0, -1)]:
        with pytest.raises(OutOfRange):
            log.check_read(offset, length)
    with pytest.raises(InvalidArgument):
        log.check_read(1.5, 1)
    with pytest.raises(InvalidArgument):
        log.record_at("0")
    with pytest.raises(OutOfRange):
        log.record_at(-1)
    with pytest.raises(InvalidArgument):
        log.plan([])


@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.data())
def test_pieces_cover_exactly_the_range(lengths, data):
    extents = [(i + 1, random.Random(i).randrange(0, 100), n) for i, n in enumerate(lengths)]
    total = sum(lengths)
    offset = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - offset))
    flat = [(seg, off + k) for seg, off, n in extents for k in range(n)]
    got = [(seg, off + k) for seg, off, n in pieces(extents, offset, length) for k in range(n)]
    assert got == flat[offset:offset + length]
    with pytest.raises(OutOfRange):
        pieces(extents, offset, total - offset + 1)


@settings(max_examples=30)
@given(payloads)
def test_recovered_log_matches_what_was_appended(records):
    capacity = used(records) + 64
    data = build(records, capacity)
    view = memoryview(data)
    log = PlogLog("l", capacity, NONCE)
    log.recovered(list(rec.scan(lambda o, n: view[o:o + n], capacity, NONCE, MAX_PLOG_RECORD_BYTES)))
    assert log.records == len(records) and log.committed == used(records)
    for i, p in enumerate(records):
        offset, length = log.record_at(i)
        assert bytes(view[offset:offset + length]) == p


@given(payloads, st.data())
def test_a_scan_from_a_record_boundary_finds_the_rest(records, data):
    """What a replica checks: the records a home sent, from where the replica's log ends."""
    log = build(records, used(records) + 64)
    first = data.draw(st.integers(0, len(records)))
    start = used(records[:first])
    view = memoryview(log)
    found = [bytes(view[s + rec.HEADER_BYTES:s + rec.HEADER_BYTES + n])
             for s, n in rec.scan(lambda o, n: view[o:o + n], len(log), NONCE, MAX_PLOG_RECORD_BYTES,
                                  start=start, first_index=first)]
    assert found == records[first:]
    if first < len(records):              # the same bytes taken for other records' do not check
        assert list(rec.scan(lambda o, n: view[o:o + n], len(log), NONCE, MAX_PLOG_RECORD_BYTES,
                             start=start, first_index=first + 1)) == []


def test_abandon_forgets_the_records_not_committed():
    log = PlogLog("l", 4096, NONCE)
    first = log.mark_written(log.plan([10]), [10])
    log.commit(first)
    log.mark_written(log.plan([20, 30]), [20, 30])
    assert log.abandon() == 2
    assert (log.written, log.committed, log.records, log.next_index) == (first, first, 1, 1)
    assert log.plan([5]) == [first]          # the next append goes where they were
    assert log.abandon() == 0


# ---- batches framed in one call (_framing.c) -----------------------------------------------------


def test_frames_of_a_batch_are_the_frames_of_each_record():
    rng = random.Random(7)
    for _ in range(100):
        lengths = [rng.choice([0, 1, 7, 8, 9, 15, 16, 17, rng.randrange(5000)]) for _ in range(rng.randrange(1, 40))]
        data = memoryview(rng.randbytes(sum(lengths)))
        nonce, first = rng.getrandbits(64), rng.getrandbits(40)
        expected, at = b"", 0
        for i, n in enumerate(lengths):
            expected += rec.encode(nonce, first + i, data[at:at + n])
            at += n
        assert b"".join(rec.frames(nonce, first, data, lengths)) == expected


@pytest.fixture
def compiled():
    return pytest.importorskip("memfabric._records")      # ./dev builds it; Python frames where it cannot


def test_the_compiled_batch_frames_the_same_bytes(compiled):
    rng = random.Random(8)
    for _ in range(200):
        lengths = [rng.choice([0, 1, 7, 8, 9, 15, 16, 17, rng.randrange(5000)]) for _ in range(rng.randrange(1, 40))]
        data = rng.randbytes(sum(lengths))
        nonce, first = rng.getrandbits(64), rng.getrandbits(40)
        assert compiled.frame_batch(nonce, first, data, lengths) == b"".join(
            rec.frames(nonce, first, memoryview(data), lengths))


def test_the_compiled_crc_is_crc32c_both_ways(compiled):
    from crc32c import crc32c
    rng = random.Random(9)
    # Around the three-stream blocks' edges (3 x 256 and 3 x 8192 bytes, _crc32c.c), from
    # every alignment.
    edges = [k * 3 * block + d for block in (256, 8192) for k in (1, 2, 5) for d in (-9, -1, 0, 1, 8, 255)]
    for n in list(range(0, 40)) + [4096, 4099, 100_000, (1 << 20) + 3] + edges:
        data = rng.randbytes(n + 7)
        start = rng.getrandbits(32)
        for skew in (0, 3) if n < 1 << 20 else (0,):
            view = memoryview(data)[skew:skew + n]
            for table in (False, True):
                assert compiled.crc32c_of(view, 0, table) == crc32c(view)
                assert compiled.crc32c_of(view, start, table) == crc32c(view, start)


@pytest.mark.parametrize("lengths, data", [([5], b"1234"), ([-1, 5], b"1234"), ([1 << 40], b""), (["4"], b"1234")])
def test_the_compiled_batch_refuses_lengths_that_do_not_fit(compiled, lengths, data):
    with pytest.raises((ValueError, OverflowError, TypeError)):
        compiled.frame_batch(1, 0, data, lengths)


def test_the_compiled_frame_read_returns_exactly_the_records_that_check(compiled):
    """read_frame (record(i) on the same host) against the frames Python makes: the payload
    of every record at its place; None for any header field, CRC, nonce or index that is not
    that record's, and for a place outside the view."""
    rng = random.Random(10)
    nonce = rng.getrandbits(64)
    lengths = [0, 1, 7, 8, 9, 4096, 4099, 17]
    payloads = [rng.randbytes(n) for n in lengths]
    first = (1 << 32) + 5                       # the header holds the index's low 32 bits only
    log = bytearray(b"\xee" * 3) + b"".join(rec.encode(nonce, first + i, p) for i, p in enumerate(payloads))
    places, at = [], 3
    for p in payloads:
        places.append(at)
        at += rec.frame_bytes(len(p))
    view = memoryview(log)
    for i, (p, at) in enumerate(zip(payloads, places)):
        index = first + i
        assert compiled.read_frame(view, at, len(p), nonce, index) == p
        assert compiled.read_frame(view, at, len(p), nonce ^ 1, index) is None
        assert compiled.read_frame(view, at, len(p), nonce, index + 1) is None
        assert compiled.read_frame(view, at, len(p), nonce, index + (1 << 32)) is None      # same low bits, CRC differs
        assert compiled.read_frame(view, at, len(p) + 1, nonce, index) is None
        assert compiled.read_frame(view, at + 8, len(p), nonce, index) is None
        for byte in (0, 4, 8, 12, rec.HEADER_BYTES + len(p) - 1):       # magic, length, index, CRC, payload
            if byte >= rec.HEADER_BYTES + len(p):
                continue
            log[at + byte] ^= 0x40
            assert compiled.read_frame(view, at, len(p), nonce, index) is None, (i, byte)
            log[at + byte] ^= 0x40
    last, n = places[-1], lengths[-1]
    assert compiled.read_frame(view[:last + rec.HEADER_BYTES + n], last, n, nonce, first + 7) == payloads[-1]
    for at, length in ((last, n + 1), (-1, 0), (len(log), 0), (len(log) - 15, 0), (last, -1), (last, 1 << 40)):
        assert compiled.read_frame(view[:last + rec.HEADER_BYTES + n], at, length, nonce, first + 7) is None
    assert compiled.read_frame(memoryview(b""), 0, 0, nonce, 0) is None
    # A whole header whose payload the view cuts short: never read past the view's end.
    assert compiled.read_frame(view[:last + rec.HEADER_BYTES + n - 1], last, n, nonce, first + 7) is None


@given(st.integers(1, 1 << 40), st.data())
def test_rounds_keep_a_pmem_log_ready_ahead_and_never_past_its_capacity(capacity, data):
    """A pmem log is made ready in rounds (limits.PLOG_PREPARE_ROUND_BYTES): the first part at
    create, the next when the log comes close to it, never past its capacity."""
    ready_end = first_ready(capacity)
    assert ready_end == min(capacity, PLOG_PREPARE_AT_CREATE_BYTES)
    written = data.draw(st.integers(0, ready_end))
    rounds = 0
    while wants_round(written, ready_end, capacity):
        before, ready_end = ready_end, round_end(ready_end, capacity)
        assert ready_end == min(capacity, before + PLOG_PREPARE_ROUND_BYTES)
        rounds += 1
    assert ready_end == capacity or written + PLOG_PREPARE_AHEAD_BYTES <= ready_end
    assert not rounds or ready_end < written + PLOG_PREPARE_AHEAD_BYTES + PLOG_PREPARE_ROUND_BYTES   # none too many
    assert not wants_round(capacity, capacity, capacity)

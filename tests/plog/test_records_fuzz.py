"""memfabric._records.frame_batch given what it must refuse (found by fuzzing it)."""

from __future__ import annotations

import numpy as np
import pytest

from memfabric.plog import record as rec

_records = pytest.importorskip("memfabric._records")


@pytest.mark.parametrize("nonce, first", [(-1, 0), (1 << 64, 0), (0, -1), (0, 1 << 64), (-(1 << 70), 0)])
def test_numbers_without_a_word_are_refused_as_record_frames_refuses_them(nonce, first):
    """Before the fix: frame_batch framed nonce -1 as 2**64 - 1 and 2**64 as 0 (PyArg "K"
    wraps), where record.frames raises struct.error: the same call, two answers."""
    with pytest.raises(Exception):
        rec.frames(nonce, first, memoryview(b"abc"), [3])
    with pytest.raises(OverflowError):
        _records.frame_batch(nonce, first, b"abc", [3])


@pytest.mark.parametrize("bad", [1.5, "1", None, np.float64(1)])
def test_a_nonce_or_index_not_an_int_is_a_type_error(bad):
    with pytest.raises(TypeError):
        _records.frame_batch(bad, 0, b"abc", [3])
    with pytest.raises(TypeError):
        _records.frame_batch(0, bad, b"abc", [3])


def test_bad_lengths_and_buffers_are_precise_errors():
    for data, lengths, error in [(b"abc", [1 << 64], OverflowError), (b"abc", [-1, 4], ValueError),
                                 (b"a" * 10, [(1 << 32) - 1] * 2, ValueError), (b"abc", (3,), TypeError),
                                 (b"abc", [np.int64(3)], ValueError), (memoryview(b"abcdef")[::2], [3], BufferError),
                                 ("abc", [3], TypeError), (b"abc", [2], ValueError)]:
        with pytest.raises(error):
            _records.frame_batch(0, 0, data, lengths)


def test_the_largest_numbers_frame_as_record_frames_does():
    top = (1 << 64) - 1
    assert _records.frame_batch(top, top - 1, b"abcd", [2, 2]) == \
        b"".join(rec.frames(top, top - 1, memoryview(b"abcd"), [2, 2]))
    assert len(_records.frame_batch(0, 0, b"", [0] * 100_000)) == 100_000 * rec.HEADER_BYTES


def test_frames_into_a_buffer_are_the_frames_it_returns():
    """frame_batch(..., into): the same bytes, written into a buffer kept for the next batch
    (the rest of it untouched), their length returned; a buffer too small (or read-only) is
    refused with nothing written."""
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(0, 5000, 40)]
    data = rng.integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    frames = _records.frame_batch(3, 10, data, lengths)
    into = bytearray(b"\xee" * (len(frames) + 100))
    assert _records.frame_batch(3, 10, data, lengths, into) == len(frames)
    assert into[:len(frames)] == frames and into[len(frames):] == b"\xee" * 100
    small = bytearray(b"\xee" * (len(frames) - 1))
    with pytest.raises(ValueError):
        _records.frame_batch(3, 10, data, lengths, small)
    assert small == b"\xee" * (len(frames) - 1)
    with pytest.raises((TypeError, BufferError)):
        _records.frame_batch(3, 10, data, lengths, bytes(len(frames)))
    assert rec.frame_into(3, 10, memoryview(data), lengths, into) == len(frames)


def test_gather_into_copies_the_parts_back_to_back_or_nothing():
    parts = [b"abc", memoryview(b"defgh"), bytearray(b""), np.arange(4, dtype=np.uint8)]
    into = bytearray(b"-" * 16)
    assert _records.gather_into(into, parts) == 12
    assert into == b"abcdefgh\x00\x01\x02\x03----"
    small = bytearray(b"-" * 11)
    with pytest.raises(ValueError):
        _records.gather_into(small, parts)
    assert small == b"-" * 11
    for bad in ([b"ab", "cd"], [b"ab", memoryview(b"abcdef")[::2]]):
        with pytest.raises((TypeError, BufferError)):
            _records.gather_into(into, bad)
    with pytest.raises(BufferError):
        _records.gather_into(bytes(16), [b"a"])
    with pytest.raises(TypeError):
        _records.gather_into(into, (b"a",))
    # With the lengths measured before: each part must still be that long, or nothing is copied.
    into = bytearray(b"-" * 16)
    assert _records.gather_into(into, parts, [3, 5, 0, 4]) == 12 and into == b"abcdefgh\x00\x01\x02\x03----"
    into = bytearray(b"-" * 16)
    for lengths in ([4, 4, 0, 4], [3, 5, 0], [3, 5, 0, 4, 0], [3, 5, 0, "4"], (3, 5, 0, 4), [3, 5, 0, 1 << 70]):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            _records.gather_into(into, parts, lengths)
        assert into == b"-" * 16

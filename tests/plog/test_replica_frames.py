"""_plogserve.c frames_check, what a copy's receive loop takes from its home (replica_packet), is
rec.scan's rule: whole records that check from the copy's next index, or nothing (Python's then,
which refuses them). The property: both say the same of any bytes, whole or damaged."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfabric.limits import MAX_PLOG_RECORD_BYTES
from memfabric.plog import record as rec

_records = pytest.importorskip("memfabric._records")


def _python_takes(data: bytes, nonce: int, first: int) -> int:
    """op_plog_replica_append's check: how many records, or 0 when it refuses the bytes."""
    view = memoryview(data)
    found = list(rec.scan(lambda o, n: view[o:o + n], len(data), nonce, MAX_PLOG_RECORD_BYTES, first_index=first))
    whole = bool(found) and found[-1][0] + rec.frame_bytes(found[-1][1]) == len(data)
    return len(found) if whole else 0


@settings(max_examples=400, deadline=None)
@given(nonce=st.integers(0, (1 << 64) - 1), first=st.integers(0, (1 << 33)),
       payloads=st.lists(st.binary(max_size=40), min_size=0, max_size=5),
       damage=st.one_of(st.none(), st.tuples(st.integers(0, 1 << 16), st.integers(1, 255))),
       cut=st.integers(-16, 16), sender_nonce_flip=st.booleans(), index_shift=st.sampled_from([0, 0, 0, 1, -1]))
def test_the_compiled_check_says_what_rec_scan_says(nonce, first, payloads, damage, cut, sender_nonce_flip,
                                                       index_shift):
    sent_nonce = nonce ^ 1 if sender_nonce_flip else nonce
    data = bytearray(b"".join(rec.encode(sent_nonce, max(0, first + index_shift) + i, p) for i, p in enumerate(payloads)))
    if damage is not None and data:
        data[damage[0] % len(data)] ^= damage[1]
    if cut < 0:
        del data[max(0, len(data) + cut):]
    elif cut > 0 and data:
        data += bytes(cut)
    want = _python_takes(bytes(data), nonce, first)
    assert _records.replica_frames(bytes(data), nonce, first) == want
    if damage is None and cut == 0 and not sender_nonce_flip and max(0, first + index_shift) == first:
        assert want == len(payloads)          # (the property is not all refusals)


def test_an_index_past_32_bits_checks_its_low_word_and_its_crc_the_whole():
    index = (1 << 32) + 5
    data = rec.encode(9, index, b"abc")
    assert _records.replica_frames(data, 9, index) == 1 == _python_takes(data, 9, index)
    assert _records.replica_frames(data, 9, 5) == 0 == _python_takes(data, 9, 5)

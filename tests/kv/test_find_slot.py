"""The server's compiled key lookup (_native.find_slot, used by kv/store.py Store.find) against
IndexWriter.find, the Python it replaces: the same slot, or none, for keys present, deleted and
never written, with hashes forced to collide (so probe chains are long, wrap around the table's
end and pass tombstones) and keys of one hash differing only in length or in their last byte."""

from __future__ import annotations

import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfabric import _native
from memfabric.errors import NoSuchObject
from memfabric.kv import index as ix

SLOTS = ix.MIN_SLOTS
SEGMENT_BYTES = 1 << 20


class Memory:
    """Record memory as the server reaches it: segment id -> an object with a `view`."""

    class Segment:
        def __init__(self, view):
            self.view = view

    def __init__(self) -> None:
        self.bytes = bytearray(SEGMENT_BYTES)
        self.segments = {7: self.Segment(memoryview(self.bytes))}
        self.used = 0

    def __call__(self, segment: int):
        got = self.segments.get(segment)
        if got is None:
            raise NoSuchObject(f"segment {segment} is gone")
        return got

    def record(self, key: bytes) -> tuple[int, int]:
        offset = self.used
        self.bytes[offset:offset + len(key)] = key
        self.used += len(key) + 1
        return 7, offset


def python_find(writer: ix.IndexWriter, memory: Memory, h: int, key: bytes) -> int | None:
    def is_key(slot: int) -> bool:
        segment, offset, klen, *_ = writer.fields(slot)
        return klen == len(key) and bytes(memory(segment).view[offset:offset + klen]) == key
    return writer.find(h, is_key)


def compiled_find(writer: ix.IndexWriter, memory: Memory, h: int, key: bytes) -> int | None:
    got = _native.find_slot(writer.words, h, key, memory)
    assert got != _native.ASK, "every record here is readable"
    return None if got == _native.MISSING else got


# A few hashes shared by many keys: each key's hash is one of them (stored hashes are >= 2).
HASHES = [2, 3, SLOTS - 1, SLOTS + 5]
KEYS = [b"k", b"k\x00", b"key", b"kez", b"key-longer", b"x" * 300, b"x" * 299 + b"y"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["put", "delete"]), st.sampled_from(KEYS), st.sampled_from(HASHES)),
                max_size=60))
def test_the_compiled_lookup_finds_what_python_finds(steps):
    writer = ix.IndexWriter(memoryview(array.array("Q", bytes(8 * ix.words_for(SLOTS)))), SLOTS, 1)
    memory = Memory()
    hashes = {key: HASHES[i % len(HASHES)] for i, key in enumerate(KEYS)}
    for op, key, _ in steps:
        h = hashes[key]
        slot = python_find(writer, memory, h, key)
        if op == "put":
            segment, offset = memory.record(key)
            if slot is None:
                slot, exists = writer.place(h, lambda s: False)
                assert not exists
            writer.write(slot, h, (segment, offset, len(key), 0, 0, 0, 1), new=python_find(writer, memory, h, key) is None)
        elif slot is not None:
            writer.delete(slot)
        for other in KEYS:
            for h_other in {hashes[other], *HASHES}:
                assert compiled_find(writer, memory, h_other, other) == python_find(writer, memory, h_other, other)


def test_a_record_without_a_view_is_left_to_python_and_a_gone_segment_raises():
    writer = ix.IndexWriter(memoryview(array.array("Q", bytes(8 * ix.words_for(SLOTS)))), SLOTS, 1)
    memory = Memory()
    segment, offset = memory.record(b"key")
    slot, _ = writer.place(9, lambda s: False)
    writer.write(slot, 9, (segment, offset, 3, 0, 0, 0, 1), new=True)
    assert _native.find_slot(writer.words, 9, b"key", memory) == slot
    assert _native.find_slot(writer.words, 9, b"kex", memory) == _native.MISSING
    assert _native.find_slot(writer.words, 10, b"key", memory) == _native.MISSING
    memory.segments[7] = Memory.Segment(None)               # a medium the server does not map
    assert _native.find_slot(writer.words, 9, b"key", memory) == _native.ASK
    released = memoryview(memory.bytes)
    released.release()
    memory.segments[7] = Memory.Segment(released)           # a destroyed segment's view
    assert _native.find_slot(writer.words, 9, b"key", memory) == _native.ASK
    del memory.segments[7]
    with pytest.raises(NoSuchObject):
        _native.find_slot(writer.words, 9, b"key", memory)
    # A slot whose record would lie past its segment's end: Python's to say what is wrong.
    memory.segments[7] = Memory.Segment(memoryview(memory.bytes))
    writer.write(slot, 9, (segment, SEGMENT_BYTES - 1, 3, 0, 0, 0, 2), new=False)
    assert _native.find_slot(writer.words, 9, b"key", memory) == _native.ASK


def test_a_table_that_is_not_one_is_refused():
    with pytest.raises(ValueError):
        _native.find_slot(b"\x00" * 12, 9, b"key", Memory())
    assert _native.find_slot(bytes(8 * ix.words_for(SLOTS)), 9, b"key", Memory()) == _native.ASK   # 0 slots

"""Property tests of the KV index (kv/index.py): the writer against a dict, and a reader whose
steps interleave with the writer's, which must never return a value the key did not have."""

from __future__ import annotations

import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memfabric.errors import InvalidArgument
from memfabric.kv import index as ix

KEYS = [b"k%d" % i for i in range(40)]


def table(slots: int = ix.MIN_SLOTS) -> memoryview:
    return memoryview(array.array("Q", bytes(8 * ix.words_for(slots))))


class Records:
    """Record memory as the slots name it: record id -> (key, value). The test's writer reuses
    a freed record's id at once (no grace at all): only the seqlock keeps readers right."""

    def __init__(self) -> None:
        self.data: dict[int, tuple[bytes, bytes]] = {}
        self.free: list[int] = []
        self.next = 1

    def new(self, key: bytes, value: bytes) -> int:
        rid = self.free.pop() if self.free else self.next
        if rid == self.next:
            self.next += 1
        self.data[rid] = (key, value)
        return rid

    def drop(self, rid: int) -> None:
        self.data[rid] = (b"garbage", b"garbage")
        self.free.append(rid)


def hash_of(key: bytes) -> int:
    # Few distinct hashes: long probe chains and many equal hashes for different keys.
    return ix.fix_hash(sum(key) % 7 * 1024 + sum(key) % 3)


class IndexMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.words = table()
        self.w = ix.IndexWriter(self.words, ix.MIN_SLOTS, generation=1)
        self.records = Records()
        self.model: dict[bytes, bytes] = {}
        self.version = 0

    def _is_key(self, key: bytes):
        return lambda slot: self.records.data[self.w.fields(slot)[0]][0] == key

    def put(self, key: bytes, value: bytes) -> None:
        h = hash_of(key)
        slot, exists = self.w.place(h, self._is_key(key))
        old = self.w.fields(slot)[0] if exists else None
        self.version += 1
        rid = self.records.new(key, value)
        self.w.write(slot, h, (rid, 0, len(key), len(value), 0, 0, self.version), new=not exists)
        if old is not None:
            self.records.drop(old)
        self.model[key] = value

    def delete(self, key: bytes) -> None:
        slot = self.w.find(hash_of(key), self._is_key(key))
        assert (slot is not None) == (key in self.model)
        if slot is not None:
            rid = self.w.fields(slot)[0]
            self.w.delete(slot)
            self.records.drop(rid)
            del self.model[key]

    def read(self, key: bytes, between=None) -> bytes | None:
        """The reader's protocol, with a hook between its memory reads."""
        words = self.words
        h = hash_of(key)
        for _ in range(50):
            slot = ix.probe(words, h)
            for _ in range(ix.MIN_SLOTS):
                seq, stored, fields = ix.read_slot(words, slot)
                if between:
                    between()
                if seq & 1:
                    break
                if stored == ix.EMPTY:
                    return None
                if stored == h:
                    rkey, rvalue = self.records.data.get(fields[0], (b"", b""))
                    if between:
                        between()
                    if rkey == key and ix.unchanged(words, slot, seq):
                        return rvalue
                    if not ix.unchanged(words, slot, seq):
                        break
                slot = (slot + 1) & (ix.MIN_SLOTS - 1)
        raise AssertionError("a reader gave up")

    @rule(key=st.sampled_from(KEYS), value=st.binary(min_size=0, max_size=4))
    def do_put(self, key: bytes, value: bytes) -> None:
        self.put(key, value)

    @rule(key=st.sampled_from(KEYS))
    def do_delete(self, key: bytes) -> None:
        self.delete(key)

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: bytes) -> None:
        assert self.read(key) == self.model.get(key)

    @rule(key=st.sampled_from(KEYS), ops=st.lists(st.tuples(st.sampled_from(KEYS), st.binary(max_size=3),
                                                            st.booleans()), min_size=1, max_size=6))
    def get_while_writing(self, key: bytes, ops: list) -> None:
        """Writes between the reader's steps: the answer is a value the key had at some moment
        of the read (before, during or after), never another key's nor garbage."""
        seen = [self.model.get(key)]
        pending = list(ops)

        def step() -> None:
            if pending:
                k, v, is_delete = pending.pop(0)
                self.delete(k) if is_delete else self.put(k, v)
                seen.append(self.model.get(key))
        got = self.read(key, step)
        assert got in seen, f"read {got!r}, the key had {seen}"

    @invariant()
    def counts(self) -> None:
        assert self.w.keys == len(self.model) == self.words[ix.H_KEYS]
        live = self.w.occupied()
        assert len(live) == len(self.model)
        assert all(self.words[ix.HEADER_WORDS + s * ix.SLOT_WORDS + ix.SEQ] % 2 == 0 for s in live)


TestIndex = IndexMachine.TestCase
TestIndex.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


def test_a_moved_table_sends_readers_on():
    words = table()
    w = ix.IndexWriter(words, ix.MIN_SLOTS, generation=1)
    w.write(5, 1029, (9, 0, 3, 4, 0, 0, 1), new=True)
    seq, _, _ = ix.read_slot(words, 5)
    assert ix.unchanged(words, 5, seq)
    w.moved_to(2)
    assert not ix.unchanged(words, 5, seq)


@given(st.integers(0, 10**7))
def test_slots_for_keeps_the_load_under_half(keys):
    if keys > ix.MAX_SLOTS * ix.MAX_LOAD:
        return
    slots = ix.slots_for(keys)
    assert slots & (slots - 1) == 0 and slots * ix.MAX_LOAD >= keys and slots >= ix.MIN_SLOTS


@pytest.mark.parametrize("slots", [0, 1000, ix.MIN_SLOTS // 2, ix.MAX_SLOTS * 2])
def test_bad_sizes_are_refused(slots):
    with pytest.raises(InvalidArgument):
        ix.IndexWriter(table(), slots, generation=1)


def test_hashes_never_mark_a_slot_empty_or_deleted():
    assert {ix.fix_hash(h) for h in range(5)} == {2, 3, 4}

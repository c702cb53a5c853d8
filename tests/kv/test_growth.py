"""Incremental growth of a keyspace's index (kv/index.py, kv/store.py): the real Store over a
real memfd segment, tables made small (MIN_SLOTS = 16) so that they grow and drain often.

Every key is read after each step, by the compiled reader (_native.probe) and by the client's
Python reader (KV._local_get_python), each given the tables a same-host client maps (kv_open:
the current table, and the one draining into it): each must answer exactly what a dict holds.
A second test reads at every instant the index changes (each slot made even again, each
header word), while writes, deletes, evictions and moves interleave."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memfabric import _native
from memfabric.core.allocator import Extent
from memfabric.kv import index as ix
from memfabric.kv import store as store_module
from memfabric.kv import space as space_module
from memfabric.kv.client import _MISS, KV, _LocalIndex
from memfabric.kv.heap import PAGE_BYTES
from memfabric.kv.rules import key_hash
from memfabric.kv.space import KeySpace, monotonic_ms, now_ms
from memfabric.kv.store import Store
from memfabric.media.dram import DramSegment

POOL, SEGMENT = "p", 5
SEGMENT_BYTES = 64 << 20
KEYS = [b"key-%d" % i for i in range(48)]
ASK = _native.ASK


class _Link:
    """What the readers need of a link: the segments this process maps."""

    def __init__(self, segment: DramSegment) -> None:
        self._segments = {(POOL, SEGMENT): segment}

    def check_alive(self) -> None:
        pass

    def segment_view(self, creds, segment):
        raise AssertionError(f"segment {segment} is not the test's")


class Keyspace:
    """One keyspace: the server's Store, and readers given what kv_open would give."""

    def __init__(self) -> None:
        fd = os.memfd_create("memfabric-test-growth")
        os.ftruncate(fd, SEGMENT_BYTES)
        self.segment = DramSegment(SEGMENT, fd, SEGMENT_BYTES)
        self.free_pages: list[int] = []
        self.next_page = 0
        self.space = KeySpace("t", "ns", grace_s=0.0)     # records reused at once: only the seqlock protects
        self.store = Store(self.space, lambda _: self.segment, self.reserve, self.release, lambda: None, "ns")
        self.space.store = self.store
        self.space.set_lease(monotonic_ms() + 3_600_000)
        self.link = _Link(self.segment)
        self.kv = KV.__new__(KV)
        self.kv._creds = (POOL, "ns", b"sec")
        self.version = 0

    def reserve(self, length: int) -> list[Extent]:
        assert length == PAGE_BYTES
        if self.free_pages:
            return [Extent(SEGMENT, self.free_pages.pop(), length)]
        self.next_page += 1
        assert self.next_page * PAGE_BYTES <= SEGMENT_BYTES
        return [Extent(SEGMENT, (self.next_page - 1) * PAGE_BYTES, length)]

    def release(self, extents: list[Extent]) -> None:
        self.free_pages += [e.offset for e in extents]

    # ---- the server's side --------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        h = key_hash(key)
        found = self.store.live(key, h, now_ms())
        self.version += 1
        self.store.write_inline(key, h, memoryview(value), 0, self.version, found, primary=True)

    def delete(self, key: bytes) -> bool:
        found = self.store.live(key, key_hash(key), now_ms())
        if found is not None:
            self.store.delete_slot(found[0])
        return found is not None

    # ---- same-host readers ----------------------------------------------------------------------

    def opened(self) -> tuple:
        """The tables a client opening now maps (kv_open)."""
        return self.space.table, self.space.draining

    def c_read(self, tables: tuple, key: bytes):
        table, old = tables
        return _native.probe(memoryview(table._index_map), table.refs, key_hash(key), POOL, self.link._segments, key,
                             None, None if old is None else memoryview(old._index_map),
                             None if old is None else old.refs)

    def c_read_many(self, tables: tuple, keys: list[bytes]):
        table, old = tables
        return _native.probe_many(memoryview(table._index_map), table.refs, [key_hash(k) for k in keys], keys, POOL,
                                  self.link._segments, None, None if old is None else memoryview(old._index_map),
                                  None if old is None else old.refs)

    def py_read(self, tables: tuple, key: bytes):
        table, old = tables
        idx = _LocalIndex.__new__(_LocalIndex)
        idx.words, idx.raw, idx.ref_bytes = table.words, memoryview(table._index_map), table.refs
        idx.mask = table.slots - 1
        idx.old = old
        idx.old_words = None if old is None else old.words
        idx.old_raw = None if old is None else memoryview(old._index_map)
        idx.old_ref_bytes = None if old is None else old.refs
        idx.old_mask = 0 if old is None else old.slots - 1
        idx.slot, idx.lock_free = None, True
        self.kv._index = lambda link: idx
        got = self.kv._local_get_python(self.link, key, None)
        return None if got is _MISS else got


def check_every_key(ks: Keyspace, model: dict[bytes, bytes], keys=KEYS) -> None:
    tables = ks.opened()
    for key in keys:
        want = model.get(key)
        assert ks.c_read(tables, key) == want, f"compiled reader, {key!r}"
        assert ks.py_read(tables, key) == want, f"Python reader, {key!r}"
    assert ks.c_read_many(tables, list(keys)) == [model.get(k) for k in keys]


@pytest.fixture
def small_tables(monkeypatch):
    monkeypatch.setattr(ix, "MIN_SLOTS", 16)


class GrowthMachine(RuleBasedStateMachine):
    """The keyspace against a dict, its readers checked after every step."""

    @initialize()
    def setup(self) -> None:
        self.ks = Keyspace()
        self.model: dict[bytes, bytes] = {}
        self.moves = 0
        self.grown = 0
        real_move, real_grow = ix.IndexWriter.move_to, Store.grow

        def counted_move(writer, slot, into):
            self.moves += 1
            return real_move(writer, slot, into)

        def counted_grow(store):
            self.grown += 1
            return real_grow(store)
        ix.IndexWriter.move_to = counted_move
        Store.grow = counted_grow
        self._restore = (real_move, real_grow)

    def teardown(self) -> None:
        if hasattr(self, "_restore"):
            ix.IndexWriter.move_to, Store.grow = self._restore

    @rule(key=st.sampled_from(KEYS), value=st.binary(max_size=24))
    def put(self, key: bytes, value: bytes) -> None:
        hand, draining = self.ks.space.drain_hand, self.ks.space.draining
        self.moves = 0
        self.ks.put(key, value)
        self.model[key] = value
        # A write moves its own key and at most MIGRATE_SLOTS_PER_WRITE slots' entries.
        assert self.moves <= ix.MIGRATE_SLOTS_PER_WRITE + 1
        if draining is not None and self.ks.space.draining is draining:
            assert self.ks.space.drain_hand - hand <= ix.MIGRATE_SLOTS_PER_WRITE

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: bytes) -> None:
        self.moves = 0
        assert self.ks.delete(key) == (key in self.model)
        self.model.pop(key, None)
        assert self.moves <= 1

    @rule(slots=st.integers(1, 20))
    def background_step(self, slots: int) -> None:
        self.ks.store.migrate(slots)

    @rule()
    def evict(self) -> None:
        store = self.ks.store
        if store.evict_one(b"none such"):
            (gone,) = store.evicted
            store.evicted.clear()
            del self.model[gone]

    @rule(cursor_steps=st.integers(1, 40), per_step=st.integers(1, 4), migrate=st.integers(0, 8))
    def scan_misses_nothing(self, cursor_steps: int, per_step: int, migrate: int) -> None:
        """A scan in small batches, writes (and the keeper's moves) between them, the table
        replaced once or several times under it: every key present all along is met. It goes
        on where its table's keys went (Store.resume, as op_kv_scan does), from the start only
        when that table is gone."""
        store = self.ks.store
        before = set(self.model)
        seen: set[bytes] = set()
        cursor, generation, first = 0, self.ks.space.table.generation, True
        for _ in range(10_000):
            if not (first or cursor):
                break
            first = False
            resumed = store.resume(cursor, generation) if cursor else 0
            generation = self.ks.space.table.generation
            found, cursor = store.scan(resumed or 0, 3, 48)
            seen.update(store.read_key(f) for f in found)
            if cursor_steps:
                cursor_steps -= 1
                for i in range(per_step):
                    self.put(b"scan-extra-%d-%d" % (cursor_steps, i), b"x")
                store.migrate(migrate)
        assert not cursor
        assert before & set(self.model) <= seen

    @invariant()
    def readers_agree_with_the_dict(self) -> None:
        if not hasattr(self, "ks"):
            return
        space = self.ks.space
        assert space.keys() == len(self.model)
        check_every_key(self.ks, self.model, KEYS + [k for k in self.model if k not in KEYS])
        if space.draining is not None:
            assert space.table.words[ix.H_DRAINING] == space.draining.generation
            assert space.draining.words[ix.H_MOVED] == space.table.generation
        else:
            assert space.table.words[ix.H_DRAINING] == 0


@pytest.mark.usefixtures("small_tables")
def test_growth_against_a_dict():
    GrowthMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=80, deadline=None,
                                               suppress_health_check=list(HealthCheck))
    GrowthMachine.TestCase().runTest()


class _Spy:
    """A table's words, calling `hook` after each store that leaves the table readable: a
    slot's sequence made even again, or a header word."""

    def __init__(self, words: memoryview, hook) -> None:
        self.words, self.hook = words, hook

    def __getitem__(self, i: int) -> int:
        return self.words[i]

    def __setitem__(self, i: int, value: int) -> None:
        self.words[i] = value
        if i < ix.HEADER_WORDS or ((i - ix.HEADER_WORDS) % ix.SLOT_WORDS == ix.SEQ and value % 2 == 0):
            self.hook()


def test_readers_are_right_at_every_instant_of_growth(small_tables, monkeypatch):
    """Between any two changes of the index (a slot rewritten, a header word set), through
    growths and drains with writes, overwrites, deletes and evictions interleaved: a reader
    given the current tables answers exactly; one still holding the tables it opened before
    the operation answers a value the key had, or asks the server, never a wrong one."""
    rng = random.Random(9)
    ks = Keyspace()
    model: dict[bytes, bytes] = {}
    changing: dict[bytes, set] = {}          # the key an operation changes: its values before and after
    held: list[tuple] = [ks.opened()]
    checks = [0]

    def hook() -> None:
        checks[0] += 1
        current = ks.opened()
        for key in KEYS:
            allowed = changing.get(key, {model.get(key)})
            assert ks.c_read(current, key) in allowed, (key, allowed)
            assert ks.py_read(current, key) in allowed, (key, allowed)
            got = ks.c_read(held[0], key)
            assert got in allowed or got == ASK, (key, got, allowed)

    class SpiedTable(space_module.Table):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.writer.words = _Spy(self.words, hook)

    monkeypatch.setattr(store_module, "Table", SpiedTable)
    ks.space.table.writer.words = _Spy(ks.space.table.words, hook)
    generations = set()
    for step in range(700):
        changing.clear()
        held[0] = ks.opened()
        key = rng.choice(KEYS[:40] if step < 350 else KEYS)
        roll = rng.random()
        if roll < 0.6:
            value = b"v%d" % step
            changing[key] = {model.get(key), value}
            ks.put(key, value)
            model[key] = value
        elif roll < 0.8:
            changing[key] = {model.get(key), None}
            ks.delete(key)
            model.pop(key, None)
        elif roll < 0.9:
            ks.store.migrate(rng.randint(1, 12))
        else:
            changing.update({k: {v, None} for k, v in model.items()})   # the key evicted is not known before
            if not ks.store.evict_one(b"none such"):
                continue
            (gone,) = ks.store.evicted
            ks.store.evicted.clear()
            del model[gone]
        changing.clear()
        generations.add(ks.space.table.generation)
        check_every_key(ks, model)
    assert len(generations) >= 3 and checks[0] > 1000      # it grew and drained, and was looked at


def test_a_put_moves_a_bounded_number_of_entries_at_any_size(monkeypatch):
    """At the real table sizes: a put that starts a growth copies no entry, and each put
    while the old table drains moves at most MIGRATE_SLOTS_PER_WRITE slots of it (plus its
    own key), however many keys the keyspace holds."""
    ks = Keyspace()
    moves = [0]
    real_move = ix.IndexWriter.move_to

    def counted(writer, slot, into):
        moves[0] += 1
        return real_move(writer, slot, into)
    monkeypatch.setattr(ix.IndexWriter, "move_to", counted)
    largest, growths, i = 0, 0, 0
    while growths < 3:
        draining = ks.space.draining
        moves[0] = 0
        ks.put(b"k%d" % i, b"0123456789abcdef")
        largest = max(largest, moves[0])
        if ks.space.draining is not draining and ks.space.draining is not None:
            growths += 1
            assert moves[0] <= ix.MIGRATE_SLOTS_PER_WRITE   # the old table of the one before, at most
        i += 1
    assert largest <= ix.MIGRATE_SLOTS_PER_WRITE + 1
    assert ks.space.table.slots >= 8 * ix.MIN_SLOTS
    check_every_key(ks, {b"k%d" % j: b"0123456789abcdef" for j in range(i)}, [b"k%d" % j for j in range(0, i, 7)])


def test_the_next_table_never_fills_while_the_old_drains():
    for slots in (ix.MIN_SLOTS, 1 << 16, 1 << 21):
        for keys in (0, slots // 8, slots // 4, slots // 2):
            grown = ix.growth_slots(slots, keys)
            # every key of the old table, and a new key per write until it is drained
            assert grown >= slots and grown * ix.MAX_LOAD >= keys + slots / ix.MIGRATE_SLOTS_PER_WRITE + 1

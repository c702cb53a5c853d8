"""Property tests for memfabric.bigmemory.objects: the object table and bm_id parsing."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from memfabric import errors
from memfabric.bigmemory.objects import Generations, ObjectTable, Placement, format_bm_id, parse_bm_id
from memfabric.limits import MAX_EXTENTS_PER_OBJECT

SERVER = 7
HOLDERS = ("c1", "c2")
BM_ID_FORM = re.compile(r"(0|[1-9][0-9]*)-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")


# ---------------------------------------------------------------------------------------
# Stateful model
# ---------------------------------------------------------------------------------------


class ObjectTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t: ObjectTable | None = None

    @initialize(max_objects=st.integers(1, 5),
                initial=st.lists(st.tuples(st.integers(1, 100),
                                           st.lists(st.sampled_from(HOLDERS), max_size=3)),
                                 max_size=5))
    def setup(self, max_objects: int, initial: list[tuple[int, list[str]]]) -> None:
        self.max_objects = max_objects
        self.t = ObjectTable(SERVER, max_objects, Generations(0))
        self.live: dict[str, dict] = {}          # bm_id -> {"size", "extents", "pins"}
        self.pinned_dead: dict[str, dict] = {}   # freed while pinned: extents wait
        self.dead: set[str] = set()              # ids that must never resolve again
        self.issued: list[str] = []              # every id ever handed out
        self.returned: Counter[Placement] = Counter()   # extents handed back for release
        self.made: list[Placement] = []          # every extent ever given to the table
        self.next_extent = 0
        # Start with some (possibly pinned) objects, so that every rule has something
        # to act on even in runs where the generator leaves `create` out.
        for size, pins in initial[:max_objects]:
            record = self.t.create(size, self._extents([size]))
            self.issued.append(record.bm_id)
            self.live[record.bm_id] = {"size": size, "extents": list(record.extents),
                                       "pins": Counter()}
            for holder in pins:
                self.t.pin(record.bm_id, holder)
                self.live[record.bm_id]["pins"][holder] += 1

    # ---- helpers -----------------------------------------------------------------

    def _extents(self, lengths: list[int]) -> list[Placement]:
        out = []
        for n in lengths:
            # Unique placements, so "returned exactly once" is checkable.
            out.append(Placement(server_id=1, segment=self.next_extent, offset=0, length=n))
            self.next_extent += 1
        self.made.extend(out)
        return out

    def _hand_back(self, extents: list[Placement]) -> None:
        self.returned.update(extents)

    def _pick(self, data: st.DataObject) -> str:
        """Mostly an id that is still live or pinned-dead; sometimes any id ever issued."""
        interesting = sorted(set(self.live) | set(self.pinned_dead))
        pool = interesting if interesting and data.draw(st.integers(0, 3), label="fresh") else None
        return data.draw(st.sampled_from(pool or sorted(set(self.issued))), label="bm_id")

    # ---- rules -------------------------------------------------------------------

    @rule(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=3), data=st.data())
    def create(self, lengths: list[int], data: st.DataObject) -> None:
        size = data.draw(st.integers(1, sum(lengths)), label="size")
        extents = self._extents(lengths)
        if len(self.live) >= self.max_objects:
            with pytest.raises(errors.LimitExceeded):
                self.t.create(size, extents)
            self.made = self.made[: -len(extents)]
            return
        record = self.t.create(size, extents)
        assert record.bm_id not in self.issued, f"bm_id {record.bm_id} issued twice"
        server, slot, gen = parse_bm_id(record.bm_id)
        assert (server, slot, gen) == (SERVER, record.slot, record.generation)
        assert 0 <= slot < self.max_objects
        assert record.size_bytes == size and record.extents == extents
        assert record.pins == {}
        self.issued.append(record.bm_id)
        self.live[record.bm_id] = {"size": size, "extents": list(extents), "pins": Counter()}

    @rule(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=3))
    def create_uncovered(self, lengths: list[int]) -> None:
        extents = [Placement(1, -1, 0, n) for n in lengths]
        with pytest.raises(errors.InvalidArgument):
            self.t.create(sum(lengths) + 1, extents)

    @precondition(lambda self: bool(self.issued))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        bm_id = self._pick(data)
        if bm_id not in self.live:
            with pytest.raises(errors.NoSuchObject):
                self.t.free(bm_id)
            return
        out = self.t.free(bm_id)
        obj = self.live.pop(bm_id)
        self.dead.add(bm_id)
        if obj["pins"]:
            assert out == [], "a pinned object's extents were released at free"
            self.pinned_dead[bm_id] = obj
        else:
            assert out == obj["extents"]
            self._hand_back(out)

    @precondition(lambda self: bool(self.issued))
    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        bm_id = self._pick(data)
        if bm_id in self.live:
            record = self.t.lookup(bm_id)
            assert record.bm_id == bm_id
            assert record.size_bytes == self.live[bm_id]["size"]
            assert record.extents == self.live[bm_id]["extents"]
        else:
            with pytest.raises(errors.NoSuchObject):
                self.t.lookup(bm_id)

    @precondition(lambda self: bool(self.issued))
    @rule(data=st.data(), grow=st.integers(0, 150),
          more=st.lists(st.integers(1, 100), max_size=2))
    def expand(self, data: st.DataObject, grow: int, more: list[int]) -> None:
        bm_id = self._pick(data)
        if bm_id not in self.live:
            with pytest.raises(errors.NoSuchObject):
                self.t.expand(bm_id, 10**6, [])
            return
        obj = self.live[bm_id]
        new_size = obj["size"] + grow
        reserved = sum(e.length for e in obj["extents"]) + sum(more)
        if reserved < new_size:
            extents = [Placement(1, -1, 0, n) for n in more]   # never accepted
            with pytest.raises(errors.InvalidArgument):
                self.t.expand(bm_id, new_size, extents)
        else:
            extents = self._extents(more)
            record = self.t.expand(bm_id, new_size, extents)
            obj["size"] = new_size
            obj["extents"].extend(extents)
            assert record.size_bytes == new_size and record.extents == obj["extents"]
        if obj["size"] > 1:
            with pytest.raises(errors.InvalidArgument):
                self.t.expand(bm_id, obj["size"] - 1, [])

    @precondition(lambda self: bool(self.issued))
    @rule(holder=st.sampled_from(HOLDERS), times=st.integers(1, 2), data=st.data())
    def pin(self, holder: str, times: int, data: st.DataObject) -> None:
        bm_id = self._pick(data)
        if bm_id not in self.live:
            with pytest.raises(errors.NoSuchObject):
                self.t.pin(bm_id, holder)
            return
        for _ in range(times):
            record = self.t.pin(bm_id, holder)
            self.live[bm_id]["pins"][holder] += 1
            assert record.pins == dict(self.live[bm_id]["pins"])

    @precondition(lambda self: bool(self.issued))
    @rule(holder=st.sampled_from(HOLDERS), data=st.data())
    def unpin(self, holder: str, data: st.DataObject) -> None:
        bm_id = self._pick(data)
        obj = self.live.get(bm_id) or self.pinned_dead.get(bm_id)
        if obj is None:
            with pytest.raises(errors.NoSuchObject):
                self.t.unpin(bm_id, holder)
            return
        if obj["pins"][holder] == 0:
            with pytest.raises(errors.InvalidArgument):
                self.t.unpin(bm_id, holder)
            return
        out = self.t.unpin(bm_id, holder)
        obj["pins"][holder] -= 1
        obj["pins"] = +obj["pins"]       # drop zero counts
        if bm_id in self.pinned_dead and not obj["pins"]:
            del self.pinned_dead[bm_id]
            assert out == obj["extents"], "last unpin of a freed object must release it"
            self._hand_back(out)
        else:
            assert out == []

    # unpin_all and drop_all wipe most state: the `rare` draw makes them act a quarter
    # of the time, so pinned-then-freed objects live long enough to be exercised.
    @rule(holder=st.sampled_from(HOLDERS), rare=st.integers(0, 3))
    def unpin_all(self, holder: str, rare: int) -> None:
        if rare:
            return
        out = self.t.unpin_all(holder)
        expected: list[Placement] = []
        for obj in self.live.values():
            obj["pins"].pop(holder, None)
        for bm_id in list(self.pinned_dead):
            obj = self.pinned_dead[bm_id]
            obj["pins"].pop(holder, None)
            if not obj["pins"]:
                expected.extend(obj["extents"])
                del self.pinned_dead[bm_id]
        assert Counter(out) == Counter(expected)
        self._hand_back(out)

    @rule(rare=st.integers(0, 3))
    def drop_all(self, rare: int) -> None:
        if rare:
            return
        records = self.t.drop_all()
        ids = [r.bm_id for r in records]
        assert sorted(ids) == sorted(list(self.live) + list(self.pinned_dead))
        for r in records:
            obj = self.live.get(r.bm_id) or self.pinned_dead[r.bm_id]
            assert r.extents == obj["extents"]
            self._hand_back(r.extents)
        self.dead |= set(ids)
        self.live.clear()
        self.pinned_dead.clear()

    # ---- invariants --------------------------------------------------------------

    @invariant()
    def table_matches_model(self) -> None:
        if self.t is None:
            return
        assert len(self.t) == len(self.live)
        ids = [r.bm_id for r in self.t.records()]
        assert len(ids) == len(set(ids)), "duplicate live ids"
        assert sorted(ids) == sorted(self.live)
        slots = [r.slot for r in self.t.records()]
        assert len(slots) == len(set(slots)), "two live objects share a slot"
        assert self.t.live_bytes() == sum(o["size"] for o in self.live.values())
        for r in self.t.records():
            assert r.reserved_bytes >= r.size_bytes
            assert r.pins == dict(self.live[r.bm_id]["pins"])

    @invariant()
    def the_counters_are_what_a_walk_finds(self) -> None:
        if self.t is None:
            return
        assert self.t.live_bytes() == sum(obj["size"] for obj in self.live.values())
        pinned: dict = {}
        for bm_id, obj in list(self.live.items()) + list(self.pinned_dead.items()):
            for holder, n in obj["pins"].items():
                if n:
                    pinned.setdefault(holder, set()).add(bm_id)
        assert self.t._pinned_by == pinned

    @invariant()
    def dead_ids_never_resolve(self) -> None:
        if self.t is None:
            return
        for bm_id in self.dead:
            with pytest.raises(errors.NoSuchObject):
                self.t.lookup(bm_id)

    @invariant()
    def every_extent_is_held_or_returned_exactly_once(self) -> None:
        if self.t is None:
            return
        assert all(n == 1 for n in self.returned.values()), (
            f"extents returned twice: {[e for e, n in self.returned.items() if n > 1]}")
        held = Counter()
        for obj in list(self.live.values()) + list(self.pinned_dead.values()):
            held.update(obj["extents"])
        assert not (set(held) & set(self.returned)), "an extent in use was handed back"
        assert held + self.returned == Counter(self.made)


ObjectTableMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestObjectTableMachine = ObjectTableMachine.TestCase


# ---------------------------------------------------------------------------------------
# bm_id parsing
# ---------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(max_size=70),
    st.text(alphabet="0123456789-", max_size=70),
    st.from_regex(r"\A[0-9]{1,4}-[0-9]{1,4}-[0-9]{1,4}\Z"),
))
def test_parse_bm_id_accepts_only_server_slot_generation(s):
    try:
        server, slot, gen = parse_bm_id(s)
    except errors.InvalidArgument:
        m = BM_ID_FORM.fullmatch(s)
        # Rejected: must not have been a well-formed id with a nonzero generation.
        assert m is None or not 5 <= len(s) <= 64 or int(m.group(3)) == 0
        return
    m = BM_ID_FORM.fullmatch(s)
    assert m is not None, f"accepted {s!r}, not SERVER-SLOT-GENERATION"
    assert 5 <= len(s) <= 64
    assert (server, slot, gen) == tuple(int(g) for g in m.groups())
    assert gen >= 1


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"\A[0-9]{1,4}-[0-9]{1,4}-[0-9]{1,4}\Z"))
def test_parse_bm_id_accepts_only_canonical_spelling(s):
    try:
        parsed = parse_bm_id(s)
    except errors.InvalidArgument:
        return
    assert format_bm_id(*parsed) == s


def test_free_by_alias_is_refused_and_unpin_by_id_still_releases():
    t = ObjectTable(1, 4, Generations(0))
    ext = [Placement(1, 0, 0, 4096)]
    rec = t.create(100, ext)
    assert rec.bm_id == "1-0-1"
    t.pin(rec.bm_id, "c")
    with pytest.raises(errors.InvalidArgument):
        t.free("01-0-1")
    assert t.free(rec.bm_id) == []
    assert t.unpin(rec.bm_id, "c") == ext


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_format_parse_round_trip(server, slot, gen):
    assert parse_bm_id(format_bm_id(server, slot, gen)) == (server, slot, gen)


@pytest.mark.parametrize("bad", [None, 1, b"1-0-1", ["1", "0", "1"], "1-0-0", "1-0", "1-0-1-2",
                                 "1--0-1", "-1-0-1", "1-0-1 ", " 1-0-1", "1-²-1", "1-0-1\n",
                                 "a-b-c", "1-0-" + "1" * 70, ""])
def test_parse_bm_id_rejects_garbage(bad):
    with pytest.raises(errors.InvalidArgument):
        parse_bm_id(bad)


# ---------------------------------------------------------------------------------------
# Plain table tests
# ---------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 20))
def test_limit_exceeded_at_max_objects_and_ids_fresh_after_reuse(max_objects, rounds):
    t = ObjectTable(3, max_objects, Generations(0))
    seen = set()
    ids = []
    for _ in range(max_objects):
        r = t.create(1, [Placement(3, 0, 0, 1)])
        ids.append(r.bm_id)
        seen.add(r.bm_id)
    with pytest.raises(errors.LimitExceeded):
        t.create(1, [Placement(3, 0, 0, 1)])
    assert len(t) == max_objects
    for _ in range(rounds):
        victim = ids.pop(0)
        t.free(victim)
        r = t.create(1, [Placement(3, 0, 0, 1)])
        assert r.bm_id not in seen
        seen.add(r.bm_id)
        ids.append(r.bm_id)
        with pytest.raises(errors.NoSuchObject):
            t.lookup(victim)
        with pytest.raises(errors.LimitExceeded):
            t.create(1, [Placement(3, 0, 0, 1)])


def test_ids_of_other_servers_do_not_resolve():
    t = ObjectTable(3, 4, Generations(0))
    r = t.create(10, [Placement(3, 0, 0, 10)])
    _, slot, gen = parse_bm_id(r.bm_id)
    with pytest.raises(errors.NoSuchObject):
        t.lookup(format_bm_id(4, slot, gen))
    with pytest.raises(errors.NoSuchObject):
        t.lookup(format_bm_id(3, slot, gen + 1))
    with pytest.raises(errors.NoSuchObject):
        t.lookup(format_bm_id(3, slot + 1, gen))


def test_pinned_free_releases_once_at_last_unpin():
    t = ObjectTable(1, 2, Generations(0))
    ext = [Placement(1, 0, 0, 4096), Placement(2, 3, 0, 4096)]
    r = t.create(5000, ext)
    t.pin(r.bm_id, "a")
    t.pin(r.bm_id, "a")
    t.pin(r.bm_id, "b")
    assert t.free(r.bm_id) == []
    with pytest.raises(errors.NoSuchObject):
        t.pin(r.bm_id, "a")
    # The slot is reusable at once, with a new generation.
    r2 = t.create(1, [Placement(1, 9, 0, 1)])
    assert r2.slot == r.slot and r2.bm_id != r.bm_id
    assert t.unpin(r.bm_id, "a") == []
    assert t.unpin(r.bm_id, "b") == []
    assert t.unpin(r.bm_id, "a") == ext
    with pytest.raises(errors.NoSuchObject):
        t.unpin(r.bm_id, "a")
    assert t.unpin_all("a") == [] and t.unpin_all("b") == []


def test_too_many_extents_is_limit_exceeded():
    t = ObjectTable(1, 2, Generations(0))
    many = [Placement(1, 0, i, 1) for i in range(MAX_EXTENTS_PER_OBJECT + 1)]
    with pytest.raises(errors.LimitExceeded):
        t.create(1, many)
    r = t.create(1, many[:MAX_EXTENTS_PER_OBJECT])
    with pytest.raises(errors.LimitExceeded):
        t.expand(r.bm_id, 2, [Placement(1, 1, 0, 1)])
    assert len(t.lookup(r.bm_id).extents) == MAX_EXTENTS_PER_OBJECT


@pytest.mark.parametrize("size", [0, -1])
def test_create_rejects_non_positive_size(size):
    t = ObjectTable(1, 2, Generations(0))
    with pytest.raises(errors.InvalidArgument):
        t.create(size, [Placement(1, 0, 0, 1)])
    assert len(t) == 0


# ---------------------------------------------------------------------------------------
# Identity across namespaces and lives of a server (issue 7, item 4)
# ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=60), st.integers(0, 5))
def test_an_id_names_one_object_forever(steps, first_epoch):
    """Tables of one server (its namespaces) share a generation source; each restart takes a
    new epoch. Whatever is created, freed, restored: no id is ever handed out twice, and an
    id of an earlier life resolves only to the very object it named (restored), never to a
    new one."""
    issued: set[str] = set()
    survivors: dict[str, tuple[int, int]] = {}     # bm_id -> (its table, its size)
    epoch = first_epoch
    for life in range(3):
        gens = Generations(epoch)
        tables = [ObjectTable(1, 8, gens) for _ in range(3)]
        for bm_id, (i, size) in survivors.items():    # a persistent pool brings them back
            tables[i].restore(bm_id, size, [Placement(1, 0, 0, size)])
        live = [(i, bm_id) for bm_id, (i, _) in survivors.items()]
        for which, free_one in steps:
            if free_one and live:
                i, bm_id = live.pop(0)
                tables[i].free(bm_id)
                continue
            if len(tables[which]) >= 8:
                continue
            record = tables[which].create(10 + life, [Placement(1, 0, 0, 10 + life)])
            assert record.bm_id not in issued, f"{record.bm_id} issued twice"
            issued.add(record.bm_id)
            live.append((which, record.bm_id))
        for i, table in enumerate(tables):           # ids of earlier lives name only their own
            for bm_id in issued:
                if table.is_live(bm_id):
                    assert (i, bm_id) in live
        # The server restarts; only objects still live survive (as a journal would keep them).
        survivors = {bm_id: (i, tables[i].lookup(bm_id).size_bytes) for i, bm_id in live}
        epoch += 1


def test_generations_of_a_later_epoch_are_all_larger():
    early, late = Generations(3), Generations(4)
    assert max(early.take() for _ in range(100)) < late.take()
    with pytest.raises(errors.InvalidArgument):
        Generations(-1)

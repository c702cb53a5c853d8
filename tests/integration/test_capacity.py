"""Capacity and placement tell the truth (issue 7, item 13).

Each test is a scenario that failed on the fixed-segment pool: free space counted segments
other namespaces partly used, a few bytes per namespace starved everyone, figures did not add
up after a free, and an explicit server affinity quietly placed elsewhere.
"""

from __future__ import annotations

import pytest

import memfabric
from memfabric import Affinity

from ..helpers import KiB, MiB, alloc_when_possible, wait_until


def pool_figures(session: memfabric.Session) -> dict[int, dict]:
    return {s["server_id"]: s["pools"]["default"] for s in session.servers() if s["alive"]}


def test_figures_add_up_and_a_freed_spread_object_is_free_again(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="32MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("spread", sec_id="k")
        big = ns.alloc(40 * MiB, Affinity("spread"))
        big.write(b"x" * MiB)
        wait_until(lambda: all(f["used_bytes"] == 20 * MiB for f in pool_figures(s).values()),
                   "both servers to publish half the object each")
        for f in pool_figures(s).values():
            assert f["used_bytes"] + f["free_bytes"] == f["capacity_bytes"]
        big.free()
        wait_until(lambda: all(f["used_bytes"] == 0 for f in pool_figures(s).values()),
                   "both servers to publish the memory as free")
        for f in pool_figures(s).values():
            assert f["free_bytes"] == f["capacity_bytes"] == 32 * MiB
            assert f["lendable_bytes"] == 32 * MiB, "an emptied namespace's segments are lendable"
        again = alloc_when_possible(s.create_namespace("next", sec_id="k"), 60 * MiB, Affinity("spread"))
        assert sum(n for _, n in again.extents) == 60 * MiB


def test_a_few_bytes_per_namespace_do_not_starve_a_new_one(fresh_fabric):
    """16 namespaces of 2 KiB each took all 16 segments of a 64 MiB pool; a 17th got
    OUT_OF_MEMORY with 99.95% of the pool holding nothing."""
    fab = fresh_fabric(servers=1, capacity="64MiB", segment_size="4MiB")
    with memfabric.init(fab.directory) as s:
        for i in range(16):
            s.create_namespace(f"tiny{i}", sec_id="k").alloc(2 * KiB).write(b"t" * 2048)
        newcomer = s.create_namespace("newcomer", sec_id="k")
        big = newcomer.alloc(48 * MiB)
        assert big.size == 48 * MiB


def test_a_new_namespace_is_placed_where_the_memory_is(fresh_fabric):
    """Eight namespaces half-fill server 1; server 2 is three-quarters full. The old pool
    published server 1's half-used segments as free and sent a ninth namespace there, where
    it got OUT_OF_MEMORY, though 4 MiB of server 1 held nothing."""
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=1) as s:       # a client of server 2
        near = s.local.server_id
        far = next(x["server_id"] for x in s.servers() if x["server_id"] != near)
        for i in range(8):
            s.create_namespace(f"part{i}", sec_id="k").alloc(512 * KiB, Affinity("server", far))
        s.create_namespace("big", sec_id="k").alloc(6 * MiB, Affinity("server", near))
        wait_until(lambda: pool_figures(s)[far]["used_bytes"] == 4 * MiB, "server 1 to publish its use")
        ninth = s.create_namespace("ninth", sec_id="k")
        bm = ninth.alloc(3 * MiB, Affinity("local"))          # 2 MiB left here: the whole goes there
        assert bm.extents and {sid for sid, _ in bm.extents} == {far}


def test_batch_free_makes_the_memory_lendable_to_others(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="16MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        a = s.create_namespace("a", sec_id="k")
        objs = []
        while True:
            try:
                objs.append(a.alloc(256 * KiB))
            except memfabric.OutOfMemory:
                break
        assert len(objs) >= 48
        assert a.batch_free([bm.bm_id for bm in objs]) == [0] * len(objs)
        with memfabric.init(fab.directory) as other:     # another client, another namespace
            b = other.create_namespace("b", sec_id="k")
            whole = alloc_when_possible(b, 16 * MiB)
            assert whole.size == 16 * MiB and whole.read(0, 256 * KiB) == bytes(256 * KiB)


def test_affinity_server_is_a_requirement(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        me = s.local.server_id
        other = next(x["server_id"] for x in s.servers() if x["server_id"] != me)
        ns = s.create_namespace("strict", sec_id="k")
        ns.alloc(8 * MiB, Affinity("server", me))
        with pytest.raises(memfabric.OutOfMemory):
            ns.alloc(MiB, Affinity("server", me))       # full: not quietly placed on the other
        elsewhere = ns.alloc(MiB, Affinity("server", other))
        assert {sid for sid, _ in elsewhere.extents} == {other}
        local = ns.alloc(MiB, Affinity("local"))        # a preference: the other server
        assert {sid for sid, _ in local.extents} == {other}

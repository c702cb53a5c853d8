"""Property tests for memfabric.bigmemory.placement.plan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfabric import errors
from memfabric.core.allocator import round_up
from memfabric.bigmemory.placement import POLICIES, plan

SETTINGS = settings(max_examples=300, deadline=None)


@st.composite
def cluster(draw, max_servers: int = 6):
    """(page, size, free_by_server): free figures in pages plus some unaligned slack."""
    page = draw(st.sampled_from([16, 4096]))
    ids = draw(st.lists(st.integers(0, 50), min_size=1, max_size=max_servers, unique=True))
    free = {}
    for s in ids:
        pages = draw(st.integers(0, 40))
        slack = draw(st.one_of(st.just(0), st.integers(0, page - 1)))
        free[s] = pages * page + slack
    size = draw(st.integers(1, 64 * page))
    return page, size, free


def eligible(free: dict[int, int], page: int) -> dict[int, int]:
    """What each server can give: whole pages, and only servers with at least one."""
    return {s: (f // page) * page for s, f in free.items() if f >= page}


# ---- spread ----------------------------------------------------------------------------


@SETTINGS
@given(cluster())
def test_spread_shares_are_page_aligned_bounded_and_sum_to_need(c):
    page, size, free = c
    need = round_up(size, page)
    room = eligible(free, page)
    if sum(room.values()) < need:
        with pytest.raises(errors.OutOfMemory):
            plan("spread", size, free, local_id=0, page_bytes=page)
        return
    shares = plan("spread", size, free, local_id=0, page_bytes=page)
    servers = [s for s, _ in shares]
    assert servers == sorted(set(servers)), "one share per server, sorted by id"
    assert sum(n for _, n in shares) == need
    for s, n in shares:
        assert s in room, f"server {s} with {free.get(s)} bytes free got a share"
        assert n > 0 and n % page == 0
        assert n <= room[s], f"server {s} asked for {n}, has {room[s]}"


@SETTINGS
@given(cluster())
def test_spread_drains_servers_below_the_even_share(c):
    """Water-filling: a server with less than need/n (n servers with room) gives all it has."""
    page, size, free = c
    need = round_up(size, page)
    room = eligible(free, page)
    if sum(room.values()) < need:
        return
    shares = dict(plan("spread", size, free, local_id=0, page_bytes=page))
    for s, r in room.items():
        if r * len(room) < need:
            assert shares.get(s, 0) == r, f"server {s} below the even share kept memory back"


@SETTINGS
@given(st.sampled_from([16, 4096]), st.integers(1, 8), st.integers(1, 10), st.data())
def test_spread_even_split_when_everyone_has_room(page, n, pages_each, data):
    free = {s: data.draw(st.integers(pages_each * page, 100 * page), label=f"free{s}")
            for s in range(n)}
    size = data.draw(st.integers((n * pages_each - 1) * page + 1, n * pages_each * page),
                     label="size")
    assert plan("spread", size, free, local_id=0, page_bytes=page) == \
        [(s, pages_each * page) for s in range(n)]


@SETTINGS
@given(cluster())
def test_spread_servers_with_room_get_shares_within_one_page(c):
    page, size, free = c
    need = round_up(size, page)
    room = eligible(free, page)
    if sum(room.values()) < need:
        return
    shares = dict(plan("spread", size, free, local_id=0, page_bytes=page))
    top = max(shares.values())
    for s, r in room.items():
        got = shares.get(s, 0)
        if got < r:      # not drained: it had room for more
            assert top - got <= page, f"server {s} got {got}, another got {top} ({shares})"


def test_spread_minimal_uneven_example():
    p = 4096
    free = {0: 100 * p, 1: 100 * p, 2: 100 * p}
    shares = dict(plan("spread", 4 * p, free, local_id=0, page_bytes=p))
    assert set(shares) == {0, 1, 2}
    assert max(shares.values()) - min(shares.values()) <= p


def test_spread_out_of_memory_counts_only_whole_pages():
    p = 4096
    # 3 servers, each one byte short of two pages: only one page each is usable.
    free = {1: 2 * p - 1, 2: 2 * p - 1, 3: 2 * p - 1}
    assert sum(n for _, n in plan("spread", 3 * p, free, 0, page_bytes=p)) == 3 * p
    with pytest.raises(errors.OutOfMemory):
        plan("spread", 3 * p + 1, free, 0, page_bytes=p)
    with pytest.raises(errors.OutOfMemory):
        plan("spread", 1, {1: p - 1, 2: 0}, 0, page_bytes=p)
    with pytest.raises(errors.OutOfMemory):
        plan("spread", 1, {}, 0, page_bytes=p)


# ---- server ----------------------------------------------------------------------------


@SETTINGS
@given(cluster(), st.integers(0, 60))
def test_server_policy(c, target):
    page, size, free = c
    need = round_up(size, page)
    if target in free:
        assert plan("server", size, free, local_id=0, target_id=target, page_bytes=page) == \
            [(target, need)]
    else:
        with pytest.raises(errors.ServerUnavailable):
            plan("server", size, free, local_id=0, target_id=target, page_bytes=page)


def test_server_policy_needs_a_target():
    with pytest.raises(errors.InvalidArgument):
        plan("server", 10, {1: 1 << 20}, local_id=1, target_id=None)


# ---- local -----------------------------------------------------------------------------


@SETTINGS
@given(cluster(), st.integers(0, 60))
def test_local_policy(c, local):
    page, size, free = c
    need = round_up(size, page)
    result = plan("local", size, free, local_id=local, page_bytes=page)
    assert len(result) == 1
    server, n = result[0]
    assert n == need
    if free.get(local, 0) >= need:
        assert server == local, "local fits but another server was chosen"
    elif any(f >= need for f in free.values()):
        assert free[server] >= need, "chose a server that cannot hold the object"
        assert free[server] == max(free.values())
    else:
        # Nowhere fits whole: the local server is asked (and will refuse).
        assert server == local


@pytest.mark.parametrize("size", [1, 4096, 4097, 3 * 4096])
def test_local_policy_exact_fit_stays_local(size):
    need = round_up(size, 4096)
    assert plan("local", size, {1: need, 2: need * 10}, local_id=1) == [(1, need)]
    assert plan("local", size, {1: need - 1, 2: need * 10}, local_id=1) == [(2, need)]


def test_local_policy_with_no_servers_known():
    assert plan("local", 5000, {}, local_id=3) == [(3, 8192)]


# ---- arguments -------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(st.text(max_size=12), st.none(), st.integers()), st.integers(1, 1 << 20))
def test_unknown_policy_is_invalid(policy, size):
    if policy in POLICIES:
        return
    with pytest.raises(errors.InvalidArgument):
        plan(policy, size, {0: 1 << 30}, local_id=0, target_id=0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size", [0, -1, -4096])
def test_non_positive_size_is_invalid(policy, size):
    with pytest.raises(errors.InvalidArgument):
        plan(policy, size, {0: 1 << 30}, local_id=0, target_id=0)

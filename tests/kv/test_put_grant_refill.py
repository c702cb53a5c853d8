"""A compiled put grant's refill (_kvput.c KvPutGrant.refill) takes only what it can use: every
chunk of its stock (new and kept) inside a segment it is given, segments as (id, buffer);
anything else is refused with the grant left as it was."""

from __future__ import annotations

import pytest

_frames = pytest.importorskip("memfabric._frames")


class _Space:
    lock = None
    key_locks = [object()]


def refill(g, stock, segments):
    words = memoryview(bytearray((16 + 8 * 1024) * 8)).cast("Q")
    g.refill(_Space(), _Space(), words, bytearray(1024), _Space(), 4096, 1, stock, segments, -1, 0, 50)


@pytest.mark.parametrize("stock, segments", [
    ([(9, 0)], [(1, bytearray(1 << 20))]),               # a chunk in a segment not given
    ([(1, (1 << 20) - 100)], [(1, bytearray(1 << 20))]),  # a chunk running past its segment's end
    ([("x",)], [(1, bytearray(1 << 20))]),               # not (segment, offset)
    ([(1, 0)], [(1, 5)]),                                # a segment without a buffer
    ([(1, 0)], [1]),                                     # not (id, view)
])
def test_a_refill_it_cannot_use_is_refused_and_changes_nothing(stock, segments):
    g = _frames.KvPutGrant("pool", "ns", b"sec")
    refill(g, [(1, 0)], [(1, bytearray(1 << 20))])
    with pytest.raises((ValueError, TypeError)):
        refill(g, stock, segments)
    assert g.stocked == 1 and g.stock_segments == {1}
    g.close()


def test_the_stock_it_keeps_must_stay_reachable():
    g = _frames.KvPutGrant("pool", "ns", b"sec")
    refill(g, [(1, 0)], [(1, bytearray(1 << 20))])
    with pytest.raises(ValueError):
        refill(g, [(2, 0)], [(2, bytearray(1 << 20))])     # segment 1, where its chunk lies, not given
    refill(g, [(2, 0)], [(1, bytearray(1 << 20)), (2, bytearray(1 << 20))])
    assert g.stocked == 2 and g.stock_segments == {1, 2}
    assert sorted(g.take_stock()) == [(1, 0), (2, 0)] and g.stocked == 0
    g.close()

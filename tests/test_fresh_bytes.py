"""datapath/fresh_bytes.py: a new bytes filled in place, a bytes like any other."""

from __future__ import annotations

import gc
import platform

import numpy as np
import pytest

from memfabric.datapath.fresh_bytes import FRESH_BYTES_MIN, available, fresh_bytes

N = FRESH_BYTES_MIN + 4097         # not a multiple of a page


def test_available_on_cpython():
    assert available == (platform.python_implementation() == "CPython")


@pytest.mark.skipif(not available, reason="CPython only")
def test_filled_bytes_are_ordinary_bytes():
    want = np.random.default_rng(1).integers(0, 256, N, dtype=np.uint8)

    def fill(view: memoryview) -> None:
        assert view.nbytes == N and not view.readonly and view.format == "B"
        view[:] = want.data
    got = fresh_bytes(N, fill)
    assert type(got) is bytes and len(got) == N
    assert got == want.tobytes() and hash(got) == hash(want.tobytes())
    assert {got: 1}[want.tobytes()] == 1


@pytest.mark.skipif(not available, reason="CPython only")
def test_a_failed_fill_returns_nothing():
    def fill(view: memoryview) -> None:
        view[:5] = b"start"
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fresh_bytes(N, fill)


@pytest.mark.skipif(not available, reason="CPython only")
def test_a_view_kept_after_the_fill_keeps_the_bytes_alive():
    kept = []

    def fill(view: memoryview) -> None:
        view[:] = b"\x07" * N
        kept.append(view[N - 10:])     # as a transfer cancelled on an error might hold it
    got = fresh_bytes(N, fill)
    del got
    gc.collect()
    junk = [bytes([i]) * N for i in range(3)]    # memory freed too early would be reused here
    assert bytes(kept[0]) == b"\x07" * 10
    del junk

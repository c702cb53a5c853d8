"""A new `bytes` to be filled once, in place, before anyone sees it: what C code gets from
`PyBytes_FromStringAndSize(NULL, n)`, for reads that return bytes without a second copy.

Large results are where this pays: malloc gives each one fresh memory, and this VM faults
fresh pages in at ~0.8 ms per MiB with 4 KiB pages (a 64 MiB read: ~50 ms of faults for 8 ms
of copying). The buffer is marked MADV_HUGEPAGE first, as numpy marks its arrays, so the
kernel faults it in 2 MiB at a time where transparent huge pages are enabled for madvised
memory. Writing into a bytes object is safe only while it is new and private: `fill` is
given a view of it before it is returned, and on any error the caller never sees it.

CPython only, and checked once at import (the data offset is derived from the object's
layout and proved on a probe); elsewhere, or if the check fails, `available` is False and
callers make their bytes another way.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

# Below this a result is served from malloc's reused memory and faults little; numpy's
# threshold for huge-page advice is the same.
FRESH_BYTES_MIN = 4 << 20
HUGE_PAGE_BYTES = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)     # Linux's value


def _setup() -> tuple[Callable[..., bytes] | None, int]:
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
    except AttributeError:            # not CPython
        return None, 0
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    offset = bytes.__basicsize__ - 1   # ob_sval, the data, ends the header (its NUL is counted)
    probe = new(None, 16)
    ctypes.memmove(id(probe) + offset, b"memfabric-probe!", 16)
    if probe != b"memfabric-probe!":
        return None, 0
    return new, offset


_new_bytes, _DATA_OFFSET = _setup()
available = _new_bytes is not None


def fresh_bytes(n: int, fill: Callable[[memoryview], None]) -> bytes:
    """A new bytes of `n` bytes (n >= FRESH_BYTES_MIN), after `fill(view)` wrote all of it."""
    assert available and n >= FRESH_BYTES_MIN
    result = _new_bytes(None, n)
    address = id(result) + _DATA_OFFSET
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + n) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end > start:
        _libc.madvise(start, end - start, MADV_HUGEPAGE)    # a hint: refused, it changes nothing
    area = (ctypes.c_char * n).from_address(address)
    # Every view of the area keeps the bytes alive: a slice some transfer still holds after
    # an error never points at freed memory.
    area.owner = result
    fill(memoryview(area).cast("B"))
    return result

"""Pool memory in this process's address space, revocable.

Python's mmap cannot map at a fixed address, so a range is: an anonymous reservation
(a Python mmap, which owns the range and refuses to close while buffers of it are
exported), with each piece of segment memory mapped over it with MAP_FIXED through libc.

`revoke` lays private zero pages over the whole range: buffers made from it stay valid
(they read zeros, and writes go nowhere), but the pool's memory is no longer reachable
through it. Links revoke before they tell a server they let go of a segment, so memory
that server lends to another namespace afterwards is never visible here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

from ..errors import Busy, IOError_

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
# Linux values; Python 3.11's mmap module does not export these.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
_RW = mmap.PROT_READ | mmap.PROT_WRITE
# Linux >= 5.14. For shared memory it maps the pages writable without write faults: as fast
# as MAP_POPULATE (~300 us per 4 MiB here), where a first write that faults page by page
# took ~2 ms per 4 MiB.
MADV_POPULATE_READ = 22


class SharedRange:
    """`pieces` are (fd, file offset, length), page-aligned, mapped back to back."""

    __slots__ = ("area", "base", "length", "writable", "revoked", "revoked_by", "tag", "__weakref__")

    def __init__(self, pieces: list[tuple[int, int, int]], writable: bool, tag: object = None,
                 populate: bool = False) -> None:
        self.length = sum(length for _, _, length in pieces)
        self.writable = writable
        self.revoked = False
        self.revoked_by: Exception | None = None   # why, when something other than its owner revoked it
        self.tag = tag        # who this range belongs to, e.g. (pool, ns), for revoking by owner
        self.area = mmap.mmap(-1, self.length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                              prot=_RW)
        anchor = ctypes.c_char.from_buffer(self.area)
        self.base = ctypes.addressof(anchor)
        del anchor
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # `populate`: fault every page in now, for a range that is about to be touched whole.
        # Otherwise pages fault in on first touch, or through populate() below: a client maps
        # whole segments, and a namespace that empties gives them back and maps them again on
        # its next alloc; populating 4 MiB each time cost ~500 us of every such cycle.
        flags = mmap.MAP_SHARED | MAP_FIXED | (mmap.MAP_POPULATE if populate else 0)
        position = 0
        for fd, offset, length in pieces:
            self._map(self.base + position, length, prot, flags, fd, offset)
            position += length

    def _map(self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
        got = _libc.mmap(addr, length, prot, flags, fd, offset)
        if got == _MAP_FAILED or got != addr:
            err = ctypes.get_errno()
            self.area.close()
            raise IOError_(f"cannot map at a fixed address: {os.strerror(err)}")

    def view(self) -> memoryview:
        whole = memoryview(self.area)
        return whole if self.writable else whole.toreadonly()

    def populate(self, offset: int, length: int) -> None:
        """Fault in [offset, offset + length) now, before it is written. A hint: an older
        kernel without MADV_POPULATE_READ leaves the pages to fault in on first touch."""
        if self.revoked or self.area.closed or length <= 0:
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(self.length, offset + length)
        _libc.madvise(self.base + start, end - start, MADV_POPULATE_READ)

    def revoke(self, reason: Exception | None = None) -> None:
        """`reason`: the error its owner's next call on it raises (a lost server, a destroyed
        namespace); None when the owner itself let go."""
        if self.revoked or self.area.closed:
            return
        self.revoked = True
        self.revoked_by = reason
        got = _libc.mmap(self.base, self.length, _RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        assert got == self.base, "could not lay zero pages over a revoked range"

    def close(self) -> None:
        """Unmap. Busy while buffers made from it live (numpy arrays, memoryview slices)."""
        if self.area.closed:
            return
        try:
            self.area.close()
        except BufferError:
            raise Busy("buffers made from this mapping are still alive (numpy arrays, memoryview "
                       "slices); drop them before unmapping") from None

    def close_or_revoke(self) -> None:
        """Unmap if nobody holds a buffer of it, else revoke and let the last buffer unmap it."""
        try:
            self.close()
        except Busy:
            self.revoke()

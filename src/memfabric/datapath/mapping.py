"""One contiguous virtual range over several segment pieces.

Python's mmap cannot map at a fixed address, so: reserve the whole range with an
anonymous mmap (which owns the range and refuses to close while buffers of it are
exported), then map each piece over it with MAP_FIXED through libc. Closing the
Python mmap unmaps the whole range, our pieces included.
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
_MAP_FAILED = ctypes.c_void_p(-1).value
# Linux values; Python 3.11's mmap module does not export these.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


def map_pieces(pieces: list[tuple[int, int, int]], writable: bool) -> mmap.mmap:
    """`pieces` are (fd, file offset, length), page-aligned; returns the owning mmap."""
    total = sum(length for _, _, length in pieces)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    if len(pieces) == 1:
        fd, offset, length = pieces[0]
        try:
            return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot,
                             offset=offset)
        except OSError as exc:
            raise IOError_(f"cannot map: {exc.strerror}") from None
    # The reservation must be writable for ctypes to take its address; the pieces get `prot`.
    area = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(anchor)
    del anchor
    position = 0
    for fd, offset, length in pieces:
        addr = _libc.mmap(base + position, length, prot,
                          mmap.MAP_SHARED | MAP_FIXED | mmap.MAP_POPULATE, fd, offset)
        if addr == _MAP_FAILED or addr != base + position:
            err = ctypes.get_errno()
            area.close()
            raise IOError_(f"cannot map a piece at a fixed address: {os.strerror(err)}")
        position += length
    return area


def unmap(area: mmap.mmap) -> None:
    try:
        area.close()
    except BufferError:
        raise Busy("the mapping still has buffers made from it (memoryview slices, numpy arrays); "
                   "release them before unmapping") from None

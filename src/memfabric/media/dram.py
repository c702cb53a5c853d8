"""DRAM segments: one sealed memfd each, made fresh from the pool's reserve memfd.

Seals forbid shrink and grow, so a client holding the fd can never make the server's
mapping fault (SIGBUS on a truncated file) nor grow it past the pool's capacity. Punching
holes stays allowed: that is how a destroyed segment's pages are taken back from under
whoever still holds it (they read zeros, and what they write is theirs, in their memory).
"""

from __future__ import annotations

import fcntl
import mmap
import os

import numpy as np

from ..errors import NoSuchObject
from .base import Medium, SegmentMemory, allocate_space, out_of, punch

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class DramSegment(SegmentMemory):
    def __init__(self, segment_id: int, fd: int, size_bytes: int) -> None:
        super().__init__(segment_id, fd, size_bytes)
        self._mapping: mmap.mmap | None = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED,
                                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._mapping)
        self._bytes: np.ndarray | None = np.frombuffer(self._mapping, dtype=np.uint8)

    def _live(self) -> np.ndarray:
        arr = self._bytes
        if arr is None:
            raise NoSuchObject(f"segment {self.id} was destroyed (its objects were freed)")
        return arr

    def read(self, at: int, dst: memoryview) -> None:
        dst[:] = memoryview(self._live())[at:at + len(dst)]

    def write(self, at: int, src: memoryview) -> None:
        memoryview(self._live())[at:at + len(src)] = src

    def zero(self, offset: int, length: int) -> None:
        self._live()[offset:offset + length] = 0   # numpy fills with memset

    def destroy(self) -> None:
        punch(self.fd, 0, self.size_bytes)
        self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        self._bytes = None
        try:
            self.view.release()
            self._mapping.close()
        except BufferError:
            # A server thread still works on a slice (a copy racing a destroy): the pages are
            # punched out already, so it sees zeros; the mapping goes with its last slice.
            pass
        self._mapping = None
        os.close(self.fd)
        self.fd = -1


class DramMedium(Medium):
    kind = "dram"

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def _open_reserve(self) -> int:
        return os.memfd_create(f"memfabric-{self.label}-reserve", os.MFD_CLOEXEC)

    def _make(self, segment_id: int, size_bytes: int) -> DramSegment:
        try:
            fd = os.memfd_create(f"memfabric-{self.label}-{segment_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise out_of(exc, f"make DRAM segment {segment_id}") from None
        try:
            os.ftruncate(fd, size_bytes)
            allocate_space(fd, 0, size_bytes, f"DRAM segment {segment_id}")
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return DramSegment(segment_id, fd, size_bytes)     # its mapping dups the fd
        except OSError as exc:
            os.close(fd)
            raise out_of(exc, f"make DRAM segment {segment_id}") from None
        except BaseException:
            os.close(fd)
            raise


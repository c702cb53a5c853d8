"""Media: where a server's segments live. One interface, three kinds.

Every medium gives fixed-size segments, each an fd plus the server's own shared mapping,
reserved and pre-faulted at start (MAP_POPULATE) so that a promised byte is a real byte.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import IOError_

MEDIA = ("dram", "pmem", "ramdisk")


@dataclass(eq=False)
class SegmentMemory:
    index: int
    fd: int
    size_bytes: int
    mapping: mmap.mmap
    view: memoryview = field(init=False)
    _bytes: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)
        self._bytes = np.frombuffer(self.mapping, dtype=np.uint8)

    def zero(self, offset: int, length: int) -> None:
        self._bytes[offset:offset + length] = 0   # numpy fills with memset

    def close(self) -> None:
        del self._bytes
        self.view.release()
        self.mapping.close()
        os.close(self.fd)


class Medium:
    """Creates a pool's segments; `close` gives every byte back."""

    kind = ""

    def create_segments(self, count: int, size_bytes: int) -> list[SegmentMemory]:
        segments: list[SegmentMemory] = []
        try:
            for index in range(count):
                segments.append(map_segment(index, self.open_segment(index, size_bytes), size_bytes))
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        return segments

    def open_segment(self, index: int, size_bytes: int) -> int:
        raise NotImplementedError


def map_segment(index: int, fd: int, size_bytes: int) -> SegmentMemory:
    try:
        mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.close(fd)
        raise IOError_(f"cannot map segment {index}: {exc.strerror}") from None
    return SegmentMemory(index, fd, size_bytes, mapping)

"""pmem and ramdisk segments: one file each under the pool's path.

`pmem` is a file system on persistent memory (DAX) or any file system; `ramdisk` is
tmpfs (survives a server crash, not a reboot). Files cannot be sealed like memfds, so
space is reserved up front with posix_fallocate: a full file system fails at start,
never later under a client's write.
"""

from __future__ import annotations

import os

from ..errors import IOError_, OutOfMemory
from .base import Medium


class FileMedium(Medium):
    def __init__(self, kind: str, directory: str) -> None:
        self.kind = kind
        self.directory = directory

    def open_segment(self, index: int, size_bytes: int) -> int:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"segment-{index:05d}.mem")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IOError_(f"cannot open {path}: {exc.strerror}") from None
        try:
            # Start empty: without persisted object metadata (a later step), old bytes
            # would be an earlier tenant's data handed out as "fresh" memory.
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, size_bytes)
        except OSError as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot reserve {size_bytes} bytes in {path}: {exc.strerror}") from None
        return fd

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
    def __init__(self, kind: str, directory: str, keep_contents: bool = False) -> None:
        self.kind = kind
        self.directory = directory
        # With a journal to say what lives in them, the files are kept across restarts.
        self.keep_contents = keep_contents

    def open_segment(self, index: int, size_bytes: int) -> int:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"segment-{index:05d}.mem")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IOError_(f"cannot open {path}: {exc.strerror}") from None
        try:
            # Without a journal, start empty: old bytes would otherwise be an earlier tenant's
            # data handed out as "fresh" memory.
            if not self.keep_contents:
                os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, size_bytes)
        except OSError as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot reserve {size_bytes} bytes in {path}: {exc.strerror}") from None
        return fd

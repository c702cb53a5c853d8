"""DRAM segments: one sealed memfd each.

Seals forbid shrink and grow, so a client holding the fd can never make the server's
mapping fault (SIGBUS on a truncated file) nor grow it past the pool's capacity.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import OutOfMemory
from .base import Medium

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class DramMedium(Medium):
    kind = "dram"

    def __init__(self, label: str) -> None:
        self.label = label

    def open_segment(self, index: int, size_bytes: int) -> int:
        fd = os.memfd_create(f"memfabric-{self.label}-{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot reserve DRAM segment {index}: {exc.strerror}") from None
        return fd

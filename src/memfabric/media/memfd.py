"""Memory a server shares with its same-host clients: a sealed memfd, mapped by the server.

Seals make sharing safe for the server: with SEALS_SIZE nobody (a client holding the fd
included) can shrink the file, so the server's mapping never turns into a SIGBUS; with
SEALS_READ_ONLY clients cannot map it writable either (F_SEAL_FUTURE_WRITE: the server's
own mapping, made before the seal, stays writable)."""

from __future__ import annotations

import fcntl
import mmap
import os

F_SEAL_FUTURE_WRITE = 0x0010
SEALS_READ_ONLY = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SEALS_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int, seals: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes (close-on-exec), mapped shared, then sealed with `seals`."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping

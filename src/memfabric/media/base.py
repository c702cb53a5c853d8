"""Media: where a server's segments live. One interface, three kinds.

A pool reserves its whole capacity at start (so that a promised byte is a real byte), in a
*reserve*: a memfd or file whose first `reserved` bytes are allocated. A segment is made
from the reserve (its bytes punched out of the reserve's end, then allocated afresh in the
segment's own memfd or file) and destroyed back into it (punched out, so that whoever still
holds its fd sees zeros; then allocated again at the reserve's end). The reserve and the
segments together always hold the capacity, never more.

Server-side access to a segment goes through `SegmentMemory`: DRAM segments are sealed
memfds, safe to map (no client can shrink them); file segments are read and written through
their fd, never mapped, because a client holding the fd could truncate the file and a
mapping of the vanished part would kill the server with SIGBUS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from typing import Any, Callable

from ..errors import IOError_, LimitExceeded, MemfabricError, OutOfMemory, ServerUnavailable
from ..stop_request import StopRequest

log = logging.getLogger("memfabric.server")

MEDIA = ("dram", "pmem", "ramdisk")

# The reserve is allocated in steps of this size, so that a SIGTERM during a long
# reservation is seen within one step.
RESERVE_STEP_BYTES = 64 << 20
# How long making a segment waits for memory another thread is giving back to the reserve.
RESERVE_WAIT_S = 1.0

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (os.posix_fallocate has no modes)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch(fd: int, offset: int, length: int) -> None:
    """Free the pages (or blocks) of a range; it reads as zeros from then on, for everyone."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def out_of(exc: OSError, what: str) -> MemfabricError:
    """The error for a failed open or make: out of fds is a limit (it passes), else memory."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return LimitExceeded(f"cannot {what}: this server has all the files open it may ({exc.strerror}); "
                             "try again later, or raise its fd limit")
    return OutOfMemory(f"cannot {what}: {exc.strerror}")


def allocate_space(fd: int, offset: int, length: int, what: str) -> None:
    try:
        fallocate(fd, 0, offset, length)
    except OSError as exc:
        raise OutOfMemory(f"cannot reserve {length} bytes for {what}: {exc.strerror}") from None


class SegmentMemory:
    """One segment's memory as the server reaches it. Besides read/write/zero, it answers
    submit_read/submit_write like bigmemory.layout.RemoteSegment, so server-side layouts treat
    a piece they cannot map like a piece on another host."""

    view: memoryview | None = None     # set when the server may touch the memory directly

    def __init__(self, segment_id: int, fd: int, size_bytes: int) -> None:
        self.id = segment_id
        self.fd = fd
        self.size_bytes = size_bytes

    def handout_fd(self) -> int:
        """An fd of this memory for a client, the caller's to close."""
        return os.dup(self.fd)

    def read(self, at: int, dst: memoryview) -> None:
        raise NotImplementedError

    def write(self, at: int, src: memoryview) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def submit_read(self, at: int, dst: memoryview, flight: Any) -> None:
        self.read(at, dst)           # done at once: nothing in flight

    def submit_write(self, at: int, src: memoryview, flight: Any) -> None:
        self.write(at, src)

    def destroy(self) -> None:
        """Free the memory for good (holders of the fd see zeros) and close it."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of it without destroying it (the server stops)."""
        raise NotImplementedError


class Medium:
    """Makes a pool's reserve and segments; `close` gives every byte back."""

    kind = ""

    def __init__(self) -> None:
        # The reserve's end moves one change at a time; a make waits (bounded) for a destroy
        # another thread is finishing (the allocator counted that budget free already).
        self._lock = threading.Condition()
        self._reserve_fd = -1
        self._reserved = 0
        self._owed = 0               # given back by destroyed segments, not yet in the reserve
        self._short_logged = False

    # ---- the reserve ------------------------------------------------------------------------

    def reserve(self, size_bytes: int, stopping: StopRequest | None = None) -> None:
        """Allocate the budget not in segments. Raises OutOfMemory when the machine lacks it
        and ServerUnavailable when `stopping` is set meanwhile; either way it leaves nothing."""
        self._reserve_fd = self._open_reserve()
        try:
            while self._reserved < size_bytes:
                if stopping is not None and stopping.is_set():
                    raise ServerUnavailable("stopped while reserving memory")
                step = min(RESERVE_STEP_BYTES, size_bytes - self._reserved)
                allocate_space(self._reserve_fd, self._reserved, step, f"the {self.kind} pool")
                self._reserved += step
        except BaseException:
            self.close()
            raise

    def reserved_bytes(self) -> int:
        return self._reserved

    def _take(self, size_bytes: int) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self._reserved >= size_bytes, RESERVE_WAIT_S):
                raise OutOfMemory(f"the {self.kind} reserve holds {self._reserved} bytes, {size_bytes} asked "
                                  "(the machine took memory the pool had given back?)")
            self._reserved -= size_bytes
            punch(self._reserve_fd, self._reserved, size_bytes)

    def _give(self, size_bytes: int) -> None:
        with self._lock:
            self._owed += size_bytes
        self.repay()

    def repay(self) -> bool:
        """Put back into the reserve what destroyed segments gave up. The machine may have
        taken that memory meanwhile (fallocate fails): the pool is short of it until then,
        and the keeper calls this again. True when nothing is owed."""
        with self._lock:
            if not self._owed:
                return True
            try:
                fallocate(self._reserve_fd, 0, self._reserved, self._owed)
            except OSError as exc:
                if not self._short_logged:
                    log.warning("the %s reserve is %d bytes short (%s): makes of that much wait for it",
                                self.kind, self._owed, exc.strerror)
                    self._short_logged = True
                return False
            self._reserved += self._owed
            self._owed = 0
            self._short_logged = False
            self._lock.notify_all()
            return True

    # ---- segments ---------------------------------------------------------------------------

    def make(self, segment_id: int, size_bytes: int) -> SegmentMemory:
        """A new segment of fresh memory, from the reserve."""
        self._take(size_bytes)
        try:
            return self._make(segment_id, size_bytes)
        except BaseException:
            self._give(size_bytes)
            raise

    def destroy(self, seg: SegmentMemory) -> None:
        seg.destroy()
        self._give(seg.size_bytes)

    def _make(self, segment_id: int, size_bytes: int) -> SegmentMemory:
        raise NotImplementedError

    def _open_reserve(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        self._reserved = 0


def check_io(what: str, fn: Callable[[], int], expected: int) -> None:
    try:
        done = fn()
    except OSError as exc:
        raise IOError_(f"{what}: {exc.strerror}") from None
    if done != expected:
        raise IOError_(f"{what}: {done} of {expected} bytes (the file shrank?)")

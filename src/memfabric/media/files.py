"""pmem and ramdisk segments: one file each under the pool's path, made from a reserve file.

`pmem` is a file system on persistent memory (DAX) or any file system; `ramdisk` is
tmpfs (survives a server crash, not a reboot). Space is allocated up front (fallocate): a
full file system fails at start, never later under a client's write.

    <path>/reserve.mem            the budget not in segments
    <path>/segment-<id>.mem       one segment; the journal says which hold live objects

Files cannot be sealed: a client holding a segment's fd could truncate it. So the server
never maps them; it reads and writes through the fd, and a file that shrank costs that
request an IO_ERROR (and its own namespace the bytes), never the server a SIGBUS.
"""

from __future__ import annotations

import os
import re
import threading

from ..errors import IOError_, OutOfMemory
from .base import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, Medium, SegmentMemory, allocate_space,
                   check_io, fallocate, out_of, punch)


def _fdatasync_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


try:       # the same in one call each, with fewer switches of the GIL (_records.c)
    from .._records import datasync_close as _datasync_close, dup_fd as _dup
except ImportError:     # pragma: no cover - ./dev builds it
    _dup, _datasync_close = os.dup, _fdatasync_close

_SEGMENT_FILE = re.compile(r"segment-(\d{1,20})\.mem")
_ZEROS = bytes(1 << 20)


class FileSegment(SegmentMemory):
    def __init__(self, segment_id: int, fd: int, size_bytes: int, path: str) -> None:
        super().__init__(segment_id, fd, size_bytes)
        self.path = path
        # Held for every access through the fd: destroy() waits for it, so an fd number is
        # never used after it was closed (and perhaps reused for another file).
        self._lock = threading.Lock()

    def _open_fd(self) -> int:
        if self.fd < 0:
            raise IOError_(f"segment {self.id} was destroyed")
        return self.fd

    def handout_fd(self) -> int:
        """A file description of its own (not a dup of ours): flags a client sets on it, such
        as O_APPEND, must not steer the server's own reads and writes."""
        with self._lock:
            return os.open(f"/proc/self/fd/{self._open_fd()}", os.O_RDWR | os.O_CLOEXEC)

    def read(self, at: int, dst: memoryview) -> None:
        with self._lock:
            fd = self._open_fd()
            check_io(f"reading segment {self.id}", lambda: os.preadv(fd, [dst], at), len(dst))

    def write(self, at: int, src: memoryview) -> None:
        with self._lock:
            fd = self._open_fd()
            check_io(f"writing segment {self.id}", lambda: os.pwritev(fd, [src], at), len(src))

    def sync(self) -> None:
        """What was written reaches the file system's storage (fdatasync): a plog's append on
        pmem is answered after this. Not under the segment's lock, which writes take: they go
        on while the flush waits for the disk (group commit depends on it); our own fd keeps
        the file open meanwhile."""
        with self._lock:
            try:
                fd = _dup(self._open_fd())
            except OSError as exc:
                raise IOError_(f"flushing segment {self.id}: {exc.strerror}") from None
        try:
            _datasync_close(fd)
        except OSError as exc:
            raise IOError_(f"flushing segment {self.id}: {exc.strerror}") from None

    def zero(self, offset: int, length: int) -> None:
        with self._lock:
            fd = self._open_fd()
            if offset + length > os.fstat(fd).st_size:
                raise IOError_(f"segment {self.id} shrank below {offset + length} bytes")
            try:   # keeps the blocks allocated (a punched hole could fail a later write)
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError:
                pass   # tmpfs and some file systems: write the zeros
            done = 0
            while done < length:
                n = min(len(_ZEROS), length - done)
                check_io(f"zeroing segment {self.id}", lambda: os.pwrite(fd, _ZEROS[:n], offset + done), n)
                done += n

    def destroy(self) -> None:
        with self._lock:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            try:
                punch(self.fd, 0, max(self.size_bytes, os.fstat(self.fd).st_size))
            except OSError:
                pass     # a file system without holes: the unlinked file goes with its last fd
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Close without destroying (the server stops; the file keeps its objects)."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class FileMedium(Medium):
    def __init__(self, kind: str, directory: str) -> None:
        super().__init__()
        self.kind = kind
        self.directory = directory

    def existing_segments(self) -> dict[int, int]:
        """Segment files an earlier run left: id -> size."""
        found = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        for name in names:
            m = _SEGMENT_FILE.fullmatch(name)
            if m:
                found[int(m.group(1))] = os.stat(os.path.join(self.directory, name)).st_size
        return found

    def adopt(self, segment_id: int) -> FileSegment:
        path = self._path(segment_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise IOError_(f"cannot open {path}: {exc.strerror}") from None
        return FileSegment(segment_id, fd, os.fstat(fd).st_size, path)

    def discard(self, segment_id: int) -> None:
        """A segment file no live object needs any more (left by an earlier run): punched out
        first, like any destroyed segment, so a client that kept its fd holds no space."""
        path = self._path(segment_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            punch(fd, 0, os.fstat(fd).st_size)
        except OSError:
            pass     # a file system without holes: the space goes with the last fd
        finally:
            os.close(fd)
        os.unlink(path)

    def _path(self, segment_id: int) -> str:
        return os.path.join(self.directory, f"segment-{segment_id}.mem")

    def _open_reserve(self) -> int:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "reserve.mem")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, 0)        # its old contents are nobody's any more
        except OSError as exc:
            raise IOError_(f"cannot open {path}: {exc.strerror}") from None
        return fd

    def _make(self, segment_id: int, size_bytes: int) -> FileSegment:
        path = self._path(segment_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise out_of(exc, f"create {path}") from None
        try:
            allocate_space(fd, 0, size_bytes, f"segment file {path}")
        except OutOfMemory:
            os.close(fd)
            os.unlink(path)
            raise
        return FileSegment(segment_id, fd, size_bytes, path)

    def close(self) -> None:
        """The reserve file goes: it holds nothing but space (a failed start leaves no
        gigabytes behind, a stopped server keeps only the segments with objects)."""
        super().close()
        try:
            os.unlink(os.path.join(self.directory, "reserve.mem"))
        except FileNotFoundError:
            pass

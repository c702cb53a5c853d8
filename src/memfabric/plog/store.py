"""A plog's bytes and metadata on its home server: written, read and flushed through the
pool's segment files, and its metadata kept in a file of its own beside them. Server side.

    <pool path>/plogs/<plog id>.plog     msgpack: name, ns, incarnation, capacity, nonce,
                                         extents, state, replicas, created_s

The metadata file is written whole (temporary file, fsync, rename, fsync of the directory)
at create and at seal, and removed at delete, before any of them is answered: a plog comes
back after a restart exactly when its create was answered and its delete was not. Its
length and records are not kept there: the scan of its bytes finds them (record.py).

Flushing (durability). The server never maps file segments (media/files.py: a client could
truncate the file), so records go in with pwrite and reach the file's page cache: that
survives a SIGKILL of the server on both media. On `pmem` an append is answered only after
`fdatasync` of every segment file it touched, which survives a host crash too (on real DAX
pmem a cache-line flush would do; through a file descriptor fdatasync is the call). On
`ramdisk` (tmpfs) there is nothing below the page cache, so no flush is made.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack

from ..errors import IOError_, NoSuchNamespace
from ..limits import MAX_MESSAGE_BYTES

META_DIR = "plogs"
META_SUFFIX = ".plog"


def meta_dir(pool_path: str) -> str:
    return os.path.join(pool_path, META_DIR)


def meta_path(pool_path: str, plog_id: int) -> str:
    return os.path.join(meta_dir(pool_path), f"{plog_id}{META_SUFFIX}")


def write_meta(path: str, meta: dict[str, Any]) -> None:
    """Replace the metadata file at `path` by `meta`, durably, before the caller answers."""
    body = msgpack.packb(meta, use_bin_type=True)
    directory = os.path.dirname(path)
    tmp = path + ".tmp"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _sync_dir(directory)
    except OSError as exc:
        raise IOError_(f"cannot write plog metadata {path}: {exc.strerror}") from None


def remove_meta(path: str) -> None:
    try:
        os.unlink(path)
        _sync_dir(os.path.dirname(path))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise IOError_(f"cannot remove plog metadata {path}: {exc.strerror}") from None


def read_metas(pool_path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every plog metadata file of a pool: (path, its contents). A file that does not read
    as one (a crash's leftover .tmp is never read) is reported and skipped."""
    directory = meta_dir(pool_path)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".tmp"):
            os.unlink(path)
            continue
        if not name.endswith(META_SUFFIX):
            continue
        with open(path, "rb") as f:
            body = f.read(MAX_MESSAGE_BYTES * 64)
        try:
            meta = msgpack.unpackb(body, raw=False)
        except Exception:        # noqa: BLE001 - any garbage: not a plog we can bring back
            meta = None
        found.append((path, meta if isinstance(meta, dict) else None))
    return found


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LogBytes:
    """A plog's bytes as laid over its extents in the pool's segment files."""

    def __init__(self, pool: Any, extents: list[tuple[int, int, int]], ns: str, flushes: bool) -> None:
        from .log import extent_ends, pieces
        self._pieces = pieces
        self.pool = pool                     # server.state.PoolState
        self.extents = extents
        self._ends = extent_ends(extents)    # kept: a log of many extents is not walked per append
        self.ns = ns
        self.flushes = flushes               # pmem: fdatasync before an append is answered
        self.capacity_bytes = sum(e[2] for e in extents)

    def _memory(self, segment: int) -> Any:
        mem = self.pool.segments.get(segment)
        if mem is None:
            raise NoSuchNamespace(f"namespace {self.ns!r} was destroyed (segment {segment} is gone)")
        return mem

    def write(self, offset: int, data: memoryview, touched: set[int]) -> None:
        at = 0
        for segment, seg_offset, length in self.places(offset, data.nbytes):
            self._memory(segment).write(seg_offset, data[at:at + length])
            touched.add(segment)
            at += length

    def read(self, offset: int, into: memoryview) -> None:
        at = 0
        for segment, seg_offset, length in self.places(offset, into.nbytes):
            self._memory(segment).read(seg_offset, into[at:at + length])
            at += length

    def places(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where bytes [offset, offset + length) lie: (segment, offset in its file, length) runs."""
        return self._pieces(self.extents, offset, length, self._ends)

    def read_bytes(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read(offset, memoryview(buffer))
        return bytes(buffer)

    def flush(self, segments: set[int]) -> int:
        """Make the writes to these segments durable (pmem); the number of flushes made."""
        if not self.flushes:
            return 0
        for segment in sorted(segments):
            self._memory(segment).sync()
        return len(segments)


def now_s() -> float:
    return time.time()

"""A crash-safe journal of a persistent pool's objects, kept next to its segment files.

Records are msgpack lists framed by length and CRC32, appended and fsynced before the
operation they describe is answered. Replay stops at the first torn or corrupt record
(a crash mid-append) and cuts the file there. At start the journal is rewritten as a
snapshot of what lives (temporary file, fsync, rename, fsync of the directory), so it
stays as small as the live set plus one run's changes.

    ["obj",  ns, incarnation, bm_id, size, [[server, segment, offset, length], ...], created_s]
                                            (created_s: wall-clock seconds; absent in older journals)
    ["free", ns, incarnation, bm_id]
    ["held", ns, incarnation, bm_id, [[segment, offset, length], ...]]   # [] = none any more
    ["drop", ns, incarnation]
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from typing import Any, Iterator

import msgpack

from ..errors import IOError_

_FRAME = struct.Struct("!II")      # body length, crc32
MAX_RECORD_BYTES = 1 << 20
FILE_NAME = "objects.journal"


class Journal:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        self._lock = threading.Lock()
        self._fd = -1

    def replay(self) -> list[list[Any]]:
        """Every whole record, in order; a torn tail is cut off."""
        records: list[list[Any]] = []
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return records
        good = 0
        for record, end in _records(data):
            records.append(record)
            good = end
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return records

    def rewrite(self, records: list[list[Any]]) -> None:
        """Replace the journal by these records, atomically, then append after them."""
        tmp = self.path + ".tmp"
        try:
            os.unlink(tmp)       # a crash's leftover may have any mode: ours is made 0600 below
        except FileNotFoundError:
            pass
        # The owner's alone from creation, whatever the umask: it names every object and extent.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            for record in records:
                f.write(_frame(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def append(self, *record: Any) -> None:
        frame = _frame(list(record))
        with self._lock:
            try:
                os.write(self._fd, frame)
                os.fdatasync(self._fd)
            except OSError as exc:
                raise IOError_(f"cannot write the journal {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _frame(record: list[Any]) -> bytes:
    body = msgpack.packb(record, use_bin_type=True)
    assert len(body) <= MAX_RECORD_BYTES, "journal record too large"
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _records(data: bytes) -> Iterator[tuple[list[Any], int]]:
    pos = 0
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + length
        if length > MAX_RECORD_BYTES or end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        try:
            record = msgpack.unpackb(data[start:end], raw=False)
        except Exception:
            return
        if not isinstance(record, list) or not record:
            return
        yield record, end
        pos = end

"""The media on their own: a reserve, segments made from it and destroyed into it, real
memfds and files (issue 7, items 1, 11, 14)."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from memfabric.errors import IOError_, OutOfMemory, ServerUnavailable
from memfabric.media.dram import DramMedium
from memfabric.media.files import FileMedium
from memfabric.stop_request import StopRequest

from ..conftest import short_tmp_dir

MiB = 1 << 20


def media(kind: str):
    if kind == "dram":
        return DramMedium("test")
    return FileMedium(kind, os.path.join(short_tmp_dir("mf-media-"), kind))


@pytest.fixture(params=["dram", "pmem"])
def medium(request):
    m = media(request.param)
    yield m
    m.close()


def test_segments_come_from_the_reserve_and_go_back(medium):
    medium.reserve(4 * MiB)
    assert medium.reserved_bytes() == 4 * MiB
    a = medium.make(1, MiB)
    b = medium.make(2, 2 * MiB)
    assert medium.reserved_bytes() == MiB
    with pytest.raises(OutOfMemory):
        medium.make(3, 2 * MiB)          # the reserve holds 1 MiB: never more than the capacity
    medium.destroy(a)
    assert medium.reserved_bytes() == 2 * MiB
    medium.destroy(b)
    assert medium.reserved_bytes() == 4 * MiB


def test_whoever_kept_a_destroyed_segment_reads_zeros(medium):
    medium.reserve(2 * MiB)
    seg = medium.make(7, MiB)
    seg.write(0, memoryview(b"\xab" * MiB))
    kept = os.dup(seg.fd)                 # what a client could keep
    try:
        medium.destroy(seg)
        with mmap.mmap(kept, MiB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            assert m[:] == bytes(MiB)
        assert os.pread(kept, 16, 0) == bytes(16)
    finally:
        os.close(kept)


def test_a_stop_during_the_reservation_leaves_nothing(medium):
    stopping = StopRequest()
    stopping.request()
    with pytest.raises(ServerUnavailable):
        medium.reserve(256 * MiB, stopping)
    assert medium.reserved_bytes() == 0
    if isinstance(medium, FileMedium):
        assert not os.path.exists(os.path.join(medium.directory, "reserve.mem"))


def test_a_truncated_file_segment_is_an_io_error_not_a_crash():
    medium = media("pmem")
    try:
        medium.reserve(2 * MiB)
        seg = medium.make(1, MiB)
        os.ftruncate(seg.fd, 4096)     # a client with the fd may do this
        with pytest.raises(IOError_):
            seg.read(0, memoryview(bytearray(MiB)))
        with pytest.raises(IOError_):
            seg.zero(0, MiB)
        seg.read(0, memoryview(bytearray(4096)))   # what is left still reads
    finally:
        medium.close()


def test_dram_segments_cannot_be_truncated_by_a_holder():
    medium = media("dram")
    try:
        medium.reserve(MiB)
        seg = medium.make(1, MiB)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 2 * MiB)
    finally:
        medium.close()


def test_existing_segment_files_are_found_and_discarded():
    medium = media("pmem")
    medium.reserve(3 * MiB)
    keep, drop = medium.make(10, MiB), medium.make(11, MiB)
    keep.close()
    drop.close()
    medium.close()
    again = FileMedium("pmem", medium.directory)
    assert again.existing_segments() == {10: MiB, 11: MiB}
    again.discard(11)
    adopted = again.adopt(10)
    assert adopted.size_bytes == MiB
    adopted.close()
    assert again.existing_segments() == {10: MiB}


def test_a_file_segment_flush_keeps_no_fd_and_its_failure_closes_the_copy():
    """FileSegment.sync's compiled steps (_records.c): dup_fd makes a close-on-exec copy with
    the GIL kept; datasync_close flushes and closes it in one call without the GIL, and
    closes it even when the flush fails (an OSError, which sync makes an IO_ERROR)."""
    records = pytest.importorskip("memfabric._records")
    path = os.path.join(short_tmp_dir("mf-media-"), "flushed")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    r, w = os.pipe()
    try:
        copy = records.dup_fd(fd)
        assert copy != fd and not os.get_inheritable(copy)
        assert os.fstat(copy).st_ino == os.fstat(fd).st_ino
        os.pwrite(copy, b"x" * 4096, 0)
        records.datasync_close(copy)
        with pytest.raises(OSError):
            os.fstat(copy)                   # closed
        copy = records.dup_fd(w)
        with pytest.raises(OSError) as failed:
            records.datasync_close(copy)     # a pipe cannot be flushed
        assert failed.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            os.fstat(copy)                   # closed all the same
    finally:
        for x in (fd, r, w):
            os.close(x)


def test_flushing_a_file_segment_leaves_no_fd_open():
    m = media("pmem")
    try:
        m.reserve(MiB)
        segment = m.make(1, MiB)
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(3):
            segment.write(0, memoryview(b"y" * 4096))
            segment.sync()
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        m.close()

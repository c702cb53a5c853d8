"""Revocable shared mappings (datapath/mapping.py) over real memfds: what is resident when,
read from the kernel's own accounting (/proc/self/smaps), and what revoking leaves."""

from __future__ import annotations

import mmap
import os

import pytest

from memfabric.datapath.mapping import SharedRange

from ..helpers import MiB, resident_bytes



@pytest.fixture
def segment():
    """A 4 MiB memfd whose pages exist, as a server's pre-faulted segment."""
    fd = os.memfd_create("test-segment")
    os.ftruncate(fd, 4 * MiB)
    server_view = mmap.mmap(fd, 4 * MiB, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    server_view[:4] = b"data"
    yield fd
    server_view.close()
    os.close(fd)


def test_a_plain_mapping_faults_in_lazily(segment):
    shared = SharedRange([(segment, 0, 2 * MiB)], writable=True)
    try:
        assert resident_bytes(shared) == 0
        assert bytes(shared.view()[:4]) == b"data"
    finally:
        shared.close()


def test_a_populated_mapping_is_resident_at_once(segment):
    shared = SharedRange([(segment, 0, 2 * MiB), (segment, 3 * MiB, MiB)], writable=True, populate=True)
    try:
        assert resident_bytes(shared) == 3 * MiB
    finally:
        shared.close()


def test_populate_faults_in_just_the_range_asked(segment):
    shared = SharedRange([(segment, 0, 4 * MiB)], writable=True)
    try:
        # Rounded out to whole pages; a read fault may map a few neighbours too (fault-around).
        shared.populate(MiB + 100, MiB)
        assert MiB + mmap.PAGESIZE <= resident_bytes(shared) < 2 * MiB
        shared.populate(3 * MiB, 10 * MiB)       # clipped to the mapping, else it would fail
        assert resident_bytes(shared) >= 2 * MiB + mmap.PAGESIZE
        assert resident_bytes(shared) < 4 * MiB, "the middle was never asked for"
    finally:
        shared.close()


def test_a_revoked_range_reads_zeros_and_populate_is_a_no_op(segment):
    shared = SharedRange([(segment, 0, MiB)], writable=True, populate=True)
    view = shared.view()
    try:
        shared.revoke()
        shared.populate(0, MiB)
        assert bytes(view[:4]) == bytes(4), "the pool's bytes are out of reach"
        view[:4] = b"gone"                       # lands in private zero pages, not the segment
        with open(f"/proc/self/fd/{segment}", "rb") as f:
            assert f.read(4) == b"data"
    finally:
        view.release()
        shared.close()

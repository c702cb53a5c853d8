"""A server's memory: its pools (medium, allocator, segments) and its namespaces' object tables.

Each namespace on its home server has a generation table in a sealed memfd: two words per
slot, [generation, size]. The server writes it; clients map it read-only and check it
around every copy, so a freed handle fails on the client without asking the server.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import mmap
import os

from ..core.allocator import Extent, SegmentAllocator
from ..core.namespaces import NamespaceRecord
from ..core.objects import Generations, ObjectRecord, ObjectTable
from ..errors import NoSuchObject
from ..limits import MAX_OBJECTS_PER_NAMESPACE
from ..media.base import Medium, SegmentMemory
from ..media.dram import DramMedium
from ..media.files import FileMedium
from ..config import PoolConfig
from .journal import Journal

log = logging.getLogger("memfabric.server")
F_SEAL_FUTURE_WRITE = 0x0010   # Linux >= 5.1: no new writable mappings, ours stays writable
WORDS_PER_SLOT = 2


class PoolState:
    """One pool on this server: its medium, its allocator, and the memory of its segments.

    Memory is made and destroyed outside the server's lock (it takes milliseconds); the
    allocator, which says what to make and destroy, is touched only under it.
    """

    def __init__(self, cfg: PoolConfig, max_segment_bytes: int, min_segment_bytes: int, label: str,
                 first_segment_id: int) -> None:
        self.name = cfg.name
        self.medium_kind = cfg.medium
        self.capacity_bytes = cfg.capacity_bytes
        # Persistent media keep a journal of their objects next to their files.
        self.journal = None if cfg.medium == "dram" else Journal(cfg.path or "")
        if cfg.medium != "dram":
            os.makedirs(cfg.path or "", mode=0o700, exist_ok=True)
        self.medium: Medium = (DramMedium(f"{label}-{cfg.name}") if cfg.medium == "dram"
                               else FileMedium(cfg.medium, cfg.path or ""))
        self.allocator = SegmentAllocator(cfg.capacity_bytes, max_segment_bytes, min_segment_bytes,
                                          first_id=first_segment_id)
        self.segments: dict[int, SegmentMemory] = {}

    def existing_segments(self) -> dict[int, int]:
        """Segment files an earlier run of this server left (file media): id -> size."""
        return self.medium.existing_segments() if isinstance(self.medium, FileMedium) else {}

    def adopt(self, segment_id: int) -> None:
        assert isinstance(self.medium, FileMedium)
        self.segments[segment_id] = self.medium.adopt(segment_id)

    def open(self, stopping: threading.Event | None = None) -> None:
        """Reserve the budget no restored segment holds; files no live object needs go."""
        if isinstance(self.medium, FileMedium):
            for segment_id in self.medium.existing_segments():
                if segment_id not in self.segments:
                    self.medium.discard(segment_id)
        size = self.capacity_bytes - self.allocator.committed_bytes()
        log.info("reserving %d bytes of %s for pool %s", size, self.medium_kind, self.name)
        self.medium.reserve(size, stopping)

    def make(self, wanted: list[tuple[int, int]]) -> list[SegmentMemory]:
        """Memory for new segments (id, size), all or none."""
        made: list[SegmentMemory] = []
        try:
            for segment_id, size in wanted:
                made.append(self.medium.make(segment_id, size))
        except BaseException:
            for seg in made:
                self.medium.destroy(seg)
            raise
        return made

    def destroy(self, memories: list[SegmentMemory]) -> None:
        for seg in memories:
            try:
                self.medium.destroy(seg)
            except OSError as exc:     # nothing to retry: the pages go when the fd does
                log.warning("destroying segment %d of pool %s: %s", seg.id, self.name, exc)

    def zero(self, extents: list[Extent]) -> None:
        for e in extents:
            seg = self.segments.get(e.segment)
            if seg is None:      # destroyed under us: its namespace went meanwhile
                raise NoSuchObject(f"segment {e.segment} of pool {self.name!r} was destroyed")
            seg.zero(e.offset, e.length)

    def summary(self) -> dict:
        return {"medium": self.medium_kind, **self.allocator.figures(),
                "segment_bytes": self.allocator.max_segment_bytes}

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()     # file segments' objects outlive us (the journal says which)
        self.segments.clear()
        self.medium.close()
        if self.journal is not None:
            self.journal.close()


class NamespaceState:
    def __init__(self, record: NamespaceRecord, server_id: int, label: str, generations: Generations) -> None:
        self.record = record
        self.key = record.key
        self.closed = False       # dropped: its generation table is gone, nothing may be added
        self.table = ObjectTable(server_id, MAX_OBJECTS_PER_NAMESPACE, generations)
        # Extents this server holds for objects homed on other servers, by object id: a remote
        # read or write must name the object whose bytes it touches.
        self.lent_by_object: dict[str, list[Extent]] = {}
        self.expand_lock = threading.Lock()   # one expand at a time: each sizes what it adds
        # Objects with an RPC transfer under way, and extents whose return waits for it.
        self.busy: dict[str, int] = {}
        self.deferred: dict[str, list[Extent]] = {}
        self.table_bytes = MAX_OBJECTS_PER_NAMESPACE * WORDS_PER_SLOT * 8
        self.gen_fd = os.memfd_create(f"memfabric-{label}-gens-{record.ns}",
                                      os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.gen_fd, self.table_bytes)
        self._mapping = mmap.mmap(self.gen_fd, self.table_bytes, flags=mmap.MAP_SHARED)
        fcntl.fcntl(self.gen_fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        self.words = memoryview(self._mapping).cast("Q")

    def publish(self, record: ObjectRecord) -> None:
        i = WORDS_PER_SLOT * record.slot
        self.words[i + 1] = record.size_bytes
        self.words[i] = record.generation

    def retract(self, record: ObjectRecord) -> None:
        i = WORDS_PER_SLOT * record.slot
        self.words[i] = 0
        self.words[i + 1] = 0

    def close(self) -> None:
        self.closed = True
        for record in self.table.records():
            self.retract(record)
        # The words stay readable (all zeros now): a server-side copy racing the destroy may
        # still check them. The mapping goes with the last reference to them.
        os.close(self.gen_fd)

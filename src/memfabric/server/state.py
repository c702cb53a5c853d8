"""A server's memory: its pools (medium, allocator, segments) and its namespaces (what each
semantic keeps of one here)."""

from __future__ import annotations

import logging
import os

from ..core.allocator import Extent, SegmentAllocator
from ..core.namespaces import NamespaceRecord
from ..bigmemory.objects import Generations
from ..bigmemory.space import ObjectSpace
from ..kv.space import KeySpace
from ..errors import NoSuchObject
from ..media.base import Medium, SegmentMemory
from ..media.dram import DramMedium
from ..media.files import FileMedium
from ..config import PoolConfig
from ..stop_request import StopRequest

log = logging.getLogger("memfabric.server")


class PoolState:
    """One pool on this server: its medium, its allocator, and the memory of its segments.

    Memory is made and destroyed outside the server's lock (it takes milliseconds); the
    allocator, which says what to make and destroy, is touched only under it.
    """

    def __init__(self, cfg: PoolConfig, max_segment_bytes: int, min_segment_bytes: int, label: str,
                 first_segment_id: int, max_segments: int | None = None) -> None:
        self.name = cfg.name
        self.medium_kind = cfg.medium
        self.capacity_bytes = cfg.capacity_bytes
        self.path = cfg.path
        self.persistent = cfg.medium != "dram"    # its segments are files that outlive the server
        if self.persistent:
            os.makedirs(cfg.path or "", mode=0o700, exist_ok=True)
        self.medium: Medium = (DramMedium(f"{label}-{cfg.name}") if cfg.medium == "dram"
                               else FileMedium(cfg.medium, cfg.path or ""))
        self.allocator = SegmentAllocator(cfg.capacity_bytes, max_segment_bytes, min_segment_bytes,
                                          first_id=first_segment_id, max_segments=max_segments)
        self.segments: dict[int, SegmentMemory] = {}

    def existing_segments(self) -> dict[int, int]:
        """Segment files an earlier run of this server left (file media): id -> size."""
        return self.medium.existing_segments() if isinstance(self.medium, FileMedium) else {}

    def adopt(self, segment_id: int) -> None:
        assert isinstance(self.medium, FileMedium)
        self.segments[segment_id] = self.medium.adopt(segment_id)

    def open(self, stopping: StopRequest | None = None) -> None:
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


class NamespaceState:
    """One namespace incarnation on this server: what each semantic keeps of it here."""

    def __init__(self, record: NamespaceRecord, server_id: int, label: str, generations: Generations) -> None:
        self.record = record
        self.key = record.key
        self.closed = False       # dropped: nothing may be added to it any more
        self.objects = ObjectSpace(server_id, label, record.ns, generations)    # BigMemory
        self.kv: KeySpace | None = None                                         # MemKV, made on first use

    def close(self) -> None:
        self.closed = True
        self.objects.close()
        if self.kv is not None:
            self.kv.close()

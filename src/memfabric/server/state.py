"""A server's memory: its pools (segments + allocator) and its namespaces' object tables.

Each namespace on its home server has a generation table in a sealed memfd: two words per
slot, [generation, size]. The server writes it; clients map it read-only and check it
around every copy, so a freed handle fails on the client without asking the server.
"""

from __future__ import annotations

import fcntl
import threading
import mmap
import os

from ..core.allocator import Extent, SegmentAllocator
from ..core.namespaces import NamespaceRecord
from ..core.objects import ObjectRecord, ObjectTable
from ..limits import MAX_OBJECTS_PER_NAMESPACE
from ..media.base import Medium, SegmentMemory
from ..media.dram import DramMedium
from ..media.files import FileMedium
from ..config import PoolConfig
from .journal import Journal

F_SEAL_FUTURE_WRITE = 0x0010   # Linux >= 5.1: no new writable mappings, ours stays writable
WORDS_PER_SLOT = 2


class PoolState:
    def __init__(self, cfg: PoolConfig, segment_bytes: int, label: str) -> None:
        self.name = cfg.name
        self.medium_kind = cfg.medium
        # Persistent media keep a journal of their objects next to their files.
        self.journal = None if cfg.medium == "dram" else Journal(cfg.path or "")
        restarting = self.journal is not None and os.path.exists(self.journal.path)
        medium: Medium = (DramMedium(f"{label}-{cfg.name}") if cfg.medium == "dram"
                          else FileMedium(cfg.medium, cfg.path or "", keep_contents=restarting))
        count = cfg.capacity_bytes // segment_bytes
        self.segments: list[SegmentMemory] = medium.create_segments(count, segment_bytes)
        self.allocator = SegmentAllocator(count, segment_bytes)
        if restarting:
            self.allocator.mark_all_dirty()

    def zero(self, extents: list[Extent]) -> None:
        for e in extents:
            self.segments[e.segment].zero(e.offset, e.length)

    def summary(self) -> dict:
        a = self.allocator
        return {"medium": self.medium_kind, "capacity_bytes": a.capacity_bytes,
                "used_bytes": a.live_bytes(), "free_bytes": a.available_bytes(),
                "segment_bytes": a.segment_size_bytes}

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        if self.journal is not None:
            self.journal.close()


class NamespaceState:
    def __init__(self, record: NamespaceRecord, server_id: int, label: str) -> None:
        self.record = record
        self.key = record.key
        self.table = ObjectTable(server_id, MAX_OBJECTS_PER_NAMESPACE)
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
        for record in self.table.records():
            self.retract(record)
        self.words.release()
        try:
            self._mapping.close()
        except BufferError:
            pass
        os.close(self.gen_fd)

"""A namespace's objects on one server: its object table, and the generation words it shares.

On its home server each namespace has a generation table in a sealed memfd: two words per
slot, [generation, size]. The server writes it; clients map it read-only and check it around
every copy, so a freed handle fails on the client without asking the server.
"""

from __future__ import annotations

import os
import threading

from ..core.allocator import Extent
from ..limits import MAX_OBJECTS_PER_NAMESPACE
from ..media.memfd import SEALS_READ_ONLY, sealed_memfd
from .objects import Generations, ObjectRecord, ObjectTable

WORDS_PER_SLOT = 2


class ObjectSpace:
    def __init__(self, server_id: int, label: str, ns: str, generations: Generations) -> None:
        self.table = ObjectTable(server_id, MAX_OBJECTS_PER_NAMESPACE, generations)
        # Extents this server holds for objects homed on other servers, by object id: a remote
        # read or write must name the object whose bytes it touches.
        self.lent_by_object: dict[str, list[Extent]] = {}
        self.expand_lock = threading.Lock()   # one expand at a time: each sizes what it adds
        # Objects with an RPC transfer under way, and extents whose return waits for it.
        self.busy: dict[str, int] = {}
        self.deferred: dict[str, list[Extent]] = {}
        self.table_bytes = MAX_OBJECTS_PER_NAMESPACE * WORDS_PER_SLOT * 8
        self.gen_fd, self._mapping = sealed_memfd(f"memfabric-{label}-gens-{ns}", self.table_bytes, SEALS_READ_ONLY)
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
        """The namespace is gone: every handle's next check fails, and the table forgets all."""
        for record in self.table.records():
            self.retract(record)
        self.table.drop_all()
        # The words stay readable (all zeros now): a server-side copy racing the destroy may
        # still check them. The mapping goes with the last reference to them.
        os.close(self.gen_fd)

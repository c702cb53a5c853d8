"""Get grants: what lets an RPC connection's compiled loop (_kvget.c) answer remote gets of
small values with no Python per request, and what takes that back.

Once Python has served a kv_get of a connection with the namespace's secId checked (the
keyspace's current table not draining, the keyspace open), the connection is granted the
keyspace: its current index and refs, two counter words (hits, misses) of the connection's
that stats() sums, the secId it proved, and the segments its records were seen in (a record in another segment is Python's, which
grants again with that segment too). The loop then answers that connection's gets itself,
hits and misses alike, and leaves everything else to Python (see _kvget.c).

The counters are Python's memory, not the connection's slot in the stats memfd: those slots
(MAX_KV_CLIENTS a keyspace) are same-host clients', and remote connections taking them would
leave same-host clients that came later uncounted.

A grant holds exports of that memory, and the loop reads it only under the grant's lock. It
is revoked (waiting out a lookup under way, which is bounded) before any of it can go or
change meaning: the keyspace closed (its namespace destroyed), its table followed by a
larger one, a flush, memory given back to the pool (a segment may then be destroyed), the
connection gone.
"""

from __future__ import annotations

import threading
from array import array
from typing import Any

from ..limits import KV_COMPILED_GET_MAX_BYTES, MAX_GET_GRANTS_PER_CONNECTION, MAX_SEGMENTS_PER_GET_GRANT
from .index import lock_free_reads

try:
    from .. import _frames
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = None

# A get whose names, secId and key are longer than this does not fit the one block the loop
# reads: granting its keyspace would only cost time.
GRANTED_NAMES_MAX_BYTES = 160
_hash_ready: bool | None = None


def compiled_hash() -> bool:
    """Whether the loop hashes keys as the index does: xxh3 from the xxhash module's own
    library, checked against Python's hash of a few keys."""
    global _hash_ready
    if _hash_ready is None:
        _hash_ready = False
        if _frames is not None and hasattr(_frames, "KvGrants"):
            from xxhash import _xxhash

            from .rules import key_hash
            if _frames.kv_hash_setup(_xxhash.__file__):
                samples = [b"k", b"key:1", bytes(range(256)), b"x" * 1000]
                _hash_ready = all(_frames.kv_hash(k) == key_hash(k) for k in samples)
    return _hash_ready


class ConnectionGetGrants:
    """One connection's grants: the compiled table, and the segments granted per keyspace."""

    __slots__ = ("table", "segments", "counted")

    def __init__(self) -> None:
        self.table = _frames.KvGrants(KV_COMPILED_GET_MAX_BYTES)
        self.segments: dict[Grantees, dict[int, memoryview]] = {}     # by keyspace: {segment: view}
        self.counted: set[Grantees] = set()        # keyspaces it has counters in (granted now or before)


class Grantees:
    """One keyspace's grants, to revoke them. Its lock is taken last (under the keyspace's
    own, or the server's), and nothing is taken under it."""

    def __init__(self, pool: str, ns: str) -> None:
        self.pool, self.ns = pool, ns
        self._lock = threading.Lock()
        self._holders: set[ConnectionGetGrants] = set()
        self._closed = False
        # Each connection's hits and misses, which the loop counts (kept across revokes), and
        # those of connections gone.
        self._counts: dict[ConnectionGetGrants, array] = {}
        self._retired = [0, 0]

    def grant(self, grants: ConnectionGetGrants, space: Any, sec: bytes, segment: int | None,
              view: memoryview | None) -> None:
        """Grant `space` to the connection (with `segment` among its segments, if given).
        A grant only saves time: one that cannot be made leaves gets to Python."""
        if len(self.pool) + len(self.ns) + len(sec) > GRANTED_NAMES_MAX_BYTES:
            return
        with self._lock:
            if self._closed:
                return
            known = grants.segments.get(self)
            if known is None and len(grants.segments) >= MAX_GET_GRANTS_PER_CONNECTION:
                return
            if known is not None and (segment is None or segment in known):
                return                   # granted as it is
            segments = dict(known or {})
            if segment is not None:
                if len(segments) >= MAX_SEGMENTS_PER_GET_GRANT:
                    segments.clear()
                segments[segment] = view
            counts = self._counts.get(grants)
            if counts is None:
                counts = self._counts[grants] = array("Q", [0, 0])
                grants.counted.add(self)
            table = space.table
            try:
                grants.table.add(self.pool, self.ns, sec, table.words, table.refs, counts, 0,
                                 list(segments.items()))
            except (ValueError, BufferError):     # a segment's view released meanwhile (destroyed)
                return
            grants.segments[self] = segments
            self._holders.add(grants)

    def revoke(self, close: bool = False) -> None:
        """No connection answers this keyspace's gets from here on (`close`: nor ever will)."""
        with self._lock:
            self._closed = self._closed or close
            for grants in self._holders:
                grants.table.revoke(self.pool, self.ns)
                grants.segments.pop(self, None)
            self._holders.clear()

    def counts(self) -> tuple[int, int]:
        """Hits and misses the loop answered for this keyspace, by every connection."""
        with self._lock:
            return (self._retired[0] + sum(c[0] for c in self._counts.values()),
                    self._retired[1] + sum(c[1] for c in self._counts.values()))

    def forget(self, grants: ConnectionGetGrants) -> None:
        """The connection is gone, its loop stopped: what it counted stays counted."""
        with self._lock:
            self._holders.discard(grants)
            grants.segments.pop(self, None)
            counts = self._counts.pop(grants, None)
            if counts is not None:
                self._retired[0] += counts[0]
                self._retired[1] += counts[1]


def open_grants() -> ConnectionGetGrants | None:
    """A connection's grants; None when the compiled part is not built or hashes otherwise,
    or where the index may not be read beside its writer without a lock (index.py)."""
    return ConnectionGetGrants() if compiled_hash() and lock_free_reads() else None


def close_grants(grants: ConnectionGetGrants) -> None:
    """The connection is gone (its loop has stopped): forget its grants."""
    for grantees in set(grants.segments) | grants.counted:
        grantees.forget(grants)
    grants.counted.clear()
    grants.table.close()

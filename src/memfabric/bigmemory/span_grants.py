"""Span grants: what lets an RPC connection's compiled loop (_spans.c) serve BigMemory span
reads and writes with no Python per request, and what takes that back.

Once the Python path has served a connection's seg_read or seg_write with every check passed
(the namespace's secId proven on this connection, the object alive and usable here, the span
inside its extents), the connection is granted the object: the spans of segment memory that
are the object's on this server, the secId it proved, and, for an object homed here, its
generation word. The compiled loop then serves that connection's span requests for the object
itself, each checked against the grant (secId, generation, span), and leaves everything else,
errors included, to Python.

A grant must never outlive the object's claim to those bytes, so every change that takes bytes
from an object or makes them unusable revokes its grants first, under the server's lock: a
free, extents given back (held for another home, or a free's), bytes lost on a restarted peer,
the namespace dropped. A transfer under way when its grant is revoked is then held as a
Python transfer is (bigmemory/service.py: its segment not destroyed, the object's extents not
given back) until the loop reports it over (`take_owed`).

Called under the server's lock, except `open`.
"""

from __future__ import annotations

from typing import Any

from ..limits import MAX_EXTENTS_PER_SPAN_GRANT, MAX_SPAN_GRANTS_PER_CONNECTION

try:
    from .. import _frames
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = None

# A request whose names and secId are longer than this does not fit the one block the
# compiled loop reads (_spans.c): granting its object would only cost time.
GRANTED_NAMES_MAX_BYTES = 120
Key = tuple[str, str, str]            # (pool, ns, bm_id)


class ConnectionGrants:
    """One connection's grants: the compiled table, and their keys oldest first (to bound them)."""

    __slots__ = ("table", "keys")

    def __init__(self) -> None:
        self.table = _frames.SpanGrants()
        self.keys: dict[Key, None] = {}


class SpanGrantRegistry:
    """Which connections hold grants for which objects, to revoke them."""

    def __init__(self) -> None:
        self._holders: dict[tuple[str, str], dict[str, set[ConnectionGrants]]] = {}
        self._open: set[ConnectionGrants] = set()
        self._served_by_closed = 0

    def open(self) -> ConnectionGrants | None:
        """A connection's grants; None when the compiled part is not built."""
        if _frames is None or not hasattr(_frames, "SpanGrants"):
            return None
        grants = ConnectionGrants()
        self._open.add(grants)
        return grants

    def served(self) -> int:
        """Span transfers served in compiled code so far, by every connection."""
        return self._served_by_closed + sum(grants.table.served for grants in self._open)

    def grant(self, grants: ConnectionGrants, key: Key, sec: bytes, spans: list[tuple[int, int, int, Any]],
              gens: memoryview | None, slot: int, generation: int, token: Any) -> None:
        """Grant `key`'s object to the connection: `spans` (segment, offset, length, segment
        view) are its bytes here; `gens` the home's generation words (None: homed elsewhere);
        `token` comes back with a transfer that was under way when the grant was revoked."""
        if not spans or len(spans) > MAX_EXTENTS_PER_SPAN_GRANT \
                or len(key[0]) + len(key[1]) + len(key[2]) + len(sec) > GRANTED_NAMES_MAX_BYTES:
            return
        if key not in grants.keys and len(grants.keys) >= MAX_SPAN_GRANTS_PER_CONNECTION:
            oldest = next(iter(grants.keys))
            self._unlist(grants, oldest)
            grants.table.remove(*oldest)
        grants.table.add(key[0], key[1], key[2], sec, spans, gens, 2 * slot, generation, token)
        grants.keys[key] = None
        self._holders.setdefault((key[0], key[1]), {}).setdefault(key[2], set()).add(grants)

    def revoke(self, pool: str, ns: str, bm_id: str) -> list[int]:
        """No connection serves this object from here on. Returns the segments transfers
        under way use (one per transfer): the caller holds them until they are over."""
        objects = self._holders.get((pool, ns))
        holders = objects.pop(bm_id, None) if objects else None
        if not holders:
            return []
        if not objects:
            del self._holders[(pool, ns)]
        key = (pool, ns, bm_id)
        in_flight = []
        for grants in holders:
            grants.keys.pop(key, None)
            segment = grants.table.revoke(pool, ns, bm_id)
            if segment is not None:
                in_flight.append(segment)
        return in_flight

    def revoke_namespace(self, pool: str, ns: str) -> list[tuple[str, int]]:
        """revoke() for every object of the namespace: (bm_id, segment) of transfers under way."""
        in_flight = []
        for bm_id in list(self._holders.get((pool, ns), {})):
            in_flight += [(bm_id, segment) for segment in self.revoke(pool, ns, bm_id)]
        return in_flight

    def close(self, grants: ConnectionGrants) -> list[tuple[Any, int]]:
        """The connection is gone (its loop has stopped): forget its grants. Returns (token,
        segment) of transfers that were under way when revoked, to let go of."""
        for key in list(grants.keys):
            self._unlist(grants, key)
        grants.keys.clear()
        if grants in self._open:
            self._open.discard(grants)
            self._served_by_closed += grants.table.served
        return grants.table.close()

    def _unlist(self, grants: ConnectionGrants, key: Key) -> None:
        grants.keys.pop(key, None)
        objects = self._holders.get((key[0], key[1]))
        holders = objects.get(key[2]) if objects else None
        if holders is not None:
            holders.discard(grants)
            if not holders:
                del objects[key[2]]
                if not objects:
                    del self._holders[(key[0], key[1])]

"""Put grants: what lets a same-host connection's receive loop (_kvput.c) answer puts of small
values with no Python bytecode per request, and what Python does for it.

Once Python has served a kv_put of an IPC connection with the secId checked, of the common
kind (no NX/XX/GET/KEEPTTL, the namespace's one replica, a value that fits a heap chunk
beside its key, no table draining), the connection is granted the keyspace: a stock of heap
chunks of that put's size class, the keyspace's current table, the segments its stock and
that record lie in, the memory limit's share here, and a time the grant holds until (the
settings' time to live: Python reads the settings that often too). The loop then answers the
connection's puts of that class itself, under the keyspace's lock, and leaves everything
else to Python (_kvput.c says what), which grants again as it serves.

What the loop leaves behind, Python takes up, under the keyspace's lock:
  - the records its puts replaced: they rest in the grant for the heap's grace, then their
    chunks serve the loop's later puts of the same class (a stream of puts replacing keys
    needs no refill, no Python). Those not reused are freed (they rest, then serve again)
    when Python grants again, when the grant goes (`settle`), on the keeper's tick once the
    oldest has waited REPLACED_IDLE_S, and before the memory limit or the keyspace's bytes
    are measured (they are no key's);
  - the stock: counted aside (space.stocked_bytes, not among the keyspace's bytes) until used,
    and given back to the heap when the grant goes or changes class, or has served no put
    for STOCK_IDLE_S. A stock starts small and doubles with each refill (up to
    KV_PUT_STOCK_CHUNKS): a connection that puts now and then holds a few chunks, not many.

A grant stops serving by itself when the table is followed by another, closed or draining,
when its lease runs out or its time is up. It is told when a segment may go (memory given
back to the pool) and when the settings change here (`pause`: it reaches no segment until
Python grants again), when the namespace is destroyed (`close_space`) and when the
connection goes (`close_grants`).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import MemfabricError
from ..limits import KV_PUT_STOCK_BYTES, KV_PUT_STOCK_CHUNKS, MAX_PUT_GRANTS_PER_CONNECTION
from .get_grants import compiled_hash
from .heap import CLASSES, MAX_RECORD_BYTES, RecordHeap
from .index import lock_free_reads

try:
    from .. import _frames
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = None

_ready: bool | None = None
FIRST_STOCK_CHUNKS = 4
STOCK_IDLE_S = 1.0          # a grant that served no put for this long gives its stock back
STOCK_LEAN_S = 1.0          # after memory ran short, stocks take one new page a refill for this long
# A replaced record not reused by then is freed by the keeper (puts stopped, or went to
# another class): several graces, so a busy grant's queue is left to reuse its records.
REPLACED_IDLE_S = 0.5


def compiled_puts() -> bool:
    """Whether the loop can answer puts: the compiled part built, hashing as the index does,
    on a machine whose readers need no lock (index.py)."""
    global _ready
    if _ready is None:
        _ready = _frames is not None and hasattr(_frames, "KvPutGrant") and compiled_hash() and lock_free_reads()
        if _ready:
            _frames.kv_put_setup(list(CLASSES))
    return _ready


class _Held:
    """What the keyspace knows of one of its grants: whose it is, how large its next stock
    is, and since when it has served nothing."""

    __slots__ = ("grants", "next_stock", "served", "idle_since")

    def __init__(self, grants: "ConnectionPutGrants") -> None:
        self.grants = grants
        self.next_stock = FIRST_STOCK_CHUNKS
        self.served = 0
        self.idle_since: float | None = None


class ConnectionPutGrants:
    """One IPC connection's grants: `table`, the list its loop scans, and each by keyspace."""

    __slots__ = ("conn", "table", "by_space", "retired", "idle")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.table: list[Any] = []                  # _frames.KvPutGrant each
        self.by_space: dict[Any, Any] = {}          # KeySpace -> its grant
        self.retired = 0                            # puts answered under grants gone since
        self.idle: dict[Any, tuple[int, float]] = {}  # grant -> (puts answered, when that count was new)


def open_grants(conn: Any) -> ConnectionPutGrants | None:
    return ConnectionPutGrants(conn) if compiled_puts() else None


def grant(grants: ConnectionPutGrants, space: Any, store: Any, creds: tuple, size: int, record_segment: int,
          share: int | None, until_s: float) -> None:
    """Under the keyspace's lock, after a put of a `size`-byte record (key and value) into
    `record_segment` was served with the secId checked: grant the keyspace, or refill it."""
    if space.closed or space.draining is not None or not 0 < size <= MAX_RECORD_BYTES:
        return
    g = grants.by_space.get(space)
    if g is None:
        if len(grants.by_space) >= MAX_PUT_GRANTS_PER_CONNECTION:
            return
        g = _frames.KvPutGrant(creds[0], creds[1], creds[2])
        grants.by_space[space] = g
        grants.table.append(g)
        space.put_grants[g] = _Held(grants)
    held = space.put_grants[g]
    cls = RecordHeap.class_of(size)
    chunk = CLASSES[cls]
    if g.queued and g.chunk_bytes != chunk:         # another class: what it kept serves none of its puts
        settle(space, store, g)
    _settle_stale(space, g, time.monotonic())     # the rest its puts reuse
    if g.stocked and g.chunk_bytes != chunk:        # another class: its stock goes back
        _give_back(space, store, g.take_stock(), g.chunk_bytes)
    fresh: list[tuple[int, int]] = []
    want = min(held.next_stock, KV_PUT_STOCK_CHUNKS, max(1, KV_PUT_STOCK_BYTES // chunk)) - g.stocked
    if want > 0:
        held.next_stock = min(2 * held.next_stock, KV_PUT_STOCK_CHUNKS)
        try:
            fresh = [(c.segment, c.offset) for c in store.chunks(size, want)]
        except MemfabricError:      # no memory for more (OUT_OF_MEMORY...): what there is serves
            pass
        space.stocked_bytes += chunk * len(fresh)
    if not fresh and not g.stocked:
        return
    # The segments of its stock, of the record just written (a key put again is there), and of
    # the replaced records it will reuse, the oldest's first, as many as it holds.
    segments = g.stock_segments | {s for s, _ in fresh}
    for segment in [record_segment, *g.queued_segments]:
        if len(segments) < _frames.PUT_SEGMENTS_MAX:
            segments.add(segment)
    views = []
    for segment in sorted(segments):
        view = store.memory(segment).view
        if view is None:                 # a file segment: its puts stay Python's
            _give_back(space, store, fresh, chunk)
            return
        views.append((segment, view))
    try:
        g.refill(space, space.table.writer, space.table.words, space.table.refs, grants.conn, chunk,
                 (CLASSES[cls - 1] + 1) if cls else 1, fresh, views, -1 if share is None else share,
                 int(until_s * 1000), int(space.grace_s * 1000))
    except (ValueError, TypeError, BufferError):
        _give_back(space, store, fresh, chunk)       # not granted: its puts stay Python's


def settle(space: Any, store: Any, g: Any) -> None:
    """Under the keyspace's lock: the records the loop's puts replaced are freed, each resting
    what is left of its grace (not a new one: a full pool's writes, which settle them, would
    wait twice as long for their memory)."""
    if g.queued:
        taken = g.take_replaced()
        store.free_records([fields for fields, _ in taken], [until_ms / 1000 for _, until_ms in taken])


def _give_back(space: Any, store: Any, chunks: list[tuple[int, int]], chunk: int) -> None:
    if chunks:
        space.stocked_bytes -= chunk * len(chunks)
        store.give_back_chunks(chunks, chunk)


def settle_all(space: Any) -> None:
    """Under the keyspace's lock: every grant's replaced records freed (the keeper's tick, and
    before the keyspace's bytes are measured: for the memory limit, for stats)."""
    for g in list(space.put_grants):
        settle(space, space.store, g)


def settle_idle(space: Any, now_s: float) -> None:
    """Under the keyspace's lock (the keeper's tick): the replaced records a grant has held for
    REPLACED_IDLE_S are freed (its puts would have reused them by then)."""
    for g in list(space.put_grants):
        _settle_stale(space, g, now_s)


def _settle_stale(space: Any, g: Any, now_s: float) -> None:
    oldest_ms = g.oldest_replaced_ms
    if oldest_ms is not None and now_s * 1000 - oldest_ms >= REPLACED_IDLE_S * 1000:
        settle(space, space.store, g)


def take_back_idle(space: Any, now_s: float) -> None:
    """Under the keyspace's lock (the keeper's tick): the stock of grants that answered no put
    for STOCK_IDLE_S goes back (the next put refills it, small)."""
    for g, held in list(space.put_grants.items()):
        if g.served != held.served:
            held.served, held.idle_since = g.served, None
        elif held.idle_since is None:
            held.idle_since = now_s
        elif now_s - held.idle_since >= STOCK_IDLE_S and g.stocked:
            _give_back(space, space.store, g.take_stock(), g.chunk_bytes)
            held.next_stock = FIRST_STOCK_CHUNKS


def reclaim_stock(space: Any) -> bool:
    """Under the keyspace's lock, when its memory ran out: every grant's stock back to the heap
    (their puts refill, or go to Python), and what their puts replaced freed; whether any
    came back (what rested its grace in a grant serves at once)."""
    took = False
    space.stock_lean_until = time.monotonic() + STOCK_LEAN_S
    for g in list(space.put_grants):
        took |= g.queued > 0
        settle(space, space.store, g)
        if g.stocked:
            chunk, chunks = g.chunk_bytes, g.take_stock()
            space.stocked_bytes -= chunk * len(chunks)
            space.store.give_back_chunks(chunks, chunk, release_pages=False)
            took = True
    return took


def pause(space: Any) -> None:
    """No grant of the keyspace reaches a segment's memory (one may go) or serves until Python
    grants again."""
    for g in list(space.put_grants):
        g.drop_views()


def close_space(space: Any) -> None:
    """The keyspace is gone (its memory with it): its grants serve nothing more."""
    for g, held in list(space.put_grants.items()):
        g.close()
        _forget(held.grants, space, g)
    space.put_grants.clear()


def close_grants(grants: ConnectionPutGrants) -> None:
    """The connection is gone (its loop has stopped): what its grants replaced is freed, their
    stock given back, and they go."""
    for space, g in list(grants.by_space.items()):
        with space.lock:
            if space.put_grants.pop(g, None) is not None and not space.closed:
                settle(space, space.store, g)
                _give_back(space, space.store, g.take_stock(), g.chunk_bytes)
            g.close()
            _forget(grants, space, g)


def _forget(grants: ConnectionPutGrants, space: Any, g: Any) -> None:
    if grants.by_space.get(space) is g:
        del grants.by_space[space]
    grants.idle.pop(g, None)
    if g in grants.table:
        grants.table.remove(g)
        grants.retired += g.served


def served(grants: ConnectionPutGrants) -> int:
    """Puts the connection's loop answered."""
    return grants.retired + sum(g.served for g in grants.table)

"""The server's MemKV operations: what a request may ask of a keyspace, checked, ordered and
passed on to the key's other homes.

The server process owns pools, namespaces, secIds, peers and dispatch; this owns each
namespace's keyspace on this server (space.py) and what requests do with it (store.py).

A server trusts its keys only while the cluster cannot have taken it for dead: a write to a
key goes to its first home among the servers the cluster sees alive, so while a server is
stopped or cut off past its liveness timeout, its keys' writes go to others, and what it
holds is stale when it comes back. So KV requests are refused (SERVER_UNAVAILABLE) once no
heartbeat reached the cluster for TRUSTED_SHARE of the liveness timeout, and same-host readers
stop at the index's lease (index.py) at the same moment. When the cluster may have seen the
server dead meanwhile (etcd: its lease ran out; the embedded catalog: a heartbeat landed the
whole timeout or more after the last one was sent), the server forgets every key before it
serves again: a key with a replica elsewhere is read
there, one without is a miss, never an old value. A server that is merely slow (a beat late
by less than the timeout: the cluster never saw it dead) keeps its keys; at most it refused
requests for a moment. Heartbeats come at least MIN_BEATS_PER_LIVENESS_TIMEOUT times per
timeout (config.py), so one late beat does neither.

Order of a write: at its first home, the key's stripe lock (one write of a key at a time,
its replication included), then the keyspace's lock for the record and the slot, released
before the replicas are called; a replica takes only the keyspace's lock, so two servers
writing to each other never wait on each other. Each
write carries a version (a hybrid clock, space.next_version); a replica keeps the newest.

Values up to KV_INLINE_BYTES (with their key) ride in the request and the reply. Larger ones
are reserved (kv_reserve), filled in place (same host: the client copies into the mapped
extents; other hosts: kv_fill, whose payload the RPC door receives straight into them) and
committed (kv_commit). A large get over RPC is sent straight from the record's extents,
which are held (not reused, even if the key is deleted) until the send is over.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..core.allocator import Extent
from ..errors import (InvalidArgument, LimitExceeded, MemfabricError, NoSuchNamespace, NoSuchObject, OutOfMemory,
                      ProtocolError, ServerUnavailable)
from ..limits import (KV_GET_MANY_PAYLOAD_BYTES, KV_INLINE_BYTES, MAX_KV_BATCH, MAX_KV_HOLDS_PER_CLIENT,
                      MAX_KV_HOLDS_PER_PEER, MAX_KV_PENDING_PER_CLIENT, MAX_KV_REPLICAS, MAX_RPC_PAYLOAD_BYTES)
from ..server.requests import Connection, Payload, Reply, receive_into_segment, send_from_segment
from ..server.state import NamespaceState
from ..units import parse_size
from . import get_grants, put_grants
from . import index as ix
from .edits import KeyEdits
from .rules import (MANY_AGAIN, MANY_ALONE, MANY_MISSING, NO_EXPIRY, check_key, check_replicas, check_value_length,
                    homes, key_hash)
from .space import KeySpace, KvSettings, now_ms
from .store import SCAN_DRAINING, Fields, Store, extents_of, inline_fits, replicas_of
from .transfer import put_large_from

if TYPE_CHECKING:
    from ..server.server import Server

log = logging.getLogger("memfabric.server")

Creds = tuple[str, str, bytes]
SCAN_BATCH_MAX = 10_000
# Settings ride in replies as 64-bit integers: a larger limit, once kept, made every reply
# carrying the settings (kv_stats, which every client asks) fail to encode.
MAX_MEMORY_LIMIT_BYTES = (1 << 63) - 1
SETTINGS_NAME = "kv"
SETTINGS_TTL_S = 1.0             # a keyspace re-reads its settings from the cluster this often
SWEEP_EVERY_S = 0.1              # expired keys are looked for this often, per keyspace...
SWEEP_SLOTS = 2048               # ...this many slots at a time
MIGRATE_SLOTS_PER_TICK = 1024   # slots of a draining index (index.py) the keeper moves each round
# A pool short of memory waits this long at most, in all, for other keyspaces' locks to take
# back their empty pages (the keeper holds one a moment each tick).
GIVE_BACK_WAIT_S = 0.05
# The part of the liveness timeout a server's keys are trusted after its last heartbeat was
# sent: the cluster takes it for dead no sooner than the whole timeout after that.
TRUSTED_SHARE = 0.9
_tokens = itertools.count(1)
_INTEGER = re.compile(rb"0|-?[1-9][0-9]*")


@dataclass
class _Reserved:
    """Extents reserved for a large value, being filled by a client."""
    state: NamespaceState
    space: KeySpace
    store: Store
    extents: list[Extent]
    length: int


@dataclass
class _Held:
    state: NamespaceState
    space: KeySpace
    store: Store
    place: tuple[int, int]
    pieces: list[tuple[int, int, int]]


@dataclass
class _ClientKv:
    """What one connection has of the keyspaces: counter slots, reservations, holds."""
    # By keyspace, not by name: a slot is a number in one keyspace's stats memfd, and a
    # namespace destroyed and made again has a new keyspace with slots of its own.
    slots: dict[KeySpace, int] = field(default_factory=dict)
    reserved: dict[int, _Reserved] = field(default_factory=dict)
    held: dict[int, _Held] = field(default_factory=dict)


class KeyValueService(KeyEdits):
    PEER_OPS = frozenset({"kv_replicate", "kv_settings_changed"})
    FD_OPS = frozenset({"kv_open"})

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.lock = server.lock
        self._settings_read: dict[tuple, float] = {}
        self.door: Any = None        # the Redis-protocol door of this server, if it has one (kv/resp/front.py)
        self._swept_at = 0.0
        self._lease_ms = 0          # what same-host readers are told to trust the indexes until
        self._beats = threading.Condition()     # notified when a heartbeat got through
        self._get_grants_open: set = set()      # RPC connections' get grants (get_grants.py)
        self._gets_served_by_closed = 0
        self._put_grants_open: set = set()      # IPC connections' put grants (put_grants.py)
        self._puts_served_by_closed = 0

    @property
    def server_id(self) -> int:
        return self.server.server_id

    def handlers(self) -> dict[str, Callable[[Connection, dict[str, Any]], Reply]]:
        return {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    def transfers(self) -> dict[str, Callable[..., None]]:
        """Operations the RPC door hands the frame to (its payload unread): each moves the
        payload straight between the socket and pool memory and answers (rpc_front.py)."""
        return {"kv_fill": self.transfer_kv_fill, "kv_read": self.transfer_kv_read}

    # ---- keyspaces -------------------------------------------------------------------------------

    def _space(self, conn: Connection, m: dict[str, Any]) -> tuple[NamespaceState, Creds, KeySpace, Store]:
        state, creds = self.server._namespace(conn, m)
        self._check_trusted()
        space = state.kv
        if space is None:
            with self.lock:
                if state.closed:
                    raise NoSuchNamespace(f"namespace {creds[1]!r} in pool {creds[0]!r} was destroyed meanwhile")
                space = state.kv
                if space is None:
                    # Made whole, then published: a request of another connection that finds
                    # state.kv set takes no lock, and must find its store there.
                    space = KeySpace(f"s{self.server_id}", creds[1], pool=creds[0])
                    try:
                        space.store = self._store(state, space, creds[0])
                        space.set_lease(self._lease_ms)
                    except BaseException:
                        space.close()
                        raise
                    state.kv = space
        self._refresh_settings(state, space)
        return state, creds, space, space.store

    def _store(self, state: NamespaceState, space: KeySpace, pool: str) -> Store:
        server = self.server

        def memory(segment: int) -> Any:
            mem = server.pools[pool].segments.get(segment)
            if mem is None:
                if space.closed or state.closed:      # its segments went with it
                    raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile")
                raise NoSuchObject(f"segment {segment} of pool {pool!r} is gone")
            return mem

        def release(extents: list[Extent]) -> None:
            space.get_grants.revoke()        # a segment left unused may be destroyed
            put_grants.pause(space)
            with self.lock:
                if server.namespaces.get((pool, state.record.ns)) is state:
                    server.pools[pool].allocator.release(state.key, extents, time.monotonic())

        return Store(space, memory, lambda n: server._reserve_local(state, pool, n), release,
                     lambda: self._share(space, pool), state.record.ns)

    def _refresh_settings(self, state: NamespaceState, space: KeySpace, force: bool = False) -> None:
        key = state.key
        now = time.monotonic()
        if not force and now - self._settings_read.get(key, 0.0) < SETTINGS_TTL_S:
            return
        self._settings_read[key] = now
        record = state.record
        stored = self.server.cluster.get_settings(record.pool, record.ns, record.incarnation, SETTINGS_NAME) or {}
        space.settings = _settings(stored)
        if force:                # changed here: compiled puts follow at once, not within SETTINGS_TTL_S
            put_grants.pause(space)

    def _share(self, space: KeySpace, pool: str) -> int | None:
        """This server's part of the namespace's memory limit: rendezvous hashing spreads keys
        evenly over the pool's live servers, so each keeps limit / servers."""
        limit = space.settings.memory_limit
        if limit is None:
            return None
        return limit // max(1, len(self._pool_servers(pool)))

    def _pool_servers(self, pool: str) -> list[int]:
        return sorted(s.server_id for s in self.server.view() if s.alive and pool in s.pools)

    @staticmethod
    def _client(conn: Connection) -> _ClientKv:
        mine = conn.services.get("kv")
        if mine is None:
            mine = conn.services["kv"] = _ClientKv()
        return mine

    def disconnected(self, conn: Connection) -> None:
        puts = conn.services.pop("kv_put_grants", None)
        if puts is not None:             # its loop has stopped
            put_grants.close_grants(puts)
            served = put_grants.served(puts)
            with self.lock:
                self._put_grants_open.discard(puts)
                self._puts_served_by_closed += served
        grants = conn.services.pop("kv_get_grants", None)
        if grants is not None:           # its loop has stopped: before its counter slots go
            get_grants.close_grants(grants)
            with self.lock:
                self._get_grants_open.discard(grants)
                self._gets_served_by_closed += grants.table.served
        mine = conn.services.pop("kv", None)
        if mine is None:
            return
        for reserved in mine.reserved.values():
            self._unreserve(reserved)
        for held in mine.held.values():
            with held.space.lock:
                held.store.let_go(held.place)
        for space, slot in mine.slots.items():
            with space.lock:
                if not space.closed:
                    space.give_client_slot(slot)

    # ---- the cluster's view of this server: how long its keys are trusted ------------------------

    def _trusted_s(self) -> float:
        return self.server.cfg.cluster.liveness_timeout_s * TRUSTED_SHARE

    def _silent_s(self) -> float:
        """Seconds since the last heartbeat the cluster took was sent (0 before the first)."""
        sent = self.server.beat_sent_s
        return 0.0 if sent is None else time.monotonic() - sent

    def _check_trusted(self) -> None:
        """SERVER_UNAVAILABLE while the cluster may take this server for dead. A request that
        comes as the server wakes from a stop waits (a little) for the heartbeat under way."""
        trusted_s = self._trusted_s()
        if self._silent_s() <= trusted_s:
            return
        with self._beats:
            self._beats.wait_for(lambda: self._silent_s() <= trusted_s, 2 * self.server.cfg.heartbeat_interval_s)
        silent_s = self._silent_s()
        if silent_s > trusted_s:
            raise ServerUnavailable(f"server {self.server_id} has not reached the cluster for {silent_s:.1f}s: it "
                                    "may be taken for dead and its keys written elsewhere (it serves keys again, "
                                    "having forgotten them, once a heartbeat gets through)")

    def _spaces(self) -> list[KeySpace]:
        with self.lock:
            return [s.kv for s in self.server.namespaces.values() if s.kv is not None]

    def rejoined(self, last_sent_s: float | None, landed_s: float, stayed_alive: bool | None = None) -> None:
        """A heartbeat reached the cluster by `landed_s` (monotonic); the one before it was
        sent at `last_sent_s`. If the cluster may have taken this server for dead in between,
        forget every key: others may have written them meanwhile. The cluster says so when it
        can (`stayed_alive`: etcd's lease lived on, or ran out); else time says (it does so a
        whole liveness timeout after a beat, which it got no sooner than it was sent). So an
        etcd outage that every server waits out with its lease intact costs no key. Called
        before the server serves keys again (requests wait for beat()); see the module's
        docstring."""
        if last_sent_s is None or stayed_alive is True:
            return
        if stayed_alive is None and not may_have_been_dead(last_sent_s, landed_s,
                                                           self.server.cfg.cluster.liveness_timeout_s):
            return
        forgotten = 0
        for space in self._spaces():
            with space.lock:
                if not space.closed:
                    forgotten += space.store.flush()
        log.warning("no heartbeat reached the cluster for %.1f s: forgot %d keys, which others may have "
                    "written meanwhile", landed_s - last_sent_s, forgotten)

    def beat(self, sent_s: float) -> None:
        """A heartbeat sent at `sent_s` (time.monotonic(): CLOCK_MONOTONIC, which the processes
        of a host share and a change of the wall clock leaves alone) reached the cluster:
        same-host readers may trust the indexes until the cluster could next take this server
        for dead."""
        self._lease_ms = int((sent_s + self._trusted_s()) * 1000)
        for space in self._spaces():
            space.set_lease(self._lease_ms)
        with self._beats:
            self._beats.notify_all()

    def op_kv_door(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """This server's Redis-protocol door's figures (`memfabric status`); None: it has none."""
        door = self.door
        return {"door": None if door is None else door.figures()}

    def usage(self, state: NamespaceState) -> dict[str, int]:
        """The keyspace's figures here, for ns_query and `memfabric status` (none: no keyspace)."""
        space = state.kv
        if space is None:
            return {}
        with space.lock:
            if space.closed:
                return {}
            stats = space.stats()
        return {f"kv_{name}": stats[name] for name in ("keys", "bytes", "hits", "misses", "evictions", "expired")}

    def tick(self) -> None:
        """From the server's keeper: draining indexes move on without writes (index.py), and
        expired keys and heap pages left empty give their memory back without a reader or a
        writer."""
        with self.lock:
            spaces = [s.kv for s in self.server.namespaces.values() if s.kv is not None]
        for space in spaces:
            if space.put_grants or space.heap.spare_count() or space.heap.may_empty():
                with space.lock:
                    if not space.closed:
                        if space.put_grants:     # what compiled puts replaced and left is freed, idle stock goes back
                            put_grants.settle_idle(space, time.monotonic())
                            put_grants.take_back_idle(space, time.monotonic())
                        space.store.release_empty_pages(time.monotonic())
            if space.draining is not None:
                with space.lock:
                    if not space.closed:
                        space.store.migrate(MIGRATE_SLOTS_PER_TICK)
        now = time.monotonic()
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for space in spaces:
            with space.lock:
                if not space.closed:
                    space.store.sweep(SWEEP_SLOTS, now_ms())

    def give_back_empty_pages(self, pool: str, asking: KeySpace | None = None) -> bool:
        """The pool refused memory: the empty heap pages the pool's keyspaces keep for their next
        writes (kv/heap.py), and the chunks their compiled puts keep in stock, go back now, for
        another namespace (a page held keeps a whole segment from every other owner) or a large
        value. Whether any did. A keyspace whose lock another thread holds past GIVE_BACK_WAIT_S
        keeps them: the caller may hold its own, and two writers short at once must not wait
        for each other for long. The asking keyspace's stock is its own writes' to take
        (Store.chunk), not a refill's."""
        with self.lock:
            spaces = [s.kv for (p, _), s in self.server.namespaces.items() if p == pool and s.kv is not None]
        gave = False
        until = time.monotonic() + GIVE_BACK_WAIT_S
        for space in spaces:
            if not (space.put_grants or space.heap.spare_count() or space.heap.may_empty()):
                continue
            if not space.lock.acquire(timeout=max(0.0, until - time.monotonic())):
                continue
            try:
                if not space.closed:
                    if space.put_grants and space is not asking:
                        put_grants.reclaim_stock(space)
                    gave = space.store.release_empty_pages(time.monotonic(), keep=False) or gave
            finally:
                space.lock.release()
        return gave

    # ---- same-host clients: the memory to read keys without asking ----------------------------------

    def op_kv_open(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, _ = self._space(conn, m)
        slots = self._client(conn).slots
        for gone in [s for s in slots if s.closed]:
            del slots[gone]
        with space.lock:
            slot = slots.get(space)
            if slot is None:
                slot = space.take_client_slot()
                if slot is not None:
                    slots[space] = slot
            table, old = space.table, space.draining
            fds: list[int] = []
            with space.fd_lock:         # a destroy closes them: never dup a closed (or reused) number
                if space.closed:
                    raise NoSuchNamespace(f"namespace {creds[1]!r} in pool {creds[0]!r} was destroyed meanwhile")
                try:
                    # While a table drains into the current one, readers read both (index.py).
                    for fd in (table.index_fd, table.refs_fd, space.stats_fd) + (
                            () if old is None else (old.index_fd, old.refs_fd)):
                        fds.append(os.dup(fd))
                except OSError as exc:
                    for fd in fds:
                        os.close(fd)
                    raise LimitExceeded(f"server {self.server_id} cannot open more files ({exc.strerror})") from None
            reply = {"generation": table.generation, "slots": table.slots, "index_bytes": table.index_bytes,
                     "stats_bytes": space.stats_bytes, "client_slot": slot, "lock_free": ix.lock_free_reads(),
                     "incarnation": state.record.incarnation,
                     "draining": None if old is None else {"generation": old.generation, "slots": old.slots,
                                                           "index_bytes": old.index_bytes}}
        return reply, fds, True

    # ---- writes ----------------------------------------------------------------------------------

    def op_kv_put(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        value = m.get("value")
        if not isinstance(value, bytes):
            raise InvalidArgument("a put's value is bytes")
        if len(key) + len(value) > KV_INLINE_BYTES:
            raise InvalidArgument(f"a key and value of {len(key) + len(value)} bytes exceed the "
                                  f"{KV_INLINE_BYTES} bytes a request carries: reserve, fill and commit it")
        nx, xx, keepttl, get_old = _flags(m)
        expiry = _expiry_of(m, keepttl)
        replicas = _replicas(m)
        reply = self._write(state, creds, space, store, key, memoryview(value), None, len(value), expiry,
                            nx=nx, xx=xx, keepttl=keepttl, get_old=get_old, replicas=replicas, conn=conn)
        puts = conn.services.get("kv_put_grants")
        if puts is not None and not (nx or xx or keepttl or get_old or replicas) and "expire_at_ms" not in m:
            self._grant_puts(puts, state, creds, space, store, key, len(key) + len(value))
        return reply

    def _grant_puts(self, puts: Any, state: NamespaceState, creds: Creds, space: KeySpace, store: Store,
                    key: bytes, size: int) -> None:
        """After a put of the kind the connection's loop answers (put_grants.py), served here
        with the secId checked: grant the keyspace (or refill it), with the segment the key's
        record is in now."""
        if space.settings.replicas != 1 or type(creds[2]) is not bytes or not inline_fits(len(key), size - len(key)):
            return
        with space.lock:
            found = store.find(key, key_hash(key)) if not space.closed else None
            if found is None or space.draining is not None:
                return
            settings_s = self._settings_read.get(state.key, 0.0) + SETTINGS_TTL_S
            put_grants.grant(puts, space, store, creds, size, space.table.writer.fields(found)[0], store.share(),
                             min(settings_s, time.monotonic() + SETTINGS_TTL_S))

    def open_put_grants(self, conn: Connection) -> Any:
        """Grants for an IPC connection whose loop answers puts (ipc_front.py); None when the
        compiled part is not built. Its checked puts fill them."""
        grants = put_grants.open_grants(conn)
        if grants is not None:
            with self.lock:
                conn.services["kv_put_grants"] = grants
                self._put_grants_open.add(grants)
        return grants

    def puts_served_compiled(self) -> int:
        """Same-host puts answered in compiled code so far (for `stats`)."""
        with self.lock:
            return self._puts_served_by_closed + sum(put_grants.served(g) for g in self._put_grants_open)

    def op_kv_put_many(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        keys = _keys(m)
        values = m.get("values")
        if not isinstance(values, list) or len(values) != len(keys) or not all(isinstance(v, bytes) for v in values):
            raise InvalidArgument("put_many takes values: one bytes per key")
        if sum(map(len, values)) + sum(map(len, keys)) > KV_INLINE_BYTES:
            raise InvalidArgument(f"a batch carries at most {KV_INLINE_BYTES} bytes of keys and values")
        expiry = _expiry(m.get("ttl_ms"), False)
        replicas = _replicas(m)
        for key, value in zip(keys, values, strict=True):
            self._write(state, creds, space, store, key, memoryview(value), None, len(value), expiry,
                        replicas=replicas)
        return {"stored": len(keys)}

    def _write(self, state: NamespaceState, creds: Creds, space: KeySpace, store: Store, key: bytes,
               value: memoryview | None, extents: list[Extent] | None, length: int, expiry: int, *,
               nx: bool = False, xx: bool = False, keepttl: bool = False, get_old: bool = False,
               version: int | None = None, replicas: int = 0, conn: Connection | None = None) -> dict[str, Any]:
        """A put of `value` (inline) or of the filled `extents` (large; released if not
        stored). get_old: the reply's "old" is the value it replaced (None: there was none) as
        _value_or_hold hands it to `conn`. As first home (version None) it numbers the write and passes it on to the
        key's other homes; as a replica it keeps the newest version."""
        h = key_hash(key)
        primary = version is None
        # A replica's write takes no stripe: its first home holds that stripe there while it
        # waits for us, and two servers replicating to each other would wait on each other.
        # The version, compared under the keyspace's lock, orders it.
        with space.key_lock(h) if primary else nullcontext():
            with space.lock:
                if space.closed:
                    raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile")
                found = store.live(key, h, now_ms())
                # The old value (GETSET): inline, or held to be read after the write.
                old = None
                if get_old and found is not None:
                    assert conn is not None, "the old value is handed to a connection"
                    old = self._value_or_hold(conn, state, space, store, found[1])
                refused = (nx and found is not None) or (xx and found is None) or \
                    (not primary and found is not None and found[1][6] >= version)
                if refused:
                    if extents is not None:
                        self._give_back(store, space, extents)
                    return {"stored": False, **({"old": old} if get_old else {})}
                if keepttl and found is not None:
                    expiry = found[1][4]
                version = space.next_version() if primary else version
                try:
                    if extents is None and not inline_fits(len(key), length):
                        # Carried in the request, too large for a record beside its key: extents.
                        extents = self._stage(store, space, value)
                    if extents is None:
                        fields = store.write_inline(key, h, value, expiry, version, found, primary, replicas)
                    else:
                        try:
                            fields = store.write_large(key, h, extents, length, expiry, version, found, primary,
                                                       replicas)
                        except BaseException:
                            self._give_back(store, space, extents)
                            raise
                except BaseException as exc:
                    self._unhand(conn, old)            # not written: nobody reads the old value
                    if isinstance(exc, NoSuchObject) and space.closed:    # a segment went with it
                        raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile") from None
                    raise
                evicted, store.evicted = store.evicted, []
                copies = replicas or space.settings.replicas
                # A value that came in the request goes on the same way; a filled one, from its record.
                held = store.hold(fields) if primary and value is None and copies > 1 else None
            # Nothing to pass on (no copies elsewhere, no key evicted, nothing held): the common put.
            if primary and (evicted or held is not None or copies > 1):
                self._pass_on(state, creds, space, store, key, fields, value, held, evicted)
        return {"stored": True, **({"old": old} if get_old else {})}

    def _stage(self, store: Store, space: KeySpace, value: memoryview) -> list[Extent]:
        """Extents holding a copy of `value`, counted as reserved (write_large takes them)."""
        store.make_room(value.nbytes, b"")
        extents = store.reserve_value(value.nbytes)
        space.reserved_bytes += sum(e.length for e in extents)
        position = 0
        for e in extents:
            take = min(e.length, value.nbytes - position)
            store.memory(e.segment).write(e.offset, value[position:position + take])
            position += take
        return extents

    def _give_back(self, store: Store, space: KeySpace, extents: list[Extent]) -> None:
        space.reserved_bytes -= sum(e.length for e in extents)
        store.release(extents)

    def _pass_on(self, state: NamespaceState, creds: Creds, space: KeySpace, store: Store, key: bytes,
                 fields: Fields, value: memoryview | None, held: tuple[int, int] | None,
                 evicted: list[bytes]) -> None:
        """A first home's write goes to the key's other homes; keys it evicted leave theirs."""
        try:
            for gone in evicted:
                self._replicate(creds, space, gone, {"value": None, "version": space.next_version()})
            copies = replicas_of(fields)
            targets = self._replica_targets(space, creds[0], key, copies)
            if not targets:
                return
            if held is None:
                self._replicate(creds, space, key, {"value": bytes(value), "expiry": fields[4], "version": fields[6],
                                                    "replicas": copies}, targets)
                return
            for server_id in targets:       # large values: reserved, filled and committed there
                try:
                    pieces = [(store.memory(s), o, n) for s, o, n in store.pieces(fields)]
                    put_large_from(self.server._peer(server_id), creds, key, pieces, fields[3], fields[4],
                                   version=fields[6], replicas=copies)
                except MemfabricError as exc:
                    self._missed(server_id, exc)
        finally:
            if held is not None:
                with space.lock:
                    store.let_go(held)

    def _replica_targets(self, space: KeySpace, pool: str, key: bytes, replicas: int = 0) -> list[int]:
        """The key's other homes: `replicas` (0: the namespace's setting) servers in all."""
        copies = replicas or space.settings.replicas
        if copies <= 1:
            return []
        return [s for s in homes(key, self._pool_servers(pool), copies) if s != self.server_id]

    def _replicate(self, creds: Creds, space: KeySpace, key: bytes, change: dict[str, Any],
                   targets: list[int] | None = None) -> None:
        if targets is None:
            targets = self._replica_targets(space, creds[0], key)
        for server_id in targets:
            try:
                self.server._peer(server_id).call("kv_replicate", pool=creds[0], ns=creds[1], sec=creds[2], key=key,
                                                  **change)
            except MemfabricError as exc:
                self._missed(server_id, exc)

    def _missed(self, server_id: int, exc: MemfabricError) -> None:
        # A dead replica: the key has one copy fewer until it is written again.
        self.server.limited_log.warning("kv replicate", "replica on server %d missed a write: %s", server_id, exc)

    def op_kv_replicate(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A first home's change to a key this server holds a copy of."""
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        version, value = m.get("version"), m.get("value", ...)
        if type(version) is not int or version <= 0:
            raise InvalidArgument(f"a replicated change has a version, got {version!r}")
        h = key_hash(key)
        if value is None:                                   # a delete (or eviction) there
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is not None and found[1][6] < version:
                    store.delete_slot(found[0], primary=False)
            return {}
        if "expire" in m:                                   # a new expiry
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is not None:
                    store.set_expiry(found[0], _replica_expiry(m.get("expire")))
            return {}
        if not isinstance(value, bytes) or len(key) + len(value) > KV_INLINE_BYTES:
            raise InvalidArgument("a replicated value is bytes within the inline limit")
        self._write(state, creds, space, store, key, memoryview(value), None, len(value),
                    _replica_expiry(m.get("expiry")), version=version, replicas=_replicas(m))
        return {}

    # ---- large values: reserve, fill, commit --------------------------------------------------------

    def op_kv_reserve(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        length = m.get("length")
        if type(length) is not int:
            raise InvalidArgument(f"a reservation has a length in bytes, got {length!r}")
        check_value_length(length)
        mine = self._client(conn)
        if len(mine.reserved) >= MAX_KV_PENDING_PER_CLIENT:
            raise LimitExceeded(f"a client fills at most {MAX_KV_PENDING_PER_CLIENT} large values at once")
        with space.lock:
            store.make_room(length, b"")
            space.reserved_bytes += length            # counted before: concurrent reservations see it
        try:
            extents = store.reserve_value(length)
        except BaseException:
            with space.lock:
                space.reserved_bytes -= length
            raise
        with space.lock:
            space.reserved_bytes += sum(e.length for e in extents) - length
        token = next(_tokens)
        mine.reserved[token] = _Reserved(state, space, store, extents, length)
        return {"token": token, "extents": [[e.segment, e.offset, e.length] for e in extents]}

    def _unreserve(self, reserved: _Reserved) -> None:
        with reserved.space.lock:
            if not reserved.space.closed:
                self._give_back(reserved.store, reserved.space, reserved.extents)

    def _reservation(self, conn: Connection, m: dict[str, Any], take: bool) -> _Reserved:
        mine = self._client(conn)
        token = m.get("token")
        if type(token) is not int:
            raise InvalidArgument(f"a reservation's token is an int, got {token!r:.40}")
        reserved = mine.reserved.get(token)
        if reserved is None:
            raise InvalidArgument(f"no reservation {token!r:.40} of this connection (committed, aborted, or never)")
        # Checked before it is taken out: a request with wrong credentials (or a namespace that
        # is not there) leaves the reservation to be committed, aborted or given back at
        # disconnection, never forgotten with its memory counted.
        state, creds = self.server._namespace(conn, m)
        if state is not reserved.state:
            raise InvalidArgument("a reservation is committed in the namespace it was made in")
        if take and mine.reserved.pop(token, None) is None:
            raise InvalidArgument(f"no reservation {token!r:.40} of this connection (committed or aborted meanwhile)")
        return reserved

    def transfer_kv_fill(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                         deadline: float) -> None:
        """kv_fill over RPC: the payload is `length` bytes at `at` of a reserved value,
        received straight into the reserved extent (its segment held meanwhile)."""
        reserved = self._reservation(conn, m, take=False)
        at, length = m.get("at"), m.get("length")
        if type(at) is not int or type(length) is not int or at < 0 or length <= 0 or at + length > reserved.length:
            raise InvalidArgument(f"a fill is within the {reserved.length} reserved bytes, got {at!r:.30}+{length!r:.30}")
        piece = _piece_at(reserved.extents, at, length)
        if piece is None:
            raise InvalidArgument("a fill lies within one extent of its reservation")
        if payload_len != length:
            raise ProtocolError(f"kv_fill of {length} bytes carried {payload_len}")
        segment, offset = piece
        mem = self._hold_segments(reserved.state, [segment])[0]
        try:
            receive_into_segment(frames, m["id"], mem, offset, length, deadline)
        finally:
            self._let_go_segments(reserved.state, [segment])

    def _hold_segments(self, state: NamespaceState, segments: list[int]) -> list[Any]:
        """Keep these segments of the namespace from being destroyed while a transfer uses
        them (a destroy of the namespace meanwhile waits for them); their memories."""
        pool = self.server.pools[state.record.pool]
        held: list[int] = []
        with self.lock:
            try:
                for segment in segments:
                    if state.closed or segment not in pool.segments or \
                            pool.allocator.owner_of(segment) != state.key:
                        raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile")
                    pool.allocator.hold(segment)
                    held.append(segment)
            except BaseException:
                for segment in held:
                    pool.allocator.let_go(segment)
                raise
            return [pool.segments[s] for s in segments]

    def _let_go_segments(self, state: NamespaceState, segments: list[int]) -> None:
        pool = self.server.pools[state.record.pool]
        with self.lock:
            for segment in segments:
                pool.allocator.let_go(segment)
        self.server._keeper_wake.set()       # a destroy may have waited for them

    def op_kv_fill(self, conn: Connection, m: dict[str, Any]) -> Reply:
        raise InvalidArgument("kv_fill carries its bytes as a payload: RPC only (on this host, write the "
                              "reserved extents through their mapping)")

    def op_kv_commit(self, conn: Connection, m: dict[str, Any]) -> Reply:
        reserved = self._reservation(conn, m, take=True)
        try:
            state, creds, space, store = self._space(conn, m)
            key = check_key(m.get("key"))
            nx, xx, keepttl, get_old = _flags(m)
            replicas = _replicas(m)
            version = m.get("version")
            if version is not None:
                if conn.role != "peer":
                    raise InvalidArgument("only a key's first home numbers its writes")
                if type(version) is not int or version <= 0:
                    raise InvalidArgument(f"a version is a positive int, got {version!r}")
                expiry = _replica_expiry(m.get("expiry"))
            else:
                expiry = _expiry_of(m, keepttl)
        except BaseException:
            self._unreserve(reserved)
            raise
        if inline_fits(len(key), reserved.length):
            # Small enough for a record after all: copy it there (the reservation goes back).
            value = bytearray(reserved.length)
            position = 0
            for e in reserved.extents:
                take = min(e.length, reserved.length - position)
                store.memory(e.segment).read(e.offset, memoryview(value)[position:position + take])
                position += take
            self._unreserve(reserved)
            return self._write(state, creds, space, store, key, memoryview(value), None, len(value), expiry,
                               nx=nx, xx=xx, keepttl=keepttl, get_old=get_old, version=version, replicas=replicas,
                               conn=conn)
        return self._write(state, creds, space, store, key, None, reserved.extents, reserved.length, expiry,
                           nx=nx, xx=xx, keepttl=keepttl, get_old=get_old, version=version, replicas=replicas,
                           conn=conn)

    def op_kv_abort(self, conn: Connection, m: dict[str, Any]) -> Reply:
        self._unreserve(self._reservation(conn, m, take=True))
        return {}

    # ---- deletes, expiry ---------------------------------------------------------------------------

    def op_kv_delete(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        return {"deleted": self._delete(creds, space, store, check_key(m.get("key")))}

    def op_kv_delete_many(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        return {"deleted": sum(self._delete(creds, space, store, k) for k in _keys(m))}

    def _delete(self, creds: Creds, space: KeySpace, store: Store, key: bytes) -> bool:
        h = key_hash(key)
        with space.key_lock(h):
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is not None:
                    store.delete_slot(found[0])
                version = space.next_version()
            # Replicas hear of it even when this home had lost the key (evicted, restarted).
            copies = replicas_of(found[1]) if found is not None else 0
            self._replicate(creds, space, key, {"value": None, "version": version},
                            self._replica_targets(space, creds[0], key, copies))
        return found is not None

    def op_kv_expire(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        expiry = _expiry(m.get("ttl_ms"), False)
        h = key_hash(key)
        with space.key_lock(h):
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is None:
                    return {"set": False}
                store.set_expiry(found[0], expiry)
            self._replicate(creds, space, key, {"expire": expiry, "version": space.next_version()},
                            self._replica_targets(space, creds[0], key, replicas_of(found[1])))
        return {"set": True}

    def op_kv_ttl(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        with space.lock:
            found = store.live(key, key_hash(key), now_ms())
        if found is None:
            return {"ttl_ms": -2}
        expiry = found[1][4]
        return {"ttl_ms": -1 if expiry == NO_EXPIRY else max(0, expiry - now_ms())}

    def op_kv_incr(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        by = m.get("by", 1)
        if type(by) is not int or not -(1 << 63) <= by < (1 << 63):
            raise InvalidArgument(f"incr takes a 64-bit integer step, got {by!r:.40}")
        h = key_hash(key)
        with space.key_lock(h):        # read, add and write as one: no increment is lost
            with space.lock:
                found = store.live(key, h, now_ms())
                current, copies = 0, 0
                if found is not None:
                    current = _integer(store.read(found[1]) if found[1][3] <= 20 else b"x")
                    copies = replicas_of(found[1])
            result = current + by
            if not -(1 << 63) <= result < (1 << 63):
                raise InvalidArgument("increment or decrement would overflow")
            self._write(state, creds, space, store, key, memoryview(str(result).encode()), None,
                        len(str(result)), NO_EXPIRY, keepttl=True, replicas=copies)
        return {"value": result}

    # ---- reads ------------------------------------------------------------------------------------

    def op_kv_get(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A key's value: inline when small; larger, over RPC, as the reply's payload sent
        straight from the record's memory; else (same host, beyond one payload, or asked
        `as_hold`: the door, which streams it) as a hold on it, read in place (kv_read, or the
        mapping), then let go (kv_let_go)."""
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        as_hold = m.get("as_hold", False)
        if type(as_hold) is not bool:
            raise InvalidArgument(f"as_hold is a boolean, got {as_hold!r:.40}")
        with space.lock:
            found = store.live(key, key_hash(key), now_ms())
            if found is None:
                space.counters.misses += 1
                self._grant_gets(conn, creds, space, store, None)
                return {"found": False}
            space.counters.hits += 1
            fields = found[1]
            if fields[3] <= KV_INLINE_BYTES or as_hold:
                if extents_of(fields) == 0:
                    self._grant_gets(conn, creds, space, store, fields[0])
                return {"found": True, **self._value_or_hold(conn, state, space, store, fields)}
            mine = self._may_hold(conn)
            place = store.hold(fields)
            pieces = store.pieces(fields)
        if not conn.carries_fds and fields[3] <= MAX_RPC_PAYLOAD_BYTES and all(
                store.memory(s).view is not None for s, _, _ in pieces):
            segments = sorted({s for s, _, _ in pieces})
            try:
                self._hold_segments(state, segments)
            except BaseException:
                with space.lock:
                    store.let_go(place)
                raise

            def done() -> None:          # sent (or not): the record and its segments go free
                self._let_go_segments(state, segments)
                with space.lock:
                    store.let_go(place)
            views = [store.memory(s).view[o:o + n] for s, o, n in pieces]
            return Payload({"found": True, "length": fields[3]}, views, done)
        token = next(_tokens)
        mine.held[token] = _Held(state, space, store, place, pieces)
        return {"found": True, "length": fields[3], "hold": token, "pieces": [list(p) for p in pieces]}

    def _grant_gets(self, conn: Connection, creds: Creds, space: KeySpace, store: Store,
                    segment: int | None) -> None:
        """Under the keyspace's lock, with the secId checked: the connection's next gets of
        this keyspace may be answered in compiled code (get_grants.py), with `segment` (the
        record's, if any) among those it reads."""
        grants = conn.services.get("kv_get_grants")
        if grants is None or space.draining is not None or space.closed or type(creds[2]) is not bytes:
            return
        view = None
        if segment is not None:
            view = store.memory(segment).view
            if view is None:             # a file segment: Python's
                return
        space.get_grants.grant(grants, space, creds[2], segment, view)

    def open_get_grants(self, conn: Connection) -> Any:
        """Grants for an RPC connection whose loop answers gets (rpc_front.py); None when
        the compiled part is not built. Its checked gets fill them."""
        grants = get_grants.open_grants()
        if grants is not None:
            with self.lock:
                conn.services["kv_get_grants"] = grants
                self._get_grants_open.add(grants)
        return grants

    def gets_served_compiled(self) -> int:
        """Remote gets answered in compiled code so far (for `stats`)."""
        with self.lock:
            return self._gets_served_by_closed + sum(g.table.served for g in self._get_grants_open)

    def _value_or_hold(self, conn: Connection, state: NamespaceState, space: KeySpace, store: Store,
                       fields: Any) -> dict[str, Any]:
        """Under the keyspace's lock: a value to hand back in a reply. Inline when small ("value");
        larger, a hold on its record ("length", "hold", "pieces"): the caller reads it where it
        lies (kv_read, or the mapping) and lets it go (kv_let_go). The record outlives a delete
        or an overwrite until then, so GETDEL's or GETSET's value is read whole after the
        change. A reply never carries a large value itself: no message limit cuts it."""
        if fields[3] <= KV_INLINE_BYTES:
            return {"value": store.read(fields)}
        mine = self._may_hold(conn)
        pieces = store.pieces(fields)
        token = next(_tokens)
        mine.held[token] = _Held(state, space, store, store.hold(fields), pieces)
        return {"length": fields[3], "hold": token, "pieces": [list(p) for p in pieces]}

    def _may_hold(self, conn: Connection) -> Any:
        """The connection's own state, if it may hold one more value: a client a few at once;
        another server's link, which carries the reads of all its door's clients, more."""
        mine = self._client(conn)
        most = MAX_KV_HOLDS_PER_PEER if conn.role == "peer" else MAX_KV_HOLDS_PER_CLIENT
        if len(mine.held) >= most:
            raise LimitExceeded(f"a {'server' if conn.role == 'peer' else 'client'} holds at most {most} values at "
                                "once (kv_let_go)")
        return mine

    def _unhand(self, conn: Connection | None, handed: dict[str, Any] | None) -> None:
        """Under the keyspace's lock: let go what _value_or_hold held for a reply that failed."""
        if conn is not None and handed is not None and "hold" in handed:
            held = self._client(conn).held.pop(handed["hold"], None)
            if held is not None:
                held.store.let_go(held.place)

    def transfer_kv_read(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                         deadline: float) -> None:
        """kv_read over RPC: `length` bytes at `at` of a held value, sent from where they are."""
        if payload_len:
            raise ProtocolError("kv_read carries no payload")
        held = self._held(conn, m, take=False)
        at, length = m.get("at"), m.get("length")
        total = sum(n for _, _, n in held.pieces)
        if type(at) is not int or type(length) is not int or at < 0 or length <= 0 or at + length > total:
            raise InvalidArgument(f"a read is within the value's {total} bytes, got {at!r:.30}+{length!r:.30}")
        piece = _piece_at([Extent(*p) for p in held.pieces], at, length)
        if piece is None:
            raise InvalidArgument("a read lies within one piece of the value")
        segment, offset = piece
        mem = self._hold_segments(held.state, [segment])[0]
        try:
            send_from_segment(frames, m["id"], mem, offset, length)
        finally:
            self._let_go_segments(held.state, [segment])

    def op_kv_read(self, conn: Connection, m: dict[str, Any]) -> Reply:
        raise InvalidArgument("kv_read answers with a payload: RPC only (on this host, read the mapping)")

    def _held(self, conn: Connection, m: dict[str, Any], take: bool) -> _Held:
        mine = self._client(conn)
        token = m.get("hold")
        if type(token) is not int:
            raise InvalidArgument(f"a hold is an int, got {token!r:.40}")
        held = mine.held.get(token)
        if held is None:
            raise InvalidArgument(f"no hold {token!r:.40} of this connection (let go, or never)")
        if held.space.closed:
            # Its namespace was destroyed, the value's memory with it: nothing is left to hold,
            # and no request can name that namespace any more to let it go.
            if take:
                mine.held.pop(token, None)
            raise NoSuchNamespace(f"the namespace of hold {token} was destroyed")
        # Still its namespace's, with the right secId; checked before the hold is taken out, so
        # a request with wrong credentials leaves it to be let go (here or at disconnection).
        state, _ = self.server._namespace(conn, m)
        if state.kv is not held.space:
            raise InvalidArgument("a hold is let go in the namespace it was taken in")
        if take and mine.held.pop(token, None) is None:
            raise InvalidArgument(f"no hold {token!r:.40} of this connection (let go meanwhile)")
        return held

    def op_kv_let_go(self, conn: Connection, m: dict[str, Any]) -> Reply:
        held = self._held(conn, m, take=True)
        with held.space.lock:
            held.store.let_go(held.place)
        return {}

    def op_kv_get_many(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Values of many keys in one reply: their lengths (MANY_MISSING; MANY_ALONE: too large
        to ride along, get it alone; MANY_AGAIN: no room left in this reply, ask again) and
        their bytes, back to back: over RPC as the reply's payload, sent from the records'
        memory (held until sent), up to KV_GET_MANY_PAYLOAD_BYTES; on this host, inline."""
        state, creds, space, store = self._space(conn, m)
        keys = _keys(m)
        lengths: list[int] = []
        by_payload = not conn.carries_fds
        limit = KV_GET_MANY_PAYLOAD_BYTES if by_payload else KV_INLINE_BYTES
        room = limit
        parts: list[bytes] = []
        places: list[tuple[int, int]] = []
        pieces: list[tuple[int, int, int]] = []
        with space.lock:
            now = now_ms()
            for key in keys:
                found = store.live(key, key_hash(key), now)
                if found is None:
                    space.counters.misses += 1
                    lengths.append(MANY_MISSING)
                    continue
                fields = found[1]
                vlen = fields[3]
                if vlen > room:
                    lengths.append(MANY_ALONE if vlen > limit else MANY_AGAIN)
                    continue
                space.counters.hits += 1
                where = store.pieces(fields)
                if by_payload and all(store.memory(s).view is not None for s, _, _ in where):
                    places.append(store.hold(fields))
                    pieces.extend(where)
                else:
                    parts.append(store.read(fields))
                    if by_payload:              # no mapping to send from: a copy, in order
                        pieces.append((-1, len(parts) - 1, vlen))
                lengths.append(vlen)
                room -= vlen
        if not by_payload:
            return {"lengths": lengths, "values": b"".join(parts)}
        segments = sorted({s for s, _, _ in pieces if s >= 0})
        try:
            self._hold_segments(state, segments)
        except BaseException:
            with space.lock:
                for place in places:
                    store.let_go(place)
            raise

        def done() -> None:              # sent (or not): the records and their segments go free
            self._let_go_segments(state, segments)
            with space.lock:
                for place in places:
                    store.let_go(place)
        views = [memoryview(parts[o]) if s < 0 else store.memory(s).view[o:o + n] for s, o, n in pieces]
        return Payload({"lengths": lengths}, views, done)

    def op_kv_exists(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        keys = _keys(m)
        with space.lock:
            now = now_ms()
            return {"exists": [store.live(k, key_hash(k), now) is not None for k in keys]}

    # ---- the whole keyspace -------------------------------------------------------------------------

    def op_kv_scan(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Up to `batch` keys from slot `cursor` on, with `prefix`, that this server holds as
        first of `servers` (the client's view of the pool: every key once, across servers).
        The next cursor, 0 at the end, and the `generation` of the table it is a cursor of.
        Given the generation of the table `cursor` is of, the scan goes on where that table's
        keys are now (Store.resume: a new table followed, keys moved); `restarted` when that
        table is gone and the scan begins again (keys may come twice, as Redis's SCAN allows;
        `restart` False: it goes on in the current table instead). While a table drains, it is
        read first (Store.scan)."""
        state, creds, space, store = self._space(conn, m)
        cursor, batch, prefix = m.get("cursor", 0), m.get("batch", 1000), m.get("prefix", b"")
        servers, of = m.get("servers"), m.get("generation")
        if type(cursor) is not int or cursor < 0 or type(batch) is not int or not 0 < batch <= SCAN_BATCH_MAX:
            raise InvalidArgument(f"scan takes a cursor >= 0 and a batch of 1 to {SCAN_BATCH_MAX}")
        if of is not None and (type(of) is not int or of < 0):
            raise InvalidArgument("a scan's generation is an int >= 0 (the reply's), or none")
        restart = m.get("restart", True)
        if type(restart) is not bool:     # "no" or 0 read as True (or not) by chance: said so
            raise InvalidArgument("a scan's restart is a bool")
        if not isinstance(prefix, bytes) or len(prefix) > 65536:
            raise InvalidArgument("a scan's prefix is bytes, at most a key long")
        if not isinstance(servers, list) or not all(type(s) is int for s in servers) or len(servers) > 4096:
            raise InvalidArgument("a scan names the pool's servers it sees (a list of ids)")
        keys: list[bytes] = []
        with space.lock:
            generation = space.table.generation
            resumed = store.resume(cursor, of) if cursor else 0
            if resumed is None and not restart:
                resumed = cursor & (SCAN_DRAINING - 1)    # read once again already: on, to the end
            found, cursor = store.scan(resumed or 0, batch, 16 * batch)
            now = now_ms()
            for fields in found:
                if not (fields[4] != NO_EXPIRY and fields[4] <= now):
                    key = store.read_key(fields)
                    if key.startswith(prefix) and (not servers or homes(key, servers, 1) == [self.server_id]):
                        keys.append(key)
        return {"keys": keys, "cursor": cursor, "generation": generation, "restarted": resumed is None}

    def op_kv_stats(self, conn: Connection, m: dict[str, Any]) -> Reply:
        _, _, space, _ = self._space(conn, m)
        with space.lock:
            return {"stats": space.stats(), "settings": space.settings.to_wire()}

    def op_kv_flush(self, conn: Connection, m: dict[str, Any]) -> Reply:
        _, _, space, store = self._space(conn, m)
        with space.lock:
            return {"flushed": store.flush()}

    def op_kv_configure(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Keep the namespace's KV settings in the cluster; every server reads them."""
        state, creds, space, _ = self._space(conn, m)
        settings = space.settings.to_wire()
        if "memory_limit" in m:
            settings["memory_limit"] = _memory_limit(m["memory_limit"])
        if "eviction" in m:
            if m["eviction"] not in ("lru", "refuse"):
                raise InvalidArgument(f"eviction is 'lru' or 'refuse', got {m['eviction']!r:.40}")
            settings["eviction"] = m["eviction"]
        if "replicas" in m:
            settings["replicas"] = check_replicas(m["replicas"])
        record = state.record
        if not self.server.cluster.set_settings(record.pool, record.ns, record.incarnation, SETTINGS_NAME, settings):
            raise NoSuchNamespace(f"namespace {record.ns!r} in pool {record.pool!r} was destroyed meanwhile")
        self._refresh_settings(state, space, force=True)
        for server in self.server.view():
            if server.alive and server.server_id != self.server_id and record.pool in server.pools:
                try:
                    self.server._peer(server.server_id).call("kv_settings_changed", pool=creds[0], ns=creds[1],
                                                             sec=creds[2])
                except MemfabricError as exc:       # it re-reads within SETTINGS_TTL_S anyway
                    self.server.limited_log.info("kv settings", "server %d: %s", server.server_id, exc)
        return {"settings": settings}

    def op_kv_settings_changed(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _, space, _ = self._space(conn, m)
        self._refresh_settings(state, space, force=True)
        return {}


def may_have_been_dead(last_sent_s: float, landed_s: float, liveness_timeout_s: float) -> bool:
    """Whether the cluster may have taken a server for dead between a heartbeat sent at
    `last_sent_s` and the next, which reached it by `landed_s` (both monotonic)."""
    return landed_s - last_sent_s >= liveness_timeout_s


def _settings(stored: dict[str, Any]) -> KvSettings:
    """Settings as the cluster keeps them, each checked as kv_configure checks it: one kept
    by an older server that checked less reads as the default, never as a value that breaks
    every reply carrying it."""
    limit, eviction, replicas = stored.get("memory_limit"), stored.get("eviction"), stored.get("replicas")
    return KvSettings(
        memory_limit=limit if type(limit) is int and 0 < limit <= MAX_MEMORY_LIMIT_BYTES else None,
        eviction=eviction if eviction in ("lru", "refuse") else "lru",
        replicas=replicas if type(replicas) is int and 1 <= replicas <= MAX_KV_REPLICAS else 1)


def _piece_at(extents: list[Extent], at: int, length: int) -> tuple[int, int] | None:
    """(segment, offset) of byte `at` of a value laid over `extents`, if `length` bytes from
    there stay within that extent."""
    position = 0
    for e in extents:
        if position <= at < position + e.length:
            return (e.segment, e.offset + at - position) if at + length <= position + e.length else None
        position += e.length
    return None


def _replicas(m: dict[str, Any]) -> int:
    """A write's own count of servers to hold the key; 0: the namespace's setting."""
    replicas = m.get("replicas")
    return 0 if replicas in (None, 0) else check_replicas(replicas)


def _flags(m: dict[str, Any]) -> tuple[bool, bool, bool, bool]:
    # Every put reads these: four lookups, no list or generator (a few microseconds each put).
    nx, xx, keepttl, get_old = m.get("nx", False), m.get("xx", False), m.get("keepttl", False), m.get("get", False)
    if not (type(nx) is bool and type(xx) is bool and type(keepttl) is bool and type(get_old) is bool):
        raise InvalidArgument("nx, xx, keepttl and get are booleans")
    if nx and xx:
        raise InvalidArgument("nx and xx exclude each other")
    return nx, xx, keepttl, get_old


def _expiry(ttl_ms: object, keepttl: bool) -> int:
    if ttl_ms is None:
        return NO_EXPIRY
    if type(ttl_ms) is not int or not 0 < ttl_ms <= 10 ** 15:
        raise InvalidArgument(f"ttl_ms is a positive number of milliseconds, got {ttl_ms!r:.40}")
    if keepttl:
        raise InvalidArgument("a ttl and keepttl exclude each other")
    return now_ms() + ttl_ms


def _expiry_of(m: dict[str, Any], keepttl: bool) -> int:
    """A write's expiry: `ttl_ms` from now, or `expire_at_ms` (ms of the wall clock; 0: none;
    in the past: the key is written expired, as Redis's SET ... PXAT does)."""
    if "expire_at_ms" not in m:
        return _expiry(m.get("ttl_ms"), keepttl)
    at = m["expire_at_ms"]
    if type(at) is not int or not 0 <= at < 1 << 63 or m.get("ttl_ms") is not None or (keepttl and at):
        raise InvalidArgument(f"expire_at_ms is ms of the wall clock (0: none), without ttl_ms or keepttl, "
                              f"got {at!r:.40}")
    return at


def _replica_expiry(expiry: object) -> int:
    if type(expiry) is not int or expiry < 0:
        raise InvalidArgument(f"an expiry is ms of the wall clock (0: none), got {expiry!r:.40}")
    return expiry


def _integer(raw: bytes) -> int:
    """A value as Redis's INCR reads it: a base-10 64-bit integer in ASCII digits, nothing
    around or between them (Python's int() also takes "1_000", " 1" and other scripts' digits)."""
    if len(raw) > 20 or not _INTEGER.fullmatch(raw):
        raise InvalidArgument("value is not an integer or out of range")
    value = int(raw)
    if not -(1 << 63) <= value < (1 << 63):
        raise InvalidArgument("value is not an integer or out of range")
    return value


def _memory_limit(limit: object) -> int | None:
    if limit is None:
        return None
    try:
        value = parse_size(limit)
    except ValueError as exc:
        raise InvalidArgument(f"memory_limit: {exc}") from None
    if not 0 < value <= MAX_MEMORY_LIMIT_BYTES:
        raise InvalidArgument(f"memory_limit is a positive size (\"1GiB\", bytes) up to {MAX_MEMORY_LIMIT_BYTES} "
                              f"bytes, or None; got {limit!r:.40}")
    return value


def _keys(m: dict[str, Any]) -> list[bytes]:
    keys = m.get("keys")
    if not isinstance(keys, list) or not 0 < len(keys) <= MAX_KV_BATCH:
        raise InvalidArgument(f"a batch names 1 to {MAX_KV_BATCH} keys")
    return [check_key(k) for k in keys]


__all__ = ["KeyValueService", "OutOfMemory", "ServerUnavailable"]

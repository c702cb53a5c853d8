"""The server's BigMemory operations: objects allocated, freed, grown, described, pinned,
copied and gathered, and their bytes moved for other hosts.

The server process owns pools, namespaces, secIds, peers and the lock, and dispatches to
this; BigMemory owns what objects need on top of them: where their bytes go (placement,
extents held for other homes), their journal on persistent pools, and transfers that must
not outlive the memory they touch (spans for RPC, pins for server-side copies).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..core.allocator import Extent, round_up
from ..errors import (BmError, InvalidArgument, LimitExceeded, MemfabricError, NoSuchNamespace, NoSuchObject,
                      OutOfMemory, OutOfRange, ProtocolError, ServerUnavailable)
from ..limits import (MAX_BATCH_IDS, MAX_BATCH_REQUEST_BYTES, MAX_BATCH_SPANS_PER_REQUEST, MAX_EXTENTS_PER_OBJECT,
                      MAX_OBJECT_BYTES, MAX_OBJECTS_PER_LISTING, PAGE_SIZE_BYTES)
from ..media.base import SegmentMemory
from ..server.requests import Connection, Payload, Reply, receive_into_segment, send_from_segment
from ..server.state import NamespaceState, PoolState
from . import placement, reduce
from ..datapath.deadline import unbounded
from ..datapath.rpc_link import InFlight
from .journal import Journal
from .layout import Layout, RemoteSegment, check_range, copy_between, described_layout, write_at
from .objects import ObjectRecord, Placement, parse_bm_id
from .span_grants import ConnectionGrants, SpanGrantRegistry

if TYPE_CHECKING:
    from ..server.server import Server

log = logging.getLogger("memfabric.server")

Creds = tuple[str, str, bytes]   # (pool, ns, secId)
OBJECTS_PER_QUERY = 2000     # ids per objects_alive request: keeps it inside one message
SPREAD_RETRY_S = 0.05       # a spread placement refused by a stale view asks again this often


class BigMemoryService:
    # Server-to-server operations (a peer's home asks for extents, checks what lives).
    PEER_OPS = frozenset({"extent_alloc", "extent_free", "home_restarted", "objects_alive", "extents_held"})
    FD_OPS = frozenset({"ns_open"})        # hands over the generation table's fd

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.journals: dict[str, Journal] = {}      # pool name -> its objects' journal (persistent pools)
        # What BigMemory uses of the server, named once.
        self.lock = server.lock
        self.pools = server.pools
        self.namespaces = server.namespaces
        self.cluster = server.cluster
        self._namespace = server._namespace
        self._creds = server._creds
        self._peer = server._peer
        self.view = server.view
        self._reserve_local = server._reserve_local
        # Objects RPC connections may read and write in compiled code (span_grants.py).
        self.grants = SpanGrantRegistry()

    @property
    def server_id(self) -> int:
        return self.server.server_id

    def handlers(self) -> dict[str, Callable[[Connection, dict[str, Any]], Reply]]:
        return {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    def usage(self, state: NamespaceState) -> dict[str, int]:
        """The namespace's figures here, for ns_query and `memfabric status`."""
        with self.lock:
            return {"object_count": len(state.objects.table), "used_bytes": state.objects.table.live_bytes()}

    def tick(self) -> None:
        """Housekeeping from the server's keeper: none (freed extents rest in the allocator)."""

    # ---- the server's life ------------------------------------------------------------------

    def announce(self) -> None:
        """Once this server answers requests: peers may hold extents for objects of ours that
        did not survive a restart (always, for DRAM); ask them to check with us."""
        for server in self.view(fresh=True):
            if server.alive and server.server_id != self.server_id:
                try:
                    self._peer(server.server_id).call("home_restarted", home=self.server_id)
                except MemfabricError as exc:
                    log.warning("could not ask server %d to check what it holds for us: %s",
                                server.server_id, exc)

    def disconnected(self, conn: Connection) -> None:
        """A client went away: its mappings no longer keep freed objects' memory, nor its
        span grants anything."""
        to_release: list[tuple[NamespaceState, str, list[Placement], Creds | None]] = []
        with self.lock:
            grants = conn.services.pop("span_grants", None)
            if grants is not None:
                for token, segment in self.grants.close(grants):
                    self._let_go_locked(token, segment)
            for (pool_name, ns), state in self.namespaces.items():
                for bm_id, freed in state.objects.table.unpin_all_by_object(conn.id):
                    # The secId this client proved lets us give back extents held by peers.
                    proven = conn.verified.get((pool_name, ns))
                    creds = (pool_name, ns, proven[1]) if proven else None
                    to_release.append((state, bm_id, freed, creds))
        for state, bm_id, extents, creds in to_release:
            self._release(state, bm_id, extents, creds)

    def dropped(self, state: NamespaceState) -> None:
        """The namespace is being destroyed (under the server's lock): no object of it comes
        back after a restart, and no connection serves its objects from compiled code."""
        allocator = self.pools[state.record.pool].allocator if state.record.pool in self.pools else None
        for bm_id, segment in self.grants.revoke_namespace(state.record.pool, state.record.ns):
            self._take_over_locked(state, allocator, bm_id, segment)
        self._log(state, "drop")

    def close(self) -> None:
        for journal in self.journals.values():
            journal.close()
        self.journals.clear()

    # ---- operations -----------------------------------------------------------------------------

    def op_home_restarted(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A home server came back: free what we hold for its objects that did not. The caller
        only names the home; which objects live, we ask the home itself."""
        home = m.get("home")
        if type(home) is not int or home == self.server_id:
            raise InvalidArgument("home_restarted names another server's id")
        with self.lock:
            held = sorted({b for st in self.namespaces.values() for b in st.objects.lent_by_object
                           if parse_bm_id(b)[0] == home})
        alive: set[str] = set()
        for i in range(0, len(held), OBJECTS_PER_QUERY):
            reply = self._peer(home).call("objects_alive", ids=held[i:i + OBJECTS_PER_QUERY])
            alive.update(reply["alive"])
        gone = set(held) - alive
        released = 0
        with self.lock:
            for state in list(self.namespaces.values()):
                for bm_id in [b for b in state.objects.lent_by_object if b in gone]:
                    extents = state.objects.lent_by_object.pop(bm_id)
                    self._give_back_locked(state, bm_id, extents)
                    self._log(state, "held", bm_id, [])
                    released += len(extents)
        if released:
            log.info("gave back %d extents held for objects server %d lost", released, home)
        damaged = self._check_bytes_on(home)
        return {"released_extents": released, "damaged_objects": damaged}

    def _check_bytes_on(self, server_id: int) -> int:
        """A server came back: objects homed here with extents there keep their bytes only if
        it still holds those extents (a pmem or ramdisk server restores them; a DRAM one lost
        them). Those that lost some are marked: using them fails, saying so, until freed."""
        with self.lock:
            placed = {record.bm_id: (state, record) for state in self.namespaces.values()
                      for record in state.objects.table.records()
                      if any(e.server_id == server_id for e in record.extents)}
        ids = sorted(placed)
        held: dict[str, list] = {}
        for i in range(0, len(ids), OBJECTS_PER_QUERY):
            reply = self._peer(server_id).call("extents_held", ids=ids[i:i + OBJECTS_PER_QUERY])
            held.update(reply["held"])
        damaged = 0
        with self.lock:
            for bm_id, (state, record) in placed.items():
                theirs = {(e.segment, e.offset, e.length) for e in record.extents if e.server_id == server_id}
                if not theirs <= {tuple(e) for e in held.get(bm_id, [])}:
                    record.lost_on.add(server_id)
                    self._revoke_grants_locked(state, bm_id)    # using it fails from now on
                    damaged += 1
        if damaged:
            log.warning("%d objects homed here lost their bytes on server %d, which restarted without them",
                        damaged, server_id)
        return damaged

    def op_extents_held(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Which extents this server holds for these objects (a home asks after our restart)."""
        ids = m.get("ids")
        if not isinstance(ids, list) or len(ids) > OBJECTS_PER_QUERY:
            raise InvalidArgument(f"extents_held takes at most {OBJECTS_PER_QUERY} ids")
        with self.lock:
            held: dict[str, list] = {}
            for state in self.namespaces.values():
                for bm_id in ids:
                    extents = state.objects.lent_by_object.get(bm_id) if isinstance(bm_id, str) else None
                    if extents:
                        held.setdefault(bm_id, []).extend([e.segment, e.offset, e.length] for e in extents)
            return {"held": held}

    def op_objects_alive(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Which of these ids name live objects here (a peer asks after our restart)."""
        ids = m.get("ids")
        if not isinstance(ids, list) or len(ids) > OBJECTS_PER_QUERY:
            raise InvalidArgument(f"objects_alive takes at most {OBJECTS_PER_QUERY} ids")
        with self.lock:
            tables = [st.objects.table for st in self.namespaces.values()]
            # Claimed (being allocated) and freed-but-mapped ids hold their extents too.
            return {"alive": [b for b in ids if isinstance(b, str) and any(t.is_known(b) for t in tables)]}

    def restore(self, pool: PoolState) -> None:
        """Bring back a persistent pool's objects from its journal, for namespaces the catalog
        still has (the same incarnation); then compact the journal to what lives."""
        journal = self.journals[pool.name] = Journal(pool.path or "")
        objects: dict[tuple[str, int], dict[str, tuple[int, list, float]]] = defaultdict(dict)
        held: dict[tuple[str, int], dict[str, list]] = defaultdict(dict)
        for record in journal.replay():
            kind, ns, incarnation, *rest = record
            key = (ns, incarnation)
            if kind == "obj":
                # Records of earlier versions have no creation time: "now" (restored) stands in.
                objects[key][rest[0]] = (rest[1], rest[2], rest[3] if len(rest) > 3 else time.time())
            elif kind == "free":
                objects[key].pop(rest[0], None)
            elif kind == "held":
                if rest[1]:
                    held[key][rest[0]] = rest[1]
                else:
                    held[key].pop(rest[0], None)
            elif kind == "drop":
                objects.pop(key, None)
                held.pop(key, None)
        snapshot: list[list[Any]] = []
        files = pool.existing_segments()

        def take_back(owner: tuple, what: str, extents: list[Extent]) -> bool:
            """Re-own `extents` in their segment files; False (and nothing taken) if any lies
            in a file that is gone or does not fit."""
            by_segment: dict[int, list[Extent]] = defaultdict(list)
            for e in extents:
                by_segment[e.segment].append(e)
            missing = [seg for seg in by_segment if seg not in files]
            if missing:
                log.warning("%s of %s/%s lost: segment files %s are gone", what, pool.name, owner[1], missing)
                return False
            try:
                for seg, mine in by_segment.items():
                    pool.allocator.restore(owner, seg, files[seg], mine)
            except InvalidArgument as exc:
                # Never drop persisted objects for a setting: refuse to start, change nothing.
                raise InvalidArgument(f"pool {pool.name}: cannot restore {what} of namespace {owner[1]!r}: {exc}; "
                                      "nothing was changed") from None
            for seg in by_segment:
                if seg not in pool.segments:
                    pool.adopt(seg)
            return True

        for key in sorted(set(objects) | set(held)):
            ns, incarnation = key
            record = self.cluster.get_namespace(pool.name, ns)
            if record is None or record.incarnation != incarnation:
                log.info("namespace %s/%s was destroyed while this server was down: not restored", pool.name, ns)
                continue
            state = self.namespaces.get((pool.name, ns)) or NamespaceState(
                record, self.server_id, f"s{self.server_id}", self.server.generations)
            self.namespaces[(pool.name, ns)] = state
            for bm_id, (size, extents, created_s) in objects.get(key, {}).items():
                placements = [Placement(*e) for e in extents]
                mine = [Extent(e.segment, e.offset, e.length) for e in placements if e.server_id == self.server_id]
                if not take_back(state.key, f"object {bm_id}", mine):
                    continue
                restored = state.objects.table.restore(bm_id, size, placements, created_s)
                state.objects.publish(restored)
                snapshot.append(["obj", ns, incarnation, bm_id, size, extents, created_s])
            for bm_id, extents in held.get(key, {}).items():
                mine = [Extent(*e) for e in extents]
                if not take_back(state.key, f"extents held for {bm_id}", mine):
                    continue
                state.objects.lent_by_object[bm_id] = mine
                snapshot.append(["held", ns, incarnation, bm_id, extents])
            log.info("restored %d objects of %s/%s from the journal", len(state.objects.table), pool.name, ns)
        over = pool.allocator.over_capacity_bytes()
        if over:
            raise InvalidArgument(f"pool {pool.name}'s files hold {pool.allocator.committed_bytes()} bytes of live "
                                  f"objects' segments, {over} more than its capacity of {pool.capacity_bytes}: "
                                  "raise its capacity to start; nothing was changed")
        journal.rewrite(snapshot)

    def _log(self, state: NamespaceState, kind: str, *fields: Any) -> None:
        """Journal a change of a persistent pool before it is answered."""
        journal = self.journals.get(state.record.pool)
        if journal is not None:
            journal.append(kind, state.record.ns, state.record.incarnation, *fields)

    def op_ns_open(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:   # a drop closes gen_fd under this lock; our duplicate is ours to close
            if state.closed:
                raise NoSuchNamespace(f"namespace {state.record.ns!r} in pool {state.record.pool!r} "
                                      "was destroyed meanwhile")
            try:
                fd = os.dup(state.objects.gen_fd)
            except OSError as exc:
                raise LimitExceeded(f"server {self.server_id} cannot open more files ({exc.strerror}); "
                                    "try again later") from None
        return ({"incarnation": state.record.incarnation, "table_bytes": state.objects.table_bytes}, [fd], True)

    def op_alloc(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        size = _size_arg(m, "size")
        policy = m.get("policy", "local")
        if policy not in placement.POLICIES:
            raise InvalidArgument(f"policy must be one of {', '.join(placement.POLICIES)}, got {policy!r}")
        target = m.get("server_id")
        if (policy == "server") != (type(target) is int) or (target is not None and type(target) is not int):
            raise InvalidArgument(f"server_id is an int with policy 'server', and only with it; got {target!r}")
        with self.lock:
            bm_id = state.objects.table.claim()
        try:
            extents = self._place(state, creds, policy, size, target, bm_id)
        except BaseException:
            with self.lock:
                state.objects.table.unclaim(bm_id)
            raise
        with self.lock:
            if not state.closed:
                record = state.objects.table.create(size, extents, claimed=bm_id, created_s=time.time())
                record.required_server = target if policy == "server" else None
                self._log(state, "obj", bm_id, size, [list(_placement(e)) for e in extents], record.created_s)
                state.objects.publish(record)
                return _describe(record, state)
        # Destroyed while we placed it: our memory went with the namespace; peers get theirs back.
        self._release(state, bm_id, extents, creds)
        raise NoSuchNamespace(f"namespace {creds[1]!r} in pool {creds[0]!r} was destroyed meanwhile")

    def _place(self, state: NamespaceState, creds: Creds, policy: str, size: int, target: int | None,
               bm_id: str) -> list[Placement]:
        """Reserve an object's memory as its affinity asks. `server`: there or OUT_OF_MEMORY
        (a requirement, not a preference). `local`: here, else the whole object on the
        roomiest other server. `spread`: striped over every live server of the pool."""
        pool = creds[0]
        if policy == "server":
            return self._reserve(state, creds, [(target, size)], bm_id)
        need = round_up(size, PAGE_SIZE_BYTES)
        if policy == "local":
            tried: set[int] = set()
            if pool in self.pools:   # the common case: it fits here, and needs no cluster view
                try:
                    return self._reserve(state, creds, [(self.server_id, size)], bm_id)
                except OutOfMemory:
                    tried.add(self.server_id)
            for fresh in (False, True):     # the view may be a moment old
                free = self._free_by_server(pool, state.key, fresh)
                for server_id in sorted(free, key=lambda s: -free[s]):
                    if server_id in tried or free[server_id] < need:
                        continue
                    try:
                        return self._reserve(state, creds, [(server_id, size)], bm_id)
                    except (OutOfMemory, ServerUnavailable):
                        tried.add(server_id)
            raise OutOfMemory(_too_large_for_one_server(pool, need, free))
        try:
            shares = placement.plan(policy, size, self._free_by_server(pool, state.key), self.server_id)
            return self._reserve(state, creds, shares, bm_id)
        except (OutOfMemory, ServerUnavailable):
            pass
        # The view may be a moment old: a server just started or filled up, or freed memory it
        # publishes with its next heartbeat. Fresh views until then, then the refusal stands.
        deadline = time.monotonic() + 2 * self.server.cfg.heartbeat_interval_s
        while True:
            try:
                shares = placement.plan(policy, size, self._free_by_server(pool, state.key, fresh=True),
                                        self.server_id)
                return self._reserve(state, creds, shares, bm_id)
            except (OutOfMemory, ServerUnavailable):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(SPREAD_RETRY_S)

    def op_describe(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:
            return _describe(self._usable(state, m.get("bm_id")), state)

    def op_objects(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A page of the namespace's objects homed here, in slot order: [bm_id, size, age_s]
        each, from the slot after `after` (-1: the first page); `next` continues, None at
        the end. Objects homed on other servers are theirs to list."""
        state, _ = self._namespace(conn, m)
        after = m.get("after", -1)
        if type(after) is not int or after < -1:
            raise InvalidArgument(f"after must be a slot (an int >= -1), got {after!r:.100}")
        with self.lock:
            records, next_slot = state.objects.table.page(after, MAX_OBJECTS_PER_LISTING)
            now = time.time()
            # A clock set back since an allocation would give a negative age: none is younger than 0.
            rows = [[r.bm_id, r.size_bytes, max(0.0, now - r.created_s)] for r in records]
        return {"objects": rows, "next": next_slot}

    def op_free(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        self._free(state, creds, m.get("bm_id"))
        return {}

    def op_batch_free(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        ids = m.get("bm_ids")
        if not isinstance(ids, list) or len(ids) > MAX_BATCH_IDS:
            raise InvalidArgument(f"bm_ids must be a list of at most {MAX_BATCH_IDS} ids")
        results = []
        for bm_id in ids:
            try:
                self._free(state, creds, bm_id)
                results.append(0)
            except MemfabricError as exc:
                results.append(int(exc.code))
        return {"results": results}

    def _free(self, state: NamespaceState, creds: Creds, bm_id: Any) -> None:
        with self.lock:
            record = self._lookup(state, bm_id)
            state.objects.retract(record)       # clients' next generation check fails from here on
            self._revoke_grants_locked(state, record.bm_id)
            extents = state.objects.table.free(record.bm_id)
            self._log(state, "free", record.bm_id)
        self._release(state, record.bm_id, extents, creds)

    def op_expand(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        new_size = _size_arg(m, "size")
        with state.objects.expand_lock:
            return self._expand(state, creds, m.get("bm_id"), new_size)

    def _zero_slack(self, state: NamespaceState, creds: Creds, record: ObjectRecord, new_size: int) -> None:
        """Bytes past an object's size but inside its last extent were never its own: a remote
        span request may have written there. Growing over them, zero them first."""
        start, end = record.size_bytes, min(new_size, record.reserved_bytes)
        position = 0
        for e in record.extents:
            lo, hi = max(start, position), min(end, position + e.length)
            if lo < hi:
                offset = e.offset + lo - position
                if e.server_id == self.server_id:
                    self.pools[creds[0]].segments[e.segment].zero(offset, hi - lo)
                else:
                    link = self._peer(e.server_id)
                    if link.is_local:
                        target = link.segment_view(creds, e.segment)
                        if type(target) is memoryview:
                            target[offset:offset + hi - lo] = bytes(hi - lo)
                        else:        # a peer's file segment, reached through its fd
                            target.zero(offset, hi - lo)
                    else:
                        RemoteSegment(link, creds, record.bm_id, e.segment).write(offset, memoryview(bytes(hi - lo)))
            position += e.length

    def _expand(self, state: NamespaceState, creds: Creds, bm_id: Any, new_size: int) -> dict[str, Any]:
        with self.lock:
            record = self._usable(state, bm_id)
            if new_size < record.size_bytes:
                raise InvalidArgument(f"expand cannot shrink object {record.bm_id}: "
                                      f"{record.size_bytes} -> {new_size} bytes")
            extra = new_size - record.reserved_bytes
        self._zero_slack(state, creds, record, new_size)
        extents: list[Placement] = []
        if extra > 0:
            if record.required_server is not None:    # a requirement, not a preference
                extents = self._place(state, creds, "server", extra, record.required_server, record.bm_id)
            else:
                try:
                    extents = self._place(state, creds, "local", extra, None, record.bm_id)
                except OutOfMemory:
                    extents = self._place(state, creds, "spread", extra, None, record.bm_id)
        try:
            with self.lock:
                if state.closed:
                    raise NoSuchNamespace(f"namespace {creds[1]!r} in pool {creds[0]!r} was destroyed meanwhile")
                record = state.objects.table.expand(record.bm_id, new_size, extents)
                self._log(state, "obj", record.bm_id, new_size, [list(_placement(e)) for e in record.extents],
                          record.created_s)
                state.objects.publish(record)
        except MemfabricError:
            self._release(state, record.bm_id, extents, creds)   # outside the lock: peers may be slow
            raise
        return _describe(record, state)

    def op_map_pin(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:
            self._usable(state, m.get("bm_id"))
            return _describe(state.objects.table.pin(m["bm_id"], conn.id), state)

    def op_map_unpin(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        parse_bm_id(bm_id)
        with self.lock:
            extents = state.objects.table.unpin(bm_id, conn.id)
        self._release(state, bm_id, extents, creds)
        return {}

    def _lookup(self, state: NamespaceState, bm_id: Any) -> ObjectRecord:
        home, _, _ = parse_bm_id(bm_id)
        if home != self.server_id:
            raise InvalidArgument(f"object {bm_id} lives on server {home}, not on server {self.server_id}")
        return state.objects.table.lookup(bm_id)

    def _usable(self, state: NamespaceState, bm_id: Any) -> ObjectRecord:
        """_lookup, for using the object's bytes: one that lost some fails (free it)."""
        record = self._lookup(state, bm_id)
        if record.lost_on:
            raise ServerUnavailable(f"object {record.bm_id} lost the bytes it had on server(s) "
                                    f"{sorted(record.lost_on)}, which restarted without them; free it")
        return record

    def op_extent_alloc(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, (pool, _, _) = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        if parse_bm_id(bm_id)[0] == self.server_id:
            raise InvalidArgument(f"object {bm_id} is homed here; extent_alloc is for other homes")
        extents = self._reserve_local(state, pool, _size_arg(m, "size"))
        with self.lock:
            held = state.objects.lent_by_object.setdefault(bm_id, [])
            held.extend(extents)
            self._log(state, "held", bm_id, [[e.segment, e.offset, e.length] for e in held])
        return {"extents": [[self.server_id, e.segment, e.offset, e.length] for e in extents]}

    def op_extent_free(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, (pool, _, _) = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        parse_bm_id(bm_id)          # a well-formed id, or INVALID_ARGUMENT
        raw = m.get("extents")
        if not isinstance(raw, list) or len(raw) > MAX_EXTENTS_PER_OBJECT:
            raise InvalidArgument("extents must be a list")
        with self.lock:
            held = state.objects.lent_by_object.get(bm_id, [])
            extents = []
            for item in raw:
                if not (isinstance(item, list) and len(item) == 3 and all(type(v) is int for v in item)):
                    raise InvalidArgument(f"an extent is [segment, offset, length], got {item!r}")
                extent = Extent(*item)
                if extent not in held or extent in extents:
                    raise InvalidArgument(f"extent {item} is not held here for object {bm_id!r}")
                extents.append(extent)
            remaining = [e for e in held if e not in extents]
            if remaining:
                state.objects.lent_by_object[bm_id] = remaining
            else:
                state.objects.lent_by_object.pop(bm_id, None)
            self._log(state, "held", bm_id, [[e.segment, e.offset, e.length] for e in remaining])
            self._give_back_locked(state, bm_id, extents)
            return {}

    # ---- transfers: requests whose payload moves straight between the socket and pool memory ----

    def transfers(self) -> dict[str, Callable[..., None]]:
        """Operations the RPC front hands the frame to (see rpc_front.py): each is called
        with the request's header, its payload still unread, and answers by itself. A
        MemfabricError it raises means it read no byte of the payload (the front drains it
        and answers with the error); an OSError means the stream is broken."""
        return {"seg_write": self.transfer_seg_write, "seg_read": self.transfer_seg_read,
                "seg_write_many": self.transfer_seg_write_many, "seg_read_many": self.transfer_seg_read_many}

    def transfer_seg_write(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                           deadline: float) -> None:
        """The payload lands straight in the segment bytes the request was checked against,
        held meanwhile (see _hold_span); the reply goes before the hold is let go."""
        held = self._hold_span(conn, m)
        try:
            mem, offset, length = held[0], held[1], held[2]
            if payload_len != length:
                raise ProtocolError(f"seg_write of {length} bytes carried {payload_len}")
            receive_into_segment(frames, m["id"], mem, offset, length, deadline)
        finally:
            self._let_go_span(held)

    def transfer_seg_read(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                          deadline: float) -> None:
        """The reply is sent straight from the held segment bytes."""
        held = self._hold_span(conn, m)
        try:
            mem, offset, length = held[0], held[1], held[2]
            if payload_len:
                raise ProtocolError("seg_read carries no payload")
            send_from_segment(frames, m["id"], mem, offset, length)
        finally:
            self._let_go_span(held)

    def _give_back_locked(self, state: NamespaceState, bm_id: str, extents: list[Extent]) -> None:
        """Return extents to the allocator, or later if a transfer still uses the object."""
        self._revoke_grants_locked(state, bm_id)     # a grant must not outlive the bytes
        if state.objects.busy.get(bm_id):
            state.objects.deferred.setdefault(bm_id, []).extend(extents)
        else:
            self.pools[state.record.pool].allocator.release(state.key, extents, time.monotonic())

    def transfer_seg_read_many(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                               deadline: float) -> None:
        """Many spans of many objects in one request (bigmemory/batch.py): each checked and
        held as a lone span is; the reply names the spans that failed and why, and its
        payload is the others' bytes back to back, sent straight from the held segments."""
        if payload_len:
            raise ProtocolError("seg_read_many carries no payload")
        spans = _many_spans(m)
        batch = _HeldSpans()
        try:
            self._hold_spans(conn, m, spans, batch)
            payload = []
            for k, (mem, offset, length) in enumerate(batch.spans):
                if mem is None:
                    continue
                if mem.view is not None:
                    payload.append(mem.view[offset:offset + length])
                    continue
                buffer = memoryview(bytearray(length))      # a file segment: through a buffer
                try:
                    mem.read(offset, buffer)
                except MemfabricError as exc:              # a file cut short: this span fails
                    batch.fail(k, int(exc.code))
                    continue
                payload.append(buffer)
            frames.send({"id": m["id"], "failed": batch.failed, "codes": batch.codes}, payload)
        finally:
            self._let_go_spans(batch)

    def transfer_seg_write_many(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                                deadline: float) -> None:
        """Many spans in one request; its payload is their bytes back to back, received
        straight into the held segments (the bytes of spans that failed are read past)."""
        spans = _many_spans(m)
        total = sum(spans[3::4])
        if payload_len != total:
            raise ProtocolError(f"seg_write_many of {total} bytes carried {payload_len}")
        batch = _HeldSpans()
        try:
            self._hold_spans(conn, m, spans, batch)
            run: list[memoryview] = []          # consecutive spans that land, received at once
            written_back = []
            for k, (mem, offset, length) in enumerate(batch.spans):
                if mem is None:                 # failed: its bytes are read past
                    if run:
                        frames.recv_into_views(run, deadline)
                        run = []
                    frames.discard(length, deadline)
                elif mem.view is not None:
                    run.append(mem.view[offset:offset + length])
                else:
                    buffer = memoryview(bytearray(length))
                    run.append(buffer)
                    written_back.append((k, mem, offset, buffer))
            if run:
                frames.recv_into_views(run, deadline)
            for k, mem, offset, buffer in written_back:
                try:
                    mem.write(offset, buffer)
                except MemfabricError as exc:        # the payload is read: this span fails
                    batch.fail(k, int(exc.code))
            frames.send({"id": m["id"], "failed": batch.failed, "codes": batch.codes})
        finally:
            self._let_go_spans(batch)

    def _hold_spans(self, conn: Connection, m: dict[str, Any], spans: list[int], batch: "_HeldSpans") -> None:
        """Check and hold every span of a batch request (see _hold_span), filling `batch`:
        (segment memory, offset, length) per span, memory None for one that failed, whose
        index and error code go to batch.failed and batch.codes."""
        creds_list, objects = m.get("creds"), m.get("objects")
        if not isinstance(creds_list, list) or not isinstance(objects, list) \
                or len(creds_list) > MAX_BATCH_SPANS_PER_REQUEST or len(objects) > MAX_BATCH_SPANS_PER_REQUEST:
            raise InvalidArgument(f"a batch names at most {MAX_BATCH_SPANS_PER_REQUEST} namespaces and objects, "
                                  "in lists")
        # Each namespace's secId is checked as for any request; one that fails fails its spans.
        namespaces: list[tuple[NamespaceState | None, Any, int]] = []
        for creds in creds_list:
            if not (isinstance(creds, list) and len(creds) == 3):
                raise InvalidArgument("a batch's creds are [pool, ns, secId] each")
            try:
                state, (pool, _, _) = self._namespace(conn, {"pool": creds[0], "ns": creds[1], "sec": creds[2]})
                namespaces.append((state, self.pools[pool], 0))
            except MemfabricError as exc:
                namespaces.append((None, None, int(exc.code)))
        if max(spans[0::4]) >= len(objects) or min(spans[0::4]) < 0:
            raise InvalidArgument(f"a span names an object beyond the {len(objects)} listed")
        me = self.server_id
        count = len(namespaces)
        failed, codes, out = batch.failed, batch.codes, batch.spans
        held_segments, held_objects = batch.segments, batch.objects
        out_of_range = int(BmError.OUT_OF_RANGE)
        no_object = int(BmError.NO_SUCH_OBJECT)
        with self.lock:
            # Each object looked up once (the first time a span names it): its extents here and
            # the pool it is held in, or the code that fails its spans. A malformed entry
            # raises (what was held so far is let go by the caller; no payload byte was read).
            resolved: dict[int, tuple[bool, Any, Any, int]] = {}
            for k in range(0, len(spans), 4):
                oi = spans[k]
                found = resolved.get(oi)
                if found is None:
                    item = objects[oi]
                    if not (type(item) is list and len(item) == 2 and type(item[0]) is int and 0 <= item[0] < count):
                        raise InvalidArgument("a batch's objects are [creds index, bm_id] each")
                    bm_id = item[1]
                    home, slot, generation = parse_bm_id(bm_id)
                    state, pool, code = namespaces[item[0]]
                    extents = None
                    if not code:
                        if home == me:
                            record = state.objects.table.live(slot, generation)
                            extents = record.extents if record is not None else None
                        else:
                            extents = state.objects.lent_by_object.get(bm_id)
                        if extents is None:
                            code = no_object
                        else:      # held from here, under the same lock as the checks below
                            busy = state.objects.busy
                            busy[bm_id] = busy.get(bm_id, 0) + 1
                            held_objects[oi] = (state, pool.allocator, bm_id)
                    found = resolved[oi] = (home == me, pool, extents, code)
                mine, pool, extents, code = found
                segment, offset, length = spans[k + 1], spans[k + 2], spans[k + 3]
                if not code:
                    end = offset + length
                    for e in extents:
                        if e.segment == segment and e.offset <= offset and end <= e.offset + e.length \
                                and (not mine or e.server_id == me):
                            break
                    else:
                        code = out_of_range
                if code:
                    failed.append(k // 4)
                    codes.append(code)
                    out.append((None, offset, length))
                    continue
                key = (pool, segment)
                if key not in held_segments:
                    pool.allocator.hold(segment)
                    held_segments[key] = pool.allocator
                out.append((pool.segments[segment], offset, length))

    def _let_go_spans(self, batch: "_HeldSpans") -> None:
        with self.lock:
            for (_, segment), allocator in batch.segments.items():
                allocator.let_go(segment)
            for state, allocator, bm_id in batch.objects.values():
                busy = state.objects.busy
                count = busy[bm_id] - 1
                if count:
                    busy[bm_id] = count
                else:
                    self._not_busy_locked(state, allocator, bm_id)     # the last: what a free deferred

    def _hold_span(self, conn: Connection, m: dict[str, Any]) -> tuple:
        """The checks of a span request (segment, offset, length of object bm_id), and its
        hold: until _let_go_span, the segment is not destroyed and a free of the object
        defers giving its extents back. Returns (segment memory, offset, length, state,
        allocator, segment, bm_id). On every remote read and write: kept to one call."""
        state, creds = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        segment, offset, length = m.get("segment"), m.get("offset"), m.get("length")
        if type(segment) is not int or type(offset) is not int or type(length) is not int \
                or offset < 0 or length <= 0:
            raise InvalidArgument("a span is segment, offset, length: ints, length > 0")
        home, slot, generation = parse_bm_id(bm_id)
        end = offset + length
        me = self.server.server_id
        with self.lock:
            if home == me:
                # Alive, and not lost on a restarted peer (its bytes there are gone).
                extents = self._usable(state, bm_id).extents
            else:
                extents = state.objects.lent_by_object.get(bm_id)
                if extents is None:
                    raise NoSuchObject(f"server {me} holds nothing of object {bm_id} (freed, or never existed)")
            for e in extents:
                if e.segment == segment and e.offset <= offset and end <= e.offset + e.length \
                        and (home != me or e.server_id == me):
                    break
            else:
                raise OutOfRange(f"[{offset}, {end}) of segment {segment} is not object {bm_id}'s on server {me}")
            pool = self.pools[creds[0]]
            allocator = pool.allocator
            grants = conn.services.get("span_grants")
            if grants is not None and type(m.get("sec")) is bytes:
                # Checked as above, under the same lock: the connection's next requests for
                # the object need no Python (span_grants.py).
                self._grant_locked(grants, state, pool, creds, bm_id, home, slot, generation, extents)
            # Held from here, under the same lock as the check.
            allocator.hold(segment)
            busy = state.objects.busy
            busy[bm_id] = busy.get(bm_id, 0) + 1
            return pool.segments[segment], offset, length, state, allocator, segment, bm_id

    def _grant_locked(self, grants: ConnectionGrants, state: NamespaceState, pool: PoolState, creds: Creds,
                      bm_id: str, home: int, slot: int, generation: int, extents: list) -> None:
        """Grant the connection the object whose span request passed every check. A grant
        only saves time: one that cannot be made leaves the request to go on as it is."""
        me = self.server_id
        mine = extents if home != me else [e for e in extents if e.server_id == me]
        mems = [pool.segments.get(e.segment) for e in mine]
        spans = [(e.segment, e.offset, e.length, mem.view) for e, mem in zip(mine, mems)
                 if mem is not None and mem.view is not None]
        if len(spans) != len(mine):          # file segments (no view) stay Python's
            return
        try:
            self.grants.grant(grants, (creds[0], creds[1], bm_id), creds[2], spans,
                              state.objects.words if home == me else None, slot, generation,
                              (state, pool.allocator, bm_id))
        except (MemoryError, ValueError, BufferError) as exc:
            self.server.limited_log.warning("span grant", "could not grant object %s: %r", bm_id, exc)

    def _let_go_span(self, held: tuple) -> None:
        _, _, _, state, allocator, segment, bm_id = held
        with self.lock:
            self._let_go_locked((state, allocator, bm_id), segment)

    def _let_go_locked(self, token: tuple, segment: int) -> None:
        state, allocator, bm_id = token
        allocator.let_go(segment)
        busy = state.objects.busy
        count = busy[bm_id] - 1
        if count:
            busy[bm_id] = count
        else:
            self._not_busy_locked(state, allocator, bm_id)     # the last: what a free deferred

    # ---- span grants: span reads and writes served in compiled code (span_grants.py) ----------

    def open_span_grants(self, conn: Connection) -> ConnectionGrants | None:
        """Grants for an RPC connection whose loop serves them (rpc_front.py); None when the
        compiled part is not built. Its checked span requests fill them."""
        with self.lock:
            grants = self.grants.open()
            if grants is not None:
                conn.services["span_grants"] = grants
        return grants

    def spans_served_compiled(self) -> int:
        """Remote span reads and writes served in compiled code so far (for `stats`)."""
        with self.lock:
            return self.grants.served()

    def settle_span_grants(self, conn: Connection) -> None:
        """Transfers that were under way when their grants were revoked are over: let go of
        what was held for them."""
        grants = conn.services.get("span_grants")
        if grants is None:
            return
        owed = grants.table.take_owed()
        if owed:
            with self.lock:
                for token, segment in owed:
                    self._let_go_locked(token, segment)

    def _revoke_grants_locked(self, state: NamespaceState, bm_id: str) -> None:
        """No connection reads or writes the object in compiled code from now on; transfers
        under way are held as Python's own are, until their loop reports them over."""
        pool = state.record.pool
        for segment in self.grants.revoke(pool, state.record.ns, bm_id):
            self._take_over_locked(state, self.pools[pool].allocator, bm_id, segment)

    @staticmethod
    def _take_over_locked(state: NamespaceState, allocator: Any, bm_id: str, segment: int) -> None:
        """Hold for a compiled transfer under way what _hold_span holds for a Python one."""
        allocator.hold(segment)
        busy = state.objects.busy
        busy[bm_id] = busy.get(bm_id, 0) + 1

    def _not_busy_locked(self, state: NamespaceState, allocator: Any, bm_id: str) -> None:
        """One transfer of the object is over; the last one gives back what a free deferred."""
        busy = state.objects.busy
        count = busy[bm_id] - 1
        if count:
            busy[bm_id] = count
            return
        del busy[bm_id]
        deferred = state.objects.deferred.pop(bm_id, None)
        if deferred and self.namespaces.get((state.record.pool, state.record.ns)) is state:
            allocator.release(state.key, deferred, time.monotonic())

    def _free_by_server(self, pool: str, owner: tuple | None = None, fresh: bool = False) -> dict[int, int]:
        """What each live server could give `owner` in `pool`: what a new namespace could get
        there, as the servers last published it; here, exactly, with the owner's own room."""
        free = {s.server_id: s.pools[pool].get("lendable_bytes", s.pools[pool].get("free_bytes", 0))
                for s in self.view(fresh) if s.alive and pool in s.pools}
        if pool in self.pools:
            with self.lock:
                allocator = self.pools[pool].allocator
                free[self.server_id] = (allocator.lendable_bytes() if owner is None
                                        else allocator.available_bytes(owner))
        return free

    def _reserve(self, state: NamespaceState, creds: Creds, shares: list[tuple[int, int]],
                 bm_id: str) -> list[Placement]:
        """All shares or none: a peer that fails rolls back what the others gave."""
        got: list[Placement] = []
        try:
            for server_id, size in shares:
                if server_id == self.server_id:
                    got += [Placement(self.server_id, e.segment, e.offset, e.length)
                            for e in self._reserve_local(state, creds[0], size)]
                else:
                    reply = self._peer(server_id).call("extent_alloc", pool=creds[0], ns=creds[1],
                                                       sec=creds[2], size=size, bm_id=bm_id)
                    got += [Placement(*e) for e in reply["extents"]]
        except MemfabricError:
            self._release(state, bm_id, got, creds)
            raise
        return got

    def _release(self, state: NamespaceState, bm_id: str, extents: list[Placement],
                 creds: Creds | None) -> None:
        """Give extents back here and on peers."""
        by_server: dict[int, list[list[int]]] = defaultdict(list)
        local = []
        for e in extents:
            if e.server_id == self.server_id:
                local.append(Extent(e.segment, e.offset, e.length))
            else:
                by_server[e.server_id].append([e.segment, e.offset, e.length])
        if local:
            with self.lock:
                # A namespace destroyed meanwhile took all its memory back already.
                if self.namespaces.get((state.record.pool, state.record.ns)) is state:
                    self._give_back_locked(state, bm_id, local)
        if by_server and creds is None:
            log.warning("cannot give back extents on peers %s without a secId; they return when "
                        "the namespace is destroyed", sorted(by_server))
            return
        for server_id, items in by_server.items():
            try:
                with unbounded():         # memory given back must not wait for a next request
                    self._peer(server_id).call("extent_free", pool=creds[0], ns=creds[1], sec=creds[2],
                                               bm_id=bm_id, extents=items)
            except MemfabricError as exc:
                log.warning("server %d did not take back %d extents: %s", server_id, len(items), exc)

    def _layout(self, pins: ExitStack, creds: Creds, bm_id: Any, conn: Connection,
                seen: dict[tuple, Layout]) -> Layout:
        """An object's layout, pinned at its home until `pins` closes: a free meanwhile keeps
        its extents from reuse, so a server-side copy never lands in (or reads) the object
        that takes its memory next. Each object is pinned once per operation (`seen`)."""
        home, _, _ = parse_bm_id(bm_id)
        key = (creds, bm_id)
        if key in seen:
            return seen[key]
        m = {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": bm_id}
        if home == self.server_id:
            state, _ = self._namespace(conn, m)
            holder = object()
            with self.lock:
                self._usable(state, bm_id)
                d = _describe(state.objects.table.pin(bm_id, holder), state)
            pins.callback(self._unpin_here, state, creds, bm_id, holder)
            gens = state.objects.words
        else:
            self.server.check_creds(conn, creds)      # never forward a secId unchecked
            link = self._peer(home)
            d = link.call("map_pin", **m)
            pins.callback(self._unpin_there, link, m)
            gens = link.gen_table(creds, d["incarnation"]) if link.is_local else None

        def view_of(server_id: int, segment: int) -> memoryview | RemoteSegment | SegmentMemory:
            if server_id == self.server_id:
                mem = self.pools[creds[0]].segments.get(segment)
                if mem is None:
                    raise NoSuchObject(f"object {bm_id}'s segment {segment} is gone (freed meanwhile)")
                # A slice of its own: it outlives the segment's view if a destroy races us.
                return mem.view[:] if mem.view is not None else mem
            peer = self._peer(server_id)
            if peer.is_local:
                return peer.segment_view(creds, segment)
            return RemoteSegment(peer, creds, bm_id, segment)

        seen[key] = layout = described_layout(d, gens, view_of)
        return layout

    def _unpin_here(self, state: NamespaceState, creds: Creds, bm_id: str, holder: object) -> None:
        with self.lock:
            try:
                extents = state.objects.table.unpin(bm_id, holder)
            except (NoSuchObject, InvalidArgument):
                return          # its namespace was destroyed meanwhile: nothing is left to give back
        self._release(state, bm_id, extents, creds)

    def _unpin_there(self, link: Any, m: dict[str, Any]) -> None:
        try:
            with unbounded():             # however late the request: a pin must not stay
                link.call("map_unpin", **m)
        except MemfabricError as exc:     # the peer drops our pins when our link to it goes
            log.info("unpinning %s on server %d: %s", m["bm_id"], link.server_id, exc)

    def op_copy(self, conn: Connection, m: dict[str, Any]) -> Reply:
        src_m, dst_m = _object_arg(m, "src"), _object_arg(m, "dst")
        with ExitStack() as pins:
            seen: dict[tuple, Layout] = {}
            src = self._layout(pins, self._creds(src_m), src_m.get("bm_id"), conn, seen)
            dst = self._layout(pins, self._creds(dst_m), dst_m.get("bm_id"), conn, seen)
            copy_between(src, m.get("src_offset"), dst, m.get("dst_offset"), m.get("length"))
            src.check_alive()
            dst.check_alive()
        return {}

    def op_gather(self, conn: Connection, m: dict[str, Any]) -> Reply:
        op, dtype, inputs = reduce.check_request(m)
        with ExitStack() as pins:
            seen: dict[tuple, Layout] = {}
            resolved = self._resolve_inputs(pins, conn, inputs, seen)
            total = reduce.result_length(op, dtype, resolved)
            dst_m = _object_arg(m, "dst")
            if not dst_m.get("bm_id"):
                made = self.op_alloc(conn, {**dst_m, "size": max(total, 1), "policy": "local"})
                dst_m = {**dst_m, "bm_id": made["bm_id"]}
            dst = self._layout(pins, self._creds(dst_m), dst_m.get("bm_id"), conn, seen)
            check_range(dst.bm_id, dst.size, 0, total)
            if op == "concat":
                position = 0
                for layout, offset, length in resolved:
                    copy_between(layout, offset, dst, position, length)
                    position += length
            else:
                acc = self._reduce(op, dtype, [it for it in inputs], resolved, total)
                write_at(dst, 0, memoryview(acc).cast("B"))
            dst.check_alive()
        return {"bm_id": dst.bm_id, "size": dst.size, "length": total}

    def _reduce(self, op: str, dtype: np.dtype, inputs: list[dict[str, Any]],
                resolved: list[tuple[Layout, int, int]], length: int) -> np.ndarray:
        """Element-wise reduction near the data: inputs wholly on one other host are reduced
        there (one partial comes back per host); the rest are reduced here."""
        here: list[reduce.Input] = []
        by_host: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for item, (layout, offset, n) in zip(inputs, resolved, strict=True):
            holders = {t.link.server_id if isinstance(t, RemoteSegment) else None
                       for t, _, _, _ in layout.spans(offset, n)}
            holder = holders.pop() if len(holders) == 1 else None
            if holder is None:
                here.append((layout, offset, n))
            else:
                by_host[holder].append(item)
        partials = []
        acc = None
        with InFlight() as flight:                 # a peer failing: the others' replies are read past
            for server_id, items in by_host.items():   # all hosts reduce at once
                link = self._peer(server_id)
                partial = np.empty(length // dtype.itemsize, dtype=dtype)
                partials.append((link, flight.submit(link, "reduce_part", {"inputs": items, "operator": op,
                                                                           "dtype": dtype.str},
                                                     into=memoryview(partial).cast("B")), partial))
            for item in here:
                acc = reduce.reduce_into(op, acc, reduce.values(item, dtype))
            for link, p, partial in partials:
                flight.wait(link, p)
                acc = reduce.reduce_into(op, acc, partial)
        assert acc is not None
        return acc

    def op_reduce_part(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A destination server asks us to reduce the inputs we hold; the partial is the payload."""
        op, dtype, inputs = reduce.check_request(m, reduction_only=True)
        with ExitStack() as pins:
            resolved = self._resolve_inputs(pins, conn, inputs, {})
            reduce.result_length(op, dtype, resolved)
            acc = None
            for item in resolved:
                acc = reduce.reduce_into(op, acc, reduce.values(item, dtype))
        return Payload({"length": acc.nbytes}, memoryview(acc).cast("B"))

    def _resolve_inputs(self, pins: ExitStack, conn: Connection, inputs: list[dict[str, Any]],
                        seen: dict[tuple, Layout]) -> list[reduce.Input]:
        resolved = []
        for item in inputs:
            layout = self._layout(pins, self._creds(item), item.get("bm_id"), conn, seen)
            check_range(layout.bm_id, layout.size, item.get("offset"), item.get("length"))
            resolved.append((layout, item["offset"], item["length"]))
        return resolved


def _too_large_for_one_server(pool: str, need: int, free: dict[int, int]) -> str:
    """What an OUT_OF_MEMORY of a local allocation says: the figures, and what would fit."""
    most, total = max(free.values(), default=0), sum(free.values())
    message = (f"no live server of pool {pool!r} has {need} bytes free for this namespace "
               f"(the most one has is {most})")
    if total >= need:
        return message + (f"; all {len(free)} together have {total}: Affinity(\"spread\") stripes an object "
                          "over every server")
    return message + f"; all {len(free)} together have {total}: free objects or add servers"


def _describe(record: ObjectRecord, state: NamespaceState) -> dict[str, Any]:
    return {"bm_id": record.bm_id, "size": record.size_bytes, "generation": record.generation,
            "slot": record.slot, "incarnation": state.record.incarnation,
            "extents": [[e.server_id, e.segment, e.offset, e.length] for e in record.extents]}


def _placement(e: Placement) -> tuple[int, int, int, int]:
    return (e.server_id, e.segment, e.offset, e.length)


def _object_arg(m: dict[str, Any], key: str) -> dict[str, Any]:
    value = m.get(key)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{key} must be a map of pool, ns, sec and bm_id")
    return value


def _size_arg(m: dict[str, Any], key: str) -> int:
    size = m.get(key)
    if type(size) is not int or not 0 < size <= MAX_OBJECT_BYTES:
        raise InvalidArgument(f"{key} must be an int in [1, {MAX_OBJECT_BYTES}], got {size!r}")
    return size


class _HeldSpans:
    """What a batch request holds (segments, objects: released once it is answered) and what
    each of its spans came to."""

    __slots__ = ("segments", "objects", "spans", "failed", "codes")

    def __init__(self) -> None:
        self.segments: dict[tuple[PoolState, int], Any] = {}   # (pool, segment) -> its allocator
        self.objects: dict[int, tuple[NamespaceState, Any, str]] = {}   # object index -> (state, allocator, bm_id)
        self.spans: list[tuple[SegmentMemory | None, int, int]] = []
        self.failed: list[int] = []
        self.codes: list[int] = []

    def fail(self, span: int, code: int) -> None:
        self.failed.append(span)
        self.codes.append(code)


def _many_spans(m: dict[str, Any]) -> list[int]:
    """A batch request's spans (object index, segment, offset, length; flat), checked for
    shape and bounds before anything is held or a payload byte read."""
    spans = m.get("spans")
    if not isinstance(spans, list) or len(spans) % 4 or not spans:
        raise InvalidArgument("a batch's spans are a flat list of object, segment, offset, length")
    if len(spans) > 4 * MAX_BATCH_SPANS_PER_REQUEST:
        raise LimitExceeded(f"a batch request holds at most {MAX_BATCH_SPANS_PER_REQUEST} spans, "
                            f"got {len(spans) // 4}")
    if not set(map(type, spans)) <= {int}:
        raise InvalidArgument("a batch's spans are ints")
    lengths = spans[3::4]
    if min(spans[2::4]) < 0 or min(lengths) <= 0:
        raise InvalidArgument("a span has offset >= 0 and length > 0")
    if sum(lengths) > MAX_BATCH_REQUEST_BYTES:
        raise LimitExceeded(f"a batch request moves at most {MAX_BATCH_REQUEST_BYTES} bytes, got {sum(lengths)}")
    return spans

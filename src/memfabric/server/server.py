"""One memfabric server: its memory, its namespaces, and the operations clients ask for.

Threads: one per client connection (bounded), one heartbeat. A single lock guards the
pure core (allocators, object tables); it is never held while talking to a peer, so two
servers asking each other for memory at once cannot deadlock.
"""

from __future__ import annotations

import fcntl
import hmac
from contextlib import ExitStack, contextmanager
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np

from ..cluster import ClusterService, ServerRecord, open_cluster
from ..cluster.base import creator_limit_message
from ..core import placement
from ..core.allocator import Extent, round_up
from ..core.namespaces import check_attribute, check_name, check_sec_id
from ..core.objects import Generations, ObjectRecord, Placement, parse_bm_id
from ..datapath.layout import (Layout, RemoteSegment, described_layout, check_range, copy_between,
                               write_at)
from ..datapath import reduce
from ..datapath.connect import connect_to
from ..datapath.deadline import deadline_for, serving_until
from ..datapath.link import Creds, ServerLink
from ..transport import rpc
from ..errors import (InternalError, InvalidArgument, LimitExceeded, MemfabricError, NamespaceExists, NoSuchNamespace,
                      NoSuchObject, NoSuchPool, OutOfMemory, OutOfRange, PermissionDenied, ServerUnavailable)
from ..limits import (MAX_BATCH_IDS, MAX_EXTENTS_PER_OBJECT, MAX_FDS_PER_MESSAGE, MAX_OBJECT_BYTES,
                      PAGE_SIZE_BYTES, PEER_TIMEOUT_S, RESERVE_RETRY_S, SEGMENT_KEEPER_INTERVAL_S,
                      SPARE_CAPACITY_DIVISOR, SPARE_SMALL_SEGMENTS, SPARE_TOP_SEGMENTS)
from ..media.base import SegmentMemory
from ..config import ServerConfig
from .audit import audit_pools
from .log_limit import LimitedLog
from .sec_ids import SecIdChecker
from .state import NamespaceState, PoolState

log = logging.getLogger("memfabric.server")

VIEW_TTL_S = 0.25
OBJECTS_PER_QUERY = 2000     # ids per objects_alive request: keeps it inside one message


class Connection:
    """What the server remembers about one connected client or peer."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, peer_pid: int | None = None, client: str = "", carries_fds: bool = False) -> None:
        self.id = next(Connection._ids)
        self.peer_pid = peer_pid
        self.client = client         # who, as the kernel or the transport says: "uid N", "host A"
        self.carries_fds = carries_fds   # its transport can hand over file descriptors (IPC)
        self.rpc_member = False      # proved the cluster token (RPC): may act as a peer
        self.role = "client"
        # (pool, ns) -> (incarnation, secId) proven on this connection.
        self.verified: dict[tuple[str, str], tuple[int, bytes]] = {}
        # Segments whose fds this client was handed, and those of them destroyed since: the
        # next reply tells it, so it unmaps them (they read zeros now) and closes their fds.
        self.segments: set[tuple[str, int]] = set()
        self.gone: list[list] = []


Reply = dict[str, Any] | tuple[dict[str, Any], list[int]]


class Server:
    def __init__(self, cfg: ServerConfig, cluster: ClusterService | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster or open_cluster(cfg.cluster.backend, **cfg.cluster.settings())
        self.server_id = 0
        self.epoch = 0          # this life's number from the cluster: ids made now never repeat
        self.generations: Generations | None = None
        self.lock = threading.RLock()
        self.pools: dict[str, PoolState] = {}
        self.namespaces: dict[tuple[str, str], NamespaceState] = {}
        self.sec_ids = SecIdChecker()
        self._peers: dict[int, ServerLink] = {}
        self._peers_lock = threading.Lock()
        self._view: list[ServerRecord] = []
        self._view_at = 0.0
        self._stopping = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._keeper_thread: threading.Thread | None = None
        self._keeper_wake = threading.Event()
        # Connections handed each segment's fd: told when it is destroyed.
        self._segment_holders: dict[tuple[str, int], set[Connection]] = defaultdict(set)
        self._deaf_since: dict[str, float] = {}    # front door -> when it stopped accepting (monotonic)
        self._deaf_lock = threading.Lock()
        self.limited_log = LimitedLog(log)          # for lines clients can cause, by the front doors too
        self.token: bytes | None = None
        self.peer_tls = None
        self.rpc_listener = None
        self.handlers: dict[str, Callable[[Connection, dict[str, Any]], Reply]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    # ---- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """The seed's order: register and start liveness, then reserve memory. The RPC port is
        bound (not yet served) first, so the address the cluster learns is the real one."""
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        rpc_address = ""
        if self.cfg.rpc_listen:
            self.token = self.cfg.cluster.token()
            if self.cfg.cluster.tls_ca:
                self.peer_tls = rpc.client_tls(self.cfg.cluster.tls_ca)
            self.rpc_listener = rpc.listen(self.cfg.rpc_listen, backlog=128)
            host, port = self.rpc_listener.getsockname()[:2]
            if host in ("0.0.0.0", "::"):
                host = self.cfg.host
            rpc_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._lock_data_dir()
        node_key = f"{self.cfg.host}:{self.cfg.data_dir}"
        deadline = time.monotonic() + self.cfg.cluster.liveness_timeout_s + 2
        while True:
            try:
                self.server_id = self.cluster.register_server(
                    node_key=node_key, host=self.cfg.host, ipc_socket=self.cfg.ipc_socket,
                    rpc_address=rpc_address, pid=os.getpid())
                break
            except ServerUnavailable:
                # We hold the data directory's lock, so the registered one is a dead predecessor
                # whose liveness has not run out yet: wait for it (bounded), then take its id.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.epoch = self.cluster.next_epoch()
        self.generations = Generations(self.epoch)
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                                  daemon=True)
        self._heartbeat_thread.start()
        for pool_cfg in self.cfg.pools:
            # Segment ids of this life start past every earlier life's (epochs never repeat).
            self.pools[pool_cfg.name] = PoolState(pool_cfg, self.cfg.segment_bytes, self.cfg.min_segment_bytes,
                                                  f"s{self.server_id}", first_segment_id=(self.epoch << 32) + 1)
        for pool in self.pools.values():
            if pool.journal is not None:
                self._restore(pool)
            pool.open(self._stopping)
        self._keeper_thread = threading.Thread(target=self._keeper_loop, name="segment-keeper", daemon=True)
        self._keeper_thread.start()
        self._publish()

    def interrupt_start(self) -> None:
        """A signal asked us to stop while starting: reserving memory gives up within a step."""
        self._stopping.set()

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

    def op_home_restarted(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A home server came back: free what we hold for its objects that did not. The caller
        only names the home; which objects live, we ask the home itself."""
        home = m.get("home")
        if type(home) is not int or home == self.server_id:
            raise InvalidArgument("home_restarted names another server's id")
        with self.lock:
            held = sorted({b for st in self.namespaces.values() for b in st.lent_by_object
                           if parse_bm_id(b)[0] == home})
        alive: set[str] = set()
        for i in range(0, len(held), OBJECTS_PER_QUERY):
            reply = self._peer(home).call("objects_alive", ids=held[i:i + OBJECTS_PER_QUERY])
            alive.update(reply["alive"])
        gone = set(held) - alive
        released = 0
        with self.lock:
            for state in list(self.namespaces.values()):
                for bm_id in [b for b in state.lent_by_object if b in gone]:
                    extents = state.lent_by_object.pop(bm_id)
                    self._give_back_locked(state, bm_id, extents)
                    self._log(state, "held", bm_id, [])
                    released += len(extents)
        if released:
            log.info("gave back %d extents held for objects server %d lost", released, home)
        return {"released_extents": released}

    def op_objects_alive(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Which of these ids name live objects here (a peer asks after our restart)."""
        ids = m.get("ids")
        if not isinstance(ids, list) or len(ids) > OBJECTS_PER_QUERY:
            raise InvalidArgument(f"objects_alive takes at most {OBJECTS_PER_QUERY} ids")
        with self.lock:
            tables = [st.table for st in self.namespaces.values()]
            return {"alive": [b for b in ids if isinstance(b, str) and any(t.is_live(b) for t in tables)]}

    def _lock_data_dir(self) -> None:
        """One server per data directory: an exclusive lock the kernel drops when we die."""
        self._dir_lock = os.open(os.path.join(self.cfg.data_dir, "server.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_lock)
            raise ServerUnavailable(f"another server is running on {self.cfg.data_dir}") from None

    def _restore(self, pool: PoolState) -> None:
        """Bring back a persistent pool's objects from its journal, for namespaces the catalog
        still has (the same incarnation); then compact the journal to what lives."""
        objects: dict[tuple[str, int], dict[str, tuple[int, list]]] = defaultdict(dict)
        held: dict[tuple[str, int], dict[str, list]] = defaultdict(dict)
        for record in pool.journal.replay():
            kind, ns, incarnation, *rest = record
            key = (ns, incarnation)
            if kind == "obj":
                objects[key][rest[0]] = (rest[1], rest[2])
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
                record, self.server_id, f"s{self.server_id}", self.generations)
            self.namespaces[(pool.name, ns)] = state
            for bm_id, (size, extents) in objects.get(key, {}).items():
                placements = [Placement(*e) for e in extents]
                mine = [Extent(e.segment, e.offset, e.length) for e in placements if e.server_id == self.server_id]
                if not take_back(state.key, f"object {bm_id}", mine):
                    continue
                restored = state.table.restore(bm_id, size, placements)
                state.publish(restored)
                snapshot.append(["obj", ns, incarnation, bm_id, size, extents])
            for bm_id, extents in held.get(key, {}).items():
                mine = [Extent(*e) for e in extents]
                if not take_back(state.key, f"extents held for {bm_id}", mine):
                    continue
                state.lent_by_object[bm_id] = mine
                snapshot.append(["held", ns, incarnation, bm_id, extents])
            log.info("restored %d objects of %s/%s from the journal", len(state.table), pool.name, ns)
        over = pool.allocator.over_capacity_bytes()
        if over:
            raise InvalidArgument(f"pool {pool.name}'s files hold {pool.allocator.committed_bytes()} bytes of live "
                                  f"objects' segments, {over} more than its capacity of {pool.capacity_bytes}: "
                                  "raise its capacity to start; nothing was changed")
        pool.journal.rewrite(snapshot)

    def _log(self, state: NamespaceState, kind: str, *fields: Any) -> None:
        """Journal a change of a persistent pool before it is answered."""
        pool = self.pools.get(state.record.pool)
        if pool is not None and pool.journal is not None:
            pool.journal.append(kind, state.record.ns, state.record.incarnation, *fields)

    def stop(self) -> None:
        self._stopping.set()
        if self.rpc_listener is not None:
            self.rpc_listener.close()
        self._keeper_wake.set()
        for thread in (self._heartbeat_thread, self._keeper_thread):
            if thread is not None:
                thread.join(timeout=5)
        try:
            self.cluster.deregister_server(self.server_id)
        except MemfabricError as exc:
            log.warning("could not deregister: %s", exc)
        with self._peers_lock:
            for link in self._peers.values():
                link.close()
            self._peers.clear()
        with self.lock:
            for state in self.namespaces.values():
                state.close()
            self.namespaces.clear()
            for pool in self.pools.values():
                if pool.journal is not None:     # files no object needs would outlive us
                    pool.destroy([pool.segments.pop(i) for i in pool.allocator.unused_segments()
                                  if i in pool.segments])
                pool.close()
            self.pools.clear()
        self.cluster.close()

    def door_accepting(self, door: str, accepting: bool) -> None:
        """A front door says whether it can take new connections. While one cannot for longer
        than a heartbeat interval, this server sends no heartbeats: the cluster sees it dead
        (it is, to anyone new) rather than alive and serving no one."""
        with self._deaf_lock:
            if accepting:
                self._deaf_since.pop(door, None)
            else:
                self._deaf_since.setdefault(door, time.monotonic())

    def _deaf_for_s(self) -> float:
        with self._deaf_lock:
            since = min(self._deaf_since.values(), default=None)
        return 0.0 if since is None else time.monotonic() - since

    def _heartbeat_loop(self) -> None:
        silent = False
        while not self._stopping.wait(self.cfg.heartbeat_interval_s):
            deaf_s = self._deaf_for_s()
            if deaf_s > self.cfg.heartbeat_interval_s:
                if not silent:
                    log.warning("a front door has not accepted connections for %.1f s: no heartbeats "
                                "until it does, so the cluster sees this server dead", deaf_s)
                silent = True
                continue
            if silent:
                log.warning("the front doors accept connections again: heartbeats resume")
                silent = False
            try:
                self._publish()
            except Exception as exc:   # keep beating: the cluster service may come back
                log.warning("heartbeat failed: %s", exc)

    def _publish(self) -> None:
        with self.lock:
            pools = {name: pool.summary() for name, pool in self.pools.items()}
        self.cluster.heartbeat(self.server_id, pools)
        self._reconcile()

    def _reconcile(self) -> None:
        """Drop namespaces the catalog no longer has (a destroy this server did not hear of)."""
        live = {(r.pool, r.ns): r.incarnation for r in self.cluster.namespaces()}
        with self.lock:
            stale = [(key, st.record.incarnation) for key, st in self.namespaces.items()
                     if live.get(key) != st.record.incarnation]
        for (pool, ns), incarnation in stale:
            log.info("namespace %s/%s is gone from the catalog; dropping it here", pool, ns)
            self._drop_namespace(pool, ns, incarnation)

    def view(self, fresh: bool = False) -> list[ServerRecord]:
        now = time.monotonic()
        if fresh or now - self._view_at > VIEW_TTL_S:
            try:
                self._view = self.cluster.servers()
                self._view_at = now
            except ServerUnavailable:
                if not self._view:
                    raise
                # The cluster service is away for a moment: the last view is the best there is.
                log.warning("cluster service unavailable; using the view from %.1f s ago", now - self._view_at)
        return self._view

    # ---- connections ----------------------------------------------------------------------

    PEER_OPS = frozenset({"extent_alloc", "extent_free", "ns_drop", "ns_usage", "home_restarted", "objects_alive"})
    # Operations whose replies hand over file descriptors: refused, before they make or hold
    # anything, on a connection that cannot carry them (RPC).
    FD_OPS = frozenset({"ns_open", "segments"})

    def dispatch(self, conn: Connection, message: dict[str, Any]) -> Reply:
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise InvalidArgument(f"unknown operation {op!r}")
        if op in self.PEER_OPS and conn.role != "peer":
            raise PermissionDenied(f"{op!r} is for servers of this cluster only")
        if op in self.FD_OPS and not conn.carries_fds:
            raise InvalidArgument(f"{op!r} hands over file descriptors: same-host (IPC) connections only")
        return handler(conn, message)

    def serve(self, conn: Connection, message: dict[str, Any]) -> Reply:
        """dispatch() as both front doors use it: an error outside the vocabulary is a bug,
        logged and answered as INTERNAL_ERROR, and the connection and the server go on.
        Calls to peers for the request end before the caller's budget does (deadline.py)."""
        try:
            with serving_until(deadline_for(message.get("budget_s"))):
                return self.dispatch(conn, message)
        except MemfabricError:
            raise
        except Exception as exc:
            # dispatch() only gets here with a known operation's name: a bounded set of kinds.
            self.limited_log.exception(f"bug in {message.get('op')}", "operation %r failed", message.get("op"))
            raise InternalError(f"internal error in {message.get('op')!r}: {exc!r}") from None

    def disconnected(self, conn: Connection) -> None:
        """A client went away: its segments and mappings no longer keep memory from reuse."""
        to_release: list[tuple[NamespaceState, str, list[Placement], Creds | None]] = []
        with self.lock:
            for key in conn.segments:
                holders = self._segment_holders.get(key)
                if holders is not None:
                    holders.discard(conn)
                    if not holders:
                        del self._segment_holders[key]
            conn.segments.clear()
            for (pool_name, ns), state in self.namespaces.items():
                for bm_id, freed in state.table.unpin_all_by_object(conn.id):
                    # The secId this client proved lets us give back extents held by peers.
                    proven = conn.verified.get((pool_name, ns))
                    creds = (pool_name, ns, proven[1]) if proven else None
                    to_release.append((state, bm_id, freed, creds))
        for state, bm_id, extents, creds in to_release:
            self._release(state, bm_id, extents, creds)

    # ---- namespaces ---------------------------------------------------------------------

    def _creds(self, m: dict[str, Any]) -> Creds:
        pool = check_name("pool", m.get("pool"))
        ns = check_name("namespace", m.get("ns"))
        return pool, ns, check_sec_id(m.get("sec"))

    def _namespace(self, conn: Connection, m: dict[str, Any]) -> tuple[NamespaceState, Creds]:
        # Fast path: this connection already proved these exact credentials for this incarnation.
        key = (m.get("pool"), m.get("ns"))
        # Only names can be keys: anything else goes the slow way, which says what is wrong.
        proven = conn.verified.get(key) if type(key[0]) is str and type(key[1]) is str else None
        if proven is not None:
            state = self.namespaces.get(key)
            sec = m.get("sec")
            if state is not None and state.record.incarnation == proven[0] and type(sec) is bytes \
                    and hmac.compare_digest(proven[1], sec):
                return state, (key[0], key[1], sec)
        creds = self._creds(m)
        pool, ns, sec = creds
        if pool not in self.pools:
            raise NoSuchPool(f"server {self.server_id} gives no memory to pool {pool!r}")
        state = self.namespaces.get((pool, ns))
        if state is None:
            record = self.cluster.get_namespace(pool, ns)
            if record is None:
                raise NoSuchNamespace(f"no namespace {ns!r} in pool {pool!r}")
            with self.lock:
                state = self.namespaces.get((pool, ns))
                if state is None or state.record.incarnation != record.incarnation:
                    state = NamespaceState(record, self.server_id, f"s{self.server_id}", self.generations)
                    self.namespaces[(pool, ns)] = state
        proven = conn.verified.get((pool, ns))
        if proven is not None and proven[0] == state.record.incarnation and hmac.compare_digest(proven[1], sec):
            return state, creds
        # First proof on this connection: make sure the cached namespace is still the catalog's
        # (a server that missed a destroy must not serve the old one).
        record = self.cluster.get_namespace(pool, ns)
        if record is None or record.incarnation != state.record.incarnation:
            self._drop_namespace(pool, ns, state.record.incarnation)
            if record is None:
                raise NoSuchNamespace(f"no namespace {ns!r} in pool {pool!r}")
            return self._namespace(conn, m)
        if not self.sec_ids.matches(state.record, sec, None if conn.role == "peer" else conn.client):
            raise PermissionDenied(f"wrong secId for namespace {ns!r} in pool {pool!r}")
        conn.verified[(pool, ns)] = (state.record.incarnation, sec)
        return state, creds

    def op_hello(self, conn: Connection, m: dict[str, Any]) -> Reply:
        if m.get("role") == "peer":
            # Only a server of this cluster may use the peer operations: over IPC the kernel
            # tells us who connected and it must be a live server's pid; over RPC the peer
            # proved the cluster token.
            if not conn.rpc_member and (conn.peer_pid is None or not any(
                    s.alive and s.pid == conn.peer_pid for s in self.view(fresh=True))):
                raise PermissionDenied("only a server of this cluster may connect as a peer")
            conn.role = "peer"
        return {"server_id": self.server_id, "host": self.cfg.host,
                "pools": sorted(self.pools), "page_bytes": PAGE_SIZE_BYTES}

    def op_stats(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """This server process's CPU time so far (all threads, ended ones included): what
        the bench divides by the operations it ran, polling included."""
        return {"server_id": self.server_id, "cpu_s": time.process_time()}

    def op_audit(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Per pool, the allocator's live bytes against what objects, pins and holdings
        account for (audit.py): a test's check that no operation leaked memory."""
        with self.lock:
            return {"server_id": self.server_id, "pools": audit_pools(self.server_id, self.pools, self.namespaces)}

    def op_cluster_view(self, conn: Connection, m: dict[str, Any]) -> Reply:
        return {"servers": [s.to_wire() for s in self.view(fresh=True)]}

    def op_ns_create(self, conn: Connection, m: dict[str, Any]) -> Reply:
        pool, ns, sec = self._creds(m)
        attribute = check_attribute(m.get("attribute", 0))
        if not any(pool in s.pools for s in self.view(fresh=True) if s.alive) and pool not in self.pools:
            raise NoSuchPool(f"no live server gives memory to pool {pool!r}")
        # The slow hash only for a create that can succeed: a client cannot make us hash in a loop
        # by naming a namespace that exists or by being at its limit (the create checks again).
        if self.cluster.get_namespace(pool, ns) is not None:
            raise NamespaceExists(f"namespace {ns!r} already exists in pool {pool!r}")
        limit = self.cfg.max_namespaces_per_client
        made = sum(1 for r in self.cluster.namespaces() if r.creator == conn.client)
        if made >= limit:
            raise LimitExceeded(creator_limit_message(conn.client, made, limit))
        salt_hex, hash_hex = self.sec_ids.hash(sec)
        record = self.cluster.create_namespace(pool, ns, attribute, salt_hex, hash_hex, creator=conn.client,
                                               creator_limit=limit)
        self.sec_ids.remember(record, sec)
        return {}

    def op_ns_destroy(self, conn: Connection, m: dict[str, Any]) -> Reply:
        pool, ns, sec = self._creds(m)
        record = self.cluster.get_namespace(pool, ns)
        if record is None:
            raise NoSuchNamespace(f"no namespace {ns!r} in pool {pool!r}")
        if not self.sec_ids.matches(record, sec, conn.client):
            raise PermissionDenied(f"wrong secId for namespace {ns!r} in pool {pool!r}")
        if not self.cluster.delete_namespace(pool, ns, record.incarnation):
            raise NoSuchNamespace(f"namespace {ns!r} in pool {pool!r} was destroyed meanwhile")
        self._drop_namespace(pool, ns, record.incarnation)
        for server in self.view(fresh=True):
            if server.alive and server.server_id != self.server_id:
                try:
                    self._peer(server.server_id).call("ns_drop", pool=pool, ns=ns, sec=sec,
                                                      incarnation=record.incarnation)
                except MemfabricError as exc:
                    log.warning("server %d did not drop %s/%s: %s", server.server_id, pool, ns, exc)
        return {}

    def op_ns_drop(self, conn: Connection, m: dict[str, Any]) -> Reply:
        pool, ns, sec = self._creds(m)
        state = self.namespaces.get((pool, ns))
        if state is not None and state.record.incarnation == m.get("incarnation"):
            if not self.sec_ids.matches(state.record, sec, None):
                raise PermissionDenied(f"wrong secId for namespace {ns!r} in pool {pool!r}")
            self._drop_namespace(pool, ns, state.record.incarnation)
        return {}

    def _drop_namespace(self, pool: str, ns: str, incarnation: int) -> None:
        with self.lock:
            state = self.namespaces.get((pool, ns))
            if state is None or state.record.incarnation != incarnation:
                return
            del self.namespaces[(pool, ns)]
            self._log(state, "drop")
            state.close()   # generation words go to 0 first: every handle's check fails from now on
            state.table.drop_all()
            if pool in self.pools:
                self.pools[pool].allocator.drop_owner(state.key)
                self._keeper_wake.set()      # it destroys the dropped segments' memory
        # This server's own links to peers must not keep that namespace's segments from reuse.
        with self._peers_lock:
            peers = list(self._peers.values())
        for link in peers:
            link.release_namespace(pool, ns)

    def op_ns_query(self, conn: Connection, m: dict[str, Any]) -> Reply:
        usage: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for rows in [self.op_ns_usage(conn, m)["usage"]] + self._ask_peers("ns_usage"):
            for pool, ns, count, used in rows:
                usage[(pool, ns)][0] += count
                usage[(pool, ns)][1] += used
        return {"namespaces": [
            {"pool": r.pool, "ns": r.ns, "attribute": r.attribute,
             "object_count": usage[(r.pool, r.ns)][0], "used_bytes": usage[(r.pool, r.ns)][1]}
            for r in self.cluster.namespaces()]}

    def op_ns_usage(self, conn: Connection, m: dict[str, Any]) -> Reply:
        with self.lock:
            return {"usage": [[pool, ns, len(s.table), s.table.live_bytes()]
                              for (pool, ns), s in self.namespaces.items()]}

    def _ask_peers(self, op: str) -> list[Any]:
        answers = []
        for server in self.view(fresh=True):
            if server.alive and server.server_id != self.server_id:
                try:
                    answers.append(self._peer(server.server_id).call(op)["usage"])
                except MemfabricError as exc:
                    log.warning("server %d did not answer %s: %s", server.server_id, op, exc)
        return answers

    def op_ns_open(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:   # a drop closes gen_fd under this lock; our duplicate is ours to close
            if state.closed:
                raise NoSuchNamespace(f"namespace {state.record.ns!r} in pool {state.record.pool!r} "
                                      "was destroyed meanwhile")
            try:
                fd = os.dup(state.gen_fd)
            except OSError as exc:
                raise LimitExceeded(f"server {self.server_id} cannot open more files ({exc.strerror}); "
                                    "try again later") from None
        return ({"incarnation": state.record.incarnation, "table_bytes": state.table_bytes}, [fd], True)

    def op_segments(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """The fds of segments of a namespace this connection proved the secId of. A segment is
        one namespace's for its whole life, so its fd can never show another's bytes."""
        state, (pool, _, _) = self._namespace(conn, m)
        wanted = m.get("segments")
        if (not isinstance(wanted, list) or not 0 < len(wanted) <= MAX_FDS_PER_MESSAGE
                or not all(type(s) is int for s in wanted)):
            raise InvalidArgument(f"segments must be a list of 1-{MAX_FDS_PER_MESSAGE} segment ids")
        pool_state = self.pools[pool]
        with self.lock:
            for segment in wanted:
                owner = pool_state.allocator.owner_of(segment)
                if owner is None or segment not in pool_state.segments:
                    raise NoSuchObject(f"segment {segment} of pool {pool!r} is gone (the objects in it "
                                       "were freed)")
                if owner != state.key:
                    raise PermissionDenied(f"segment {segment} is not lent to namespace {state.record.ns!r}")
            memories = [pool_state.segments[s] for s in wanted]
            # Fds of their own, ours to close once sent: a concurrent destroy may close the
            # originals. Out of fds, none is sent and none is kept.
            fds: list[int] = []
            try:
                for mem in memories:
                    fds.append(mem.handout_fd())
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                raise LimitExceeded(f"server {self.server_id} cannot open more files ({exc.strerror}); "
                                    "try again later") from None
            for segment in wanted:
                self._segment_holders[(pool, segment)].add(conn)
                conn.segments.add((pool, segment))
        return ({"sizes": [mem.size_bytes for mem in memories],
                 "mappable": [mem.view is not None for mem in memories]}, fds, True)

    def take_gone(self, conn: Connection) -> list[list]:
        """Segments destroyed since this connection was last told (see Connection.gone)."""
        if not conn.gone:
            return []
        with self.lock:
            gone, conn.gone = conn.gone, []
        return gone

    # ---- objects ------------------------------------------------------------------------

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
            bm_id = state.table.claim()
        try:
            extents = self._place(state, creds, policy, size, target, bm_id)
        except BaseException:
            with self.lock:
                state.table.unclaim(bm_id)
            raise
        with self.lock:
            if not state.closed:
                record = state.table.create(size, extents, claimed=bm_id)
                self._log(state, "obj", bm_id, size, [list(_placement(e)) for e in extents])
                state.publish(record)
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
            raise OutOfMemory(f"no live server of pool {pool!r} has {need} bytes free for this namespace")
        try:
            shares = placement.plan(policy, size, self._free_by_server(pool, state.key), self.server_id)
            return self._reserve(state, creds, shares, bm_id)
        except (OutOfMemory, ServerUnavailable):
            # The view may be a moment old (a server just started, or just filled up).
            shares = placement.plan(policy, size, self._free_by_server(pool, state.key, fresh=True), self.server_id)
            return self._reserve(state, creds, shares, bm_id)

    def op_describe(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:
            return _describe(self._lookup(state, m.get("bm_id")), state)

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
            state.retract(record)       # clients' next generation check fails from here on
            extents = state.table.free(record.bm_id)
            self._log(state, "free", record.bm_id)
        self._release(state, record.bm_id, extents, creds)

    def op_expand(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        new_size = _size_arg(m, "size")
        with state.expand_lock:
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
            record = self._lookup(state, bm_id)
            if new_size < record.size_bytes:
                raise InvalidArgument(f"expand cannot shrink object {record.bm_id}: "
                                      f"{record.size_bytes} -> {new_size} bytes")
            extra = new_size - record.reserved_bytes
        self._zero_slack(state, creds, record, new_size)
        extents: list[Placement] = []
        if extra > 0:
            try:
                extents = self._place(state, creds, "local", extra, None, record.bm_id)
            except OutOfMemory:
                extents = self._place(state, creds, "spread", extra, None, record.bm_id)
        try:
            with self.lock:
                if state.closed:
                    raise NoSuchNamespace(f"namespace {creds[1]!r} in pool {creds[0]!r} was destroyed meanwhile")
                record = state.table.expand(record.bm_id, new_size, extents)
                self._log(state, "obj", record.bm_id, new_size, [list(_placement(e)) for e in record.extents])
                state.publish(record)
        except MemfabricError:
            self._release(state, record.bm_id, extents, creds)   # outside the lock: peers may be slow
            raise
        return _describe(record, state)

    def op_map_pin(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self.lock:
            self._lookup(state, m.get("bm_id"))
            return _describe(state.table.pin(m["bm_id"], conn.id), state)

    def op_map_unpin(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        parse_bm_id(bm_id)
        with self.lock:
            extents = state.table.unpin(bm_id, conn.id)
        self._release(state, bm_id, extents, creds)
        return {}

    def _lookup(self, state: NamespaceState, bm_id: Any) -> ObjectRecord:
        home, _, _ = parse_bm_id(bm_id)
        if home != self.server_id:
            raise InvalidArgument(f"object {bm_id} lives on server {home}, not on server {self.server_id}")
        return state.table.lookup(bm_id)

    # ---- extents: reserving here and on peers ---------------------------------------------

    def op_extent_alloc(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, (pool, _, _) = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        if parse_bm_id(bm_id)[0] == self.server_id:
            raise InvalidArgument(f"object {bm_id} is homed here; extent_alloc is for other homes")
        extents = self._reserve_local(state, pool, _size_arg(m, "size"))
        with self.lock:
            held = state.lent_by_object.setdefault(bm_id, [])
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
            held = state.lent_by_object.get(bm_id, [])
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
                state.lent_by_object[bm_id] = remaining
            else:
                state.lent_by_object.pop(bm_id, None)
            self._log(state, "held", bm_id, [[e.segment, e.offset, e.length] for e in remaining])
            self._give_back_locked(state, bm_id, extents)
            return {}

    # ---- data from other hosts: one span of one extent per request -----------------------------

    @contextmanager
    def span(self, conn: Connection, m: dict[str, Any], writing: bool) -> Iterator[memoryview]:
        """The bytes a remote read or write touches, held for the transfer: the segment is not
        destroyed, and a free of the object defers giving its extents back, until it is over.
        A DRAM segment's bytes are lent in place; a file segment's go through a buffer (read
        before, written after), since the server never maps files."""
        mem, offset, length, state, allocator, segment, bm_id = self._span_view(conn, m)
        try:
            if mem.view is not None:
                yield mem.view[offset:offset + length]
            else:
                buffer = memoryview(bytearray(length))
                if not writing:
                    mem.read(offset, buffer)
                yield buffer
                if writing:
                    mem.write(offset, buffer)
        finally:
            with self.lock:
                allocator.let_go(segment)
                state.busy[bm_id] -= 1
                if not state.busy[bm_id]:
                    del state.busy[bm_id]
                    deferred = state.deferred.pop(bm_id, [])
                    if deferred and self.namespaces.get((state.record.pool, state.record.ns)) is state:
                        allocator.release(state.key, deferred, time.monotonic())

    def _give_back_locked(self, state: NamespaceState, bm_id: str, extents: list[Extent]) -> None:
        """Return extents to the allocator, or later if a transfer still uses the object."""
        if state.busy.get(bm_id):
            state.deferred.setdefault(bm_id, []).extend(extents)
        else:
            self.pools[state.record.pool].allocator.release(state.key, extents, time.monotonic())

    def _span_view(self, conn: Connection, m: dict[str, Any]):
        """The checks of a span request, and its hold; returns (segment memory, offset, length,
        state, allocator, segment, bm_id)."""
        state, (pool, _, _) = self._namespace(conn, m)
        bm_id = m.get("bm_id")
        segment, offset, length = m.get("segment"), m.get("offset"), m.get("length")
        if not all(type(v) is int for v in (segment, offset, length)) or offset < 0 or length <= 0:
            raise InvalidArgument("a span is segment, offset, length: ints, length > 0")
        end = offset + length
        with self.lock:
            if parse_bm_id(bm_id)[0] == self.server_id:
                me = self.server_id
                owned = any(e.server_id == me and e.segment == segment and e.offset <= offset
                            and end <= e.offset + e.length for e in self._lookup(state, bm_id).extents)
            else:
                extents = state.lent_by_object.get(bm_id)
                if extents is None:
                    raise NoSuchObject(f"server {self.server_id} holds nothing of object {bm_id} "
                                       "(freed, or never existed)")
                owned = any(e.segment == segment and e.offset <= offset and end <= e.end for e in extents)
            if not owned:
                raise OutOfRange(f"[{offset}, {offset}+{length}) of segment {segment} is not object "
                                 f"{bm_id}'s on server {self.server_id}")
            # Held from here, under the same lock as the check: not destroyed until span() ends.
            allocator = self.pools[pool].allocator
            allocator.hold(segment)
            state.busy[bm_id] = state.busy.get(bm_id, 0) + 1
            return self.pools[pool].segments[segment], offset, length, state, allocator, segment, bm_id

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

    def _reserve_local(self, state: NamespaceState, pool: str, size: int) -> list[Extent]:
        if pool not in self.pools:
            raise NoSuchPool(f"server {self.server_id} gives no memory to pool {pool!r}")
        pool_state = self.pools[pool]
        allocator = pool_state.allocator
        deadline = time.monotonic() + RESERVE_RETRY_S
        while True:
            with self.lock:
                if state.closed:
                    raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile")
                try:
                    allocation = allocator.allocate(state.key, size, time.monotonic())
                    break
                except OutOfMemory as exc:
                    # Memory freed a moment ago (resting) or being destroyed now is usable soon.
                    wait_s = None if exc.retry_at_s is None else exc.retry_at_s - time.monotonic()
                    if wait_s is None or time.monotonic() + wait_s > deadline:
                        raise
            time.sleep(max(wait_s, 0.001))
        if allocation.retire:           # other owners' empty segments, taken back for this one
            self._destroy_segments(pool_state, allocation.retire)
        if allocation.make:
            try:
                memories = pool_state.make(allocation.make)
            except BaseException:
                with self.lock:
                    allocator.abandon(state.key, allocation)
                raise
            with self.lock:
                for mem in memories:
                    pool_state.segments[mem.id] = mem
                allocator.made(allocation)
            self._keeper_wake.set()    # spares may be needed again, or dropped ones to destroy
        try:
            pool_state.zero(allocation.zero)   # our extents: nobody knows of them yet
        except NoSuchObject:
            if state.closed:                   # destroyed meanwhile, our memory with it
                raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile") from None
            raise
        return allocation.extents

    def _destroy_segments(self, pool: PoolState, segment_ids: list[int]) -> None:
        """Destroy segments' memory (whoever kept their fds sees zeros from now on), tell the
        clients that were handed them, and free their budget."""
        with self.lock:
            memories = [pool.segments.pop(i) for i in segment_ids if i in pool.segments]
            for segment_id in segment_ids:
                for conn in self._segment_holders.pop((pool.name, segment_id), ()):
                    conn.segments.discard((pool.name, segment_id))
                    conn.gone.append([pool.name, segment_id])
        try:
            pool.destroy(memories)
        finally:
            with self.lock:
                pool.allocator.retired(segment_ids)

    def _keeper_loop(self) -> None:
        """Off the request path: destroy retired segments, keep spares made."""
        while not self._stopping.is_set():
            self._keeper_wake.wait(SEGMENT_KEEPER_INTERVAL_S)
            self._keeper_wake.clear()
            for pool in list(self.pools.values()):
                if self._stopping.is_set():
                    return
                try:
                    self._keep(pool)
                except Exception as exc:      # out of fds, a bug: log it, try again next round
                    self.limited_log.warning("keeper", "keeping pool %s's segments: %r", pool.name, exc)

    def _keep(self, pool: PoolState) -> None:
        pool.medium.repay()
        with self.lock:
            retiring = pool.allocator.take_retiring()
        if retiring:
            self._destroy_segments(pool, retiring)
        with self.lock:
            planned = pool.allocator.plan_spares(_spares_wanted(pool.allocator))
        if not planned:
            return
        try:
            memories = pool.make(planned)
        except BaseException:
            with self.lock:
                pool.allocator.spares_failed([segment_id for segment_id, _ in planned])
            raise
        with self.lock:
            for mem in memories:
                pool.segments[mem.id] = mem
            pool.allocator.spares_made([mem.id for mem in memories])

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
                self._peer(server_id).call("extent_free", pool=creds[0], ns=creds[1], sec=creds[2],
                                           bm_id=bm_id, extents=items)
            except MemfabricError as exc:
                log.warning("server %d did not take back %d extents: %s", server_id, len(items), exc)

    # ---- data operations done here, near the data -------------------------------------------

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
                self._lookup(state, bm_id)
                d = _describe(state.table.pin(bm_id, holder), state)
            pins.callback(self._unpin_here, state, creds, bm_id, holder)
            gens = state.words
        else:
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
                extents = state.table.unpin(bm_id, holder)
            except (NoSuchObject, InvalidArgument):
                return          # its namespace was destroyed meanwhile: nothing is left to give back
        self._release(state, bm_id, extents, creds)

    def _unpin_there(self, link: Any, m: dict[str, Any]) -> None:
        try:
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
        pending = []
        for server_id, items in by_host.items():   # all hosts reduce at once
            link = self._peer(server_id)
            partial = np.empty(length // dtype.itemsize, dtype=dtype)
            rid, p = link.submit("reduce_part", {"inputs": items, "operator": op, "dtype": dtype.str},
                                 into=memoryview(partial).cast("B"))
            pending.append((link, rid, p, partial))
        acc = None
        for item in here:
            acc = reduce.reduce_into(op, acc, reduce.values(item, dtype))
        for link, rid, p, partial in pending:
            link.wait(rid, p, "reduce_part")
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

    # ---- peers ----------------------------------------------------------------------------

    def _peer(self, server_id: int) -> ServerLink:
        with self._peers_lock:
            link = self._peers.get(server_id)
        if link is not None and not link.peer_gone():    # a restarted peer leaves it hung up
            return link
        record = next((s for s in self.view(fresh=True) if s.server_id == server_id), None)
        if record is None or not record.alive:
            raise ServerUnavailable(f"server {server_id} is not alive")
        link = connect_to(server_id, record.host, record.ipc_socket, record.rpc_address, local_host=self.cfg.host,
                          token=self.token, tls=self.peer_tls, timeout_s=PEER_TIMEOUT_S, role="peer",
                          busy_poll_s=self.cfg.busy_poll_us / 1e6)
        with self._peers_lock:
            old = self._peers.get(server_id)
            if old is not None and not old.closed:
                link.close()
                return old
            self._peers[server_id] = link
        return link


class Payload:
    """A reply with raw bytes after it (RPC only: IPC peers read each other's memory)."""

    def __init__(self, reply: dict[str, Any], data: memoryview) -> None:
        self.reply, self.data = reply, data


def _describe(record: ObjectRecord, state: NamespaceState) -> dict[str, Any]:
    return {"bm_id": record.bm_id, "size": record.size_bytes, "generation": record.generation,
            "slot": record.slot, "incarnation": state.record.incarnation,
            "extents": [[e.server_id, e.segment, e.offset, e.length] for e in record.extents]}


def _spares_wanted(allocator: Any) -> dict[int, int]:
    """Spares to keep made: a few of the largest size (large objects) and of the smallest
    (a namespace's first segment), within a fraction of the capacity."""
    top, small = allocator.max_segment_bytes, allocator.min_segment_bytes
    budget = allocator.capacity_bytes // SPARE_CAPACITY_DIVISOR
    wanted = {top: min(SPARE_TOP_SEGMENTS, budget // top)}
    if small < top:
        wanted[small] = min(SPARE_SMALL_SEGMENTS, (budget - wanted[top] * top) // small)
    return {size: n for size, n in wanted.items() if n > 0}


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

"""One memfabric server: its memory, its namespaces, and the operations clients ask for.

Threads: one per client connection (bounded), one heartbeat. A single lock guards the
pure core (allocators, object tables); it is never held while talking to a peer, so two
servers asking each other for memory at once cannot deadlock.
"""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable


from ..capacity import segment_slots
from ..cluster import ClusterService, ServerRecord, open_cluster
from ..cluster.base import creator_limit_message
from ..core.allocator import Extent
from ..core.namespaces import NamespaceRecord, check_attribute, check_name, check_sec_id
from ..bigmemory.objects import Generations
from ..datapath.connect import connect_to
from ..datapath.deadline import deadline_for, serving_until, time_left_s
from ..datapath.link import Creds, ServerLink
from ..transport import rpc
from ..errors import (InternalError, InvalidArgument, LimitExceeded, MemfabricError, NamespaceExists, NoSuchNamespace,
                      NoSuchObject, NoSuchPool, OutOfMemory, PermissionDenied, ServerUnavailable, Timeout)
from ..limits import (MAX_FDS_PER_MESSAGE, PAGE_SIZE_BYTES, PEER_TIMEOUT_S, RESERVE_RETRY_S, SEGMENT_KEEPER_INTERVAL_S,
                      SPARE_CAPACITY_DIVISOR, SPARE_SMALL_SEGMENTS, SPARE_TOP_SEGMENTS)
from ..config import ServerConfig
from ..bigmemory.service import BigMemoryService
from ..kv.service import KeyValueService
from ..plog.service import PlogService
from .audit import audit_pools
from .log_limit import LimitedLog
from .metrics import RequestMetrics
from .sec_ids import SecIdChecker
from .requests import Connection, Reply
from .state import NamespaceState, PoolState
from ..stop_request import StopRequest

log = logging.getLogger("memfabric.server")

VIEW_TTL_S = 0.25
OBJECTS_PER_QUERY = 2000     # ids per objects_alive request: keeps it inside one message


class Server:
    def __init__(self, cfg: ServerConfig, cluster: ClusterService | None = None,
                 stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster or open_cluster(cfg.cluster.backend, **cfg.cluster.settings())
        self.server_id = 0
        self.epoch = 0          # this life's number from the cluster: ids made now never repeat
        self.generations: Generations | None = None
        self.lock = threading.RLock()
        self.pools: dict[str, PoolState] = {}
        self.namespaces: dict[tuple[str, str], NamespaceState] = {}
        self.sec_ids = SecIdChecker()
        self._peers: dict[int | tuple[int, str], ServerLink] = {}     # server_id, or (server_id, lane)
        self._peers_lock = threading.Lock()
        self._view: list[ServerRecord] = []
        self._view_at = 0.0
        self._stopping = threading.Event()
        # The process's stop (what its signal handlers set, taking no lock): a start still
        # reserving memory gives up within a step once it is asked for.
        self._start_interrupted = stop if stop is not None else StopRequest()
        self._heartbeat_thread: threading.Thread | None = None
        self.beat_sent_s: float | None = None     # when the last heartbeat the cluster took was sent (monotonic)
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
        # The semantics: each registers its operations with the dispatcher.
        self.bigmemory = BigMemoryService(self)
        self.kv = KeyValueService(self)
        self.plog = PlogService(self)
        self.services = (self.bigmemory, self.kv, self.plog)
        self.handlers: dict[str, Callable[[Connection, dict[str, Any]], Reply]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}
        self.peer_ops, self.fd_ops = set(self.PEER_OPS), set(self.FD_OPS)
        # Operations whose payload the RPC door moves straight to or from pool memory.
        self.transfers: dict[str, Callable[[Connection, dict[str, Any]], Any]] = {}
        for service in self.services:
            assert not set(service.handlers()) & set(self.handlers), "two semantics claim one operation"
            self.handlers.update(service.handlers())
            self.peer_ops |= service.PEER_OPS
            self.fd_ops |= service.FD_OPS
            self.transfers.update(service.transfers())
        self.metrics = RequestMetrics(self.handlers)

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
        slots = segment_slots(self.cfg.pools, self.cfg.segment_bytes)
        for pool_cfg in self.cfg.pools:
            # Segment ids of this life start past every earlier life's (epochs never repeat).
            self.pools[pool_cfg.name] = PoolState(pool_cfg, self.cfg.segment_bytes, self.cfg.min_segment_bytes,
                                                  f"s{self.server_id}", first_segment_id=(self.epoch << 32) + 1,
                                                  max_segments=slots[pool_cfg.name])
        for pool in self.pools.values():
            if pool.persistent:
                self.bigmemory.restore(pool)
                self.plog.restore(pool, self._start_interrupted)    # before open(): it discards unclaimed files
            pool.open(self._start_interrupted)
        self._keeper_thread = threading.Thread(target=self._keeper_loop, name="segment-keeper", daemon=True)
        self._keeper_thread.start()
        self._publish()

    def announce(self) -> None:
        """Once this server answers requests: what the semantics tell the cluster then."""
        self.bigmemory.announce()

    def _lock_data_dir(self) -> None:
        """One server per data directory: an exclusive lock the kernel drops when we die."""
        self._dir_lock = os.open(os.path.join(self.cfg.data_dir, "server.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_lock)
            raise ServerUnavailable(f"another server is running on {self.cfg.data_dir}") from None

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
        self.plog.close()          # its thread writes into pool files
        with self.lock:
            for state in self.namespaces.values():
                state.close()
            self.namespaces.clear()
            for pool in self.pools.values():
                if pool.persistent:     # files no object needs would outlive us
                    pool.destroy([pool.segments.pop(i) for i in pool.allocator.unused_segments()
                                  if i in pool.segments])
                pool.close()
            self.pools.clear()
            self.bigmemory.close()
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
        sent_s = time.monotonic()
        stayed_alive = self.cluster.heartbeat(self.server_id, pools)
        # Back from a silence the cluster may have taken for death: MemKV forgets the keys
        # others may have written since, before it serves them again (kv/service.py).
        self.kv.rejoined(self.beat_sent_s, time.monotonic(), stayed_alive)
        self.beat_sent_s = sent_s
        self.kv.beat(sent_s)            # the index leases are CLOCK_MONOTONIC (kv/index.py)
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

    VIEW_TTL_S = VIEW_TTL_S    # view()'s, for the compiled paths that check a view is fresh (plog/fast_append.py)

    PEER_OPS = frozenset({"ns_drop", "ns_usage"})     # the server's own; each semantic adds its
    # Operations whose replies hand over file descriptors: refused, before they make or hold
    # anything, on a connection that cannot carry them (RPC).
    FD_OPS = frozenset({"segments"})

    def dispatch(self, conn: Connection, message: dict[str, Any]) -> Reply:
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise InvalidArgument(f"unknown operation {op!r}")
        if op in self.peer_ops and conn.role != "peer":
            raise PermissionDenied(f"{op!r} is for servers of this cluster only")
        if op in self.fd_ops and not conn.carries_fds:
            raise InvalidArgument(f"{op!r} hands over file descriptors: same-host (IPC) connections only")
        return handler(conn, message)

    def serve(self, conn: Connection, message: dict[str, Any]) -> Reply:
        """dispatch() as both front doors use it: an error outside the vocabulary is a bug,
        logged and answered as INTERNAL_ERROR, and the connection and the server go on.
        Calls to peers for the request end before the caller's budget does (deadline.py).
        Every answer is counted here, once, for the metrics (metrics.py)."""
        started_s = time.perf_counter()
        code = None
        try:
            with serving_until(deadline_for(message.get("budget_s"))):
                return self.dispatch(conn, message)
        except MemfabricError as exc:
            code = exc.code
            raise
        except Exception as exc:
            code = InternalError.code
            # dispatch() only gets here with a known operation's name: a bounded set of kinds.
            self.limited_log.exception(f"bug in {message.get('op')}", "operation %r failed", message.get("op"))
            raise InternalError(f"internal error in {message.get('op')!r}: {exc!r}") from None
        finally:
            self.metrics.observe(message.get("op"), code, time.perf_counter() - started_s)

    def disconnected(self, conn: Connection) -> None:
        """A client went away: it holds no segment any more, and its mappings no memory."""
        with self.lock:
            for key in conn.segments:
                holders = self._segment_holders.get(key)
                if holders is not None:
                    holders.discard(conn)
                    if not holders:
                        del self._segment_holders[key]
            conn.segments.clear()
        for service in self.services:
            service.disconnected(conn)

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
                raise NoSuchNamespace(_no_namespace(pool, ns))
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
                raise NoSuchNamespace(_no_namespace(pool, ns))
            return self._namespace(conn, m)
        # Peers too spend from a failure budget (theirs: the token is every remote client's, so
        # "peer" proves no more than that). A server forwards only secIds it checked itself
        # (check_creds), so an honest peer never fails.
        if not self.sec_ids.matches(state.record, sec, conn.client):
            raise PermissionDenied(_wrong_sec_id(pool, ns))
        conn.verified[(pool, ns)] = (state.record.incarnation, sec)
        return state, creds

    def check_creds(self, conn: Connection, creds: Creds) -> None:
        """Check a namespace's secId before passing it on to a peer (the namespace need not
        have memory here), against this connection's failure budget."""
        pool, ns, sec = creds
        proven = conn.verified.get((pool, ns))
        if proven is not None and hmac.compare_digest(proven[1], sec):
            state = self.namespaces.get((pool, ns))
            if state is None or state.record.incarnation == proven[0]:
                return
        record = self.cluster.get_namespace(pool, ns)
        if record is None:
            raise NoSuchNamespace(f"no namespace {ns!r} in pool {pool!r}")
        if not self.sec_ids.matches(record, sec, conn.client):
            raise PermissionDenied(f"wrong secId for namespace {ns!r} in pool {pool!r}")
        conn.verified[(pool, ns)] = (record.incarnation, sec)

    def is_server_pid(self, pid: int | None) -> bool:
        """Whether a process on this host is a live server of the cluster (the view may be a
        moment old: a server started just now is a client until the next look)."""
        try:
            return pid is not None and any(s.alive and s.pid == pid for s in self.view())
        except MemfabricError:
            return False

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
        the bench divides by the operations it ran, polling included; and how many remote
        span reads and writes its RPC connections served in compiled code."""
        return {"server_id": self.server_id, "cpu_s": time.process_time(),
                "compiled_spans": self.bigmemory.spans_served_compiled(),
                "compiled_gets": self.kv.gets_served_compiled(), "compiled_puts": self.kv.puts_served_compiled()}

    def op_audit(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Per pool, the allocator's live bytes against what objects, pins and holdings
        account for (audit.py): a test's check that no operation leaked memory."""
        with self.lock:
            return {"server_id": self.server_id, "pools": audit_pools(
                self.server_id, self.pools, self.namespaces, lambda st: {"plog_bytes": self.plog.held_bytes(st)})}

    def op_cluster_view(self, conn: Connection, m: dict[str, Any]) -> Reply:
        # The age by this server's clock, the one nearest the heartbeats: a client's may be off.
        now = time.time()
        return {"servers": [{**s.to_wire(), "seen_s_ago": max(0.0, now - s.last_seen_s)}
                            for s in self.view(fresh=True)]}

    def op_ns_create(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Create (pool, ns). With `exist_ok`, a namespace of that name is opened instead when
        the secId is its own (and the attribute the same): {"created": False}."""
        pool, ns, sec = self._creds(m)
        attribute = check_attribute(m.get("attribute", 0))
        exist_ok = m.get("exist_ok", False)
        if type(exist_ok) is not bool:
            raise InvalidArgument(f"exist_ok must be true or false, got {exist_ok!r:.100}")
        if not any(pool in s.pools for s in self.view(fresh=True) if s.alive) and pool not in self.pools:
            raise NoSuchPool(f"no live server gives memory to pool {pool!r}")
        # The slow hash only for a create that can succeed: a client cannot make us hash in a loop
        # by naming a namespace that exists or by being at its limit (the create checks again).
        # (exist_ok checks the secId against the existing one: wrong ones are counted and limited.)
        existing = self.cluster.get_namespace(pool, ns)
        if existing is not None:
            return self._existing_namespace(conn, existing, sec, attribute, exist_ok)
        limit = self.cfg.max_namespaces_per_client
        made = sum(1 for r in self.cluster.namespaces() if r.creator == conn.client)
        if made >= limit:
            raise LimitExceeded(creator_limit_message(conn.client, made, limit))
        salt_hex, hash_hex = self.sec_ids.hash(sec)
        try:
            record = self.cluster.create_namespace(pool, ns, attribute, salt_hex, hash_hex, creator=conn.client,
                                                   creator_limit=limit)
        except NamespaceExists:
            existing = self.cluster.get_namespace(pool, ns)     # another client made it meanwhile
            if existing is None:
                raise
            return self._existing_namespace(conn, existing, sec, attribute, exist_ok)
        self.sec_ids.remember(record, sec)
        return {"created": True}

    def _existing_namespace(self, conn: Connection, record: NamespaceRecord, sec: bytes, attribute: int,
                            exist_ok: bool) -> Reply:
        pool, ns = record.pool, record.ns
        if not exist_ok:
            raise NamespaceExists(f"namespace {ns!r} already exists in pool {pool!r} "
                                  "(create_namespace(..., exist_ok=True) opens it with its secId)")
        if not self.sec_ids.matches(record, sec, conn.client):
            raise PermissionDenied(_wrong_sec_id(pool, ns))
        if record.attribute != attribute:
            raise NamespaceExists(f"namespace {ns!r} exists in pool {pool!r} with attribute {record.attribute}, "
                                  f"not {attribute}")
        return {"created": False}

    def op_ns_destroy(self, conn: Connection, m: dict[str, Any]) -> Reply:
        pool, ns, sec = self._creds(m)
        record = self.cluster.get_namespace(pool, ns)
        if record is None:
            raise NoSuchNamespace(_no_namespace(pool, ns))
        if not self.sec_ids.matches(record, sec, conn.client):
            raise PermissionDenied(_wrong_sec_id(pool, ns))
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
                raise PermissionDenied(_wrong_sec_id(pool, ns))
            self._drop_namespace(pool, ns, state.record.incarnation)
        return {}

    def _drop_namespace(self, pool: str, ns: str, incarnation: int) -> None:
        with self.lock:
            state = self.namespaces.get((pool, ns))
            if state is None or state.record.incarnation != incarnation:
                return
            del self.namespaces[(pool, ns)]
            self.bigmemory.dropped(state)
            self.plog.dropped(state)
            state.close()   # generation words go to 0 first: every handle's check fails from now on
            if pool in self.pools:
                self.pools[pool].allocator.drop_owner(state.key)
                self._keeper_wake.set()      # it destroys the dropped segments' memory
        # This server's own links to peers must not keep that namespace's segments from reuse.
        with self._peers_lock:
            peers = list(self._peers.values())
        for link in peers:
            link.release_namespace(pool, ns)

    def op_ns_query(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Every namespace of the cluster with its figures summed over the live servers: each
        semantic's own (objects and bytes; keys, hits...)."""
        usage: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"object_count": 0, "used_bytes": 0})
        for rows in [self.op_ns_usage(conn, m)["usage"]] + self._ask_peers("ns_usage"):
            for pool, ns, figures in rows:
                mine = usage[(pool, ns)]
                for name, number in figures.items():
                    mine[name] = mine.get(name, 0) + number
        return {"namespaces": [{"pool": r.pool, "ns": r.ns, "attribute": r.attribute, **usage[(r.pool, r.ns)]}
                               for r in self.cluster.namespaces()]}

    def op_ns_usage(self, conn: Connection, m: dict[str, Any]) -> Reply:
        with self.lock:
            states = list(self.namespaces.items())
        rows = []
        for (pool, ns), state in states:      # outside the server's lock: a semantic takes its own
            figures: dict[str, int] = {}
            for service in self.services:
                figures.update(service.usage(state))
            rows.append([pool, ns, figures])
        return {"usage": rows}

    def _ask_peers(self, op: str) -> list[Any]:
        left = time_left_s()
        if left is not None and left <= 0:       # the caller has given up already: ask no one
            raise Timeout(f"no time was left to ask the other servers ({op!r})")
        answers = []
        for server in self.view(fresh=True):
            if server.alive and server.server_id != self.server_id:
                try:
                    answers.append(self._peer(server.server_id).call(op)["usage"])
                except MemfabricError as exc:
                    self.limited_log.warning("ask peers", "server %d did not answer %s: %s", server.server_id, op, exc)
        return answers

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

    # ---- extents: reserving here and on peers ---------------------------------------------

    # ---- data from other hosts: one span of one extent per request -----------------------------

    def _reserve_local(self, state: NamespaceState, pool: str, size: int) -> list[Extent]:
        if pool not in self.pools:
            raise NoSuchPool(f"server {self.server_id} gives no memory to pool {pool!r}")
        pool_state = self.pools[pool]
        allocator = pool_state.allocator
        deadline = time.monotonic() + RESERVE_RETRY_S
        gave_back = False
        while True:
            refused = None
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
                        if gave_back:
                            raise
                        refused = exc
            if refused is not None:
                # Keyspaces keep empty heap pages for their next writes: the pool takes them
                # back first (outside the lock: giving back takes it), then they rest a grace.
                gave_back = True
                if not self.kv.give_back_empty_pages(pool, state.kv):
                    raise refused
                deadline = time.monotonic() + RESERVE_RETRY_S
                continue
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
            for service in self.services:
                try:
                    service.tick()
                except Exception as exc:
                    self.limited_log.warning("keeper", "%s's housekeeping: %r", type(service).__name__, exc)

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

    # ---- data operations done here, near the data -------------------------------------------

    # ---- peers ----------------------------------------------------------------------------

    def _peer(self, server_id: int, lane: str = "") -> ServerLink:
        """This server's link to server `server_id`. A `lane` is a link of its own, for calls made
        while serving a peer's request: a plog copy's pull from its home ("pull") waits on the
        home while the home may wait on this server's main link to it, which would otherwise
        close the circle (two servers each forwarding to the other)."""
        key = (server_id, lane) if lane else server_id
        with self._peers_lock:
            link = self._peers.get(key)
        if link is not None and not link.peer_gone():    # a restarted peer leaves it hung up
            return link
        record = next((s for s in self.view(fresh=True) if s.server_id == server_id), None)
        if record is None or not record.alive:
            raise ServerUnavailable(f"server {server_id} is not alive")
        link = connect_to(server_id, record.host, record.ipc_socket, record.rpc_address, local_host=self.cfg.host,
                          token=self.token, tls=self.peer_tls, timeout_s=PEER_TIMEOUT_S, role="peer",
                          busy_poll_s=self.cfg.busy_poll_us / 1e6)
        with self._peers_lock:
            old = self._peers.get(key)
            if old is not None and not old.closed:
                link.close()
                return old
            self._peers[key] = link
        return link


def _no_namespace(pool: str, ns: str) -> str:
    return (f"no namespace {ns!r} in pool {pool!r}: create_namespace makes it "
            "(Session.namespaces() lists those there are)")


def _wrong_sec_id(pool: str, ns: str) -> str:
    return f"wrong secId for namespace {ns!r} in pool {pool!r}: give the secId it was created with"


def _spares_wanted(allocator: Any) -> dict[int, int]:
    """Spares to keep made: a few of the largest size (large objects) and of the smallest
    (a namespace's first segment), within a fraction of the capacity."""
    top, small = allocator.max_segment_bytes, allocator.min_segment_bytes
    budget = allocator.capacity_bytes // SPARE_CAPACITY_DIVISOR
    wanted = {top: min(SPARE_TOP_SEGMENTS, budget // top)}
    if small < top:
        wanted[small] = min(SPARE_SMALL_SEGMENTS, (budget - wanted[top] * top) // small)
    return {size: n for size, n in wanted.items() if n > 0}

"""The server's MemPlog operations: create, append, read, seal, delete and list a namespace's
plogs whose home is this server, and bring them back after a restart.

The home is the plog's sequencer: its lock orders appends from every client, so records
never interleave and offsets only grow. An append plans its records' places (log.py), writes
them (header, payload, padding) into the plog's extents, and lets go of the lock; then it
waits for its bytes to be flushed (store.py says when a medium needs one). Flushes are
shared (group commit): one appender at a time flushes every segment written since the last
flush and commits everything written before it started, so appenders that wrote meanwhile
find their records committed without a flush of their own. Readers see committed bytes only.

Record bytes arrive in the request (small records), as the RPC payload (plog_append_payload:
received straight into one buffer, then written), or, from a same-host client's larger
batches, in a shared stage: memory the client writes and the server maps (plog_share_stage),
so that a batch costs one request and no bytes in messages.

Where a plog is: on the server that created it (the client's own server). A client finds a
plog by asking its servers (client.py); names are unique per namespace on one server, and
the client checks the others before a create (two creates of one name at once on two
servers could both succeed: there is no cluster-wide claim yet).

Replicas. A plog of R replicas has its home and R - 1 copies on other live servers of its
pool, chosen by the home at create (fewer live servers than R: INVALID_ARGUMENT). The home
forwards the log's bytes to every live copy in order, at the same offsets, as part of the
shared flush (one forward carries every append written since the last), and commits (answers
the appends, shows them to readers) only once each live copy holds them durably. A copy
applies bytes strictly at the end of its log (a gap is refused), checks every frame (nonce,
index, CRC) before it commits them, and serves reads and seal like a home, but no appends.
A copy that does not answer within PEER_TIMEOUT_S, refuses, or that the cluster sees dead,
is marked dead for that plog (info()'s dead_replicas) and gets nothing more: appends go on
with the live ones (availability over copy count, as a KV key's replicas do; the info says
how many copies an append had). A copy that comes back after a restart is stale (it may lack
appends made while it was away): it refuses reads and says so, and the home never forwards
to it again. A dead copy whose server did not restart (stopped a while, cut off) is told it
is stale by its home once it answers again (tick, once a second); until then, a client that
must read a copy (the home away) takes the longest one. The same round learns whether a dead
copy was sealed (a client on the other side of a cut sealed it): the home then fences itself.
Seal is fencing: a copy that was sealed (by a client, its home being dead or cut off)
refuses the home's forward with SEALED, and the home then seals itself, drops the
uncommitted appends and refuses them, and seals its other live copies at its committed
length (one that a forward of those appends reached first drops them too: op_plog_seal's
fence_at): after that, no append succeeds anywhere, and no copy holds one answered SEALED. (A home cut
off from every copy appends alone until it reaches one again: the price of going on with
the live copies.) A home that
restarts asks its copies before its first append: one sealed seals it, one not in step
(shorter, stale, unreachable) is dead.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from array import array
from typing import TYPE_CHECKING, Any, Callable

from ..core.allocator import Extent
from ..core.namespaces import check_name
from ..datapath.deadline import (allowing, call_timeout_s, deadline_for, serving_until, time_left_s,
                                 unbounded)
from ..errors import (IOError_, InvalidArgument, LimitExceeded, MemfabricError, NoSuchNamespace, NoSuchObject, ProtocolError,
                      InternalError, PermissionDenied, Sealed, ServerUnavailable)
from ..limits import (MAX_PLOG_BATCH, MAX_PLOG_CAPACITY_BYTES, MAX_PLOG_RECORD_BYTES, MAX_PLOG_REPLICAS,
                      MAX_PLOG_BUFFERED_BYTES, MAX_PLOG_STAGED_BYTES, MAX_PLOG_STAGES_PER_CLIENT, MAX_PLOGS_PER_NAMESPACE, MAX_RPC_PAYLOAD_BYTES,
                      MAX_PLOG_PULL_PLACES, PLOG_INLINE_BYTES, PLOG_PULL_BYTES, PLOG_REPLICA_PIECE_BYTES,
                      PLOG_PREPARE_FLUSH_MOST_BYTES, PLOG_PREPARE_PIECE_BYTES, PLOG_PREPARE_SKIP_BYTES,
                      PLOG_PREPARE_WAIT_S, PLOG_RPC_READ_BYTES, PLOG_SHARED_STAGE_KEPT_BYTES,
                      PLOG_SHARED_STAGE_MIN_BYTES)
from ..media.memfd import SEALS_SIZE, sealed_memfd
from ..server.requests import Connection, Payload, Reply
from ..server.state import NamespaceState, PoolState
from ..stop_request import StopRequest
from ..transport import wire
from . import fast_append
from . import record as rec
from .log import (OPEN, SEALED, STATES, PlogLog, first_ready, frame_starts, next_reach, prepare_allowance_s, round_end,
                  wants_round)
from .preparer import Preparer
from .store import LogBytes, meta_path, read_metas, remove_meta, write_meta

try:    # a batch's lengths checked in one call (_framing.c): ./dev builds it
    from .. import _records
except ImportError:      # pragma: no cover
    _records = None

if TYPE_CHECKING:
    from ..server.server import Server

log = logging.getLogger("memfabric.server")

JOIN_BELOW_BYTES = 1 << 20     # a batch this small is framed into one buffer: one write per extent
FRAME_BUFFERS_KEPT = 4         # of those buffers, kept for the next batches
RECORD_OVERHEAD_BYTES = 32     # a record's place ([offset, length]) and framing in a records reply
STALE_NOTICE_RETRY_S = 1.0     # how often a home tries again to tell its dead copies they are stale
HOME, REPLICA = "home", "replica"


class _Plog:
    """One plog homed here, or a copy of one: its rules (log.py), its bytes (store.py), its locks."""

    def __init__(self, plog_id: int, core: PlogLog, state: NamespaceState, data: LogBytes, path: str,
                 replicas: int, created_s: float, role: str = HOME, home: int = 0,
                 replica_servers: list[int] | None = None, reach: int = 0) -> None:
        self.id = plog_id
        self.core = core
        self.state = state
        self.data = data
        self.path = path
        self.replicas = replicas
        self.created_s = created_s
        self.lock = threading.Lock()          # the sequencer: plans, writes, commits, seal
        # The log never wrote a byte at or past this (no frame of it lies there): what a restart
        # scans and zeroes (restore). In its metadata, raised there before a write goes past it
        # (a restore that zeroed all past the log takes the log's end, lower than the metadata's).
        self.reach = reach
        # pmem: its memory is ready (zeros written and flushed) from the log's end to here, and
        # a round of making more ready is queued or under way (the server's Preparer); under
        # way, it holds the memory as a read does, and `round_over` is told when it ends. No
        # round until the log is this long (a log that outran one: limits.PLOG_PREPARE_SKIP_BYTES).
        self.ready_end = 0
        self.preparing = False
        self.round_under_way = False
        self.round_over = threading.Condition(self.lock)
        self.prepare_from = 0
        self.flushed_bytes = 0                # by its last flush (large ones are not made ready for)
        self.flush_lock = threading.Lock()    # one flusher at a time (group commit)
        # Where appends its connections' receive loops wrote wait for a flush (pmem), or None.
        self.commit_group = fast_append.commit_group(data)
        self.touched: set[int] = set()        # segments written since the last flush started
        self.readers = 0                      # reads under way: a delete frees the bytes after them
        self.deleted = False
        self.namespace_gone = False           # deleted because its namespace was destroyed (dropped)
        self.released = False
        # A flush that failed (EIO from fdatasync): what was written since is of unknown fate on
        # the disk, so no more appends are taken until the server restarts and scans the log.
        self.broken: str | None = None
        # Replicas (see the module's docstring). The home: the copies' servers, those it
        # stopped forwarding to, how far it has forwarded, and whether it must ask its copies
        # before the next append (after its restart). A copy: bytes received past its log's end
        # (a forward comes in pieces), and whether it came back from a restart (stale).
        self.role = role
        self.home = home
        self.replica_servers = list(replica_servers or [])
        self.dead: set[int] = set()
        self.watched: set[int] = set()      # dead copies the home tells they are stale, and watches for a seal
        self.forwarded = 0
        self.no_pull: set[int] = set()      # copies that cannot read this home's files (_forward_large)
        self.resync = False
        self.receiving = 0
        self.stale = False
        self.fenced_by: int | None = None     # the copy's server whose seal fenced this one (_fence)
        self.creds: tuple[str, str, bytes] | None = None     # the secId a client proved: what forwards present
        # A forward's request as packed for these creds (fast_append.forward_head), and its entries.
        self.forward_head: tuple[tuple[str, str, bytes] | None, bytes, int] | None = None
        # The receive loop's forward to the one live copy (fast_append.Forwarder), when Python's
        # last forward found it the only one.
        self.fast_forward: Any = None

    def meta(self) -> dict[str, Any]:
        record = self.state.record
        return {"name": self.core.name, "ns": record.ns, "incarnation": record.incarnation,
                "capacity": self.core.capacity, "nonce": self.core.nonce,
                "extents": [list(e) for e in self.data.extents], "state": self.core.state,
                "replicas": self.replicas, "created_s": self.created_s, "role": self.role, "home": self.home,
                "replica_servers": self.replica_servers, "reach": self.reach}

    def info(self, server_id: int, alive: set[int] | None) -> dict[str, Any]:
        """`alive`: the servers the cluster sees alive (None: not known now)."""
        holders = [s for s in [self.home, *self.replica_servers] if s != server_id]
        dead = {s for s in holders if alive is not None and s not in alive}
        if self.role == HOME:
            dead |= self.dead
        return {**self.core.info(), "replicas": self.replicas, "dead_replicas": sorted(dead), "home": self.home,
                "replica_servers": self.replica_servers, "role": self.role, "stale": self.stale,
                "server": server_id, "pool": self.state.record.pool, "ns": self.state.record.ns, "id": self.id}


_META_FILE = re.compile(r"\d{1,20}\.plog")


def _meta_ok(meta: dict[str, Any]) -> bool:
    """A metadata file's fields have the types a plog needs (a damaged one is not restored)."""
    extents = meta.get("extents")
    return (isinstance(meta.get("ns"), str) and type(meta.get("incarnation")) is int
            and isinstance(meta.get("name"), str) and type(meta.get("capacity")) is int and meta["capacity"] > 0
            and type(meta.get("nonce")) is int and meta.get("state") in STATES
            and isinstance(extents, list) and bool(extents)
            and all(isinstance(e, list) and len(e) == 3 and all(type(x) is int and x >= 0 for x in e)
                    for e in extents)
            and sum(e[2] for e in extents) >= meta["capacity"]
            and meta.get("role", HOME) in (HOME, REPLICA) and type(meta.get("home", 0)) is int
            and isinstance(meta.get("replica_servers", []), list)
            and all(type(x) is int for x in meta.get("replica_servers", [])))


class _Window:
    """Reads for the recovery scan, a MiB of the log at a time (not two preads per record)."""

    SIZE_BYTES = 1 << 20

    def __init__(self, data: LogBytes, end: int | None = None, check: Callable[[], None] | None = None) -> None:
        self.data = data
        self.end = data.capacity_bytes if end is None else end      # never read past this
        self.check = check                                          # before each read (it may raise)
        self.start = 0
        self.bytes = b""

    def read(self, offset: int, length: int) -> bytes | memoryview:
        if not (self.start <= offset and offset + length <= self.start + len(self.bytes)):
            if self.check is not None:
                self.check()
            if length > self.SIZE_BYTES:
                return self.data.read_bytes(offset, length)
            self.start = offset
            self.bytes = self.data.read_bytes(offset, max(length, min(self.SIZE_BYTES, self.end - offset)))
        at = offset - self.start
        return memoryview(self.bytes)[at:at + length]


class _SharedStage:
    """Memory a same-host client writes its record batches into, and the server reads them
    from (plog_share_stage): a batch then costs one request, with no bytes in messages. A
    sealed memfd, so the client cannot shrink it under the server's mapping; the client can
    write it at any time, so an append copies the batch out before it checks or frames a
    byte. Kept by the connection for its next batches, until it asks for a larger one."""

    def __init__(self, size: int, label: str) -> None:
        self.fd, self.mapping = sealed_memfd(label, size, SEALS_SIZE)
        self.size = size

    def close(self) -> None:
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PlogService:
    PEER_OPS: frozenset[str] = frozenset({"plog_replica_create", "plog_replica_append", "plog_replica_stale"})
    FD_OPS: frozenset[str] = frozenset({"plog_share_stage"})      # hands over the stage's memfd

    def __init__(self, server: "Server") -> None:
        self.server = server
        self._lock = threading.Lock()         # the registry below; never held while doing I/O
        self._plogs: dict[tuple[str, str, int], dict[str, _Plog]] = {}
        self._next_id = 0
        self._grant_holders = fast_append.GrantHolders()    # revoked from when a plog goes
        self._forward_buffers = threading.local()                # _forward_buffer's, one per connection thread
        # Counters for the metrics (metrics.py reads them when scraped, through counts()).
        self.appends = 0
        self.appended_bytes = 0
        self.flushes = 0
        self.fast_appends = 0                 # of them, served by the compiled path (fast_append.py)
        self._counts_lock = threading.Lock()
        self.forwards = 0                     # pieces of the log sent to copies, and those sent compiled
        self.compiled_forwards = 0
        # Appends and their payload bytes answered in the connections' receive loops (those
        # committed at once: _plogserve.c serve_append, and pmem ones after their shared flush:
        # _commitgroup.c), counted there atomically (commit_wait holds no GIL); then the forwards
        # sent there (forward_served, with the GIL), and of them the compiled ones (all).
        self.served_counts = array("Q", [0, 0, 0, 0])
        # Record bytes held in this server's own memory before they are appended (stages, RPC
        # payloads): bounded for the whole server, so many connections cannot take its RAM.
        self._buffered_bytes = 0
        self._notifier_busy = False
        self._notify_after_s = 0.0
        # Buffers batches are framed into, kept for the next (a new one faulted in 400 KB of
        # pages for each batch of 100 x 4 KiB): as many as appends have run at once, at most
        # FRAME_BUFFERS_KEPT.
        self._frame_buffers: list[bytearray] = []
        self._preparer = Preparer(self._prepare_round)      # pmem plogs' memory, ahead of their logs

    def counts(self) -> dict[str, int]:
        """Appends (records), their payload bytes, those the compiled path served, and flushes,
        since this server started."""
        served, served_bytes = self.served_counts[:2]
        with self._counts_lock:
            return {"appends": self.appends + served, "appended_bytes": self.appended_bytes + served_bytes,
                    "compiled_appends": self.fast_appends + served, "flushes": self.flushes}

    def forward_counts(self) -> dict[str, int]:
        """Pieces of logs forwarded to copies, and of them those sent by the compiled call
        (fast_append.send_forward), since this server started."""
        served, served_compiled = self.served_counts[2:]
        with self._counts_lock:
            return {"forwards": self.forwards + served, "compiled_forwards": self.compiled_forwards + served_compiled}

    def _count_forwards(self, forwards: int, compiled: int) -> None:
        with self._counts_lock:
            self.forwards += forwards
            self.compiled_forwards += compiled

    def fast_grants(self, conn: Connection) -> dict[bytes, Any] | None:
        """The dict of a same-host connection whose appends (a client's) or forwards (a home's,
        to a copy here) its receive loop may serve (fast_append.py), or None."""
        return fast_append.grants_of(conn)

    def _frame_buffer(self) -> bytearray | None:
        """A buffer of JOIN_BELOW_BYTES to frame a batch into (give it back to
        _frame_buffers); None where the compiled framing is not built."""
        if not rec.compiled():
            return None
        try:
            return self._frame_buffers.pop()
        except IndexError:
            return bytearray(JOIN_BELOW_BYTES)

    def _take_buffer(self, n: int) -> None:
        with self._counts_lock:
            if self._buffered_bytes + n > MAX_PLOG_BUFFERED_BYTES:
                raise LimitExceeded(f"server {self.server.server_id} holds {self._buffered_bytes} bytes of records "
                                    f"being sent, {n} more would pass its {MAX_PLOG_BUFFERED_BYTES}: try again soon")
            self._buffered_bytes += n

    def _give_buffer(self, n: int) -> None:
        with self._counts_lock:
            self._buffered_bytes -= n
            assert self._buffered_bytes >= 0

    def handlers(self) -> dict[str, Callable[[Connection, dict[str, Any]], Reply]]:
        return {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    def transfers(self) -> dict[str, Callable[..., None]]:
        return {"plog_append_payload": self.transfer_append, "plog_replica_payload": self.transfer_replica_payload}

    # ---- the server's life ----------------------------------------------------------------------

    def restore(self, pool: PoolState, stopping: StopRequest | None = None) -> None:
        """Bring back a persistent pool's plogs (before the pool discards segment files no one
        claimed): their extents re-owned, their bytes scanned up to the first record that does
        not check, everything after it zeroed. ServerUnavailable once `stopping` is set, seen
        between two plogs and each MiB of one (a scan changes nothing, and zeroing past the
        last record is done again by the next start): thousands of plogs, or one large one,
        take longer than a stop waits before it kills."""
        server = self.server
        files = pool.existing_segments()

        def check() -> None:      # between two plogs, and each MiB of one plog's scan
            if stopping is not None and stopping.is_set():
                raise ServerUnavailable(f"stopped while restoring the plogs of pool {pool.name}")

        for path, meta in read_metas(pool.path or ""):
            check()
            if meta is None or not _META_FILE.fullmatch(os.path.basename(path)) or not _meta_ok(meta):
                log.warning("plog metadata %s does not read as one: skipped (left in place)", path)
                continue
            ns, incarnation, name = meta.get("ns"), meta.get("incarnation"), meta.get("name")
            record = server.cluster.get_namespace(pool.name, ns) if isinstance(ns, str) else None
            if record is None or record.incarnation != incarnation:
                log.info("plog %r of %s/%s: its namespace was destroyed while this server was down", name,
                         pool.name, ns)
                remove_meta(path)
                continue
            extents = [Extent(*e) for e in meta["extents"]]
            missing = sorted({e.segment for e in extents} - set(files))
            if missing:
                log.warning("plog %r of %s/%s lost: segment files %s are gone", name, pool.name, ns, missing)
                remove_meta(path)
                continue
            state = server.namespaces.get((pool.name, ns))
            if state is None:
                state = server.namespaces[(pool.name, ns)] = NamespaceState(
                    record, server.server_id, f"s{server.server_id}", server.generations)
            by_segment: dict[int, list[Extent]] = {}
            for e in extents:
                by_segment.setdefault(e.segment, []).append(e)
            for segment, mine in by_segment.items():
                try:
                    pool.allocator.restore(state.key, segment, files[segment], mine)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"pool {pool.name}: cannot restore plog {name!r} of namespace {ns!r}: "
                                          f"{exc}; nothing was changed") from None
                if segment not in pool.segments:
                    pool.adopt(segment)
            plog_id = int(os.path.basename(path).split(".")[0])
            self._next_id = max(self._next_id, plog_id & 0xFFFFFFFF)
            data = LogBytes(pool, [(e.segment, e.offset, e.length) for e in extents], ns,
                            flushes=pool.medium_kind == "pmem")
            core = PlogLog(name, meta["capacity"], meta["nonce"], meta["state"])
            reach = meta.get("reach", core.capacity)        # (written before there was one: all of it)
            if type(reach) is not int or not 0 <= reach <= core.capacity:
                # It only bounds what is read here: a damaged one costs a full scan, not the log.
                log.warning("plog %r of %s/%s: its metadata's reach %.40r is not a length of the log: all of "
                            "its %d bytes are scanned", name, pool.name, ns, reach, core.capacity)
                reach = core.capacity
            # The scan goes as far as the records do (it stops at the first frame that does not
            # check, so it reads the log and no more whatever its bound): a server that kept no
            # reach (an earlier version, rolled back to) may have appended past it.
            found = list(rec.scan(_Window(data, check=check).read, core.capacity, core.nonce, MAX_PLOG_RECORD_BYTES))
            core.recovered(found)
            if core.committed > reach:
                log.warning("plog %r of %s/%s: records past its reach (%d of %d bytes), written by a server that "
                            "kept none: all past them is zeroed", name, pool.name, ns, core.committed, reach)
                reach = core.capacity
            self._zero_tail(data, core.committed, reach, check=check)
            if reach == core.capacity:
                # All past the log is zero now: the next append past it writes a reach in the
                # metadata (one that had none gets one), and the next restart reads up to there.
                reach = core.committed
            role = meta.get("role", HOME)
            plog = _Plog(plog_id, core, state, data, path, meta.get("replicas", 1), meta.get("created_s", 0.0),
                         role, meta.get("home", server.server_id) if role == REPLICA else server.server_id,
                         meta.get("replica_servers", []), reach)
            plog.forwarded = core.committed
            # A copy may have missed appends while it was away; a home may hold appends its
            # copies never got, and a copy may have been sealed meanwhile: see _resync.
            plog.stale = role == REPLICA
            plog.resync = role == HOME and bool(plog.replica_servers)
            self._plogs.setdefault(state.key, {})[name] = plog
            log.info("restored plog %r of %s/%s: %d records, %d bytes, %s", name, pool.name, ns, core.records,
                     core.committed, core.state)
        over = pool.allocator.over_capacity_bytes()
        if over:
            raise InvalidArgument(f"pool {pool.name}'s files hold {over} bytes more than its capacity of "
                                  f"{pool.capacity_bytes} (objects' and plogs' segments): raise its capacity to "
                                  "start; nothing was changed")

    @staticmethod
    def _zero_tail(data: LogBytes, start: int, end: int, force: bool = False,
                   check: Callable[[], None] | None = None) -> None:
        """Zero a recovered log past its last whole record (a torn record, garbage), where it is
        not zero already (`force`: everywhere), so that no later scan can take old bytes for
        records. `check` is called before each MiB (it may raise: what is zeroed stays so)."""
        chunk = 1 << 20
        zeros = memoryview(bytes(chunk))
        touched: set[int] = set()
        at = start
        while at < end:
            if check is not None:
                check()
            n = min(chunk, end - at)
            if force or data.read_bytes(at, n).count(0) != n:
                data.write(at, zeros[:n], touched)
            at += n
        data.flush(touched)

    def announce(self) -> None:
        return None

    def disconnected(self, conn: Connection) -> None:
        stages = conn.services.pop("plog", None) or {}     # staged bytes go with the connection
        for stage in stages.values():
            stage.close()
            self._give_buffer(stage.size)

    def dropped(self, state: NamespaceState) -> None:
        """The namespace is destroyed (under the server's lock): its plogs go, for good."""
        with self._lock:
            plogs = self._plogs.pop(state.key, {})
        gone = [plog for plog in plogs.values() if plog is not None]
        for plog in gone:
            with plog.lock:      # an append that found it whole finishes first (plog.lock is a leaf)
                plog.namespace_gone = plog.deleted = True
            try:
                remove_meta(plog.path)
            except MemfabricError as exc:
                log.warning("%s", exc)
        self._grant_holders.revoke(gone)

    def usage(self, state: NamespaceState) -> dict[str, int]:
        with self._lock:     # each plog once, at its home (copies: held_bytes)
            plogs = [p for p in self._plogs.get(state.key, {}).values() if p is not None and p.role == HOME]
        if not plogs:
            return {}
        return {"plogs": len(plogs), "plogs_sealed": sum(p.core.state != OPEN for p in plogs),
                "plog_records": sum(p.core.records for p in plogs), "plog_bytes": sum(p.core.committed for p in plogs)}

    def held_bytes(self, state: NamespaceState) -> int:
        """The bytes of this server's memory the namespace's plogs hold (audit.py)."""
        with self._lock:
            plogs = [p for p in self._plogs.get(state.key, {}).values() if p is not None]
        return sum(e[2] for p in plogs if not p.released for e in p.data.extents)

    def tick(self) -> None:
        """Once a second, off the request path (one watcher at a time): tell the dead copies of
        open plogs homed here that they are stale, and learn whether one was sealed meanwhile."""
        now = time.monotonic()
        if self._notifier_busy or now < self._notify_after_s:
            return
        with self._lock:
            watched = [p for plogs in self._plogs.values() for p in plogs.values()
                       if p is not None and p.watched and not p.deleted and p.creds is not None]
        if watched:
            self._notifier_busy = True
            self._notify_after_s = now + STALE_NOTICE_RETRY_S
            threading.Thread(target=self._watch_dead_copies, args=(watched,), name="plog-dead-copies",
                             daemon=True).start()

    def _watch_dead_copies(self, plogs: list[_Plog]) -> None:
        try:
            for plog in plogs:
                for server_id in sorted(plog.watched):
                    if plog.core.state != OPEN or plog.deleted:
                        plog.watched.clear()       # sealed or gone here: nothing more to learn
                        break
                    try:
                        with unbounded():
                            reply = self.server._peer(server_id).call("plog_replica_stale", **self._copy_args(plog))
                    except NoSuchObject:
                        plog.watched.discard(server_id)      # gone there: it serves nothing
                        continue
                    except MemfabricError:
                        continue                   # not reachable now: the next round asks again
                    if reply.get("state") == SEALED:
                        # A client sealed the copy (this home away or cut off from it): fencing.
                        with plog.flush_lock:
                            self._fence(plog, server_id)
                        log.warning("plog %r: its copy on server %d was sealed; sealed here too", plog.core.name,
                                    server_id)
        finally:
            self._notifier_busy = False

    def op_plog_replica_stale(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """The home stopped forwarding to this copy: it may lack appends, and says so from now on.
        Answers the copy's state: a sealed copy fences its home."""
        plog = self._plog(conn, m)
        if plog.role != REPLICA:
            raise InvalidArgument(f"plog {plog.core.name!r} is homed on server {self.server.server_id}, not a copy")
        with plog.lock:
            if not plog.stale:
                log.warning("plog %r: this copy is stale (its home, server %d, stopped forwarding to it)",
                            plog.core.name, plog.home)
            plog.stale = True
            return {"state": plog.core.state}

    def close(self) -> None:
        """(The server stops, before its pools close.)"""
        self._preparer.close()

    # ---- finding plogs --------------------------------------------------------------------------

    def _namespace(self, conn: Connection, m: dict[str, Any]) -> tuple[NamespaceState, str]:
        state, (pool, _, _) = self.server._namespace(conn, m)
        return state, pool

    def _info(self, plog: _Plog) -> dict[str, Any]:
        try:      # (outside the plog's lock: the view may ask the cluster service)
            alive: set[int] | None = {s.server_id for s in self.server.view() if s.alive}
        except MemfabricError:
            alive = None
        with plog.lock:
            return plog.info(self.server.server_id, alive)

    def _plog(self, conn: Connection, m: dict[str, Any]) -> _Plog:
        state, creds = self.server._namespace(conn, m)
        name = check_name("plog", m.get("name"))
        with self._lock:
            plog = self._plogs.get(state.key, {}).get(name)
        if plog is None or plog.deleted:
            raise NoSuchObject(f"no plog {name!r} in namespace {state.record.ns!r} on server "
                               f"{self.server.server_id}")
        wanted = m.get("plog_id")
        if wanted is not None and wanted != plog.id:
            raise NoSuchObject(f"plog {name!r} this handle named was deleted (the one of that name now is "
                               "another: ns.plog(name) opens it)")
        if plog.role == HOME and conn.role != "peer":
            plog.creds = creds
        return plog

    # ---- operations -----------------------------------------------------------------------------

    def op_plog_create(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, creds = self.server._namespace(conn, m)
        pool_name = creds[0]
        name = check_name("plog", m.get("name"))
        capacity = m.get("capacity")
        if type(capacity) is not int or not rec.HEADER_BYTES <= capacity <= MAX_PLOG_CAPACITY_BYTES:
            raise InvalidArgument(f"a plog's capacity is an integer of {rec.HEADER_BYTES} to "
                                  f"{MAX_PLOG_CAPACITY_BYTES} bytes, got {capacity!r:.40}")
        replicas = m.get("replicas", 1)
        if type(replicas) is not int or not 1 <= replicas:
            raise InvalidArgument(f"replicas is a positive integer, got {replicas!r:.40}")
        if replicas > MAX_PLOG_REPLICAS:
            raise InvalidArgument(f"a plog has at most {MAX_PLOG_REPLICAS} replicas, got {replicas}")
        pool = self.server.pools[pool_name]
        if not pool.persistent:
            raise InvalidArgument(f"pool {pool_name!r} is {pool.medium_kind}: a plog must survive its server, so it "
                                  "lives on a pmem or ramdisk pool (create the namespace in one, e.g. "
                                  "`memfabric up --pool logs:pmem:256MiB`)")
        replica_servers = self._replica_servers(pool_name, replicas)

        def make(data: LogBytes) -> _Plog:
            with self._lock:
                self._next_id += 1
                plog_id = (self.server.epoch << 32) + self._next_id
            plog = _Plog(plog_id, PlogLog(name, capacity, secrets.randbits(64)), state, data,
                         meta_path(pool.path or "", plog_id), replicas, time.time(), HOME, self.server.server_id,
                         replica_servers)
            plog.creds = creds
            return plog
        plog = self._new_plog(state, pool_name, name, capacity, make, copies=self._make_copies)
        return {"info": self._info(plog)}

    def _new_plog(self, state: NamespaceState, pool_name: str, name: str, capacity: int,
                  make: Callable[[LogBytes], _Plog], copies: Callable[[_Plog], None] | None = None) -> _Plog:
        """A plog here, home or copy: `name` claimed in the namespace, `capacity` bytes of the
        pool reserved, the plog made over them (`make`), its meta file written, then its
        copies made elsewhere (`copies`, a home's). Any step that fails undoes the others; a
        namespace destroyed meanwhile is NO_SUCH_NAMESPACE."""
        pool = self.server.pools[pool_name]
        with self._lock:
            mine = self._plogs.setdefault(state.key, {})
            if name in mine:
                raise InvalidArgument(f"plog {name!r} already exists in namespace {state.record.ns!r} on server "
                                      f"{self.server.server_id} (ns.plog(name) opens it)")
            if len(mine) >= MAX_PLOGS_PER_NAMESPACE:
                raise LimitExceeded(f"namespace {state.record.ns!r} has {len(mine)} plogs on server "
                                    f"{self.server.server_id}, the most it may")
            mine[name] = None  # type: ignore[assignment]   # claimed while its memory is made
        try:
            extents = self.server._reserve_local(state, pool_name, capacity)
            try:
                data = LogBytes(pool, [(e.segment, e.offset, e.length) for e in extents], state.record.ns,
                                flushes=pool.medium_kind == "pmem")
                if data.flushes:      # its first part made ready (limits.PLOG_PREPARE_AT_CREATE_BYTES)
                    self._zero_tail(data, 0, first_ready(capacity), force=True)
                plog = make(data)
                if data.flushes:
                    plog.ready_end = first_ready(capacity)
                write_meta(plog.path, plog.meta())
                if copies is not None:
                    try:
                        copies(plog)
                    except BaseException:
                        remove_meta(plog.path)
                        raise
            except BaseException:
                self._release_extents(state, pool_name, extents)
                raise
        except BaseException:
            with self._lock:
                self._plogs.get(state.key, {}).pop(name, None)
            raise
        with self._lock:
            made = self._plogs.get(state.key) is mine and not state.closed
            if made:
                mine[name] = plog
        if made:
            return plog
        remove_meta(plog.path)          # the namespace was destroyed meanwhile
        raise NoSuchNamespace(f"namespace {state.record.ns!r} was destroyed meanwhile")

    def _replica_servers(self, pool_name: str, replicas: int) -> list[int]:
        """Where the copies of a new plog of `replicas` go: other live servers of the pool, the
        ones with the most free memory in it first."""
        if replicas == 1:
            return []
        others = [s for s in self.server.view(fresh=True)
                  if s.alive and s.server_id != self.server.server_id and pool_name in s.pools]
        if len(others) < replicas - 1:
            raise InvalidArgument(f"replicas={replicas} needs {replicas} live servers giving memory to pool "
                                  f"{pool_name!r}, each holding one copy; it has {len(others) + 1}")
        others.sort(key=lambda s: (-int(s.pools[pool_name].get("free_bytes", 0) or 0), s.server_id))
        return [s.server_id for s in others[:replicas - 1]]

    def _copy_args(self, plog: _Plog) -> dict[str, Any]:
        assert plog.creds is not None
        pool, ns, sec = plog.creds
        return {"pool": pool, "ns": ns, "sec": sec, "name": plog.core.name, "plog_id": plog.id}

    def _make_copies(self, plog: _Plog) -> None:
        """Create the plog's copies on its replica servers; all of them, or none (and raise)."""
        made = []
        try:
            for server_id in plog.replica_servers:
                with allowing(prepare_allowance_s(plog.core.capacity)):   # the copy zeroes and flushes it
                    self.server._peer(server_id).call(
                        "plog_replica_create", **self._copy_args(plog), capacity=plog.core.capacity,
                        nonce=plog.core.nonce, home=plog.home, replica_servers=plog.replica_servers,
                        replicas=plog.replicas)
                made.append(server_id)
        except MemfabricError as exc:
            self._drop_copies(plog, made)
            raise type(exc)(f"cannot make a copy of plog {plog.core.name!r} on server {server_id}: "
                            f"{exc.message}") from None
        except BaseException:
            self._drop_copies(plog, made)
            raise

    def _drop_copies(self, plog: _Plog, servers: list[int]) -> None:
        for server_id in servers:
            try:
                with unbounded():
                    self.server._peer(server_id).call("plog_delete", **self._copy_args(plog))
            except MemfabricError as exc:
                log.info("copy of plog %r on server %d not deleted: %s", plog.core.name, server_id, exc)

    def op_plog_replica_create(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A home's new plog: its copy here, empty, with the home's nonce and id."""
        state, creds = self.server._namespace(conn, m)
        pool_name = creds[0]
        name = check_name("plog", m.get("name"))
        capacity, nonce, plog_id, home = m.get("capacity"), m.get("nonce"), m.get("plog_id"), m.get("home")
        replica_servers, replicas = m.get("replica_servers"), m.get("replicas")
        if not (type(capacity) is int and rec.HEADER_BYTES <= capacity <= MAX_PLOG_CAPACITY_BYTES
                and type(nonce) is int and 0 <= nonce < 1 << 64 and type(plog_id) is int and plog_id > 0
                and type(home) is int
                and isinstance(replica_servers, list) and all(type(x) is int for x in replica_servers)
                and type(replicas) is int and 1 < replicas <= MAX_PLOG_REPLICAS):
            raise InvalidArgument("plog_replica_create: capacity, nonce, plog_id, home, replica_servers, replicas")
        pool = self.server.pools[pool_name]
        if not pool.persistent:
            raise InvalidArgument(f"pool {pool_name!r} is {pool.medium_kind} on server {self.server.server_id}")
        self._new_plog(state, pool_name, name, capacity, lambda data: _Plog(
            plog_id, PlogLog(name, capacity, nonce), state, data, meta_path(pool.path or "", plog_id), replicas,
            time.time(), REPLICA, home, replica_servers))
        return {}

    def op_plog_replica_append(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A piece of the home's log, `data` at `at` (where the pieces received so far end);
        with `last`, the pieces since this copy's log end are whole records: checked, written
        durably, committed. A gap, or a frame that does not check, is refused (and the pieces
        since the log end dropped)."""
        plog = self._plog(conn, m)
        at, data, source, last = m.get("at"), m.get("data"), m.get("source"), m.get("last") is True
        if type(at) is not int or (type(data) is bytes) == (source is not None):
            raise InvalidArgument("plog_replica_append takes at (int), and data (bytes) or source (where a "
                                  "same-host home holds them)")
        if source is not None:       # read before the lock: another server's files
            data, why = self._pull(plog, m, source)
            if data is None:
                return {"pulled": False, "why": why}
        return self._take_forward(conn, plog, m, at, data, last)

    def transfer_replica_payload(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                                 deadline: float) -> None:
        """plog_replica_payload over RPC: a forward past one piece from a home on another host,
        its bytes (up to PLOG_PULL_BYTES) as the payload, received into one buffer and taken as
        plog_replica_append takes `data`: one message where pieces took a round trip each."""
        started_s = time.perf_counter()
        if conn.role != "peer":
            raise PermissionDenied("plog_replica_payload is for the servers of the cluster")
        until = deadline_for(m.get("budget_s"))      # (transfers do not pass through Server.serve)
        plog = self._plog(conn, m)
        at = m.get("at")
        if type(at) is not int or not 0 < payload_len <= PLOG_PULL_BYTES:
            raise InvalidArgument(f"plog_replica_payload takes at (int) and 1-{PLOG_PULL_BYTES} bytes of payload, "
                                  f"got {payload_len}")
        self._take_buffer(payload_len)
        try:
            data = self._forward_buffer(payload_len)
            frames.recv_into_exact(data, deadline)
            try:        # the payload is read: answered here
                with serving_until(until):
                    reply = {"id": m["id"], **self._take_forward(conn, plog, m, at, data, m.get("last") is True)}
                code = None
            except MemfabricError as exc:
                reply, code = wire.error_reply(m["id"], exc), exc.code
        finally:
            self._give_buffer(payload_len)
        # (counted as the operation it is: plog_replica_append with its bytes as the payload)
        self.server.metrics.observe("plog_replica_append", code, time.perf_counter() - started_s)
        frames.send(reply)

    def _take_forward(self, conn: Connection, plog: _Plog, m: dict[str, Any], at: int, data: Any,
                      last: bool) -> Reply:
        """A forward's bytes (`data`, any buffer) at `at`, under the copy's rules (see
        op_plog_replica_append)."""
        core = plog.core
        with plog.lock:
            if plog.deleted:      # (found before a client deleted it): its memory is the namespace's again
                raise _gone(plog)
            if plog.role != REPLICA:
                raise InvalidArgument(f"plog {core.name!r} is homed on server {self.server.server_id}, not a copy")
            if plog.stale:
                raise ServerUnavailable(f"the copy of plog {core.name!r} on server {self.server.server_id} is stale "
                                        "(it restarted and may lack appends)")
            if core.state != OPEN:
                raise Sealed(f"plog {core.name!r} was sealed (its copy on server {self.server.server_id})")
            if plog.receiving < core.written or at == core.written:
                plog.receiving = core.written      # (a forward from the log's end drops unfinished pieces)
            if at != plog.receiving or at + len(data) > core.capacity:
                received, plog.receiving = plog.receiving, core.written
                raise InvalidArgument(f"the copy of plog {core.name!r} on server {self.server.server_id} takes bytes "
                                      f"at {received}, got {len(data)} at {at}: no gaps")
            touched: set[int] = set()
            try:
                if data:
                    self._raise_reach(plog, at + len(data))
                    plog.data.write(at, memoryview(data), touched)
                plog.receiving = at + len(data)
                if not last:
                    plog.touched |= touched
                    return {}
                start, end = core.written, plog.receiving
                if at == start:       # the whole forward came in this message: checked in memory
                    view = memoryview(data)
                    read = lambda o, n: view[o - start:o - start + n]      # noqa: E731
                else:
                    read = _Window(plog.data, end).read
                found = list(rec.scan(read, end, core.nonce, MAX_PLOG_RECORD_BYTES,
                                      start=start, first_index=core.next_index))
                if not found or found[-1][0] + rec.frame_bytes(found[-1][1]) != end:
                    raise InvalidArgument(f"the bytes [{start}, {end}) sent to the copy of plog {core.name!r} are "
                                          "not whole records that check")
                core.mark_written([f[0] for f in found], [f[1] for f in found])
                plog.data.flush(touched | plog.touched)
                plog.touched = set()
                core.commit(end)
                plog.flushed_bytes = end - start
                self._prepare_ahead(plog)
            except BaseException:
                # Nothing of it may look like a record to a later scan or check.
                plog.receiving = core.written
                try:
                    plog.data.write(core.written, memoryview(bytes(rec.HEADER_BYTES)), set())
                except MemfabricError:
                    pass
                raise
        # the home's next forwards: compiled (fast_append.py)
        fast_append.grant_replica(conn, plog, m, self._grant_holders)
        return {"length": core.committed}

    def _forward_buffer(self, n: int) -> memoryview:
        """`n` bytes of this thread's buffer for a forward's bytes (a pull's, an RPC payload's),
        kept: a new one's pages cost a fault each on the first write, which doubled the time of
        a 1 MiB pull. At most PLOG_PULL_BYTES, per connection thread; nothing holds it past the
        request."""
        buffer = getattr(self._forward_buffers, "buffer", None)
        if buffer is None or len(buffer) < n:
            buffer = self._forward_buffers.buffer = bytearray(max(n, min(PLOG_PULL_BYTES, 1 << 20)))
        return memoryview(buffer)[:n]

    def _pull(self, plog: _Plog, m: dict[str, Any], source: Any) -> tuple[memoryview | None, str]:
        """The bytes a same-host home's forward names (`source`: [segment, offset, length] places
        in its segment files), read here through this server's link to the home and the fds of
        the namespace's segments it lends (op_segments: one namespace's for their whole life);
        then checked as any forward's bytes. (None, why) when they cannot be read (the home on
        another host, a segment it no longer lends, no fds left): nothing changed, and the home
        sends pieces instead."""
        if (not isinstance(source, list) or not 0 < len(source) <= MAX_PLOG_PULL_PLACES
                or not all(isinstance(p, list) and len(p) == 3 and all(type(v) is int and 0 <= v < 1 << 63 for v in p)
                           for p in source)
                or not 0 < sum(p[2] for p in source) <= PLOG_PULL_BYTES):
            raise InvalidArgument(f"source must be 1-{MAX_PLOG_PULL_PLACES} [segment, offset, length] places "
                                  f"of 1-{PLOG_PULL_BYTES} bytes in all")
        total = sum(p[2] for p in source)
        view, at = self._forward_buffer(total), 0
        try:
            link = self.server._peer(plog.home, lane="pull")     # (not the main link: see _peer)
            if not link.is_local:
                return None, f"its home, server {plog.home}, is on another host"
            creds = (m["pool"], m["ns"], m["sec"])
            for segment, offset, length in source:
                fd = link.segment_fd(creds, segment)
                end = at + length
                while at < end:
                    n = os.preadv(fd, [view[at:end]], offset)
                    if n <= 0:
                        return None, f"segment {segment} of server {plog.home} ends before byte {offset}"
                    at, offset = at + n, offset + n
        except MemfabricError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return None, f"reading server {plog.home}'s segment: {exc.strerror}"
        return view, ""

    def _release_extents(self, state: NamespaceState, pool_name: str, extents: list[Extent]) -> None:
        server = self.server
        with server.lock:
            if server.namespaces.get((pool_name, state.record.ns)) is state and not state.closed:
                server.pools[pool_name].allocator.release(state.key, extents, time.monotonic())

    def op_plog_info(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """The plog's info; with `layout`, where its bytes lie (extents of the namespace's
        segments) and its nonce: a same-host client reads committed records there itself."""
        plog = self._plog(conn, m)
        reply: dict[str, Any] = {"info": self._info(plog)}
        if m.get("layout") is True:
            self._check_whole(plog)
            reply["extents"] = [list(e) for e in plog.data.extents]
            reply["nonce"] = plog.core.nonce
        return reply

    def op_plog_list(self, conn: Connection, m: dict[str, Any]) -> Reply:
        state, _ = self._namespace(conn, m)
        with self._lock:
            plogs = [p for p in self._plogs.get(state.key, {}).values() if p is not None and not p.deleted]
        infos = []
        for plog in sorted(plogs, key=lambda p: p.core.name):
            infos.append(self._info(plog))
        return {"plogs": infos}

    # ---- appends ----------------------------------------------------------------------------

    def op_plog_append(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Records in the request (`records`, a list of bytes), or written into the
        connection's shared stage `shared` (their `lengths`)."""
        plog = self._plog(conn, m)
        shared = m.get("shared")
        if shared is not None:
            data = None
            try:
                data, lengths = self._shared_batch(conn, shared, m.get("lengths"))
                offsets = self._append(plog, data, lengths, shared=True)
                fast_append.grant(conn, plog, m, self.served_counts, self._flush_to,   # its next batches: compiled
                                  self._grant_holders)
                return {"offsets": offsets}
            finally:
                if data is not None:
                    data.release()            # its stage may be closed now
                self._drop_if_large(conn, shared)
        records = m.get("records")
        if not isinstance(records, list) or not all(type(r) is bytes for r in records):
            raise InvalidArgument("records must be a list of bytes")
        lengths = _lengths([len(r) for r in records], None)
        offsets = self._append(plog, memoryview(b"".join(records)), lengths)
        if len(records) == 1:
            fast_append.grant(conn, plog, m, self.served_counts, self._flush_to,   # its next ones: compiled
                              self._grant_holders)
        return {"offsets": offsets}

    def fast_finish(self, got: tuple[Any, ...], started_s: float) -> bytes:
        """A same-host append the connection's receive loop wrote (fast_append.py; `got`:
        append_one's tuple, or append_batch's with its record count last), committed
        (_flush_to: forwarded, flushed, shared) and counted: the reply's bytes."""
        reply, grant, end, committed, payload_bytes, request_id = got[:6]
        records = got[6] if len(got) > 6 else 1
        code = None
        try:
            if not committed:
                self._flush_to(grant.plog, end)
        except MemfabricError as exc:
            code = exc.code
            reply = wire.encode(wire.error_reply(request_id, exc))
        except Exception as exc:           # as Server.serve answers a bug: logged, and the server goes on
            code = InternalError.code
            self.server.limited_log.exception("bug in plog_append (compiled)", "plog_append failed")
            reply = wire.encode(wire.error_reply(request_id, InternalError(
                f"internal error in 'plog_append': {exc!r}")))
        else:
            with self._counts_lock:
                self.appends += records
                self.appended_bytes += payload_bytes
                self.fast_appends += records
        self.server.metrics.observe("plog_append", code, time.perf_counter() - started_s)
        return reply

    def transfer_append(self, conn: Connection, m: dict[str, Any], payload_len: int, frames: Any,
                        deadline: float) -> None:
        """plog_append_payload over RPC: the records back to back as the payload, received into
        one buffer, then appended like any other."""
        until = deadline_for(m.get("budget_s"))      # (transfers do not pass through Server.serve)
        plog = self._plog(conn, m)
        lengths = _lengths(m.get("lengths"), payload_len)
        self._take_buffer(payload_len)
        try:
            buffer = bytearray(payload_len)
            frames.recv_into_exact(memoryview(buffer), deadline)
            try:
                with serving_until(until):
                    reply: dict[str, Any] = {"id": m["id"], "offsets": self._append(plog, memoryview(buffer), lengths)}
            except MemfabricError as exc:         # the payload is read: answer here
                reply = wire.error_reply(m["id"], exc)
        finally:
            self._give_buffer(payload_len)
        frames.send(reply)

    def op_plog_append_payload(self, conn: Connection, m: dict[str, Any]) -> Reply:
        raise InvalidArgument("plog_append_payload carries its records as a payload: RPC only "
                              "(on this host: plog_append, with a shared stage for large batches)")

    def _append(self, plog: _Plog, data: memoryview, lengths: list[int], shared: bool = False) -> list[int]:
        """Write records (`data`: their payloads back to back) at the end of the log, durably;
        the offsets of their payloads. `shared`: `data` is memory the client may write at any
        moment (its stage): framed from a copy, so each record's CRC is that of its bytes."""
        core = plog.core
        with plog.lock:
            if plog.deleted:
                raise _gone(plog)
            if plog.role != HOME:
                raise ServerUnavailable(f"server {self.server.server_id} holds a copy of plog {core.name!r}; appends go "
                                        f"to its home, server {plog.home} (when it is dead, seal the plog and read "
                                        "it here)")
            if plog.broken is not None:
                raise IOError_(f"plog {core.name!r} takes no appends: a flush failed ({plog.broken}); "
                               "its committed records can be read, and a restart of its server scans it again")
            starts = core.plan(lengths)
            total = starts[-1] + rec.frame_bytes(lengths[-1]) - starts[0]
            self._raise_reach(plog, starts[0] + total)
            try:
                buffer = self._frame_buffer() if total <= JOIN_BELOW_BYTES else None
                if buffer is None and shared:     # Python frames it below: from a copy that cannot change
                    data = memoryview(data.tobytes())
                if buffer is not None:
                    try:
                        rec.frame_into(core.nonce, core.next_index, data, lengths, buffer)
                        plog.data.write(starts[0], memoryview(buffer)[:total], plog.touched)
                    finally:
                        if len(self._frame_buffers) < FRAME_BUFFERS_KEPT:
                            self._frame_buffers.append(buffer)
                elif total <= JOIN_BELOW_BYTES:
                    framed = rec.framed(core.nonce, core.next_index, data, lengths)
                    plog.data.write(starts[0], memoryview(framed), plog.touched)
                else:
                    at = starts[0]
                    for part in rec.frames(core.nonce, core.next_index, data, lengths):
                        plog.data.write(at, memoryview(part), plog.touched)
                        at += len(part)
            except BaseException:
                # Part of the batch may be in: its first header goes, so no scan after a crash
                # finds a record of an append that failed (the next append writes over it anyway).
                try:
                    plog.data.write(starts[0], memoryview(bytes(rec.HEADER_BYTES)), plog.touched)
                except MemfabricError:
                    pass
                raise
            committed_before = core.committed
            end = core.mark_written(starts, lengths)
            # Nothing to flush or forward, and nothing else written but not committed: no
            # flusher is between taking its target and committing it (as append_one's rule).
            commit_here = not plog.data.flushes and not plog.replica_servers and committed_before == starts[0]
            if commit_here:
                core.commit(end)
        if not commit_here:
            self._flush_to(plog, end)
        with self._counts_lock:
            self.appends += len(lengths)
            self.appended_bytes += data.nbytes
        return frame_starts(starts[0] + rec.HEADER_BYTES, lengths)[0]     # where their payloads begin

    @staticmethod
    def _raise_reach(plog: _Plog, end: int) -> None:
        """Before bytes up to `end` are written (under the plog's lock): the log's reach in its
        metadata goes past them first, so a restart after a crash scans and zeroes them."""
        if end <= plog.reach:
            return
        before, plog.reach = plog.reach, next_reach(end, plog.core.capacity)
        try:
            write_meta(plog.path, plog.meta())
        except BaseException:
            plog.reach = before
            raise

    def _prepare_ahead(self, plog: _Plog) -> None:
        """Under the plog's lock, after its log grew: a round of making its memory ready is
        queued when the log comes close to what is ready (pmem, an open log, small flushes)."""
        end = max(plog.core.written, plog.receiving)
        if (plog.data.flushes and not plog.preparing and plog.flushed_bytes < PLOG_PREPARE_FLUSH_MOST_BYTES
                and end >= plog.prepare_from and plog.core.state == OPEN
                and not plog.deleted and plog.broken is None and wants_round(end, plog.ready_end, plog.core.capacity)):
            plog.preparing = self._preparer.submit(plog)

    def _prepare_round(self, plog: _Plog) -> None:
        """One round (the Preparer's thread): zeros written past the log's end, a piece at a
        time (_ready_piece), then flushed. Meanwhile the plog's memory is held as a read holds
        it (a delete frees it after the round, and waits for that)."""
        with plog.lock:
            capacity, log_end = plog.core.capacity, max(plog.core.written, plog.receiving)
            start = max(plog.ready_end, log_end)       # (appends may have gone past what is ready)
            # (as _prepare_ahead asks: queued while its plog's last round was under way, that
            # one may have been outrun since)
            go = (not self._preparer.stopping() and not plog.deleted and plog.broken is None
                  and plog.core.state == OPEN and log_end >= plog.prepare_from
                  and wants_round(log_end, plog.ready_end, capacity))
            plog.preparing = False
            if not go:
                return
            plog.readers += 1
            plog.round_under_way = True
        end, touched, outran, done, failed = round_end(start, capacity), set(), False, False, None
        try:
            at = start
            while at < end and not outran:
                if self._preparer.stopping() or plog.deleted:
                    return                  # (called off)
                n = min(PLOG_PREPARE_PIECE_BYTES, end - at)
                outran = not self._ready_piece(plog, at, n, touched)
                at += n
            plog.data.flush(touched)
            done = not outran
        except MemfabricError as exc:
            failed = exc
        finally:
            with plog.lock:
                if done:
                    plog.ready_end = max(plog.ready_end, end)
                elif outran:
                    plog.prepare_from = plog.core.written + PLOG_PREPARE_SKIP_BYTES
                if isinstance(failed, IOError_) and not plog.deleted:
                    # Its flush shares the segment files' error state with the appends' flushes:
                    # an EIO it took would not be seen by theirs, so no append is taken after it
                    # (as after a failed flush of theirs; an outrun round flushes too).
                    plog.broken = f"making its memory ready: {failed}"
            self._done_reading(plog)        # (deleted meanwhile: its memory is freed here)
            with plog.lock:
                plog.round_under_way = False      # (over once its memory is freed: op_plog_delete waits)
                plog.round_over.notify_all()
                if done:
                    self._prepare_ahead(plog)     # (appends went on meanwhile)
        if failed is not None and not plog.deleted and not self._preparer.stopping():
            log.warning("plog %r: its memory past %d bytes was not made ready: %s%s", plog.core.name, start, failed,
                        "; it takes no more appends" if plog.broken else "")

    _ZEROS = memoryview(bytes(PLOG_PREPARE_PIECE_BYTES))

    def _ready_piece(self, plog: _Plog, at: int, n: int, touched: set[int]) -> bool:
        """Zeros written over [at, at + n) of the log, but where the log has written: under its
        lock, as every write of the log's bytes is, so that none lands after them. False when
        the log has gone past the piece's end (it outran the round)."""
        with plog.lock:
            if plog.deleted:                # (a delete is waiting for the round to end)
                raise ServerUnavailable("the round was called off")
            start = max(at, plog.core.written, plog.receiving)
            if start < at + n:
                plog.data.write(start, self._ZEROS[:at + n - start], touched)
            return start < at + n

    def _flush_to(self, plog: _Plog, end: int) -> None:
        """Return once bytes up to `end` are committed: flushed by us, or by a flusher that
        started after they were written (group commit)."""
        with plog.flush_lock:
            if plog.core.committed >= end:
                return                 # another appender's flush covered ours
            if plog.broken is not None:
                raise IOError_(f"plog {plog.core.name!r}: a flush failed ({plog.broken}); this append's fate "
                               "on the disk is unknown")
            if end > plog.core.written:
                raise Sealed(_fenced_message(plog))
            with plog.lock:
                target = plog.core.written
                touched, plog.touched = plog.touched, set()
            try:
                flushed = plog.data.flush(touched)
            except MemfabricError as exc:
                with plog.lock:
                    plog.broken = str(exc)
                raise
            except BaseException:
                with plog.lock:
                    plog.touched |= touched
                raise
            if plog.replica_servers and target > plog.forwarded:
                self._forward(plog, target)
            with plog.lock:
                plog.flushed_bytes = target - plog.core.committed
                plog.core.commit(target)
                self._prepare_ahead(plog)
            if flushed:
                with self._counts_lock:
                    self.flushes += 1

    # ---- replicas ---------------------------------------------------------------------------------

    def _live_copies(self, plog: _Plog) -> list[int]:
        """The copies still forwarded to; those the cluster sees dead are marked dead here."""
        try:
            alive = {s.server_id for s in self.server.view() if s.alive}
        except MemfabricError:
            alive = None
        for server_id in plog.replica_servers:
            if alive is not None and server_id not in alive and server_id not in plog.dead:
                self._mark_dead(plog, server_id, "the cluster sees its server dead")
        return [s for s in plog.replica_servers if s not in plog.dead]

    def _mark_dead(self, plog: _Plog, server_id: int, why: str) -> None:
        plog.dead.add(server_id)
        plog.watched.add(server_id)
        log.warning("plog %r: its copy on server %d is dead (%s); appends go on with %d of %d copies",
                    plog.core.name, server_id, why, plog.replicas - len(plog.dead), plog.replicas)

    def _forward(self, plog: _Plog, target: int) -> None:
        """Bring every live copy to `target` (under the plog's flush lock): the log's bytes from
        where the last forward ended, in pieces, at the same offsets. A copy that fails is dead;
        one that says SEALED fences the plog (_fence), and this raises SEALED."""
        if plog.resync:
            self._resync(plog)
        start = plog.forwarded
        args = self._copy_args(plog)
        if plog.forward_head is None or plog.forward_head[0] != plog.creds:
            plog.forward_head = plog.creds, fast_append.forward_head(args), len(args) + 1
        _, head, head_entries = plog.forward_head
        live = self._live_copies(plog)
        view = getattr(self.server, "_view", None)          # the one _live_copies just read
        view_ttl_s = getattr(self.server, "VIEW_TTL_S", None)
        plog.fast_forward = None
        for server_id in live:
            forwards = compiled_forwards = 0
            try:
                with unbounded():               # bounded by the peer link's timeout, not one client's budget
                    link = self.server._peer(server_id)
                    whole = self._forward_large(plog, server_id, link, args, start, target)
                    forwards += whole
                    at = start
                    while not whole and at < target:       # in pieces (target > start: _flush_to)
                        n = min(PLOG_REPLICA_PIECE_BYTES, target - at)
                        data, last = plog.data.read_bytes(at, n), at + n == target
                        compiled = fast_append.send_forward(link, head, head_entries, args, at, data, last)
                        if not compiled:
                            link.call("plog_replica_append", **args, at=at, data=data, last=last)
                        forwards += 1
                        compiled_forwards += compiled
                        at += n
            except MemfabricError as exc:
                self._forward_failed(plog, server_id, exc)
            else:
                if (len(live) == 1 and compiled_forwards == forwards and not plog.data.flushes and view is not None
                        and view_ttl_s is not None):
                    # The next appends' forwards, to this copy alone: in the receive loop
                    # (_plogforward.c forward_served), while all this still holds.
                    plog.fast_forward = fast_append.Forwarder(self, plog, self.server, server_id, link, view,
                                                              view_ttl_s, head, head_entries, args)
            finally:
                self._count_forwards(forwards, compiled_forwards)
        plog.forwarded = target

    def _forward_large(self, plog: _Plog, server_id: int, link: Any, args: dict[str, Any], start: int,
                       target: int) -> int:
        """A forward past one piece, in messages of up to PLOG_PULL_BYTES, the copy committing
        with the last: to a same-host copy, where its bytes lie in this home's segment files
        (`source`), which the copy reads there itself (op_plog_replica_append); to a copy on
        another host, the bytes as the RPC payload (transfer_replica_payload). One round trip
        each, against one per piece through both sides' Python. The number of messages; 0 when
        not taken, when a same-host copy could not read these files, or when a copy on another
        host had no room to buffer a payload (then the pieces, from `start`: a forward from the
        log's end drops what the copy holds unfinished)."""
        if target - start <= PLOG_REPLICA_PIECE_BYTES or server_id in plog.no_pull:
            return 0
        at, sent = start, 0
        while at < target:
            if link.is_local:
                places = plog.data.places(at, min(PLOG_PULL_BYTES, target - at))[:MAX_PLOG_PULL_PLACES]
                n = sum(p[2] for p in places)
                reply = link.call("plog_replica_append", **args, at=at, source=[list(p) for p in places],
                                  last=at + n == target)
                if reply.get("pulled") is False:
                    log.warning("plog %r: its copy on server %d cannot read this home's files (%s); forwarding "
                                "to it in pieces", plog.core.name, server_id, reply.get("why"))
                    plog.no_pull.add(server_id)
                    return 0
            else:
                n = min(PLOG_PULL_BYTES, target - at)
                timeout_s = call_timeout_s(link.timeout_s)
                try:
                    link.request("plog_replica_payload", {**args, "at": at, "last": at + n == target,
                                                          "budget_s": timeout_s},
                                 payload=[memoryview(plog.data.read_bytes(at, n))], timeout_s=timeout_s)
                except LimitExceeded:
                    # The copy's server holds all the record bytes being sent it may (its
                    # clients' batches in flight): no reason to call the copy dead. This
                    # forward goes in pieces, which hold no such buffer.
                    return 0
            at += n
            sent += 1
        return sent

    def _forward_failed(self, plog: _Plog, server_id: int, exc: MemfabricError) -> None:
        """A forward to the copy on `server_id` failed with `exc` (under the plog's flush lock):
        the copy is dead; or it was sealed, and so is the plog (_fence), and this raises SEALED."""
        if isinstance(exc, Sealed):
            self._fence(plog, server_id)
            raise Sealed(_fenced_message(plog)) from None
        self._mark_dead(plog, server_id, str(exc))

    def _fence(self, plog: _Plog, sealed_on: int | None = None) -> None:
        """A copy (on `sealed_on`) was sealed: seal here too and drop the appends not committed
        (their callers get SEALED), so that nothing appended after the seal is ever read
        anywhere; the other live copies too, which a forward of them may have reached first."""
        if plog.fenced_by is None:
            plog.fenced_by = sealed_on
        self._fence_here(plog)
        if plog.role != HOME or plog.creds is None:
            return
        for server_id in self._live_copies(plog):
            if server_id == sealed_on:
                continue
            try:
                with unbounded():
                    self.server._peer(server_id).call("plog_seal", **self._copy_args(plog),
                                                      fence_at=plog.core.committed)
            except MemfabricError as exc:
                self._mark_dead(plog, server_id, f"fence not taken: {exc}")

    def _fence_here(self, plog: _Plog) -> None:
        with plog.lock:
            dropped_from = plog.core.committed
            plog.core.abandon()
            plog.forwarded = min(plog.forwarded, dropped_from)
            if plog.core.state == OPEN:
                plog.core.seal()
                try:
                    write_meta(plog.path, plog.meta())
                except MemfabricError as exc:
                    log.warning("plog %r: seal not written: %s", plog.core.name, exc)
            try:      # the first dropped header: no scan after a restart finds them
                self._zero_tail(plog.data, dropped_from, min(plog.core.capacity, dropped_from + rec.HEADER_BYTES))
            except MemfabricError as exc:
                log.warning("plog %r: dropped appends not zeroed: %s", plog.core.name, exc)

    def _resync(self, plog: _Plog) -> None:
        """After this home's restart, before it forwards again: a copy that was sealed seals it
        (fencing); one whose log is not this one's (shorter, stale, gone) is dead."""
        plog.resync = False
        for server_id in self._live_copies(plog):
            try:
                with unbounded():
                    info = self.server._peer(server_id).call("plog_info", **self._copy_args(plog))["info"]
            except MemfabricError as exc:
                self._mark_dead(plog, server_id, f"not reached after the home restarted: {exc}")
                continue
            if info.get("state") == SEALED:
                self._fence(plog, server_id)
                raise Sealed(f"plog {plog.core.name!r} was sealed on server {server_id} while its home was away")
            if info.get("stale") or info.get("length") != plog.forwarded:
                self._mark_dead(plog, server_id, f"its copy holds {info.get('length')} bytes, the home "
                                f"{plog.forwarded}{' (stale)' if info.get('stale') else ''}")

    # ---- large batches over IPC: shared stages ---------------------------------------------------

    @staticmethod
    def _stages(conn: Connection) -> dict[int, _SharedStage]:
        mine = conn.services.get("plog")
        if mine is None:
            mine = conn.services["plog"] = {}
        return mine

    @staticmethod
    def _room_for_stage(stages: dict[int, _SharedStage], length: int) -> None:
        staged = sum(s.size for s in stages.values())
        if len(stages) >= MAX_PLOG_STAGES_PER_CLIENT or staged + length > MAX_PLOG_STAGED_BYTES:
            raise LimitExceeded(f"this connection has {len(stages)} stages of {staged} bytes: at most "
                                f"{MAX_PLOG_STAGES_PER_CLIENT} of {MAX_PLOG_STAGED_BYTES} bytes in all")

    @staticmethod
    def _stage_token(conn: Connection) -> int:
        """A new stage's number. Never reused on a connection: a client dropping a stage it
        gave up on twice (its own drop, and its late reply's) must not drop a newer one."""
        token = conn.services["plog_stage_count"] = conn.services.get("plog_stage_count", 0) + 1
        return token

    def op_plog_share_stage(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """A shared stage of at least `length` bytes for this connection's record batches
        (same host only: its memfd is handed over), in place of the one numbered `replaces`
        (dropped first, if the connection has it)."""
        self.server._namespace(conn, m)     # only a client of a namespace stages, with its secId
        stages = self._stages(conn)
        length, replaces = m.get("length"), m.get("replaces")
        if type(length) is not int or not 0 < length <= MAX_PLOG_STAGED_BYTES:
            raise InvalidArgument(f"a stage holds 1 to {MAX_PLOG_STAGED_BYTES} bytes, got {length!r:.40}")
        if replaces is not None:
            if type(replaces) is not int:
                raise InvalidArgument(f"replaces names a stage by its number, got {replaces!r:.40}")
            old = stages.pop(replaces, None)
            if old is not None:
                old.close()
                self._give_buffer(old.size)
        # Whole pages, and room to grow: a client whose batches grow asks again rarely.
        size = min(MAX_PLOG_STAGED_BYTES, (max(length, PLOG_SHARED_STAGE_MIN_BYTES) + 4095) & ~4095)
        self._room_for_stage(stages, size)
        self._take_buffer(size)
        try:
            stage = _SharedStage(size, f"memfabric-plog-stage-{conn.id}")
        except BaseException:
            self._give_buffer(size)
            raise
        token = self._stage_token(conn)
        stages[token] = stage
        fd, stage.fd = stage.fd, -1            # ours is closed once sent: the mapping holds the memory
        return {"stage": token, "size": size}, [fd], True

    def op_plog_drop_stage(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Drop stage `stage` of this connection, if it has it (a client that gave up on the
        call that made it)."""
        self.server._namespace(conn, m)
        token = m.get("stage")
        stage = self._stages(conn).pop(token, None) if type(token) is int else None
        if stage is not None:
            stage.close()
            self._give_buffer(stage.size)
        return {"dropped": stage is not None}

    def _drop_if_large(self, conn: Connection, token: Any) -> None:
        """A stage larger than PLOG_SHARED_STAGE_KEPT_BYTES serves one batch (client.py drops its side too):
        kept by an idle connection, it would count against what this server holds being
        sent for as long as that connection lives, and a few such refuse every other batch."""
        stages = self._stages(conn)
        stage = stages.get(token) if type(token) is int else None
        if stage is not None and stage.size > PLOG_SHARED_STAGE_KEPT_BYTES:
            del stages[token]
            stage.close()
            self._give_buffer(stage.size)

    def _shared_batch(self, conn: Connection, token: Any, lengths: Any) -> tuple[memoryview, list[int]]:
        """The batch a client wrote into its shared stage `token`: a view of the stage, which
        the client may write again at any moment (_append copies what it frames first)."""
        stage = self._stages(conn).get(token) if type(token) is int else None
        if stage is None:
            raise InvalidArgument(f"no shared stage {token!r:.40} on this connection")
        lengths = _lengths(lengths, None)
        total = sum(lengths)
        if total > stage.size:
            raise InvalidArgument(f"lengths: a list of record lengths whose sum fits the stage's {stage.size} bytes")
        return memoryview(stage.mapping)[:total], lengths

    # ---- reads ----------------------------------------------------------------------------------

    def _check_whole(self, plog: _Plog) -> None:
        """A copy that restarted may lack appends made while it was away: it never serves its
        log as if it were whole."""
        if plog.stale:
            raise ServerUnavailable(f"the copy of plog {plog.core.name!r} on server {self.server.server_id} is stale: "
                                    "its server restarted, and it may lack appends made meanwhile; read the plog "
                                    f"at its home (server {plog.home}) or another copy")

    def _read(self, plog: _Plog, offset: int, length: int) -> bytes:
        with plog.lock:
            if plog.deleted:       # (found before the delete): its memory is zeroed, or another's now
                raise _gone(plog)
            self._check_whole(plog)
            plog.core.check_read(offset, length)
            plog.readers += 1
        try:
            return plog.data.read_bytes(offset, length)
        finally:
            self._done_reading(plog)

    def _done_reading(self, plog: _Plog) -> None:
        with plog.lock:
            plog.readers -= 1
            release = plog.deleted and plog.readers == 0 and not plog.released
            if release:
                plog.released = True
        if release:
            self._free(plog)

    def op_plog_read(self, conn: Connection, m: dict[str, Any]) -> Reply:
        plog = self._plog(conn, m)
        offset, length = m.get("offset"), m.get("length")
        limit = PLOG_INLINE_BYTES if conn.carries_fds else PLOG_RPC_READ_BYTES
        if type(length) is int and length > limit:
            raise InvalidArgument(f"one plog_read reads at most {limit} bytes on this connection, got {length}")
        data = self._read(plog, offset, length)
        if conn.carries_fds:
            return {"data": data}
        return Payload({"length": length}, memoryview(data))

    def op_plog_records(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """Committed records from `start`: up to `count`, and up to the reply's budget. Each
        record's (payload offset, length); with `data`, the payloads too, as long as they fit
        (a record larger than the budget comes alone, without its bytes: read it by offset)."""
        plog = self._plog(conn, m)
        start, count = m.get("start"), m.get("count")
        if type(start) is not int or type(count) is not int or start < 0 or not 0 < count <= MAX_PLOG_BATCH:
            raise InvalidArgument(f"start is an index >= 0 and count 1 to {MAX_PLOG_BATCH}, got "
                                  f"{start!r:.30} and {count!r:.30}")
        budget = PLOG_INLINE_BYTES
        want_data = m.get("data", True) is not False
        with plog.lock:
            self._check_whole(plog)
            total = plog.core.records
            places = []
            size = 0
            for index in range(start, min(start + count, total)):
                offset, length = plog.core.record_at(index)
                # Each record costs its place and msgpack's framing too: the reply stays one message.
                cost = (length if want_data else 0) + RECORD_OVERHEAD_BYTES
                if places and size + cost > budget:
                    break
                places.append((offset, length))
                size += cost
        reply: dict[str, Any] = {"records": total, "places": [list(p) for p in places]}
        if not places or not want_data or size > budget:
            return reply
        # Records are contiguous: one read from the first payload to the end of the last.
        first, last = places[0][0], places[-1][0] + places[-1][1]
        blob = self._read(plog, first, last - first)
        reply["data"] = [blob[o - first:o - first + n] for o, n in places]
        return reply

    # ---- seal and delete -------------------------------------------------------------------------

    def op_plog_seal(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """No append succeeds after this (appends planned before it finish); durable before
        it is answered. Sealing a sealed plog is no error."""
        plog = self._plog(conn, m)
        fence_at = m.get("fence_at")       # from the home, fenced by another copy: its committed length
        if fence_at is not None and (type(fence_at) is not int or fence_at < 0 or conn.role != "peer"):
            raise InvalidArgument("fence_at is a length a plog's home gives its copies")
        with plog.lock:
            if (fence_at is not None and plog.role == REPLICA and plog.core.state == OPEN
                    and plog.core.written > fence_at):
                # Records forwarded here that the home then dropped (another copy was sealed and
                # refused them; their appends were answered SEALED): not records of the log.
                plog.core.cut(fence_at)
                self._zero_tail(plog.data, fence_at, min(plog.core.capacity, fence_at + rec.HEADER_BYTES))
                plog.receiving = plog.core.written
            if plog.role == REPLICA and plog.receiving > plog.core.written:
                # Pieces of a forward its home never finished: not records of the sealed log,
                # and no scan after a restart may take them for some.
                self._zero_tail(plog.data, plog.core.written,
                                min(plog.core.capacity, plog.core.written + rec.HEADER_BYTES))
                plog.receiving = plog.core.written
            if plog.core.state == OPEN:
                plog.core.seal()
                try:
                    write_meta(plog.path, plog.meta())
                except BaseException:
                    plog.core.state = OPEN
                    raise
            end = plog.core.written
        try:
            self._flush_to(plog, end)
        except Sealed:
            # A copy's seal fenced the plog meanwhile (_fence): sealed all the same, at what it
            # had committed; the appends dropped are told so, and this seal is no error.
            pass
        if plog.role == HOME and plog.replica_servers:
            with plog.flush_lock:            # after any forward under way: a copy sealed last
                for server_id in self._live_copies(plog):
                    try:
                        with unbounded():
                            self.server._peer(server_id).call("plog_seal", **self._copy_args(plog))
                    except MemfabricError as exc:
                        self._mark_dead(plog, server_id, f"seal not taken: {exc}")
        return {"info": self._info(plog)}

    def op_plog_delete(self, conn: Connection, m: dict[str, Any]) -> Reply:
        plog = self._plog(conn, m)
        state = plog.state
        with plog.lock:
            if plog.deleted:
                raise _gone(plog)
            remove_meta(plog.path)
            plog.deleted = True
            if plog.round_under_way:
                # It holds the memory, and stops at its next piece (it sees `deleted`), then frees
                # it: waited for, so that the memory is free when the delete is answered (a
                # create may follow, in a pool with room for one). Past the wait, it frees it later.
                plog.round_over.wait_for(lambda: not plog.round_under_way, _round_wait_s())
            release = plog.readers == 0 and not plog.released
            if release:
                plog.released = True
        with self._lock:
            mine = self._plogs.get(state.key, {})
            if mine.get(plog.core.name) is plog:
                del mine[plog.core.name]
        self._grant_holders.revoke([plog])
        if release:
            self._free(plog)
        if plog.role == HOME and plog.replica_servers and plog.creds is not None:
            try:
                alive = {s.server_id for s in self.server.view() if s.alive}
            except MemfabricError:
                alive = set()
            # A copy on a server away now stays in its files until its namespace goes (it is
            # stale when the server comes back, and serves nothing).
            self._drop_copies(plog, [s for s in plog.replica_servers if s in alive])
        return {}

    def _free(self, plog: _Plog) -> None:
        extents = [Extent(*e) for e in plog.data.extents]
        # Zeroed first: a same-host handle that kept the plog's layout reads its records from
        # the mapped segments, and must find frames that fail their check, not the old records.
        try:
            self.server.pools[plog.state.record.pool].zero(extents)
        except MemfabricError as exc:       # its namespace is being destroyed: its memory with it
            log.info("plog %r's memory was not zeroed: %s", plog.core.name, exc)
        self._release_extents(plog.state, plog.state.record.pool, extents)


def _round_wait_s() -> float:
    """How long a request may wait for a round of making memory ready to end: answered before
    its caller gives up (deadline.py), and at most PLOG_PREPARE_WAIT_S."""
    left_s = time_left_s()
    return PLOG_PREPARE_WAIT_S if left_s is None else max(0.0, min(PLOG_PREPARE_WAIT_S, left_s))


def _gone(plog: _Plog) -> MemfabricError:
    """What a request that found `plog` before it went is refused with: as one that came a
    moment later would be (NO_SUCH_NAMESPACE when its namespace was destroyed)."""
    where = f"{'a copy of ' if plog.role == REPLICA else ''}plog {plog.core.name!r}"
    if plog.namespace_gone:
        return NoSuchNamespace(f"namespace {plog.state.record.ns!r} was destroyed, and {where} with it")
    return NoSuchObject(f"{where} was deleted")


def _fenced_message(plog: _Plog) -> str:
    """What an append not committed because a copy's seal fenced the plog is told, whether
    Python's forward met the seal (_forward_failed) or the receive loop's (then _flush_to)."""
    where = "a copy" if plog.fenced_by is None else f"its copy on server {plog.fenced_by}"
    return (f"plog {plog.core.name!r} was sealed ({where} was: a client sealed it there): this append was not "
            "committed, and no more are taken")


def _lengths(lengths: Any, total: int | None) -> list[int]:
    if not isinstance(lengths, list) or not 0 < len(lengths) <= MAX_PLOG_BATCH:
        raise InvalidArgument(f"an append takes 1 to {MAX_PLOG_BATCH} records, got "
                              f"{len(lengths) if isinstance(lengths, list) else repr(lengths)[:40]}")
    checked = _records.lengths_total(lengths, MAX_PLOG_RECORD_BYTES) if _records is not None else -1
    if checked < 0 and (set(map(type, lengths)) != {int} or min(lengths) < 0 or max(lengths) > MAX_PLOG_RECORD_BYTES):
        bad = next(n for n in lengths if type(n) is not int or not 0 <= n <= MAX_PLOG_RECORD_BYTES)
        raise InvalidArgument(f"a record is 0 to {MAX_PLOG_RECORD_BYTES} bytes, got {bad!r:.40}")
    if total is not None and (checked if checked >= 0 else sum(lengths)) != total:
        raise ProtocolError(f"records of {sum(lengths)} bytes in all, {total} bytes sent")
    if total is not None and total > max(MAX_PLOG_STAGED_BYTES, MAX_RPC_PAYLOAD_BYTES):
        raise InvalidArgument(f"an append carries at most {MAX_RPC_PAYLOAD_BYTES} bytes")
    return lengths



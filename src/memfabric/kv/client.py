"""The client's MemKV: `ns.kv()`.

A key's homes come from rendezvous hashing over the pool's live servers, which every client
computes alike (rules.py). Writes go to the first home, which numbers them and passes them
on to the others. A get is served by a home on this host when there is one, without asking
it: the client maps that server's key index and the namespace's segments, and reads the
slot, the key and the value itself under the slot's sequence number (index.py), retrying
when the server changed it meanwhile. A key on other hosts costs one request; a batch one
request per server. Large values move once on each side (transfer.py).

Where a key's only home died: its gets fail SERVER_UNAVAILABLE until the cluster sees that
server dead (cluster.liveness_timeout_s), then they miss (the key is gone with it). With
replicas, a get (or exists, or ttl) that misses at one home, or cannot reach it, asks the
next: a home that restarted, or came back from a silence the cluster took for death, has
forgotten its keys, and its replicas still hold them. A same-host home whose index lease ran
out (index.py: stopped, or cut off from the cluster) is not read; the other homes are asked.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from ..bigmemory.layout import as_bytes_view
from ..client.arguments import as_bool, as_int
from ..datapath import forks
from ..datapath.reentry import methods_code, refuse_reentry
from ..datapath.rpc_link import InFlight
from ..errors import InvalidArgument, MemfabricError, ProtocolError, ServerUnavailable, Timeout
from ..limits import BATCH_REQUESTS_IN_FLIGHT, KV_INLINE_BYTES, MAX_KV_BATCH, MAX_KV_KEY_BYTES
from ..transport import wire
from . import index as ix
from .index import (EMPTY, H_DRAINING, H_GENERATION, H_LEASE, H_MAGIC, H_MOVED, H_VERSION, HEADER_WORDS, MAGIC,
                    OFFSET_MASK, SLOT_WORDS, VERSION)
from .rules import MANY_AGAIN, MANY_ALONE, check_key, check_replicas, homes, key_hash, ttl_ms, utf8
from .space import EXTENT, monotonic_ms
from .transfer import put_large, read_held

try:           # the compiled lookup (src/memfabric/_native.c); without it, the same in Python
    from .. import _native
except ImportError:        # pragma: no cover - a machine that could not build it
    _native = None

if TYPE_CHECKING:
    from ..client.session import Namespace

VIEW_TTL_S = 1.0           # how long a client trusts its list of the pool's servers, and the replica count
READ_RETRIES = 64          # a same-host read that keeps meeting writes asks the server instead
EXTENTS_MASK = (1 << 32) - 1
_SLOT = struct.Struct("<8Q")
_MISS = object()
_ASK = object()            # the lock-free read cannot answer: ask the server
_AWAY = object()           # the server's lease ran out: neither its index nor it may be current
_AGAIN = object()          # a table changed under the read: read again
_NOT_HERE = object()       # a validated miss in one table


class _LocalIndex:
    """A same-host server's key index of one namespace, as this process maps it; attached to
    the link, so it goes with the namespace or the link."""

    def __init__(self, link: Any, creds: tuple[str, str, bytes]) -> None:
        from ..datapath.link import _Mapped
        reply, fds = link.call_with_fds("kv_open", pool=creds[0], ns=creds[1], sec=creds[2])
        mapped: list[Any] = []
        # While a table drains into the current one (index.py), its index and refs come too.
        draining = reply.get("draining")
        try:
            if len(fds) != (3 if draining is None else 5):
                raise ProtocolError(f"kv_open sent {len(fds)} fds, expected {3 if draining is None else 5}")
            sizes = [(reply["index_bytes"], True), (reply["slots"], False), (reply["stats_bytes"], False)]
            if draining is not None:
                sizes += [(draining["index_bytes"], True), (draining["slots"], False)]
            for fd, (size, readonly) in zip(fds, sizes, strict=True):
                mapped.append(_Mapped(fd, size, readonly=readonly, pool=creds[0], ns=creds[1]))
        except BaseException:
            for m in mapped:
                m.close()
            for fd in fds[len(mapped):]:
                os.close(fd)
            raise
        self.index, self.refs, self.stats = mapped[:3]
        self.old, self.old_refs = (mapped[3], mapped[4]) if draining is not None else (None, None)
        self.old_raw = None if self.old is None else self.old.view
        self.old_words = None if self.old is None else self.old.view.cast("Q")
        self.old_ref_bytes = None if self.old_refs is None else self.old_refs.view
        self.old_mask = 0 if self.old_words is None else self.old_words[ix.H_SLOTS] - 1
        self.words = self.index.view.cast("Q")
        self.raw = self.index.view
        self.ref_bytes = self.refs.view
        self.stats_words = self.stats.view.cast("Q")
        self.slot = reply["client_slot"]
        # The stats words and slot for _native.probe, which counts the gets it answers (-1: none).
        self.stats_view = None if self.slot is None else self.stats.view
        self.stats_slot = -1 if self.slot is None else self.slot
        self.lock_free = bool(reply["lock_free"])
        self.mask = self.words[ix.H_SLOTS] - 1
        self._count_lock = threading.Lock()

    def count(self, hit: bool) -> None:
        """Gets the server never sees still count in its stats: this client's own words."""
        self.count_many(int(hit), int(not hit))

    def count_many(self, hits: int, misses: int) -> None:
        if self.slot is None or not (hits or misses):
            return
        if _native is not None:        # adds with the GIL held: no count lost to the compiled probe's
            _native.count(self.stats_view, self.slot, hits, misses)
            return
        with self._count_lock:
            self.stats_words[self.slot * 2] += hits
            self.stats_words[self.slot * 2 + 1] += misses

    def stale(self) -> bool:
        """Followed by a larger table, or revoked (reads zeros); or the table draining into it
        is drained (its memory is let go), or one drains that this process does not map."""
        words = self.words
        if words[ix.H_MOVED] != 0 or words[ix.H_MAGIC] != ix.MAGIC:
            return True
        return (words[H_DRAINING] != 0) != (self.old is not None)

    def close(self) -> None:
        for mapped in (self.index, self.refs, self.stats, self.old, self.old_refs):
            if mapped is not None:
                mapped.close()


class KV:
    """A namespace's keyspace (`ns.kv()`). Keys: bytes or str (UTF-8), 1 to 64 KiB. Values:
    any buffer (bytes, bytearray, memoryview, numpy arrays), 0 bytes to 1 GiB. Safe to share
    between threads."""

    def __init__(self, namespace: "Namespace") -> None:
        self._namespace = namespace
        self._session = namespace.session
        self._creds = namespace.creds
        self._wire = namespace.wire_creds
        # A get's pairs but its key and id (call_get's head): op, pool, ns, sec.
        self._get_head = wire.encode({"op": "kv_get", **self._wire})[1:]
        self._put_head = wire.encode({"op": "kv_put", **self._wire})[1:]     # call_put's, likewise
        self._index_key = (namespace.pool, namespace.name, "kv")
        # Indexes are mapped under it (a kv_open: a request). An RLock to tell its owner: a
        # signal's handler run while its thread maps one is not to wait for it for ever (_index).
        self._lock = threading.RLock()
        forks.fresh_locks(self, "_lock")
        self._servers: list[int] = []
        self._local: frozenset[int] = frozenset()     # those of them on this host (reached by IPC)
        self._servers_at = -VIEW_TTL_S
        self._replicas = 1
        self._replicas_at = -VIEW_TTL_S

    def __repr__(self) -> str:
        return f"KV({self._namespace.pool!r}/{self._namespace.name!r})"

    # ---- where keys live ----------------------------------------------------------------------

    def _pool_servers(self, fresh: bool = False) -> list[int]:
        now = time.monotonic()
        if fresh or now - self._servers_at > VIEW_TTL_S:
            pool = self._namespace.pool
            live = [s for s in self._session.servers() if s["alive"] and pool in s["pools"]]
            if not live:
                raise ServerUnavailable(f"no live server gives memory to pool {pool!r}")
            home = self._session.local
            here = home.host if home.is_local else None
            self._local = frozenset(s["server_id"] for s in live if s["host"] == here)
            self._servers, self._servers_at = sorted(s["server_id"] for s in live), now
        return self._servers

    def _replica_count(self) -> int:
        """The namespace's replicas, as last heard (a stale count costs a request, never a
        wrong answer: the first home always holds the key)."""
        now = time.monotonic()
        if now - self._replicas_at > VIEW_TTL_S:
            servers = self._pool_servers()
            reply = self._call(servers[0], "kv_stats")
            self._replicas, self._replicas_at = reply["settings"]["replicas"], now
        return self._replicas

    def _homes(self, key: bytes) -> list[int]:
        servers = self._pool_servers()
        return servers if len(servers) == 1 else homes(key, servers, self._replica_count())

    def _call(self, server_id: int, op: str, **args: Any) -> dict[str, Any]:
        return self._session.link(server_id).call(op, **self._wire, **args)

    def _at_first_home(self, key: bytes, op: str, retry: bool = True, **args: Any) -> dict[str, Any]:
        """`op` at the key's first home; if that server cannot be reached, once more with a
        fresh view of the pool (a dead server's keys have a new first home)."""
        try:
            return self._call(self._homes(key)[0], op, key=key, **args)
        except ServerUnavailable:
            if not retry:
                raise
            self._pool_servers(fresh=True)
            return self._call(self._homes(key)[0], op, key=key, **args)

    def _local_link(self, server_id: int) -> Any:
        if server_id not in self._local:
            return None
        try:
            link = self._session.link(server_id)
        except MemfabricError:
            return None
        return link if link.is_local else None

    # ---- settings ------------------------------------------------------------------------------

    def configure(self, *, memory_limit: Any = ..., eviction: Any = ..., replicas: Any = ...) -> dict[str, Any]:
        """Set any of: memory_limit (a size like "1GiB" or bytes, the namespace's whole over its
        servers; None: no limit), eviction ("lru": evict the least recently used, approximately,
        as Redis's; "refuse": a write past the limit fails OUT_OF_MEMORY), replicas (servers
        that hold each key, 1 to 8). Kept by the cluster for the namespace; every server and
        client follows within a second. Returns the settings now. Raises INVALID_ARGUMENT."""
        args: dict[str, Any] = {}
        if memory_limit is not ...:
            args["memory_limit"] = None if memory_limit is None else (
                memory_limit if isinstance(memory_limit, str) else _int64(memory_limit, "memory_limit"))
        if eviction is not ...:
            args["eviction"] = eviction
        if replicas is not ...:
            args["replicas"] = check_replicas(replicas)
        reply = self._call(self._pool_servers()[0], "kv_configure", **args)
        self._replicas, self._replicas_at = reply["settings"]["replicas"], time.monotonic()
        return reply["settings"]

    # ---- single keys -----------------------------------------------------------------------------

    def put(self, key: Any, value: Any, *, ttl_s: float | None = None, replicas: int | None = None,
            nx: bool = False, xx: bool = False) -> bool:
        """Store `value` (any buffer, or a str as UTF-8) under `key`. ttl_s: seconds (sub-second allowed) until it
        expires; replicas: servers to hold this key (default: the namespace's); nx: only if
        absent; xx: only if present. Returns False when nx or xx said no. Raises
        INVALID_ARGUMENT, OUT_OF_MEMORY (the limit with eviction "refuse", or a full pool)."""
        view = None
        if type(key) is bytes and ttl_s is None and replicas is None and nx is False and xx is False \
                and 0 < len(key) <= MAX_KV_KEY_BYTES:
            # Any buffer (a numpy array, say) as it lies: the compiled call copies it once.
            view = value if type(value) is bytes else _value_view(value)
            if len(key) + len(view) <= KV_INLINE_BYTES if type(view) is bytes else \
                    len(key) + view.nbytes <= KV_INLINE_BYTES:
                stored = self._put_here(key, view)
                if stored is not None:
                    return stored
        key = check_key(key)
        view = _value_view(value) if view is None or type(view) is bytes else view
        options = {"ttl_ms": _ttl_ms(ttl_s), "nx": as_bool(nx, "nx"), "xx": as_bool(xx, "xx"),
                   "replicas": None if replicas is None else check_replicas(replicas)}
        if options["nx"] and options["xx"]:
            raise InvalidArgument("nx and xx exclude each other")
        return bool(self._put(key, view, options)["stored"])

    def _put_here(self, key: bytes, value: Any) -> bool | None:
        """The common put (a bytes key, any buffer, no options) to a first home on this host, in the fewest
        steps: a same-host put is some 15 us of round trip, and each layer of Python costs
        about one more (its server answers it in compiled code: kv/put_grants.py). None: not
        taken (a home elsewhere, no link yet, or the link failed: put() does what it says)."""
        servers = self._pool_servers()
        server_id = servers[0] if len(servers) == 1 else homes(key, servers, self._replica_count())[0]
        link = self._session._links.get(server_id)
        if link is None or not link.is_local or link.closed:
            return None
        try:
            return bool(link.call_put(self._put_head, len(self._wire) + 1, key, value, self._wire)["stored"])
        except ServerUnavailable:
            return None          # once more the long way, with a fresh view of the pool

    def _put(self, key: bytes, view: memoryview, options: dict[str, Any]) -> dict[str, Any]:
        if len(key) + view.nbytes <= KV_INLINE_BYTES:
            return self._at_first_home(key, "kv_put", value=view.tobytes(), **options)
        try:
            server_id = self._homes(key)[0]
            return put_large(self._session.link(server_id), self._creds, key, [view], view.nbytes, options)
        except ServerUnavailable:
            server_id = homes(key, self._pool_servers(fresh=True), self._replica_count())[0]
            return put_large(self._session.link(server_id), self._creds, key, [view], view.nbytes, options)

    def get(self, key: Any) -> bytes | None:
        """The value, or None when the key is missing or expired."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KV_KEY_BYTES:
            key = check_key(key)
        got = self._get(key, None)
        return None if got is _MISS else got

    def get_into(self, key: Any, buffer: Any) -> int | None:
        """Fill `buffer` (any writable buffer) with the value, in place; returns its length, or
        None when the key is missing. A buffer too small: INVALID_ARGUMENT, buffer untouched."""
        key = check_key(key)
        got = self._get(key, as_bytes_view(buffer, writable=True))
        return None if got is _MISS else got

    def _get(self, key: bytes, into: memoryview | None) -> Any:
        ranked = self._homes(key)
        for server_id in ranked:
            if server_id not in self._local:
                continue
            link = self._session._links.get(server_id)      # the common case, without a call
            if link is None or link.closed or not link.is_local:
                link = self._local_link(server_id)
            if link is not None:
                got = self._local_get(link, key, into)
                if got is _AWAY:
                    return self._remote_get([s for s in ranked if s != server_id], key, into, tried=[server_id])
                if got is _MISS and server_id == ranked[0]:
                    # The first home may have lost it (restarted, or forgot it coming back):
                    # its other homes are asked (none when the key has no replica).
                    return self._remote_get(ranked[1:], key, into, tried=[server_id], reached=True)
                # A replica may lack the key (evicted there, or written while it was away).
                if got is not _ASK and got is not _MISS:
                    return got
                break
        return self._remote_get(ranked, key, into)

    def _remote_get(self, ranked: list[int], key: bytes, into: memoryview | None, tried: list[int] | None = None,
                    reached: bool = False) -> Any:
        """Ask `ranked` in turn; `tried`: homes asked already (`reached`: one answered)."""
        for server_id in ranked:
            try:
                got = self._get_at(server_id, key, into)
            except ServerUnavailable:
                continue               # a dead home: the next may hold the key
            reached = True
            if got is not _MISS:
                return got
        if reached:
            return _MISS
        # No home answers. Once the cluster sees them dead, the key's homes are others.
        asked = set(ranked) | set(tried or ())
        fresh = [s for s in homes(key, self._pool_servers(fresh=True), self._replica_count()) if s not in asked]
        if fresh:
            return self._remote_get(fresh, key, into, tried=list(asked))
        raise ServerUnavailable(f"no home of key {key[:40]!r} answers (servers {sorted(asked)}: stopped, "
                                "or cut off from the cluster, which does not see them dead yet)")

    def _get_at(self, server_id: int, key: bytes, into: memoryview | None) -> Any:
        """A get asked of a server: inline, or sent as the reply's payload, or held for us."""
        link = self._session.link(server_id)
        made: list[bytearray] = []

        def buffer(length: int) -> memoryview | None:
            if into is not None:
                return into[:length] if into.nbytes >= length else None   # None: dropped, untouched
            made.append(bytearray(length))
            return memoryview(made[-1])

        if link.is_local:
            reply = link.call("kv_get", **self._wire, key=key)
        else:
            # A lone get on an idle link: sent and answered in one compiled call (_kvget.c).
            call_get = getattr(link, "call_get", None)
            reply = None if call_get is None else call_get(
                self._get_head + wire.encode({"key": key})[1:], len(self._wire) + 2, buffer, KV_INLINE_BYTES)
            if reply is None:
                reply = link.request("kv_get", {**self._wire, "key": key}, into=buffer)
        if not reply["found"]:
            return _MISS
        if "value" in reply:
            value = reply["value"]
            if into is None:
                return value
            _check_room(len(value), into)
            into[:len(value)] = value
            return len(value)
        length = reply["length"]
        if "hold" not in reply:                 # it came as the payload
            _check_room(length, into)
            return length if into is not None else bytes(made[0])
        if into is not None and into.nbytes < length:
            read_held(link, self._creds, {**reply, "pieces": []}, into)    # just let go
            _check_room(length, into)
        target = into if into is not None else memoryview(bytearray(length))
        read_held(link, self._creds, reply, target)
        return length if into is not None else bytes(target)

    def _index(self, link: Any) -> _LocalIndex:
        key = self._index_key
        idx = link.attached.get(key)
        if idx is None or idx.stale():
            if self._lock._is_owned():     # a signal's handler, its thread part way through mapping one?
                refuse_reentry(self, (self._lock,), _KV_CODES, "this KV handle (mapping its index)")
            with self._lock:
                idx = link.attached.get(key)
                if idx is None or idx.stale():
                    if idx is not None:
                        link.attached.pop(key, None)
                        idx.close()
                    idx = link.attached[key] = _LocalIndex(link, self._creds)
        return idx

    def _local_get(self, link: Any, key: bytes, into: memoryview | None) -> Any:
        """The lock-free read (index.py): the value, _MISS, _ASK when it cannot be done here, or
        _AWAY when the index's lease ran out. Compiled when it can be (_native.probe); what it
        cannot answer (a segment not mapped yet, a large value, a table replaced) goes the
        Python way, which can."""
        if _native is not None:
            try:
                idx = self._index(link)
            except MemfabricError:
                return _ASK
            if not idx.lock_free:
                return _ASK
            link.check_alive()
            got = _native.probe(idx.raw, idx.ref_bytes, key_hash(key), self._creds[0], link._segments, key, into,
                                idx.old_raw, idx.old_ref_bytes, idx.stats_view, idx.stats_slot)   # counted
            if got is None:
                return _MISS
            if type(got) is bytes or got >= 0:
                return got
            if got == _native.AWAY:
                return _AWAY
        return self._local_get_python(link, key, into)

    def _local_get_python(self, link: Any, key: bytes, into: memoryview | None) -> Any:
        """The lock-free read in Python. While a table drains into the current one, the
        draining table is probed first, then the current one (index.py says why no key is
        missed between them)."""
        try:
            idx = self._index(link)
        except MemfabricError:
            return _ASK
        if not idx.lock_free:
            return _ASK
        h = key_hash(key)
        for attempt in range(READ_RETRIES):
            if attempt and idx.stale():
                try:
                    idx = self._index(link)
                except MemfabricError:
                    return _ASK
            link.check_alive()
            words = idx.words
            if words[H_MAGIC] != MAGIC or words[H_VERSION] != VERSION:
                return _ASK                                 # revoked, or a layout this reader does not know
            if words[H_LEASE] <= monotonic_ms():
                return _AWAY
            if words[H_MOVED]:
                continue                                    # followed by another table: open it
            draining = words[H_DRAINING]
            if draining:
                old = idx.old_words
                if old is None or old[H_GENERATION] != draining:
                    continue                                # a drain this mapping does not know: open again
                got = self._probe_python(link, idx, old, idx.old_raw, idx.old_mask, idx.old_ref_bytes, True, key,
                                         h, into)
                if got is _AGAIN:
                    continue
                if got is not _NOT_HERE:
                    return got
            got = self._probe_python(link, idx, words, idx.raw, idx.mask, idx.ref_bytes, False, key, h, into)
            if got is _AGAIN:
                continue
            if got is _NOT_HERE:
                idx.count(False)
                return _MISS
            return got
        return _ASK

    def _probe_python(self, link: Any, idx: _LocalIndex, words: memoryview, raw: memoryview, mask: int,
                      ref_bytes: memoryview, draining: bool, key: bytes, h: int, into: memoryview | None) -> Any:
        """One table's probe chain for `key`: its value (or length), _MISS (there but expired),
        _NOT_HERE, _AGAIN (changed meanwhile) or _ASK. `draining`: the table drains into the
        current one, so its `moved` is set by design and only its slots' sequences count.

        A slot is read between two reads of its sequence: the first alone, then the fields
        in one unpack, then the sequence again, in program order (x86's loads keep it)."""
        klen = len(key)
        segments = link._segments
        pool = self._creds[0]
        slot = h & mask
        for _ in range(mask + 1):
            base = HEADER_WORDS + slot * SLOT_WORDS
            seq = words[base]
            if seq & 1:
                return _AGAIN                               # being written
            _, stored, segment, packed, vlen, expiry, extents, _ = _SLOT.unpack_from(raw, base * 8)
            if stored == EMPTY:             # a miss, unless the table moved on or was revoked (zeros)
                if words[base] != seq or (not draining and words[H_MOVED]) or words[H_MAGIC] != MAGIC:
                    return _AGAIN
                return _NOT_HERE
            if stored != h or packed >> 32 != klen:
                slot = (slot + 1) & mask
                continue
            if words[base] != seq:
                return _AGAIN
            mapped = segments.get((pool, segment))
            if mapped is None:
                try:
                    view = link.segment_view(self._creds, segment)
                except MemfabricError:
                    return _ASK
            else:
                view = mapped.view
            offset = packed & OFFSET_MASK
            if view[offset:offset + klen] != key:
                if words[base] != seq:
                    return _AGAIN
                slot = (slot + 1) & mask
                continue
            if expiry and expiry <= time.time_ns() // 1_000_000:
                result: Any = _MISS
            else:
                if into is not None and into.nbytes < vlen:
                    if words[base] != seq:
                        return _AGAIN
                    _check_room(vlen, into)
                result = self._copy_value(link, words, base, seq, view, offset + klen, vlen,
                                          extents & EXTENTS_MASK, into)
                if result is _ASK:
                    return _ASK
            if result is None or words[base] != seq or (not draining and words[H_MOVED]) or words[H_MAGIC] != MAGIC:
                return _AGAIN                               # changed while we read: again
            idx.count(result is not _MISS)
            if result is not _MISS:
                ref_bytes[slot] = 1                         # recency, for the eviction clock
            return result
        return _ASK

    def _copy_value(self, link: Any, words: memoryview, base: int, seq: int, view: memoryview, at: int,
                    vlen: int, extents: int, into: memoryview | None) -> Any:
        """The value's bytes (or its length, copied into `into`); None when the slot changed
        meanwhile; _ASK when its memory cannot be reached here."""
        if extents == 0:
            if at + vlen > len(view):
                return None
            if into is None:
                return bytes(view[at:at + vlen])
            into[:vlen] = view[at:at + vlen]
            return vlen
        table = bytes(view[at:at + EXTENT.size * extents])
        if words[base] != seq or len(table) != EXTENT.size * extents:
            return None
        out = into if into is not None else memoryview(bytearray(vlen))
        position = 0
        for i in range(extents):
            segment, offset, length = EXTENT.unpack_from(table, i * EXTENT.size)
            take = min(length, vlen - position)
            try:
                source = link.segment_view(self._creds, segment)
            except MemfabricError:
                return _ASK
            if offset + take > len(source):
                return None
            out[position:position + take] = source[offset:offset + take]
            position += take
        return vlen if into is not None else bytes(out)

    def _local_get_many(self, link: Any, keys: list[bytes], into: list[memoryview] | None) -> list[Any]:
        """_local_get for many keys of one server on this host: one compiled call for all."""
        if _native is None:
            return [self._local_get(link, k, None if into is None else into[i]) for i, k in enumerate(keys)]
        try:
            idx = self._index(link)
        except MemfabricError:
            return [_ASK] * len(keys)
        if not idx.lock_free:
            return [_ASK] * len(keys)
        link.check_alive()
        results = _native.probe_many(idx.raw, idx.ref_bytes, list(map(key_hash, keys)), keys, self._creds[0],
                                     link._segments, into, idx.old_raw, idx.old_ref_bytes)
        misses = results.count(None)
        asked = [i for i, got in enumerate(results) if type(got) is int and got < 0]
        idx.count_many(len(results) - misses - len(asked), misses)
        away = _native.AWAY
        for i in asked:         # ASK or TOO_SMALL: the Python way answers (or raises) for these
            if results[i] == away:
                results[i] = _AWAY
            else:
                results[i] = self._local_get_python(link, keys[i], None if into is None else into[i])
        return [_MISS if got is None else got for got in results]

    def exists(self, key: Any) -> bool:
        """Whether the key is there (and not expired)."""
        return self.exists_many([key])[0]

    def delete(self, key: Any) -> bool:
        """Delete the key; True when it was there."""
        return bool(self._at_first_home(check_key(key), "kv_delete")["deleted"])

    def expire(self, key: Any, ttl_s: float) -> bool:
        """Give the key `ttl_s` seconds more to live; False when it is missing."""
        return bool(self._at_first_home(check_key(key), "kv_expire", ttl_ms=_ttl_ms(ttl_s, required=True))["set"])

    def ttl(self, key: Any) -> float:
        """Seconds left; -1.0 when the key never expires, -2.0 when it is missing (as Redis)."""
        key = check_key(key)
        ms = self._at_first_home(key, "kv_ttl")["ttl_ms"]
        for server_id in self._homes(key)[1:] if ms == -2 else ():     # the first home may have lost it
            try:
                ms = self._call(server_id, "kv_ttl", key=key)["ttl_ms"]
            except ServerUnavailable:
                continue
            if ms != -2:
                break
        return float(ms) if ms < 0 else ms / 1000

    def incr(self, key: Any, by: int = 1) -> int:
        """Add `by` to the integer the key holds as decimal text (a missing key counts 0);
        the new value. INVALID_ARGUMENT when the value is not an integer, or on overflow."""
        step = _int64(by, "by")
        # Never sent twice: a lost reply may have been applied.
        return int(self._at_first_home(check_key(key), "kv_incr", retry=False, by=step)["value"])

    # ---- many keys: one request per server ---------------------------------------------------------

    def _by_first_home(self, keys: list[bytes]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        servers, replicas = self._pool_servers(), self._replica_count()
        for i, key in enumerate(keys):
            groups.setdefault(homes(key, servers, replicas)[0], []).append(i)
        return groups

    def put_many(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]], *, ttl_s: float | None = None,
                 replicas: int | None = None) -> None:
        """Store `items` (a mapping, or (key, value) pairs), each with `ttl_s` and `replicas` as
        put's. One request per server (per batch of 4,096 keys or 192 KiB); large values each
        on their own. Raises as put."""
        pairs = [(check_key(k), _value_view(v)) for k, v in _pairs(items)]
        options = {"ttl_ms": _ttl_ms(ttl_s), "replicas": None if replicas is None else check_replicas(replicas)}
        keys = [k for k, _ in pairs]
        for server_id, positions in self._by_first_home(keys).items():
            small = [i for i in positions if len(keys[i]) + pairs[i][1].nbytes <= KV_INLINE_BYTES]
            for i in positions:
                if len(keys[i]) + pairs[i][1].nbytes > KV_INLINE_BYTES:
                    self._put(keys[i], pairs[i][1], options)
            for chunk in _batches(small, [len(keys[i]) + pairs[i][1].nbytes for i in small]):
                self._call(server_id, "kv_put_many", keys=[keys[i] for i in chunk],
                           values=[pairs[i][1].tobytes() for i in chunk], **options)

    def get_many(self, keys: Iterable[Any]) -> list[bytes | None]:
        """The values of many keys (None for each missing): read in place for keys homed on
        this host, one request per other server."""
        keys = _keys(keys)
        return [None if v is _MISS else v for v in self._get_many(keys, None)]

    def get_many_into(self, keys: Iterable[Any], buffers: Iterable[Any]) -> list[int | None]:
        """Fill `buffers` (one per key of `keys`) in place; each value's length, None for a
        missing key. A buffer too small: INVALID_ARGUMENT (that buffer untouched; those before
        it may be filled)."""
        keys = _keys(keys)
        views = [as_bytes_view(b, writable=True) for b in _many(buffers, "buffers", "buffer")]
        if len(keys) != len(views):
            raise InvalidArgument(f"{len(keys)} keys and {len(views)} buffers: one buffer per key")
        return [None if v is _MISS else v for v in self._get_many(keys, views)]

    def _get_many(self, keys: list[bytes], into: list[memoryview] | None) -> list[Any]:
        out: list[Any] = [_MISS] * len(keys)
        servers, replicas = self._pool_servers(), self._replica_count()
        ask: dict[int, list[int]] = {}
        here: dict[int, list[int]] = {}         # server on this host -> the keys it is asked for
        if len(servers) == 1:                   # the common case of one server: no placement
            ranks = [servers] * len(keys)
            (here if servers[0] in self._local else ask)[servers[0]] = list(range(len(keys)))
        else:
            ranks = []
            local_servers = self._local
            for i, key in enumerate(keys):
                ranked = homes(key, servers, replicas)
                ranks.append(ranked)
                local = next((s for s in ranked if s in local_servers), None)
                if local is not None:
                    here.setdefault(local, []).append(i)
                else:
                    ask.setdefault(ranked[0], []).append(i)
        for server_id, positions in here.items():
            link = self._local_link(server_id)
            if link is None:
                for i in positions:
                    ask.setdefault(ranks[i][0], []).append(i)
                continue
            for i, got in zip(positions, self._local_get_many(link, [keys[i] for i in positions],
                                                               None if into is None else [into[i] for i in positions]),
                              strict=True):
                # As _get: a server whose lease ran out is not asked; a first home's miss
                # asks the other homes; a replica's miss asks the first home.
                if got is _AWAY:
                    out[i] = self._remote_get([s for s in ranks[i] if s != server_id], keys[i],
                                              None if into is None else into[i], tried=[server_id])
                elif got is _MISS and server_id == ranks[i][0]:
                    out[i] = self._remote_get(ranks[i][1:], keys[i], None if into is None else into[i],
                                              tried=[server_id], reached=True)
                elif got is not _ASK and got is not _MISS:
                    out[i] = got
                else:
                    ask.setdefault(ranks[i][0], []).append(i)
        while ask:                   # the keys a reply had no room for are asked again
            ask = self._ask_many(ask, keys, into, out, servers, replicas)
        return out

    def _ask_many(self, ask: dict[int, list[int]], keys: list[bytes], into: list[memoryview] | None,
                  out: list[Any], servers: list[int], replicas: int) -> dict[int, list[int]]:
        """kv_get_many of the keys at `ask` (server -> positions), their values put in `out`.
        Over RPC every request is sent before a reply is waited for (at most
        BATCH_REQUESTS_IN_FLIGHT per server), each reply's values landing in one buffer.
        Returns the keys to ask again (a reply ran out of room for them)."""
        again: dict[int, list[int]] = {}
        queue = [(server_id, chunk) for server_id, positions in ask.items()
                 for chunk in _batches(positions, [len(keys[i]) for i in positions])]
        in_flight: list[tuple[int, list[int], Any, Any]] = []
        with InFlight() as flight:      # however this ends, no reply lands after it
            while queue or in_flight:
                while queue and sum(1 for f in in_flight if f[0] == queue[0][0]) < BATCH_REQUESTS_IN_FLIGHT:
                    server_id, chunk = queue.pop(0)
                    try:
                        link = self._session.link(server_id)
                        if link.is_local:
                            in_flight.append((server_id, chunk, link, None))
                        else:
                            landed: list[memoryview] = []    # the reply's values, back to back
                            pending = flight.submit(link, "kv_get_many", {**self._wire, "keys": [
                                keys[i] for i in chunk]}, into=partial(_landing_buffer, landed))
                            in_flight.append((server_id, chunk, link, (pending, landed)))
                    except ServerUnavailable:
                        self._ask_others(chunk, keys, into, out, servers, replicas)
                if not in_flight:
                    continue
                server_id, chunk, link, pending = in_flight.pop(0)
                try:
                    if pending is None:
                        reply = link.call("kv_get_many", **self._wire, keys=[keys[i] for i in chunk])
                        blob = memoryview(reply["values"])
                    else:
                        reply = flight.wait(link, pending[0])
                        blob = pending[1][0] if pending[1] else memoryview(b"")
                except ServerUnavailable:
                    self._ask_others(chunk, keys, into, out, servers, replicas)
                    continue
                self._take_many(server_id, chunk, reply["lengths"], blob, keys, into, out, again, servers, replicas)
        return again

    def _ask_others(self, chunk: list[int], keys: list[bytes], into: list[memoryview] | None, out: list[Any],
                    servers: list[int], replicas: int) -> None:
        """A server that cannot be reached: each of its keys from its other homes, or fresh ones."""
        for i in chunk:
            out[i] = self._remote_get(homes(keys[i], servers, replicas), keys[i], None if into is None else into[i])

    def _take_many(self, server_id: int, chunk: list[int], lengths: list[int], blob: memoryview, keys: list[bytes],
                   into: list[memoryview] | None, out: list[Any], again: dict[int, list[int]], servers: list[int],
                   replicas: int) -> None:
        position = 0
        for i, length in zip(chunk, lengths, strict=True):
            if length >= 0:
                value = blob[position:position + length]
                position += length
                if into is None:
                    out[i] = bytes(value)
                else:
                    _check_room(length, into[i])
                    into[i][:length] = value
                    out[i] = length
            elif length == MANY_AGAIN:
                again.setdefault(server_id, []).append(i)
            elif length == MANY_ALONE:       # too large to ride along: on its own
                out[i] = self._get(keys[i], None if into is None else into[i])
            elif replicas > 1:
                out[i] = self._remote_get(homes(keys[i], servers, replicas)[1:], keys[i],
                                          None if into is None else into[i])

    def exists_many(self, keys: Iterable[Any]) -> list[bool]:
        """Whether each of `keys` is there; one request per server."""
        keys = _keys(keys)
        out = [False] * len(keys)
        servers, replicas = self._pool_servers(), self._replica_count()
        ranked = [homes(key, servers, replicas) for key in keys]
        answered = [False] * len(keys)
        missing = list(range(len(keys)))
        unavailable: ServerUnavailable | None = None
        # The first homes, then (for keys they lack) each next home: see the module's docstring.
        for rank in range(replicas):
            groups: dict[int, list[int]] = {}
            for i in missing:
                if rank < len(ranked[i]):
                    groups.setdefault(ranked[i][rank], []).append(i)
            for server_id, positions in groups.items():
                for chunk in _batches(positions, [len(keys[i]) for i in positions]):
                    try:
                        reply = self._call(server_id, "kv_exists", keys=[keys[i] for i in chunk])
                    except ServerUnavailable as exc:
                        unavailable = exc
                        continue
                    for i, there in zip(chunk, reply["exists"], strict=True):
                        out[i], answered[i] = bool(there), True
            missing = [i for i in missing if not out[i]]
            if not missing:
                break
        if unavailable is not None and not all(answered[i] for i in missing):
            raise unavailable
        return out

    def delete_many(self, keys: Iterable[Any]) -> int:
        """Delete many keys; how many were there. One request per server."""
        keys = _keys(keys)
        deleted = 0
        for server_id, positions in self._by_first_home(keys).items():
            for chunk in _batches(positions, [len(keys[i]) for i in positions]):
                deleted += self._call(server_id, "kv_delete_many", keys=[keys[i] for i in chunk])["deleted"]
        return deleted

    # ---- the whole keyspace ------------------------------------------------------------------------

    def scan(self, prefix: Any = b"", *, batch: int = 1000) -> Iterator[bytes]:
        """Every key (with `prefix`) once, across servers, `batch` keys per request. Keys
        written or deleted during the scan may or may not be seen; every key there all along
        is (a server's table grown meanwhile is read on where its keys went)."""
        prefix = b"" if prefix in (b"", "") else check_key(prefix)
        batch = as_int(batch, "batch")
        servers = self._pool_servers(fresh=True)
        for server_id in servers:
            cursor, generation = 0, None
            seen: set[bytes] = set()        # keys given, should the table move under us
            while True:
                reply = self._call(server_id, "kv_scan", cursor=cursor, batch=batch, prefix=prefix, servers=servers,
                                   generation=generation)
                generation = reply["generation"]
                for key in reply["keys"]:
                    if key not in seen:
                        seen.add(key)
                        yield key
                cursor = reply["cursor"]
                if cursor == 0:
                    break

    def __len__(self) -> int:
        return self.stats()["keys"]

    def stats(self) -> dict[str, Any]:
        """The namespace's keys, bytes (keys and values held, replicas included), memory_limit,
        hits, misses, evictions and expired, summed over the pool's servers; and `settings`."""
        total: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for server_id in self._pool_servers(fresh=True):
            reply = self._call(server_id, "kv_stats")
            settings = reply["settings"]
            for name, value in reply["stats"].items():
                total[name] = value if name == "memory_limit" else total.get(name, 0) + (value or 0)
        total["settings"] = settings
        self._replicas, self._replicas_at = settings.get("replicas", self._replicas), time.monotonic()
        return total

    def flush(self) -> int:
        """Delete every key of the namespace, on every server; how many there were
        (replicas included)."""
        return sum(self._call(s, "kv_flush")["flushed"] for s in self._pool_servers(fresh=True))


def _value_view(value: Any) -> memoryview:
    """A value's bytes: any buffer as it is, a str as UTF-8 (as a key)."""
    return memoryview(utf8(value, "a value")) if isinstance(value, str) else as_bytes_view(value)


def _many(items: Any, what: str, one: str) -> list[Any]:
    """An iterable's items as a list. A str or a buffer is one thing, not many: a batch of
    the characters of a key (or of the bytes of a value) is never what was meant."""
    if isinstance(items, (str, bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{what} is an iterable of them (a list, say), got one {one}: {items!r:.40}")
    try:
        return list(items)
    except TypeError:
        raise InvalidArgument(f"{what} is an iterable of them (a list, say), got {type(items).__name__}") from None


def _keys(keys: Any) -> list[bytes]:
    """check_key of each, without a call for the keys that are bytes already."""
    return [k if type(k) is bytes and 0 < len(k) <= MAX_KV_KEY_BYTES else check_key(k)
            for k in _many(keys, "keys", "key")]


def _pairs(items: Any) -> list[tuple[Any, Any]]:
    """put_many's items: a mapping, or (key, value) pairs, each a tuple or a list of two."""
    if isinstance(items, Mapping):
        return list(items.items())
    pairs = _many(items, "items", "value")
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidArgument(f"items are a mapping or (key, value) pairs, got {pair!r:.40}")
    return pairs


def _int64(value: Any, what: str) -> int:
    """An integer that travels as a signed 64-bit one (the wire's and Redis's)."""
    number = as_int(value, what)
    if not -(1 << 63) <= number < (1 << 63):
        raise InvalidArgument(f"{what} is a 64-bit integer, got {number}")
    return number


def _check_room(length: int, into: memoryview | None) -> None:
    if into is not None and into.nbytes < length:
        raise InvalidArgument(f"the value has {length} bytes; the buffer holds {into.nbytes} (left untouched)")


def _ttl_ms(ttl_s: Any, required: bool = False) -> int | None:
    if ttl_s is None and not required:
        return None
    return ttl_ms(ttl_s)


def _landing_buffer(landed: list[memoryview], length: int) -> memoryview:
    landed.append(memoryview(bytearray(length)))
    return landed[-1]


def _batches(positions: list[int], sizes: list[int]) -> Iterator[list[int]]:
    """Runs of positions within MAX_KV_BATCH keys and KV_INLINE_BYTES of keys and values."""
    chunk: list[int] = []
    total = 0
    for position, size in zip(positions, sizes, strict=True):
        if chunk and (len(chunk) >= MAX_KV_BATCH or total + size > KV_INLINE_BYTES):
            yield chunk
            chunk, total = [], 0
        chunk.append(position)
        total += size
    if chunk:
        yield chunk


__all__ = ["KV", "Timeout"]


_KV_CODES = methods_code(KV)

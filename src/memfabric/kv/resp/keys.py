"""The door's way to a namespace's keys: each operation at the key's first home, which is
this server (the operation runs here, through Server.serve, as an IPC or RPC request's
would) or another (the request goes on over this server's link to it, as MemKV's
replication does). The first home is the same rendezvous choice every client makes
(rules.homes), so door writes and library writes of a key are ordered by one server.
"""

from __future__ import annotations

import mmap
import random
from typing import TYPE_CHECKING, Any

from ...errors import MemfabricError, NoSuchObject, ServerUnavailable, Timeout
from ...limits import KV_GET_MANY_PAYLOAD_BYTES, KV_INLINE_BYTES, MAX_KV_BATCH
from ...server.requests import Connection, Payload
from ..rules import homes
from ..transfer import copy_from_segment, put_large, read_held

if TYPE_CHECKING:
    from ...server.server import Server

Creds = tuple[str, str, bytes]
RANDOM_KEY_CALLS = 4096      # scans of a server's table for RANDOMKEY, at most
OWN_MAPPING_BYTES = 1 << 20  # a batch of values this large gets a mapping of its own (_buffer)


class Keyspace:
    """One door connection's namespace (pool, ns, secId), reached from this server."""

    def __init__(self, server: "Server", conn: Connection, creds: Creds) -> None:
        self.server = server
        self.conn = conn
        self.creds = creds
        self.wire = {"pool": creds[0], "ns": creds[1], "sec": creds[2]}

    # ---- where ---------------------------------------------------------------------------------

    def servers(self, fresh: bool = False) -> list[int]:
        pool = self.creds[0]
        live = sorted(s.server_id for s in self.server.view(fresh=fresh) if s.alive and pool in s.pools)
        if not live:
            raise ServerUnavailable(f"no live server gives memory to pool {pool!r}")
        return live

    def home(self, key: bytes, fresh: bool = False) -> int:
        servers = self.servers(fresh)
        return servers[0] if len(servers) == 1 else homes(key, servers, 1)[0]

    def by_home(self, keys: list[bytes]) -> list[tuple[int, list[int]]]:
        """Positions of `keys` grouped by their first home, in order, each group a batch one
        request carries: at most MAX_KV_BATCH keys and KV_INLINE_BYTES of them."""
        servers = self.servers()
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            home = servers[0] if len(servers) == 1 else homes(key, servers, 1)[0]
            groups.setdefault(home, []).append(i)
        out: list[tuple[int, list[int]]] = []
        for server_id, positions in groups.items():
            batch: list[int] = []
            size = 0
            for i in positions:
                if batch and (len(batch) == MAX_KV_BATCH or size + len(keys[i]) > KV_INLINE_BYTES):
                    out.append((server_id, batch))
                    batch, size = [], 0
                batch.append(i)
                size += len(keys[i])
            out.append((server_id, batch))
        return out

    def put_pairs(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """MSET: each home's pairs in order, as few requests as fit (kv_put_many), a pair too
        large to ride along alone."""
        for server_id, positions in self.by_home([k for k, _ in pairs]):
            batch: list[tuple[bytes, bytes]] = []
            size = 0

            def flush() -> None:
                if batch:
                    self.call_at(server_id, "kv_put_many", keys=[k for k, _ in batch], values=[v for _, v in batch])
                    batch.clear()
            for i in positions:
                key, value = pairs[i]
                if len(key) + len(value) > KV_INLINE_BYTES:
                    flush()
                    size = 0
                    self.put(key, value)
                    continue
                if size + len(key) + len(value) > KV_INLINE_BYTES:
                    flush()
                    size = 0
                batch.append((key, value))
                size += len(key) + len(value)
            flush()

    # ---- calls ---------------------------------------------------------------------------------

    def call_at(self, server_id: int, op: str, **args: Any) -> Any:
        """`op` at a server: here through the dispatcher (the reply may be a Payload), else
        over the link to it."""
        if server_id == self.server.server_id:
            return self.server.serve(self.conn, {"op": op, **self.wire, **args})
        return self.server._peer(server_id).call(op, **self.wire, **args)

    def call(self, key: bytes, op: str, **args: Any) -> Any:
        """`op` on `key` at its first home; once more with a fresh view if that server is gone."""
        try:
            return self.call_at(self.home(key), op, key=key, **args)
        except ServerUnavailable:
            return self.call_at(self.home(key, fresh=True), op, key=key, **args)

    def everywhere(self, op: str, **args: Any) -> list[dict[str, Any]]:
        """`op` at every live server of the pool (FLUSHDB, DBSIZE)."""
        return [self.call_at(s, op, **args) for s in self.servers()]

    # ---- values of any size ------------------------------------------------------------------------

    def call_where(self, key: bytes, op: str, **args: Any) -> tuple[int, Any]:
        """call(), and which server answered (a reply that holds a value: where to read it)."""
        server_id = self.home(key)
        try:
            return server_id, self.call_at(server_id, op, key=key, **args)
        except ServerUnavailable:
            server_id = self.home(key, fresh=True)
            return server_id, self.call_at(server_id, op, key=key, **args)

    def put(self, key: bytes, value: bytes, **options: Any) -> dict[str, Any]:
        return self.put_where(key, value, **options)[1]

    def put_where(self, key: bytes, value: bytes, **options: Any) -> tuple[int, dict[str, Any]]:
        """kv_put, or for a value too large to ride in a request, reserve, fill and commit; and
        the server that took it."""
        if len(key) + len(value) <= KV_INLINE_BYTES:
            return self.call_where(key, "kv_put", value=value, **options)
        server_id = self.home(key)
        if server_id != self.server.server_id:
            return server_id, put_large(self.server._peer(server_id), self.creds, key, [memoryview(value)],
                                        len(value), options)
        reply = self.call_at(server_id, "kv_reserve", length=len(value))
        token = reply["token"]
        try:
            segments = self.server.pools[self.creds[0]].segments
            position = 0
            for segment, offset, length in reply["extents"]:
                take = min(length, len(value) - position)
                if take:
                    segments[segment].write(offset, memoryview(value)[position:position + take])
                position += take
        except BaseException:
            self.call_at(server_id, "kv_abort", token=token)
            raise
        return server_id, self.call_at(server_id, "kv_commit", token=token, key=key, **options)

    def homes_of(self, keys: list[bytes], servers: list[int]) -> list[int]:
        """Each key's first home among `servers`."""
        if len(servers) == 1:
            return [servers[0]] * len(keys)
        return [homes(key, servers, 1)[0] for key in keys]

    def get_many_reply_max(self, server_id: int) -> int:
        """The most bytes of values one kv_get_many at that server answers: by payload (this
        server, or one over RPC), or inline (a peer on this host)."""
        if server_id != self.server.server_id and self.server._peer(server_id).is_local:
            return KV_INLINE_BYTES
        return KV_GET_MANY_PAYLOAD_BYTES

    def get_many_once(self, server_id: int, keys: list[bytes]) -> tuple[list[int], memoryview]:
        """kv_get_many at one server (at most MAX_KV_BATCH keys): the lengths (MANY_*: see
        kv/service.py) and the values back to back."""
        if server_id == self.server.server_id:
            reply = self.call_at(server_id, "kv_get_many", keys=keys)
            if isinstance(reply, Payload):        # values lent from pool memory until done
                try:
                    data = reply.data if isinstance(reply.data, list) else [reply.data]
                    return reply.reply["lengths"], _gather(data)
                finally:
                    if reply.done is not None:
                        reply.done()
            return reply["lengths"], memoryview(reply["values"])
        link = self.server._peer(server_id)
        if link.is_local:
            reply = link.call("kv_get_many", **self.wire, keys=keys)
            return reply["lengths"], memoryview(reply["values"])
        made: list[memoryview] = []

        def buffer(length: int) -> memoryview:
            made.append(_buffer(length))
            return made[-1]
        reply = link.request("kv_get_many", {**self.wire, "keys": keys}, into=buffer)
        return reply["lengths"], made[0] if made else memoryview(b"")

    def get(self, key: bytes) -> bytes | None:
        server_id = self.home(key)
        try:
            return self._get_at(server_id, key)
        except ServerUnavailable:
            return self._get_at(self.home(key, fresh=True), key)

    def _get_at(self, server_id: int, key: bytes) -> bytes | None:
        if server_id == self.server.server_id:
            reply = self.call_at(server_id, "kv_get", key=key)
            if isinstance(reply, Payload):        # a large value, lent from pool memory until done
                try:
                    data = reply.data if isinstance(reply.data, list) else [reply.data]
                    return b"".join(data)
                finally:
                    if reply.done is not None:
                        reply.done()
            if not reply["found"]:
                return None
            if "value" in reply:
                return reply["value"]
            return self._read_held_here(reply)
        link = self.server._peer(server_id)
        made: list[bytearray] = []

        def buffer(length: int) -> memoryview:
            made.append(bytearray(length))
            return memoryview(made[-1])
        if link.is_local:
            reply = link.call("kv_get", **self.wire, key=key)
        else:
            reply = link.request("kv_get", {**self.wire, "key": key}, into=buffer)
        if not reply["found"]:
            return None
        if "value" in reply:
            return reply["value"]
        if "hold" not in reply:
            return bytes(made[0])
        target = memoryview(bytearray(reply["length"]))
        read_held(link, self.creds, reply, target)
        return bytes(target)

    # ---- values a server holds for this door (kv_get as_hold, GETDEL, GETEX, GETSET) ----------------

    def read_held(self, server_id: int, hold: int, pieces: list[tuple[int, int, int]], at: int,
                  into: memoryview) -> None:
        """len(into) bytes at `at` of a held value whose `pieces` lie on `server_id`: here or on a
        peer of this host, from the segments; over RPC, kv_read (within one piece)."""
        position = 0
        for segment, offset, n in pieces:
            if position <= at < position + n:
                break
            position += n
        else:
            raise ValueError(f"position {at} is past the held value")
        offset += at - position
        assert at + len(into) <= position + n, "a read of a held value lies within one of its pieces"
        if server_id == self.server.server_id:
            memory = self.server.pools[self.creds[0]].segments.get(segment)
            if memory is None:          # the namespace was destroyed, its segments with it
                raise NoSuchObject(f"segment {segment} of pool {self.creds[0]!r} is gone (its namespace was "
                                   "destroyed)")
            memory.read(offset, into)
            return
        link = self.server._peer(server_id)
        if link.is_local:
            copy_from_segment(link.segment_view(self.creds, segment), offset, into)
            return
        link.request("kv_read", {**self.wire, "hold": hold, "at": at, "length": len(into)}, into=into)

    def let_go(self, server_id: int, hold: int, confirm: bool = False) -> None:
        """The hold is let go (a server that cannot be told lets go when the link closes).
        confirm: MemfabricError if the server did not hold it any more (its namespace
        destroyed, its link to this server lost) or cannot say."""
        try:
            if server_id == self.server.server_id:
                self.call_at(server_id, "kv_let_go", hold=hold)
                return
            link = self.server._peer(server_id)
            try:
                link.call("kv_let_go", **self.wire, hold=hold)
            except Timeout:
                # Perhaps never sent: a same-host link carries one exchange at a time, and a
                # stuck server's holds it. Sent again with that link's next request (to the
                # server that gave the hold, never to one restarted since).
                link.send_later("kv_let_go", **self.wire, hold=hold)
                raise
        except MemfabricError:
            if confirm:
                raise

    def _read_held_here(self, reply: dict[str, Any]) -> bytes:
        """A value larger than one payload, held for this connection: read where it lies."""
        token = reply["hold"]
        try:
            segments = self.server.pools[self.creds[0]].segments
            out = bytearray(reply["length"])
            position = 0
            for segment, offset, length in reply["pieces"]:
                segments[segment].read(offset, memoryview(out)[position:position + length])
                position += length
            return bytes(out)
        finally:
            self.call_at(self.server.server_id, "kv_let_go", hold=token)

    def random_key(self) -> bytes | None:
        """Some live key, or None: from a random slot on of a random server holding keys."""
        servers = self.servers()
        for server_id in random.sample(servers, len(servers)):
            if not self.call_at(server_id, "kv_stats")["stats"]["keys"]:
                continue
            start = cursor = random.randrange(1024)        # within the smallest table
            wrapped = False
            for _ in range(RANDOM_KEY_CALLS):
                reply = self.call_at(server_id, "kv_scan", cursor=cursor, batch=16, servers=servers)
                if reply["keys"]:
                    return random.choice(reply["keys"])
                cursor = reply["cursor"]
                if cursor == 0:
                    if wrapped:
                        break
                    wrapped = True
                elif wrapped and cursor >= start:
                    break
        return None


def _buffer(length: int) -> memoryview:
    """Memory for a batch of values. A large one is mapped on its own, so that it goes back to
    the system the moment it is let go: from malloc, glibc keeps such buffers (its mmap
    threshold rises past them) in each thread's arena, and a door with many clients held
    tens of MiB past its reply budget."""
    if length < OWN_MAPPING_BYTES:
        return memoryview(bytearray(length))
    return memoryview(mmap.mmap(-1, length))


def _gather(parts: list[memoryview]) -> memoryview:
    out = _buffer(sum(len(part) for part in parts))
    at = 0
    for part in parts:
        out[at:at + len(part)] = part
        at += len(part)
    return out

"""The server's read-modify-write operations on one key, the ones Redis's string and key
commands need beyond put, get and delete: take (GETDEL), get with a new expiry (GETEX),
append, setrange, incr_float, describe (TTL, STRLEN), expire_at with Redis's NX/XX/GT/LT,
persist, and move (RENAME, RENAMENX, COPY).

Each runs at the key's first home under the key's stripe lock, the lock every write of the
key takes, so it is atomic for the key as Redis's command is: no write of the key comes
between the read and the write. The new value goes through the service's _write (replicas
included); a new expiry to the replicas as kv_expire sends it.

A mixin of KeyValueService (service.py): it uses the service's keyspaces and writes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import InvalidArgument, NoSuchObject
from ..limits import KV_INLINE_BYTES
from ..server.requests import Connection, Reply
from . import longdouble
from .rules import NO_EXPIRY, check_key, homes, key_hash
from .space import KEY_LOCK_STRIPES, now_ms
from .store import replicas_of
from .transfer import put_large

# Redis's proto-max-bulk-len: a string an edit would make longer is refused, as Redis does.
MAX_STRING_BYTES = 512 << 20
TOO_LONG = "string exceeds maximum allowed size (proto-max-bulk-len)"
WHEN = frozenset({"nx", "xx", "gt", "lt"})


def _value_arg(m: dict[str, Any], name: str = "value") -> bytes:
    value = m.get(name)
    if not isinstance(value, bytes) or len(value) > KV_INLINE_BYTES:
        raise InvalidArgument(f"{name} is bytes, at most {KV_INLINE_BYTES} of them")
    return value


def _expire_at(m: dict[str, Any]) -> int:
    at = m.get("expire_at_ms")
    if type(at) is not int or at < 0:
        raise InvalidArgument(f"expire_at_ms is ms of the wall clock (0: none), got {at!r:.40}")
    return at


class KeyEdits:
    """Operations registered with KeyValueService's (op_ methods)."""

    # ---- helpers ----------------------------------------------------------------------------

    def _current(self, space: Any, store: Any, key: bytes, h: int) -> tuple[bytes, int, int, int] | None:
        """The key's (value, expiry, replicas, version), or None; under its stripe lock."""
        with space.lock:
            found = store.live(key, h, now_ms())
            if found is None:
                return None
            return store.read(found[1]), found[1][4], replicas_of(found[1]), found[1][6]

    def _put_here(self, state: Any, creds: Any, space: Any, store: Any, key: bytes, value: bytes, expiry: int,
                  replicas: int, nx: bool = False) -> bool:
        return self._write(state, creds, space, store, key, memoryview(value), None, len(value), expiry,
                           nx=nx, replicas=replicas)["stored"]

    def _new_expiry(self, creds: Any, space: Any, store: Any, key: bytes, h: int, expiry: int,
                    replicas: int) -> None:
        """Set the key's expiry (NO_EXPIRY: none; in the past: the key goes) and tell its replicas."""
        if expiry != NO_EXPIRY and expiry <= now_ms():
            self._delete(creds, space, store, key)
            return
        with space.lock:
            found = store.live(key, h, now_ms())
            if found is None:
                return
            store.set_expiry(found[0], expiry)
            version = space.next_version()
        self._replicate(creds, space, key, {"expire": expiry, "version": version},
                        self._replica_targets(space, creds[0], key, replicas))

    def _edit(self, conn: Connection, m: dict[str, Any],
              fn: Callable[[Any, Any, Any, Any, bytes, int], Reply]) -> Reply:
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        h = key_hash(key)
        with space.key_lock(h):
            return fn(state, creds, space, store, key, h)

    # ---- reads that change ---------------------------------------------------------------------

    def _handed(self, conn: Connection, state: Any, space: Any, store: Any, key: bytes, h: int
                ) -> tuple[dict[str, Any], int, int] | None:
        """The key's value as a reply hands it back (inline, or held: _value_or_hold), its
        expiry and replicas; None: no such key. Under its stripe lock."""
        with space.lock:
            found = store.live(key, h, now_ms())
            if found is None:
                return None
            return self._value_or_hold(conn, state, space, store, found[1]), found[1][4], replicas_of(found[1])

    def op_kv_take(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """GETDEL: the value, and the key is gone (a large value is held: read after the delete)."""
        def take(state, creds, space, store, key, h):
            current = self._handed(conn, state, space, store, key, h)
            if current is None:
                return {"found": False}
            try:
                self._delete(creds, space, store, key)
            except BaseException:
                with space.lock:
                    self._unhand(conn, current[0])
                raise
            return {"found": True, **current[0]}
        return self._edit(conn, m, take)

    def op_kv_get_expire(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """GETEX: the value, then the key's expiry set to expire_at_ms (0: none, persist)."""
        expiry = _expire_at(m)

        def get_expire(state, creds, space, store, key, h):
            current = self._handed(conn, state, space, store, key, h)
            if current is None:
                return {"found": False}
            if expiry != current[1]:
                try:
                    self._new_expiry(creds, space, store, key, h, expiry, current[2])
                except BaseException:
                    with space.lock:
                        self._unhand(conn, current[0])
                    raise
            return {"found": True, **current[0]}
        return self._edit(conn, m, get_expire)

    def op_kv_describe(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """The key's length and absolute expiry (-1: none), without its value."""
        state, creds, space, store = self._space(conn, m)
        key = check_key(m.get("key"))
        with space.lock:
            found = store.live(key, key_hash(key), now_ms())
            if found is None:
                return {"found": False}
            expiry = found[1][4]
            return {"found": True, "length": found[1][3], "expire_at_ms": -1 if expiry == NO_EXPIRY else expiry}

    # ---- writes of part of a value ----------------------------------------------------------------

    def op_kv_append(self, conn: Connection, m: dict[str, Any]) -> Reply:
        more = _value_arg(m)

        def append(state, creds, space, store, key, h):
            current = self._current(space, store, key, h)
            value, expiry, replicas, _ = current if current is not None else (b"", NO_EXPIRY, 0, 0)
            if len(value) + len(more) > MAX_STRING_BYTES:
                raise InvalidArgument(TOO_LONG)
            new = value + more
            self._put_here(state, creds, space, store, key, new, expiry, replicas)
            return {"length": len(new)}
        return self._edit(conn, m, append)

    def op_kv_setrange(self, conn: Connection, m: dict[str, Any]) -> Reply:
        part = _value_arg(m)
        offset = m.get("offset")
        if type(offset) is not int or offset < 0:
            raise InvalidArgument("offset is out of range")

        def setrange(state, creds, space, store, key, h):
            current = self._current(space, store, key, h)
            if current is None and not part:
                return {"length": 0}
            value, expiry, replicas, _ = current if current is not None else (b"", NO_EXPIRY, 0, 0)
            if not part:
                return {"length": len(value)}
            if offset + len(part) > MAX_STRING_BYTES:
                raise InvalidArgument(TOO_LONG)
            new = bytearray(value)
            if len(new) < offset + len(part):
                new.extend(bytes(offset + len(part) - len(new)))
            new[offset:offset + len(part)] = part
            self._put_here(state, creds, space, store, key, bytes(new), expiry, replicas)
            return {"length": len(new)}
        return self._edit(conn, m, setrange)

    def op_kv_incr_float(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """INCRBYFLOAT: the value plus `by` (text), as long doubles (longdouble.py)."""
        by_text = m.get("by")
        if not isinstance(by_text, bytes):
            raise InvalidArgument("by is the increment's text (bytes)")

        def incr(state, creds, space, store, key, h):
            current = self._current(space, store, key, h)
            value, expiry, replicas, _ = current if current is not None else (None, NO_EXPIRY, 0, 0)
            start = longdouble.parse(value) if value is not None else longdouble.parse(b"0")
            by = longdouble.parse(by_text)
            if start is None or by is None:
                raise InvalidArgument("value is not a valid float")
            result = start + by
            if not (result - result == 0):            # NaN or infinite
                raise InvalidArgument("increment would produce NaN or Infinity")
            text = longdouble.human(result)
            self._put_here(state, creds, space, store, key, text, expiry, replicas)
            return {"value": text}
        return self._edit(conn, m, incr)

    # ---- expiry ---------------------------------------------------------------------------------

    def op_kv_expire_at(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """EXPIRE and its kin: expire at `expire_at_ms` (in the past: delete), unless one of
        `when` (nx: only without an expiry; xx: only with one; gt: only later than its own,
        none counting as forever; lt: only earlier) says no. {"set": whether it changed}."""
        at = m.get("expire_at_ms")
        when = m.get("when", [])
        if type(at) is not int or not isinstance(when, list) or not all(isinstance(w, str) and w in WHEN
                                                                        for w in when):
            raise InvalidArgument("expire_at takes expire_at_ms (an int) and when (a list of nx, xx, gt, lt)")

        def expire(state, creds, space, store, key, h):
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is None:
                    return {"set": False}
                current = found[1][4]
                replicas = replicas_of(found[1])
            has = current != NO_EXPIRY
            if ("nx" in when and has) or ("xx" in when and not has) or \
                    ("gt" in when and (not has or at <= current)) or ("lt" in when and has and at >= current):
                return {"set": False}
            if at <= now_ms():
                self._delete(creds, space, store, key)
            else:
                self._new_expiry(creds, space, store, key, h, at, replicas)
            return {"set": True}
        return self._edit(conn, m, expire)

    def op_kv_persist(self, conn: Connection, m: dict[str, Any]) -> Reply:
        def persist(state, creds, space, store, key, h):
            with space.lock:
                found = store.live(key, h, now_ms())
                if found is None or found[1][4] == NO_EXPIRY:
                    return {"persisted": False}
                replicas = replicas_of(found[1])
            self._new_expiry(creds, space, store, key, h, NO_EXPIRY, replicas)
            return {"persisted": True}
        return self._edit(conn, m, persist)

    # ---- one key to another --------------------------------------------------------------------

    def op_kv_move(self, conn: Connection, m: dict[str, Any]) -> Reply:
        """RENAME (nx: RENAMENX) and, with keep, COPY: `key`'s value and expiry under `to`,
        written at `to`'s first home. {"moved": False} when nx and `to` exists. NO_SUCH_OBJECT:
        no `key`.

        `to` here too: both keys' stripes are held (in stripe order, so two moves the other way
        round never wait on each other) and the move is atomic. `to` elsewhere: no stripe is
        held while that server is asked (it may be asking us the same the other way round);
        `key` is deleted after, unless it was written meanwhile (then that write stands, as if
        it came after the rename)."""
        state, creds, space, store = self._space(conn, m)
        key, to = check_key(m.get("key")), check_key(m.get("to"))
        nx, keep = m.get("nx", False), m.get("keep", False)
        if type(nx) is not bool or type(keep) is not bool:
            raise InvalidArgument("nx and keep are booleans")
        h, h_to = key_hash(key), key_hash(to)
        servers = self._pool_servers(creds[0])
        home = homes(to, servers, 1)[0] if servers else self.server_id
        if home == self.server_id:
            locks = [space.key_locks[s] for s in sorted({h % KEY_LOCK_STRIPES, h_to % KEY_LOCK_STRIPES})]
            for lock in locks:
                lock.acquire()
            try:
                current = self._current(space, store, key, h)
                if current is None:
                    raise NoSuchObject("no such key")
                if key == to:
                    return {"moved": not nx}
                value, expiry, replicas, _ = current
                moved = self._put_here(state, creds, space, store, to, value, expiry, replicas, nx=nx)
                if moved and not keep:
                    self._delete(creds, space, store, key)
                return {"moved": moved}
            finally:
                for lock in reversed(locks):
                    lock.release()
        with space.key_lock(h):
            current = self._current(space, store, key, h)
        if current is None:
            raise NoSuchObject("no such key")
        value, expiry, replicas, version = current
        commit = {"expire_at_ms": expiry, "nx": nx, "replicas": replicas or None}
        link = self.server._peer(home)
        if len(to) + len(value) <= KV_INLINE_BYTES:
            moved = link.call("kv_put", pool=creds[0], ns=creds[1], sec=creds[2], key=to, value=value,
                              **commit)["stored"]
        else:
            moved = put_large(link, creds, to, [memoryview(value)], len(value), commit)["stored"]
        if moved and not keep:
            with space.key_lock(h):
                now = self._current(space, store, key, h)
                if now is not None and now[3] == version:
                    self._delete(creds, space, store, key)
        return {"moved": moved}

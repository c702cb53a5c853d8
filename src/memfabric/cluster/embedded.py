"""Embedded cluster service: one SQLite file (WAL) shared by the servers of one host, and a
directory of liveness files next to it.

Registration, epochs and the namespace catalog are SQLite transactions. Liveness is not:
each server's heartbeat (a wall-clock timestamp, shared by every process on the host, with
its pool figures) is one small file it replaces atomically (write, then rename), which no
lock guards. A process stopped while it holds SQLite's write lock (SIGSTOP, a debugger, a
server frozen inside a write) then blocks catalog writes, never liveness: the other servers
go on beating and seeing each other alive, and reads of the catalog (WAL snapshots) go on.

The database and everything next to it are the owner's alone (0600 from creation): the
catalog holds the secIds' hashes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

from ..core.namespaces import NamespaceRecord
from ..errors import IOError_, LimitExceeded, NamespaceExists, ServerUnavailable
from ..limits import (CATALOG_LOCK_RETRY_S, CATALOG_LOCK_WAIT_S, LIVENESS_TIMEOUT_S, MAX_NAMESPACES)
from .base import ServerRecord, creator_limit_message

# The servers table keeps its old up/heartbeat_s/pools columns, so that catalogs of earlier
# versions open unchanged; liveness and pool figures now live in the liveness files.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    server_id   INTEGER PRIMARY KEY,
    node_key    TEXT UNIQUE NOT NULL,
    host        TEXT NOT NULL,
    ipc_socket  TEXT NOT NULL,
    rpc_address TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    up          INTEGER NOT NULL,
    heartbeat_s REAL NOT NULL,
    pools       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS namespaces (
    pool        TEXT NOT NULL,
    ns          TEXT NOT NULL,
    attribute   INTEGER NOT NULL,
    salt        TEXT NOT NULL,
    sec_hash    TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    creator     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (pool, ns)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ns_settings (
    pool        TEXT NOT NULL,
    ns          TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (pool, ns, incarnation, name)
);
"""
_NS_COLUMNS = "pool, ns, attribute, salt, sec_hash, incarnation, creator"
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
MAX_LIVENESS_FILE_BYTES = 1 << 20


class CatalogLocked(ServerUnavailable):
    """Another process holds the database's write lock for longer than a write waits."""


class EmbeddedCluster:
    def __init__(self, path: str, liveness_timeout_s: float = LIVENESS_TIMEOUT_S) -> None:
        self.path = path
        self.liveness_dir = path + "-liveness"
        self.liveness_timeout_s = liveness_timeout_s
        self._pids: dict[int, int] = {}      # servers registered through this object -> pid
        # Two connections, each with its lock: a write waiting for another process's lock
        # never holds up this process's reads (its view of who is alive above all).
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lock_stuck = False             # the last write found the lock held for long
        try:
            _create_private(path)
        except OSError as exc:
            raise IOError_(f"cannot make the cluster database {path}: {exc.strerror}") from None
        try:
            self._writer = self._connect()
            self._reader = self._connect()
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.executescript(_SCHEMA)
            columns = {row[1] for row in self._reader.execute("PRAGMA table_info(namespaces)")}
            if "creator" not in columns:     # a catalog of an earlier version
                self._writer.execute("ALTER TABLE namespaces ADD COLUMN creator TEXT NOT NULL DEFAULT ''")
        except sqlite3.Error as exc:
            raise IOError_(f"cannot open the cluster database {path}: {exc}") from None
        # SQLite makes -wal and -shm with the database's mode; narrow any an older version left.
        for name in (path, path + "-wal", path + "-shm"):
            _narrow(name)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=CATALOG_LOCK_WAIT_S, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _run(self, fn, write: bool = True):
        if not write:
            with self._read_lock:
                return self._transaction(self._reader, "BEGIN", fn)
        with self._write_lock:
            # Writers take the lock up front (no upgrade deadlocks). While another process
            # sits on it, each write waits only a moment before it says so, not the full wait.
            wait_s = CATALOG_LOCK_RETRY_S if self._lock_stuck else CATALOG_LOCK_WAIT_S
            self._writer.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
            stuck = False
            try:
                return self._transaction(self._writer, "BEGIN IMMEDIATE", fn)
            except CatalogLocked:
                stuck = True
                raise
            finally:
                self._lock_stuck = stuck

    def _transaction(self, db: sqlite3.Connection, begin: str, fn):
        try:
            db.execute(begin)
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise CatalogLocked(
                    f"the cluster database {self.path} is locked by another process (a server stopped or "
                    f"stuck inside a write?): catalog changes wait until it lets go; liveness does not") from None
            raise IOError_(f"cluster database {self.path}: {exc}") from None

    # ---- liveness files ---------------------------------------------------------------------

    def _liveness_path(self, server_id: int) -> str:
        return os.path.join(self.liveness_dir, f"server-{server_id}.json")

    def _beat(self, server_id: int, pid: int, up: bool, pools: dict[str, dict[str, Any]]) -> None:
        """Replace the server's liveness file whole: readers see the old one or the new one."""
        data = json.dumps({"pid": pid, "up": up, "heartbeat_s": time.time(), "pools": pools}).encode()
        final = self._liveness_path(server_id)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(self.liveness_dir, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise IOError_(f"cannot write the liveness file {final}: {exc.strerror}") from None

    def _liveness(self, server_id: int) -> dict[str, Any] | None:
        """The server's last beat, or None if there is none (or it cannot be read)."""
        try:
            with open(self._liveness_path(server_id), "rb") as f:
                beat = json.loads(f.read(MAX_LIVENESS_FILE_BYTES))
        except (OSError, ValueError):
            return None
        if not isinstance(beat, dict) or not isinstance(beat.get("heartbeat_s"), (int, float)) \
                or not isinstance(beat.get("pools"), dict):
            return None
        return beat

    def _alive(self, beat: dict[str, Any] | None, pid: int, now: float) -> bool:
        return (beat is not None and beat.get("up") is True and beat.get("pid") == pid
                and now - beat["heartbeat_s"] < self.liveness_timeout_s)

    # ---- servers ------------------------------------------------------------------

    def register_server(self, node_key: str, host: str, ipc_socket: str, rpc_address: str,
                        pid: int) -> int:
        def txn(db: sqlite3.Connection) -> int:
            now = time.time()
            row = db.execute("SELECT server_id, pid FROM servers WHERE node_key=?", (node_key,)).fetchone()
            if row is not None:
                server_id, old_pid = row
                if self._alive(self._liveness(server_id), old_pid, now) and old_pid != pid and _running(old_pid):
                    raise ServerUnavailable(
                        f"server {server_id} for {node_key} is alive (pid {old_pid}); "
                        "two servers cannot share a data directory")
                db.execute("UPDATE servers SET host=?, ipc_socket=?, rpc_address=?, pid=?, up=1, "
                           "heartbeat_s=? WHERE server_id=?",
                           (host, ipc_socket, rpc_address, pid, now, server_id))
            else:
                cur = db.execute("INSERT INTO servers (node_key, host, ipc_socket, rpc_address, pid, up, "
                                 "heartbeat_s) VALUES (?, ?, ?, ?, ?, 1, ?)",
                                 (node_key, host, ipc_socket, rpc_address, pid, now))
                server_id = int(cur.lastrowid)
            # Alive from the moment the registration is visible (the commit follows).
            self._beat(server_id, pid, True, {})
            return server_id
        server_id = self._run(txn)
        self._pids[server_id] = pid
        return server_id

    def next_epoch(self) -> int:
        def txn(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO counters (name, value) VALUES ('epoch', 1) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + 1")
            return db.execute("SELECT value FROM counters WHERE name='epoch'").fetchone()[0]
        return self._run(txn)

    def _pid_of(self, server_id: int) -> int | None:
        """The registered pid (liveness files are only believed for it); None: no such server."""
        pid = self._pids.get(server_id)
        if pid is None:
            row = self._run(lambda db: db.execute("SELECT pid FROM servers WHERE server_id=?",
                                                  (server_id,)).fetchone(), write=False)
            if row is not None:
                pid = self._pids[server_id] = row[0]
        return pid

    def heartbeat(self, server_id: int, pools: dict[str, dict[str, Any]]) -> bool | None:
        pid = self._pid_of(server_id)
        if pid is None:
            raise ServerUnavailable(f"server {server_id} is not registered")
        self._beat(server_id, pid, True, pools)
        return None      # members judge liveness by each beat's time: so must the server

    def deregister_server(self, server_id: int) -> None:
        pid = self._pid_of(server_id)
        if pid is not None:        # a server that never registered has nothing to take back
            beat = self._liveness(server_id) or {}
            self._beat(server_id, pid, False, beat.get("pools", {}))

    def servers(self) -> list[ServerRecord]:
        rows = self._run(lambda db: db.execute(
            "SELECT server_id, host, ipc_socket, rpc_address, pid, heartbeat_s, pools FROM servers "
            "ORDER BY server_id").fetchall(), write=False)
        now = time.time()
        out = []
        for sid, host, ipc, rpc, pid, registered_s, pools in rows:
            beat = self._liveness(sid)
            if beat is None:      # never beat since this version: what registration said
                out.append(ServerRecord(sid, host, ipc, rpc, pid, False, registered_s, json.loads(pools)))
            else:
                out.append(ServerRecord(sid, host, ipc, rpc, pid, self._alive(beat, pid, now),
                                        beat["heartbeat_s"], beat["pools"]))
        return out

    # ---- namespaces ---------------------------------------------------------------

    def create_namespace(self, pool: str, ns: str, attribute: int, salt_hex: str,
                         sec_hash_hex: str, creator: str = "",
                         creator_limit: int | None = None) -> NamespaceRecord:
        def txn(db: sqlite3.Connection) -> NamespaceRecord:
            if db.execute("SELECT 1 FROM namespaces WHERE pool=? AND ns=?", (pool, ns)).fetchone():
                raise NamespaceExists(f"namespace {ns!r} already exists in pool {pool!r}")
            (count,) = db.execute("SELECT COUNT(*) FROM namespaces").fetchone()
            if count >= MAX_NAMESPACES:
                raise LimitExceeded(f"the cluster has {count} namespaces, the most it may")
            if creator_limit is not None:
                (mine,) = db.execute("SELECT COUNT(*) FROM namespaces WHERE creator=?", (creator,)).fetchone()
                if mine >= creator_limit:
                    raise LimitExceeded(creator_limit_message(creator, mine, creator_limit))
            db.execute("INSERT INTO counters (name, value) VALUES ('incarnation', 1) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + 1")
            (incarnation,) = db.execute("SELECT value FROM counters WHERE name='incarnation'").fetchone()
            db.execute(f"INSERT INTO namespaces ({_NS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (pool, ns, attribute, salt_hex, sec_hash_hex, incarnation, creator))
            return NamespaceRecord(pool, ns, attribute, salt_hex, sec_hash_hex, incarnation, creator)
        return self._run(txn)

    def get_namespace(self, pool: str, ns: str) -> NamespaceRecord | None:
        row = self._run(lambda db: db.execute(
            f"SELECT {_NS_COLUMNS} FROM namespaces WHERE pool=? AND ns=?", (pool, ns)).fetchone(), write=False)
        return None if row is None else NamespaceRecord(*row)

    def delete_namespace(self, pool: str, ns: str, incarnation: int) -> bool:
        def txn(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM namespaces WHERE pool=? AND ns=? AND incarnation=?", (pool, ns, incarnation))
            db.execute("DELETE FROM ns_settings WHERE pool=? AND ns=? AND incarnation=?", (pool, ns, incarnation))
            return cur.rowcount == 1
        return self._run(txn)

    def set_settings(self, pool: str, ns: str, incarnation: int, name: str, value: dict[str, Any]) -> bool:
        def txn(db: sqlite3.Connection) -> bool:
            if not db.execute("SELECT 1 FROM namespaces WHERE pool=? AND ns=? AND incarnation=?",
                              (pool, ns, incarnation)).fetchone():
                return False
            db.execute("INSERT INTO ns_settings VALUES (?, ?, ?, ?, ?) ON CONFLICT(pool, ns, incarnation, name) "
                       "DO UPDATE SET value = excluded.value", (pool, ns, incarnation, name, json.dumps(value)))
            return True
        return self._run(txn)

    def get_settings(self, pool: str, ns: str, incarnation: int, name: str) -> dict[str, Any] | None:
        row = self._run(lambda db: db.execute(
            "SELECT value FROM ns_settings WHERE pool=? AND ns=? AND incarnation=? AND name=?",
            (pool, ns, incarnation, name)).fetchone(), write=False)
        return None if row is None else json.loads(row[0])

    def namespaces(self) -> list[NamespaceRecord]:
        rows = self._run(lambda db: db.execute(
            f"SELECT {_NS_COLUMNS} FROM namespaces ORDER BY pool, ns").fetchall(), write=False)
        return [NamespaceRecord(*row) for row in rows]

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()



def _create_private(path: str) -> None:
    """Make the database file 0600 before SQLite opens it, so it is never wider, whatever the
    umask; SQLite gives its -wal and -shm files the same mode. Its directory is made if
    missing (as a server makes its data_dir), so a first start needs nothing made by hand."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))


def _narrow(path: str) -> None:
    try:
        st = os.stat(path)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


def _running(pid: int) -> bool:
    """One host, one process table: a vanished predecessor is dead without waiting."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Embedded cluster service: one SQLite file (WAL) shared by the servers of one host.

Liveness is a heartbeat timestamp (wall clock, shared by every process on the host);
a server is alive while its last heartbeat is younger than the liveness timeout.
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
from ..limits import LIVENESS_TIMEOUT_S, MAX_NAMESPACES
from .base import ServerRecord

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
    PRIMARY KEY (pool, ns)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class EmbeddedCluster:
    def __init__(self, path: str, liveness_timeout_s: float = LIVENESS_TIMEOUT_S) -> None:
        self.path = path
        self.liveness_timeout_s = liveness_timeout_s
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise IOError_(f"cannot open the cluster database {path}: {exc}") from None

    def _run(self, fn, write: bool = True):
        with self._lock:
            try:
                # Writers take the lock up front (no upgrade deadlocks); readers see a WAL snapshot
                # and never wait for another server's heartbeat.
                self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise IOError_(f"cluster database {self.path}: {exc}") from None

    # ---- servers ------------------------------------------------------------------

    def register_server(self, node_key: str, host: str, ipc_socket: str, rpc_address: str,
                        pid: int) -> int:
        def txn(db: sqlite3.Connection) -> int:
            now = time.time()
            row = db.execute("SELECT server_id, up, heartbeat_s, pid FROM servers WHERE node_key=?",
                             (node_key,)).fetchone()
            if row is not None:
                server_id, up, heartbeat_s, old_pid = row
                if up and now - heartbeat_s < self.liveness_timeout_s and old_pid != pid and _running(old_pid):
                    raise ServerUnavailable(
                        f"server {server_id} for {node_key} is alive (pid {old_pid}); "
                        "two servers cannot share a data directory")
                db.execute("UPDATE servers SET host=?, ipc_socket=?, rpc_address=?, pid=?, up=1, "
                           "heartbeat_s=? WHERE server_id=?",
                           (host, ipc_socket, rpc_address, pid, now, server_id))
                return server_id
            cur = db.execute("INSERT INTO servers (node_key, host, ipc_socket, rpc_address, pid, up, "
                             "heartbeat_s) VALUES (?, ?, ?, ?, ?, 1, ?)",
                             (node_key, host, ipc_socket, rpc_address, pid, now))
            return int(cur.lastrowid)
        return self._run(txn)

    def next_epoch(self) -> int:
        def txn(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO counters (name, value) VALUES ('epoch', 1) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + 1")
            return db.execute("SELECT value FROM counters WHERE name='epoch'").fetchone()[0]
        return self._run(txn)

    def heartbeat(self, server_id: int, pools: dict[str, dict[str, Any]]) -> None:
        self._run(lambda db: db.execute(
            "UPDATE servers SET heartbeat_s=?, pools=?, up=1 WHERE server_id=?",
            (time.time(), json.dumps(pools), server_id)))

    def deregister_server(self, server_id: int) -> None:
        self._run(lambda db: db.execute("UPDATE servers SET up=0 WHERE server_id=?", (server_id,)))

    def servers(self) -> list[ServerRecord]:
        def txn(db: sqlite3.Connection) -> list[ServerRecord]:
            now = time.time()
            rows = db.execute("SELECT server_id, host, ipc_socket, rpc_address, pid, up, heartbeat_s, "
                              "pools FROM servers ORDER BY server_id").fetchall()
            return [ServerRecord(sid, host, ipc, rpc, pid,
                                 bool(up) and now - hb < self.liveness_timeout_s, hb, json.loads(pools))
                    for sid, host, ipc, rpc, pid, up, hb, pools in rows]
        return self._run(txn, write=False)

    # ---- namespaces ---------------------------------------------------------------

    def create_namespace(self, pool: str, ns: str, attribute: int, salt_hex: str,
                         sec_hash_hex: str) -> NamespaceRecord:
        def txn(db: sqlite3.Connection) -> NamespaceRecord:
            if db.execute("SELECT 1 FROM namespaces WHERE pool=? AND ns=?", (pool, ns)).fetchone():
                raise NamespaceExists(f"namespace {ns!r} already exists in pool {pool!r}")
            (count,) = db.execute("SELECT COUNT(*) FROM namespaces").fetchone()
            if count >= MAX_NAMESPACES:
                raise LimitExceeded(f"the cluster has {count} namespaces, the most it may")
            db.execute("INSERT INTO counters (name, value) VALUES ('incarnation', 1) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + 1")
            (incarnation,) = db.execute("SELECT value FROM counters WHERE name='incarnation'").fetchone()
            db.execute("INSERT INTO namespaces VALUES (?, ?, ?, ?, ?, ?)",
                       (pool, ns, attribute, salt_hex, sec_hash_hex, incarnation))
            return NamespaceRecord(pool, ns, attribute, salt_hex, sec_hash_hex, incarnation)
        return self._run(txn)

    def get_namespace(self, pool: str, ns: str) -> NamespaceRecord | None:
        row = self._run(lambda db: db.execute(
            "SELECT pool, ns, attribute, salt, sec_hash, incarnation FROM namespaces "
            "WHERE pool=? AND ns=?", (pool, ns)).fetchone(), write=False)
        return None if row is None else NamespaceRecord(*row)

    def delete_namespace(self, pool: str, ns: str, incarnation: int) -> bool:
        cur = self._run(lambda db: db.execute(
            "DELETE FROM namespaces WHERE pool=? AND ns=? AND incarnation=?", (pool, ns, incarnation)))
        return cur.rowcount == 1

    def namespaces(self) -> list[NamespaceRecord]:
        rows = self._run(lambda db: db.execute(
            "SELECT pool, ns, attribute, salt, sec_hash, incarnation FROM namespaces "
            "ORDER BY pool, ns").fetchall(), write=False)
        return [NamespaceRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()



def _running(pid: int) -> bool:
    """One host, one process table: a vanished predecessor is dead without waiting."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

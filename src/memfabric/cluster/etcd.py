"""The etcd cluster service, for fabrics that span hosts.

    PREFIX/ids/<n>            the node key that claimed server id n (txn: create_revision == 0)
    PREFIX/nodes/<sha256>     node key -> server id: a restarted server keeps its id
    PREFIX/known/<n>          the server's last published record (persistent)
    PREFIX/live/<n>           the same, under the server's lease: present while it is alive
    PREFIX/ns/<pool>/<ns>     the namespace catalog; a key's create revision is its incarnation
    PREFIX/epoch              a counter servers take a fresh number from at each start

Liveness is the lease: the server refreshes it on every heartbeat; if it stops, etcd drops
its live/ key within the TTL. The live set is kept current by a prefix watch. When etcd
is unreachable for a while and the lease is gone on return, the heartbeat registers the
same server id again with a new lease: the server's objects never left its memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from typing import Any

import grpc
import pyetcd
import pyetcd.exceptions

from ..core.namespaces import NamespaceRecord
from ..errors import InvalidArgument, LimitExceeded, NamespaceExists, ServerUnavailable
from ..limits import LIVENESS_TIMEOUT_S, MAX_NAMESPACES
from .base import ServerRecord, creator_limit_message

log = logging.getLogger("memfabric.cluster")
ETCD_TIMEOUT_S = 3.0
RECONNECT_EVERY_S = 0.2
RETIRE_AFTER_S = 2 * ETCD_TIMEOUT_S     # longer than any call on a replaced client can last
MAX_SERVER_IDS = 4096
MAX_EPOCH_ATTEMPTS = 100


_ETCD_ERRORS = (pyetcd.exceptions.Etcd3Exception, grpc.RpcError, ValueError)


def _guard(fn):
    def wrapper(self, *args, **kwargs):
        client = self._client
        try:
            return fn(self, *args, **kwargs)
        except _ETCD_ERRORS:
            # A fresh client (channel) is used again as soon as etcd answers: try once more on it.
            self._reconnect(client)
            if self._client is not client:
                try:
                    return fn(self, *args, **kwargs)
                except _ETCD_ERRORS as again:
                    exc = again
            raise ServerUnavailable(f"the cluster service (etcd at {self.endpoint}) did not answer: "
                                    f"{exc.__class__.__name__}") from None
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class EtcdCluster:
    def __init__(self, endpoints: list[str], liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
                 prefix: str = "/memfabric") -> None:
        if not endpoints:
            raise InvalidArgument("the etcd backend needs cluster.endpoints")
        self.endpoint = endpoints[0]
        host, _, port = self.endpoint.rpartition(":")
        self.prefix = prefix.rstrip("/")
        self.ttl_s = max(2, math.ceil(liveness_timeout_s))
        self._host, self._port = host, int(port)
        self._client = _new_client(host, int(port))
        self._lock = threading.Lock()
        self._leases: dict[int, int] = {}                  # server id -> lease id
        self._records: dict[int, dict[str, Any]] = {}     # what each of our servers registered
        self._live: dict[int, dict[str, Any]] | None = None
        self._watch_id = None
        self._retired: list[tuple[float, Any]] = []
        self._reconnected_at = 0.0

    def _reconnect(self, failed: Any) -> None:
        """Replace the client that failed (once: threads that failed on it together share one
        replacement, at most every RECONNECT_EVERY_S). Old clients are closed only after a
        while, since other threads may still be in a call on them."""
        now = time.monotonic()
        with self._lock:
            if failed is not self._client or now - self._reconnected_at < RECONNECT_EVERY_S:
                return
            self._reconnected_at = now
            self._retired.append((now, self._client))
            self._client = _new_client(self._host, self._port)
            self._live, self._watch_id = None, None
            expired = [c for t, c in self._retired if now - t > RETIRE_AFTER_S]
            self._retired = [(t, c) for t, c in self._retired if now - t <= RETIRE_AFTER_S]
        for old in expired:
            try:
                old.close()
            except Exception:
                pass

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    # ---- servers ----------------------------------------------------------------------

    @_guard
    def register_server(self, node_key: str, host: str, ipc_socket: str, rpc_address: str, pid: int) -> int:
        digest = hashlib.sha256(node_key.encode()).hexdigest()
        value, _ = self._client.get(self._key("nodes", digest))
        if value is not None:
            server_id = int(value)
            live, _ = self._client.get(self._key("live", server_id))
            if live is not None and json.loads(live)["pid"] != pid:
                raise ServerUnavailable(f"server {server_id} for {node_key} is alive (pid {json.loads(live)['pid']}); "
                                        "two servers cannot share a data directory")
        else:
            server_id = self._claim_id(node_key, digest)
        record = {"server_id": server_id, "host": host, "ipc_socket": ipc_socket, "rpc_address": rpc_address,
                  "pid": pid, "pools": {}}
        with self._lock:
            self._records[server_id] = record
        self._go_live(server_id, record)
        return server_id

    def _claim_id(self, node_key: str, digest: str) -> int:
        taken = {int(md.key.decode().rsplit("/", 1)[1]) for _, md in self._client.get_prefix(self._key("ids") + "/")}
        t = self._client.transactions
        for server_id in range(1, MAX_SERVER_IDS + 1):
            if server_id in taken:
                continue
            ok, _ = self._client.transaction(
                compare=[t.create(self._key("ids", server_id)) == 0],
                success=[t.put(self._key("ids", server_id), node_key),
                         t.put(self._key("nodes", digest), str(server_id))],
                failure=[])
            if ok:
                return server_id
        raise LimitExceeded(f"all {MAX_SERVER_IDS} server ids are taken")

    def _go_live(self, server_id: int, record: dict[str, Any]) -> None:
        lease = self._client.lease(self.ttl_s).id
        with self._lock:
            self._leases[server_id] = lease
        record = {**record, "heartbeat_s": time.time()}
        self._client.put(self._key("known", server_id), json.dumps({**record, "up": True}))
        self._client.put(self._key("live", server_id), json.dumps(record), lease=lease)

    @_guard
    def next_epoch(self) -> int:
        """Compare-and-swap on the counter's value: concurrent starts each get their own."""
        key = self._key("epoch")
        t = self._client.transactions
        for _ in range(MAX_EPOCH_ATTEMPTS):
            value, _ = self._client.get(key)
            current = int(value) if value is not None else 0
            guard = t.create(key) == 0 if value is None else t.value(key) == str(current)
            ok, _ = self._client.transaction(compare=[guard], success=[t.put(key, str(current + 1))], failure=[])
            if ok:
                return current + 1
        raise ServerUnavailable(f"the epoch counter in etcd changed {MAX_EPOCH_ATTEMPTS} times under us")

    @_guard
    def heartbeat(self, server_id: int, pools: dict[str, dict[str, Any]]) -> bool | None:
        with self._lock:
            lease = self._leases.get(server_id)
            record = self._records[server_id]
            record["pools"] = pools
        ttl = None
        if lease is not None:
            responses = list(self._client.refresh_lease(lease))
            ttl = responses[0].TTL if responses else 0
        if not ttl or ttl <= 0:
            # The lease ran out while etcd was away: same id, new lease.
            log.warning("server %d lost its etcd lease; registering again", server_id)
            self._go_live(server_id, record)
            return False     # its live key was gone: members may have seen it dead
        payload = json.dumps({**record, "heartbeat_s": time.time()})
        self._client.put(self._key("live", server_id), payload, lease=lease)
        self._client.put(self._key("known", server_id), json.dumps({**json.loads(payload), "up": True}))
        # The same lease lived on: the live key was never deleted, so no member saw it dead.
        return True

    @_guard
    def deregister_server(self, server_id: int) -> None:
        with self._lock:
            lease = self._leases.pop(server_id, None)
            record = self._records.pop(server_id, None)
        if lease is not None:
            self._client.revoke_lease(lease)
        if record is not None:
            self._client.put(self._key("known", server_id), json.dumps({**record, "up": False,
                                                                        "heartbeat_s": time.time()}))

    @_guard
    def servers(self) -> list[ServerRecord]:
        live = self._live_view()
        out = []
        for value, _ in self._client.get_prefix(self._key("known") + "/"):
            known = json.loads(value)
            current = live.get(known["server_id"], known)
            out.append(ServerRecord(known["server_id"], current["host"], current["ipc_socket"],
                                    current["rpc_address"], current["pid"], known["server_id"] in live,
                                    current.get("heartbeat_s", 0.0), current.get("pools", {})))
        return sorted(out, key=lambda s: s.server_id)

    def _live_view(self) -> dict[int, dict[str, Any]]:
        """The live set, kept by a prefix watch; read afresh while the watch is not running."""
        with self._lock:
            if self._live is not None:
                return dict(self._live)
        live = {json.loads(v)["server_id"]: json.loads(v) for v, _ in self._client.get_prefix(self._key("live") + "/")}
        self._start_watch(live)
        return live

    def _start_watch(self, snapshot: dict[int, dict[str, Any]]) -> None:
        with self._lock:
            if self._watch_id is not None:
                return
            self._live = dict(snapshot)
        try:
            self._watch_id = self._client.add_watch_prefix_callback(self._key("live") + "/", self._on_watch)
        except pyetcd.exceptions.Etcd3Exception:
            with self._lock:
                self._live = None

    def _on_watch(self, response: Any) -> None:
        with self._lock:
            if isinstance(response, Exception) or self._live is None:
                self._live, self._watch_id = None, None     # fall back to reads until re-watched
                return
            for event in response.events:
                server_id = int(event.key.decode().rsplit("/", 1)[1])
                if isinstance(event, pyetcd.events.PutEvent):
                    self._live[server_id] = json.loads(event.value)
                else:
                    self._live.pop(server_id, None)

    # ---- namespaces -------------------------------------------------------------------

    @_guard
    def create_namespace(self, pool: str, ns: str, attribute: int, salt_hex: str, sec_hash_hex: str,
                         creator: str = "", creator_limit: int | None = None) -> NamespaceRecord:
        # Counted before the transaction, as the cluster-wide limit is: creates racing each
        # other may pass a limit by as many as are in flight at once.
        if creator_limit is None:
            count = sum(1 for _ in self._client.get_prefix(self._key("ns") + "/", keys_only=True))
        else:
            creators = [json.loads(v).get("creator", "") for v, _ in self._client.get_prefix(self._key("ns") + "/")]
            count = len(creators)
        if count >= MAX_NAMESPACES:
            raise LimitExceeded(f"the cluster has {count} namespaces, the most it may")
        if creator_limit is not None and creators.count(creator) >= creator_limit:
            raise LimitExceeded(creator_limit_message(creator, creators.count(creator), creator_limit))
        key = self._key("ns", pool, ns)
        t = self._client.transactions
        value = json.dumps({"attribute": attribute, "salt": salt_hex, "sec_hash": sec_hash_hex, "creator": creator})
        ok, _ = self._client.transaction(compare=[t.create(key) == 0], success=[t.put(key, value)], failure=[])
        if not ok:
            raise NamespaceExists(f"namespace {ns!r} already exists in pool {pool!r}")
        record = self.get_namespace(pool, ns)
        assert record is not None
        return record

    @_guard
    def get_namespace(self, pool: str, ns: str) -> NamespaceRecord | None:
        value, md = self._client.get(self._key("ns", pool, ns))
        return None if value is None else _ns_record(pool, ns, value, md)

    @_guard
    def delete_namespace(self, pool: str, ns: str, incarnation: int) -> bool:
        key = self._key("ns", pool, ns)
        t = self._client.transactions
        ok, _ = self._client.transaction(compare=[t.create(key) == incarnation], success=[t.delete(key)], failure=[])
        if ok:
            self._client.delete_prefix(self._key("nsset", pool, ns, incarnation) + "/")
        return bool(ok)

    @_guard
    def set_settings(self, pool: str, ns: str, incarnation: int, name: str, value: dict[str, Any]) -> bool:
        """Put only while the namespace's incarnation lives (one transaction)."""
        ns_key = self._key("ns", pool, ns)
        t = self._client.transactions
        ok, _ = self._client.transaction(
            compare=[t.create(ns_key) == incarnation],
            success=[t.put(self._key("nsset", pool, ns, incarnation, name), json.dumps(value))], failure=[])
        return bool(ok)

    @_guard
    def get_settings(self, pool: str, ns: str, incarnation: int, name: str) -> dict[str, Any] | None:
        value, _ = self._client.get(self._key("nsset", pool, ns, incarnation, name))
        return None if value is None else json.loads(value)

    @_guard
    def namespaces(self) -> list[NamespaceRecord]:
        out = []
        for value, md in self._client.get_prefix(self._key("ns") + "/"):
            _, pool, ns = md.key.decode()[len(self.prefix) + 1:].split("/")
            out.append(_ns_record(pool, ns, value, md))
        return sorted(out, key=lambda r: (r.pool, r.ns))

    def close(self) -> None:
        for _, old in self._retired:
            try:
                old.close()
            except Exception:
                pass
        if self._watch_id is not None:
            try:
                self._client.cancel_watch(self._watch_id)
            except Exception:
                pass
        self._client.close()


def _new_client(host: str, port: int) -> Any:
    # gRPC backs off reconnecting for up to minutes by default: cap it, so that a returning
    # etcd is found within a second.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    client = pyetcd.client(host, port, timeout=ETCD_TIMEOUT_S, grpc_options=options)
    # pyetcd marks an endpoint "failed" for 300 s after one error and refuses to use it
    # meanwhile; gRPC reconnects by itself when etcd returns, so never shun it.
    for endpoint in client.endpoints.values():
        endpoint.time_retry = 0
    return client


def _ns_record(pool: str, ns: str, value: bytes, md: Any) -> NamespaceRecord:
    data = json.loads(value)
    return NamespaceRecord(pool, ns, data["attribute"], data["salt"], data["sec_hash"], md.create_revision,
                           data.get("creator", ""))

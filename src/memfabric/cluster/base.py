"""The cluster management service: one interface, interchangeable backends.

It numbers servers (a cluster-unique id, stable for a server that keeps its data
directory), knows who is alive, carries each server's resource figures to the others,
and keeps the namespace catalog. Servers talk to it; clients never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.namespaces import NamespaceRecord


@dataclass
class ServerRecord:
    server_id: int
    host: str
    ipc_socket: str
    rpc_address: str
    pid: int
    alive: bool
    last_seen_s: float
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {medium, capacity_bytes, free_bytes, used_bytes}

    def to_wire(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "host": self.host, "ipc_socket": self.ipc_socket,
                "rpc_address": self.rpc_address, "pid": self.pid, "alive": self.alive,
                "last_seen_s": self.last_seen_s, "pools": self.pools}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ServerRecord":
        return cls(**d)


def creator_limit_message(creator: str, count: int, limit: int) -> str:
    return (f"{creator} has created {count} namespaces, the most one client may ({limit}): destroy one, "
            f"or raise [server] max_namespaces_per_client in the servers' configuration")


class ClusterService(Protocol):
    def register_server(self, node_key: str, host: str, ipc_socket: str, rpc_address: str,
                        pid: int) -> int:
        """Claim a server id for this node key (the data directory); the same key gets the same id."""

    def next_epoch(self) -> int:
        """A number this cluster never gave before: strictly larger than every earlier answer,
        across restarts of any server and of the service itself. A server takes one each time
        it starts, so that ids it makes (objects, segments) never repeat an earlier life's."""

    def heartbeat(self, server_id: int, pools: dict[str, dict[str, Any]]) -> bool | None:
        """Publish that the server lives, with its pools' figures. Returns whether the server
        stayed alive in the cluster's eyes since its last beat: True (it did: etcd refreshed
        the same lease, so no member could have seen it dead, however long the beat took),
        False (it did not: the lease ran out and it registered again), None (the backend
        cannot tell: judge by the time between beats)."""

    def deregister_server(self, server_id: int) -> None: ...

    def servers(self) -> list[ServerRecord]: ...

    def create_namespace(self, pool: str, ns: str, attribute: int, salt_hex: str,
                         sec_hash_hex: str, creator: str = "",
                         creator_limit: int | None = None) -> NamespaceRecord:
        """Raises NamespaceExists when (pool, ns) is taken, LimitExceeded when the cluster has
        its most namespaces or `creator` (the client, as its server knows it) already made
        `creator_limit` of those there are."""

    def get_namespace(self, pool: str, ns: str) -> NamespaceRecord | None: ...

    def delete_namespace(self, pool: str, ns: str, incarnation: int) -> bool: ...

    def namespaces(self) -> list[NamespaceRecord]: ...

    def set_settings(self, pool: str, ns: str, incarnation: int, name: str, value: dict[str, Any]) -> bool:
        """Keep a namespace incarnation's settings of one kind (e.g. "kv"); False when that
        incarnation is gone. They go with the namespace."""

    def get_settings(self, pool: str, ns: str, incarnation: int, name: str) -> dict[str, Any] | None: ...

    def close(self) -> None: ...

"""`memfabric status`: the fabric's servers, pools and namespaces, as a table or JSON.

It asks a live server, as any client would (IPC on this host, else RPC: a `remote.toml` is
enough): the server's cluster view, with each server's age by that server's clock, and the
objects and bytes of every namespace summed over the live servers (`ns_query`). When no
server answers, it reads what it can from the cluster service itself, if the configuration
names one (`fabric.toml`, a server's TOML): the servers, and the namespaces without figures.

Exit status: 0 when every server the cluster knows is alive; 3 when any is not (stopped,
killed or cut off); 1 when nothing answers; 2 for a bad configuration.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from ..client.session import Session
from ..cluster import open_cluster
from ..config import ConfigError, FabricConfig, load_fabric_config
from ..errors import MemfabricError, ServerUnavailable, Timeout
from ..units import format_size

STATUS_TIMEOUT_S = 5.0     # per request to a server: a stopped one must not hold status up
EXIT_SERVER_DEAD = 3


def collect(path: str) -> dict[str, Any]:
    fabric = load_fabric_config(path)
    try:
        session = Session(path, timeout_s=STATUS_TIMEOUT_S)
    except (ServerUnavailable, Timeout) as exc:
        if not _names_cluster_service(fabric):
            raise ServerUnavailable(f"{exc}; {fabric.source} names no cluster service to read instead") from None
        return _from_cluster_service(fabric, str(exc))
    try:
        servers = session.servers()
        namespaces = [dataclasses.asdict(n) for n in session.namespaces()]
        asked = session.local.server_id
        doors = _doors(session, servers)
    finally:
        session.close()
    return {"asked": f"server {asked}", "servers": [_server_row(s, s["seen_s_ago"]) for s in servers],
            "namespaces": namespaces, "doors": doors}


def _doors(session: Session, servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Redis-protocol doors of the live servers, with their figures."""
    doors = []
    for s in servers:
        if not s["alive"]:
            continue
        try:
            door = session.link(s["server_id"]).call("kv_door")["door"]
        except MemfabricError:
            continue                  # gone meanwhile, or a server from before doors
        if door is not None:
            doors.append({"server_id": s["server_id"], **door})
    return doors


def _names_cluster_service(fabric: FabricConfig) -> bool:
    cluster = fabric.cluster
    return cluster is not None and bool(cluster.path if cluster.backend == "embedded" else cluster.endpoints)


def _from_cluster_service(fabric: FabricConfig, why: str) -> dict[str, Any]:
    cluster = open_cluster(fabric.cluster.backend, **fabric.cluster.settings())
    try:
        records = cluster.servers()
        namespaces = [{"pool": r.pool, "ns": r.ns, "attribute": r.attribute, "object_count": None,
                       "used_bytes": None, **{f"kv_{k}": None for k in ("keys", "bytes", "hits", "misses",
                                                                         "evictions", "expired")},
                       **{k: None for k in ("plogs", "plogs_sealed", "plog_records", "plog_bytes")}}
                      for r in cluster.namespaces()]
    finally:
        cluster.close()
    now = time.time()
    return {"asked": f"the cluster service (no server answered: {why})",
            "servers": [_server_row(r.to_wire(), max(0.0, now - r.last_seen_s)) for r in records],
            "namespaces": namespaces, "doors": []}


def _server_row(record: dict[str, Any], seen_s_ago: float) -> dict[str, Any]:
    keep = ("server_id", "host", "alive", "pid", "ipc_socket", "rpc_address", "pools")
    return {**{k: record[k] for k in keep}, "seen_s_ago": round(seen_s_ago, 3)}


def run_status(path: str, as_json: bool = False) -> int:
    try:
        state = collect(path)
    except ConfigError as exc:
        print(f"memfabric status: {exc}", file=sys.stderr)
        return 2
    except MemfabricError as exc:
        print(f"memfabric status: {exc}", file=sys.stderr)
        return 1
    dead = [s for s in state["servers"] if not s["alive"]]
    if as_json:
        print(json.dumps(state, indent=2))
        return EXIT_SERVER_DEAD if dead else 0
    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title="servers")
    for column in ("id", "host", "alive", "seen", "pid", "pool", "medium", "capacity", "used", "free",
                   "lendable"):
        table.add_column(column)
    for s in state["servers"]:
        alive = "[green]alive[/]" if s["alive"] else "[red]dead[/]"
        rows = s["pools"].items() or [("-", {})]
        for name, p in rows:
            table.add_row(str(s["server_id"]), s["host"], alive, f"{s['seen_s_ago']:.1f}s ago", str(s["pid"]),
                          name, p.get("medium", "-"),
                          *(format_size(p[k]) if k in p else "-"
                            for k in ("capacity_bytes", "used_bytes", "free_bytes", "lendable_bytes")))
    console.print(table)
    ns_table = Table(title="namespaces")
    for column in ("pool", "namespace", "attribute", "objects", "bytes", "keys", "key bytes", "hits", "misses",
                   "evictions", "plogs", "plog bytes"):
        ns_table.add_column(column)
    for n in state["namespaces"]:
        if n["object_count"] is None:
            figures = ("-",) * 9
        else:
            plogs = n.get("plogs", 0)
            figures = (str(n["object_count"]), format_size(n["used_bytes"]), str(n["kv_keys"]),
                       format_size(n["kv_bytes"]), str(n["kv_hits"]), str(n["kv_misses"]), str(n["kv_evictions"]),
                       f"{plogs} ({n.get('plogs_sealed', 0)} sealed)"
                       if plogs else "0", format_size(n.get("plog_bytes", 0)))
        ns_table.add_row(n["pool"], n["ns"], str(n["attribute"]), *figures)
    console.print(ns_table)
    if state["doors"]:
        door_table = Table(title="Redis-protocol doors")
        for column in ("server", "address", "namespace", "auth", "clients", "connections", "commands", "errors",
                       "most asked"):
            door_table.add_column(column)
        for d in state["doors"]:
            top = sorted(d["commands"].items(), key=lambda item: -item[1])[:3]
            door_table.add_row(str(d["server_id"]), d["address"], f"{d['pool']}/{d['ns']}",
                               "required" if d["auth_required"] else "loopback: none", str(d["connected"]),
                               str(d["connections_total"]), str(sum(d["commands"].values())),
                               str(sum(d["errors"].values())), " ".join(f"{k}={v}" for k, v in top))
        console.print(door_table)
    console.print(f"asked {state['asked']}", markup=False, highlight=False)
    if dead:
        console.print(f"{len(dead)} of {len(state['servers'])} servers not alive: "
                      f"{', '.join(str(s['server_id']) for s in dead)} (exit status {EXIT_SERVER_DEAD})",
                      markup=False, highlight=False)
        return EXIT_SERVER_DEAD
    return 0

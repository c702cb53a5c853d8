"""`memfabric status`: what the cluster service knows, as a table or JSON."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from ..cluster import open_cluster
from ..errors import MemfabricError
from ..config import ConfigError, load_fabric_config
from ..units import format_size


def collect(path: str) -> dict:
    fabric = load_fabric_config(path)
    if fabric.cluster is None or (fabric.cluster.backend == "embedded" and fabric.cluster.path is None):
        raise ConfigError(f"{fabric.source}: names no cluster service (cluster.path or an etcd backend): "
                          "give the fabric's directory, its fabric.toml or a server's configuration")
    cluster = open_cluster(fabric.cluster.backend, **fabric.cluster.settings())
    try:
        servers = [s.to_wire() for s in cluster.servers()]
        namespaces = [{"pool": r.pool, "ns": r.ns, "attribute": r.attribute} for r in cluster.namespaces()]
    finally:
        cluster.close()
    return {"servers": servers, "namespaces": namespaces}


def run_status(path: str, as_json: bool = False) -> int:
    try:
        state = collect(path)
    except ConfigError as exc:
        print(f"memfabric status: {exc}", file=sys.stderr)
        return 2
    except MemfabricError as exc:
        print(f"memfabric status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title="servers")
    for column in ("id", "host", "alive", "pid", "pool", "medium", "capacity", "used", "free", "lendable"):
        table.add_column(column)
    for s in state["servers"]:
        alive = "[green]alive[/]" if s["alive"] else "[red]dead[/]"
        rows = s["pools"].items() or [("-", {})]
        for name, p in rows:
            table.add_row(str(s["server_id"]), s["host"], alive, str(s["pid"]), name, p.get("medium", "-"),
                          *(format_size(p[k]) if k in p else "-"
                            for k in ("capacity_bytes", "used_bytes", "free_bytes", "lendable_bytes")))
    console.print(table)
    ns_table = Table(title="namespaces")
    for column in ("pool", "namespace", "attribute"):
        ns_table.add_column(column)
    for n in state["namespaces"]:
        ns_table.add_row(n["pool"], n["ns"], str(n["attribute"]))
    console.print(ns_table)
    return 0

"""`memfabric ls`: a namespace's objects (id, size, home server, age), as a table or JSON."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from ..errors import InvalidArgument, MemfabricError
from ..units import format_size


def run_ls(ock_path: str, ns: str, sec_id: str, pool: str, as_json: bool = False) -> int:
    """Exit status 0; 2 for a wrong fabric path or argument; 1 for any other error (a wrong
    secId, no such namespace, a server lost), each said in one line on stderr."""
    from ..client.session import init
    try:
        with init(ock_path) as session:
            objects = session.namespace(ns, sec_id, pool=pool).objects()
    except InvalidArgument as exc:
        print(f"memfabric ls: {exc}", file=sys.stderr)
        return 2
    except MemfabricError as exc:
        print(f"memfabric ls: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps([{"bm_id": o.bm_id, "size": o.size, "home": o.home, "age_s": round(o.age_s, 3)}
                          for o in objects], indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"objects of {pool}/{ns}")
    for column in ("id", "size", "home", "age"):
        table.add_column(column, justify="left" if column == "id" else "right")
    for o in objects:
        table.add_row(o.bm_id, format_size(o.size), str(o.home), _age(o.age_s))
    console.print(table)
    console.print(f"{len(objects)} objects, {format_size(sum(o.size for o in objects))}")
    return 0


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"

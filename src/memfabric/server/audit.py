"""Where a server's allocated bytes went: the allocator's count against what accounts for it.

Every byte the allocator counts as live on this server belongs to one of: a live object homed
here (its extents on this server), an object freed while a client still maps it (kept until
the last unmap), extents this server holds for objects homed elsewhere (`lent_by_object`),
extents whose return waits for a transfer to end (`deferred`), and the namespace's MemKV
keyspace (its record pages, large values' extents, held ones included, and reservations
being filled). A difference is memory an operation reserved and then forgot: leaked until
its namespace is destroyed.

Exact when nothing is under way: an alloc or expand in progress has reserved extents that no
record names yet. Callers audit a quiet server.
"""

from __future__ import annotations

from typing import Any, Callable

from .state import NamespaceState, PoolState


def _local_bytes(extents: Any, server_id: int) -> int:
    return sum(e.length for e in extents if e.server_id == server_id)


def namespace_usage(state: NamespaceState, server_id: int) -> dict[str, int]:
    """The bytes of this server's memory a namespace's records account for, by kind."""
    table = state.objects.table
    # The table keeps no public list of its pinned-dead records; reading its own field
    # keeps this audit out of the object table's code.
    pinned_dead = table._pinned_dead.values()
    kv = state.kv
    return {
        "object_bytes": sum(_local_bytes(r.extents, server_id) for r in table.records()),
        "pinned_dead_bytes": sum(_local_bytes(r.extents, server_id) for r in pinned_dead),
        "held_bytes": sum(e.length for extents in state.objects.lent_by_object.values() for e in extents),
        "deferred_bytes": sum(e.length for extents in state.objects.deferred.values() for e in extents),
        "kv_bytes": 0 if kv is None else kv.heap.page_bytes() + kv.large_bytes + kv.reserved_bytes,
    }


def audit_pools(server_id: int, pools: dict[str, PoolState],
                namespaces: dict[tuple[str, str], NamespaceState],
                more: Callable[[NamespaceState], dict[str, int]] | None = None) -> dict[str, Any]:
    """Per pool: the allocator's live bytes, the bytes the records account for, and both per
    namespace. Call with the server's lock held."""
    report: dict[str, Any] = {}
    for name, pool in pools.items():
        allocator = pool.allocator
        rows = []
        for (pool_name, ns), state in namespaces.items():
            if pool_name != name:
                continue
            usage = namespace_usage(state, server_id)
            if more is not None:          # other semantics' bytes (a plog's extents)
                usage.update(more(state))
            rows.append({"ns": ns, "live_bytes": allocator.live_bytes(state.key),
                         "accounted_bytes": sum(usage.values()), **usage})
        report[name] = {"live_bytes": allocator.live_bytes(),
                        "accounted_bytes": sum(r["accounted_bytes"] for r in rows),
                        "namespaces": rows}
    return report

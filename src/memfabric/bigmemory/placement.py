"""Where an object's bytes go. Pure: no I/O.

`plan` turns an affinity and the cluster's free memory into (server id, bytes) shares.
Free figures come from heartbeats and may be a little old; a server that then cannot
give its share fails the allocation, which is rolled back whole.
"""

from __future__ import annotations

from typing import Mapping

from ..errors import InvalidArgument, OutOfMemory, ServerUnavailable
from ..core.allocator import round_up

POLICIES = ("local", "server", "spread")


def plan(policy: str, size_bytes: int, free_by_server: Mapping[int, int], local_id: int,
         target_id: int | None = None, page_bytes: int = 4096) -> list[tuple[int, int]]:
    if policy not in POLICIES:
        raise InvalidArgument(f"affinity policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if size_bytes <= 0:
        raise InvalidArgument(f"size must be positive, got {size_bytes}")
    need = round_up(size_bytes, page_bytes)
    if policy == "server":
        if target_id is None:
            raise InvalidArgument("affinity 'server' needs a server_id")
        if target_id not in free_by_server:
            raise ServerUnavailable(f"server {target_id} is not alive in this pool")
        return [(target_id, need)]
    if policy == "local":
        if free_by_server.get(local_id, 0) >= need or not free_by_server:
            return [(local_id, need)]
        # Local first, then the roomiest other server that fits whole.
        best = max(free_by_server, key=lambda s: free_by_server[s])
        return [(best if free_by_server[best] >= need else local_id, need)]
    return _spread(need, free_by_server, page_bytes)


def _spread(need: int, free_by_server: Mapping[int, int], page_bytes: int) -> list[tuple[int, int]]:
    """Stripe evenly, in whole pages: servers with room get shares within one page of each
    other; servers short of the even share give all they have (water-filling)."""
    free_pages = {s: f // page_bytes for s, f in free_by_server.items() if f >= page_bytes}
    remaining = need // page_bytes
    if sum(free_pages.values()) < remaining:
        raise OutOfMemory(f"the pool has {sum(free_pages.values()) * page_bytes} bytes free across "
                          f"{len(free_pages)} servers, {need} asked")
    shares: dict[int, int] = {}
    open_servers = sorted(free_pages)
    while remaining:
        even = -(-remaining // len(open_servers))
        short = [s for s in open_servers if free_pages[s] < even]
        if short:
            for server in short:
                shares[server] = free_pages[server]
                remaining -= free_pages[server]
                open_servers.remove(server)
            continue
        base, extra = divmod(remaining, len(open_servers))
        for i, server in enumerate(open_servers):
            shares[server] = base + (1 if i < extra else 0)
        remaining = 0
    return sorted((s, n * page_bytes) for s, n in shares.items() if n)

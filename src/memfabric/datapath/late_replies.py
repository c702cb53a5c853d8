"""What to do about a reply that comes after its caller gave up.

A request whose caller timed out may still be carried out: its reply arrives on the link
later and is dropped (fds closed). Where the work done would otherwise be lost for good, the
link sends the request that undoes it, without waiting for the answer: an object allocated
for no one (its id never reached a caller) is freed, a pin no mapping will drop is dropped,
extents a peer reserved for an allocation its home abandoned are given back, and MemKV's
reservation for a large value no one will fill is aborted and its hold of a value no one
will read let go: kv_get's, and those of GETDEL, GETEX, GETSET and SET ... GET, which hand
a large value back held too (else both last as long as the connection, and count against
its limits).

Other late effects stand: an expand or a free that happened after all is what the caller
asked for, and a late `segments` reply only costs its fds (closed): the server counting
those segments as handed over means no more than a "gone" notice for them later.
"""

from __future__ import annotations

from typing import Any

_CREDS = ("pool", "ns", "sec")


def undo_of(op: str, request: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any] | None:
    """The request (with its "op") that undoes what an abandoned request did, or None."""
    if "error" in reply:
        return None
    if op == "gather":
        dst = request.get("dst")
        if not isinstance(dst, dict) or dst.get("bm_id"):
            return None          # into an existing object: nothing to take back
        creds = {k: dst.get(k) for k in _CREDS}
    else:
        creds = {k: request.get(k) for k in _CREDS}
    if op in ("alloc", "gather") and isinstance(reply.get("bm_id"), str):
        return {"op": "free", **creds, "bm_id": reply["bm_id"]}
    if op == "map_pin":
        return {"op": "map_unpin", **creds, "bm_id": request.get("bm_id")}
    if op == "kv_reserve" and type(reply.get("token")) is int:
        return {"op": "kv_abort", **creds, "token": reply["token"]}
    if op in ("kv_get", "kv_take", "kv_get_expire") and type(reply.get("hold")) is int:
        return {"op": "kv_let_go", **creds, "hold": reply["hold"]}
    # A write asked for the value it replaced (GETSET, SET ... GET): a large one is held too.
    old = reply.get("old")
    if op in ("kv_put", "kv_commit") and isinstance(old, dict) and type(old.get("hold")) is int:
        return {"op": "kv_let_go", **creds, "hold": old["hold"]}
    if op == "plog_share_stage" and type(reply.get("stage")) is int:
        # A stage given up on would stay on the connection (and count against its stages).
        return {"op": "plog_drop_stage", **creds, "stage": reply["stage"]}
    if op == "extent_alloc" and isinstance(reply.get("extents"), list):
        extents = [e[1:] for e in reply["extents"] if isinstance(e, list) and len(e) == 4]
        return {"op": "extent_free", **creds, "bm_id": request.get("bm_id"), "extents": extents}
    return None

"""The compiled same-host append (_plogserve.c append_one): which connections may use it, for
which plogs, and what Python still does around it. Server side.

Why. A same-host 4 KiB append spent ~50 us in the server's Python (decode, dispatch, checks,
framing, pieces, the write through three layers, encode) on top of the round trip; the
common case (one inline record, a plog homed here, open) needs none of that machinery. So
append_one serves exactly that case in C with the GIL held, or changes nothing, and Python
serves the request as it always did.

Python stays the authority. A connection is granted a plog only after Python served an
append of it on that connection (its secId checked there, by Server._namespace); the grant
holds what was proven (the connection's `verified` entry, the secId, the plog's id), and
append_one checks each of these against the request and the connection's state on every
call, and every rule of the plog (open, not deleted, not broken, its reach) under the
plog's own lock (waited for as Python waits, then the grant checked again). What is not the
common case goes to Python: a secId that differs, a sealed, deleted or full plog, a frame
across two extents, a connection owed a "gone" notice.

Durability is Python's too: on pmem, for a plog with copies (the grant's `python_commits`),
and whenever something else awaits commit, the record is marked written in C and
committed by PlogService._flush_to, which forwards it to the copies and flushes it (without
the GIL, one flush shared by every appender waiting: group commit) before it is answered.
On pmem without copies the loop itself waits for that commit, without the GIL, on the plog's
CommitGroup (_commitgroup.c): one waiter at a time calls _flush_to (the grant's `flush`) and
the others it covers answer from their loops, with no return to Python each; what its flush
raised goes back to Python (fast_finish), which raises it again and answers.

Batches. An append_many written into the connection's shared stage (one it keeps) is served
the same way by append_batch, under the same grant (given by Python's first append of either
kind), when the loop commits it at once (ramdisk, no copies): its records are copied out of
the stage and checked over the copy, written piece by piece under each segment's lock, marked
written and committed together; the rest (pmem, copies, a stage dropped after its batch, bad
lengths, frames past 1 MiB or over 16 extents, a full plog) is Python's, as before.

Where. The connection's receive loop (_frames.c serve_packets) hands each packet to
append_one's C entry (_plogserve.c serve_append) before Python sees it: an append committed at
once (ramdisk) is answered there and counted in the grant's `counts` (the service's
served_counts), and the loop goes on receiving; one that needs a flush comes back to Python
with append_one's tuple (PlogService.fast_finish). Those answered in the loop are not timed
in the operations' latency histogram (as MemKV's compiled puts are not).

Copies. A same-host home forwards each append to its copies (PlogService._forward), and a
copy's Python spent ~50 us on each (plog_replica_append). So the copy's side has its twin
(grant_replica, _plogserve.c replica_packet), on the home's peer connection, by the same rules:
granted only after Python served a forward there, every rule of op_plog_replica_append read
again under the plog's lock, and only the common case served (one message of whole records
that check, at the log's end, on a medium with nothing to flush); the rest goes to Python. A
copy on pmem is never granted: it flushes before it answers, in Python.

The home's side of a forward to a same-host copy (send_forward) goes out and is answered in
one compiled call (_plogcall.c call_append, as a client's append: the request written around the
piece's bytes, the wait without the GIL) on the peer link, when the link is idle; the link's
rules hold (its timeout, replies given up on), and a reply that is not the common one is
decoded and raised as call() raises it.

And in the common case the home's side needs no Python at all: once Python forwarded an
append to a plog's only live copy (ramdisk), it leaves a Forwarder on the plog, and the
receive loop forwards the next appends append_one wrote itself (_plogforward.c forward_served:
every rule of _flush_to, _forward, Server._peer and call_compiled read again, or nothing
done), commits them and answers; any other outcome of the forward goes back to Python's rules
(Forwarder.failed), and Python finishes the append.
"""

from __future__ import annotations

import struct
import threading
import weakref
from array import array
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from ..errors import MemfabricError
from ..limits import (MAX_PLOG_BATCH, MAX_PLOG_FAST_GRANTS_PER_CONNECTION, MAX_PLOG_RECORD_BYTES,
                      PLOG_REPLICA_PIECE_BYTES, PLOG_SHARED_STAGE_KEPT_BYTES)
from ..media.files import FileSegment
from ..server.requests import Connection

if TYPE_CHECKING:
    from .service import _Plog

try:
    from .. import _records
except ImportError:      # pragma: no cover - ./dev builds it
    _records = None

# append_batch's limits are compiled in: they must be these.
assert _records is None or (_records.BATCH_MOST, _records.RECORD_MOST_BYTES, _records.FORWARD_PIECE_MOST) == (
    MAX_PLOG_BATCH, MAX_PLOG_RECORD_BYTES, PLOG_REPLICA_PIECE_BYTES)

GRANTS = "plog_fast"          # conn.services[GRANTS]: grant key -> FastGrant
_EXTENT = struct.Struct("=QQ")    # an extent's end in the log, and its offset in its segment's file


class FastGrant:
    """What append_one needs to append to one plog for one connection (read by name in C)."""

    # A shared stage larger than this serves one batch and is dropped after it (Python's
    # _drop_if_large): append_batch leaves such batches to Python.
    stage_kept_bytes = PLOG_SHARED_STAGE_KEPT_BYTES

    __slots__ = ("plog", "sec", "plog_id", "vkey", "proven", "python_commits", "extents",
                 "segments", "seg_ids", "counts", "group", "flush_to")

    def __init__(self, plog: "_Plog", sec: bytes, vkey: tuple[str, str], proven: Any,
                 segments: list[FileSegment], counts: array | None,
                 flush_to: Callable[["_Plog", int], None] | None) -> None:
        self.plog = plog
        self.sec = sec
        self.plog_id = plog.id
        self.vkey = vkey
        self.proven = proven
        # Committed by Python (_flush_to): flushed (pmem), forwarded (copies); else in C.
        self.python_commits = plog.data.flushes or bool(plog.replica_servers)
        ends = plog.data._ends
        self.extents = b"".join(_EXTENT.pack(end, e[1]) for end, e in zip(ends, plog.data.extents))
        self.segments = segments
        self.seg_ids = [e[0] for e in plog.data.extents]
        self.counts = counts           # appends and payload bytes answered in the receive loop
        # Committed in the receive loop by a flush shared there (_commitgroup.c): pmem, no copies.
        self.flush_to = flush_to
        self.group = plog.commit_group if flush_to is not None and not plog.replica_servers else None

    def flush(self, end: int) -> int:
        """A commit_wait leader's flush: returns once bytes up to `end` are committed (Python's
        _flush_to, which raises what it raises); the log's committed end."""
        self.flush_to(self.plog, end)
        return self.plog.core.committed


def commit_group(data: Any) -> Any:
    """A pmem plog's CommitGroup (_commitgroup.c), or None (nothing to flush, or not built)."""
    return _records.CommitGroup() if _records is not None and data.flushes else None


def grant_key(pool: str, ns: str, name: str) -> bytes:
    return b"\0".join(x.encode() for x in (pool, ns, name))


# A copy's grant (_plogserve.c replica_packet) on its home's peer connection: a key no client's
# append finds (names hold no control characters).
REPLICA_KEY_PREFIX = b"\x01"


def grants_of(conn: Connection) -> dict[bytes, FastGrant] | None:
    """The connection's grants (filled by grant(), and on a peer's by grant_replica()), for its
    receive loop; None where it has none to take (no compiled part, one carrying no fds)."""
    if _records is None or not conn.carries_fds:
        return None
    return conn.services.setdefault(GRANTS, {})


class GrantHolders:
    """The connections holding grants, held weakly (a closed one goes by itself): a grant keeps
    its plog, and with it the plog's namespace's memory, so a plog that goes (deleted, its
    namespace destroyed) is revoked from each of them at once. A client's connection may stay
    open for hours, and a home's peer connection to a copy as long as both servers run."""

    def __init__(self) -> None:
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._lock = threading.Lock()      # a WeakSet is no one's to change while another walks it

    def add(self, conn: Connection) -> None:
        with self._lock:
            self._conns.add(conn)

    def revoke(self, plogs: list["_Plog"]) -> None:
        """No receive loop serves these plogs from here on. Set each one's `deleted` first:
        a grant given meanwhile sees it (_give) and goes too. What a loop is serving now
        holds its own references, and finds the plog deleted under its lock."""
        gone = {id(plog) for plog in plogs}
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            grants = conn.services.get(GRANTS)
            for key, held in list(grants.items()) if grants else ():
                if id(held.plog) in gone and grants.get(key) is held:
                    grants.pop(key, None)


def grant(conn: Connection, plog: "_Plog", m: dict[str, Any], counts: array,
          flush_to: Callable[["_Plog", int], None], holders: GrantHolders) -> None:
    """After Python served an append of `plog` from `conn` (request `m`): let later ones of the
    common case go through append_one, when the plog is one it can serve. `flush_to`: Python's
    commit of a written append (PlogService._flush_to), for the loop's commit_wait."""
    if plog.role == "home":
        _give(conn, plog, m, b"", counts, flush_to, holders)


def grant_replica(conn: Connection, plog: "_Plog", m: dict[str, Any], holders: GrantHolders) -> None:
    """After Python served a forward to a copy (`plog`) from its home's peer connection `conn`
    (request `m`): let the home's later forwards of whole records through _plogserve.c
    replica_packet. Only where nothing is to flush (ramdisk): a copy on pmem commits in Python."""
    if conn.role == "peer" and plog.role == "replica" and not plog.data.flushes:
        _give(conn, plog, m, REPLICA_KEY_PREFIX, None, None, holders)


def _give(conn: Connection, plog: "_Plog", m: dict[str, Any], prefix: bytes, counts: array | None,
          flush_to: Callable[["_Plog", int], None] | None, holders: GrantHolders) -> None:
    """The grant of `plog` to `conn` under the request's names and secId, which Python has just
    checked (its namespace's entry in conn.verified), when the compiled part can serve it."""
    if _records is None or not conn.carries_fds:
        return
    pool, ns, name, sec = m.get("pool"), m.get("ns"), m.get("name"), m.get("sec")
    if not (type(pool) is str and type(ns) is str and type(name) is str and type(sec) is bytes):
        return
    proven = conn.verified.get((pool, ns))
    if proven is None:
        return
    grants = conn.services.setdefault(GRANTS, {})
    key = prefix + grant_key(pool, ns, name)
    held = grants.get(key)
    if held is not None and held.plog is plog and held.proven is proven and held.sec == sec and held.counts is counts:
        return          # (before the walk below: a plog of many extents is not walked per forward)
    segments = [plog.data.pool.segments.get(e[0]) for e in plog.data.extents]
    if not all(type(s) is FileSegment for s in segments):
        return
    if key not in grants and len(grants) >= MAX_PLOG_FAST_GRANTS_PER_CONNECTION:
        # The oldest: served by Python again, and granted again. Taken in one call, and let go
        # if gone: GrantHolders.revoke takes grants from another thread at any moment.
        for oldest in list(grants)[:1]:
            grants.pop(oldest, None)
    grants[key] = FastGrant(plog, sec, (pool, ns), proven, segments, counts, flush_to)
    holders.add(conn)
    if plog.deleted:                 # went while this was given: GrantHolders.revoke may have missed it
        grants.pop(key, None)


def forward_head(copy_args: dict[str, Any]) -> bytes:
    """The part of a forward's request (plog_replica_append) that is the same for every piece:
    the copy's creds and the op, packed once per plog."""
    pack = msgpack.Packer(use_bin_type=True).pack
    return b"".join(pack(k) + pack(v) for k, v in copy_args.items()) + pack("op") + pack("plog_replica_append")


_PACK = msgpack.Packer(use_bin_type=True).pack     # at import only: a Packer is no one's to share between threads
_AT, _LAST, _NOT_LAST, _DATA = _PACK("at"), _PACK("last") + _PACK(True), _PACK("last") + _PACK(False), _PACK("data")
# A piece's offset as msgpack's uint 64, packed without a Packer: flushers of several plogs
# forward at once from their threads, and msgpack's Python packer (its fallback) keeps a buffer
# between calls that two threads would write together (wire.py keeps one per thread for that).
_AT_U64 = struct.Struct(">BQ")
_FORWARD_ENTRIES = 5      # at, last, data, then call_append's budget_s and id: besides the head's


def send_forward(link: Any, head: bytes, head_entries: int, copy_args: dict[str, Any], at: int, data: bytes,
                 last: bool) -> bool:
    """One piece of a forward sent and answered in one compiled call on an idle same-host peer
    link (its reply raised as call() raises it); False when not taken (nothing sent: call() it)."""
    call_compiled = getattr(link, "call_compiled", None)
    entries = head_entries + _FORWARD_ENTRIES
    if _records is None or call_compiled is None or entries > 15:     # (a fixmap's header)
        return False
    request = (bytes([0x80 | entries]) + head + _AT + _AT_U64.pack(0xcf, at) + (_LAST if last else _NOT_LAST)
               + _DATA)      # call_append adds the bin, budget_s and id
    got = call_compiled("plog_replica_append", copy_args, lambda fd, buffer, poll_s, request_id, timeout_s:
                        _records.call_append(fd, request, data, timeout_s, request_id, buffer, poll_s))
    return got is not None


class Forwarder:
    """What a home's receive loop needs to forward an append to its plog's one live copy itself
    (_plogforward.c forward_served), read by name in C; `plog.fast_forward`, made by
    PlogService._forward after it forwarded a piece compiled to that copy alone. It names the
    choices Python made (the copy, its link, the view that showed it alive, the dead copies
    then) and the request's fixed parts; C checks each against the plog, the server and the
    link on every append, and does nothing where one no longer holds."""

    __slots__ = ("service", "server", "server_id", "link", "view", "view_ttl_s", "dead_count", "head", "mid",
                 "args", "abandoned_entry")

    def __init__(self, service: Any, plog: "_Plog", server: Any, server_id: int, link: Any, view: Any,
                 view_ttl_s: float, head: bytes, head_entries: int, args: dict[str, Any]) -> None:
        assert head_entries + _FORWARD_ENTRIES <= 15 and server_id in plog.replica_servers
        self.service = service       # (not the plog, which holds this: no cycle keeps a dropped plog)
        self.server = server
        self.server_id = server_id
        self.link = link
        self.view = view
        self.view_ttl_s = view_ttl_s
        self.dead_count = len(plog.dead)
        self.head = bytes([0x80 | (head_entries + _FORWARD_ENTRIES)]) + head + _AT     # then "at" (0xcf u64)
        self.mid = _LAST + _DATA          # then the bin, budget_s and id
        self.args = args
        self.abandoned_entry = ("plog_replica_append", args)

    def failed(self, plog: "_Plog", status: int, value: int, waited_s: float, request_id: int, buffer: bytearray,
               end: int) -> None:
        """forward_served sent `plog`'s log up to `end` and the outcome was not the common reply (or,
        status < 0, the call failed with errno `value`), the plog's flush lock held and the
        link's taken: the link's rules (ServerLink.end_compiled, which lets its lock go), then
        _forward's for the outcome (a dead copy marked, a sealed one fencing the plog)."""
        link = self.link
        try:
            try:
                link.end_compiled("plog_replica_append", self.args, request_id, link.timeout_s, buffer, status, value,
                                  waited_s)
            finally:
                if link._lock._is_owned():       # (end_compiled not reached)
                    link._lock.release()
        except MemfabricError as exc:
            self.service._forward_failed(plog, self.server_id, exc)
        else:        # another reply, no error: taken as send_forward takes it
            plog.forwarded = end
            self.service._count_forwards(1, 1)

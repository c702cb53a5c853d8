"""The client's MemPlog: `ns.create_plog(name, capacity)`, `ns.plog(name)`, `ns.plogs()`.

A plog lives on one server, its home (the one that created it: this client's own server when
it gives the pool, else another that does); every call goes to the home, which orders the
appends. Records travel in the request when they are small; larger batches go as the RPC
payload (other hosts), or are staged in pieces over IPC first (this host), then appended in
one request. Reads come in the reply (IPC, up to PLOG_INLINE_BYTES a request) or as its
payload (RPC, straight into the caller's buffer).

A plog of several replicas has copies on other servers (service.py). Appends go to the home
only; when the home does not answer, a handle's reads, records, info and seal go to a copy
(found by asking the pool's live servers, as the home is found): seal then seals every copy
that answers, which fences the plog for good.
"""

from __future__ import annotations

import os
import sys
import threading
from bisect import bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import msgpack

from ..bigmemory.layout import as_bytes_view
from ..client.arguments import as_int
from ..core.namespaces import check_name
from ..datapath import forks
from ..datapath.deadline import allowing, call_timeout_s
from ..datapath.reentry import further_up
from ..errors import (Busy, InvalidArgument, MemfabricError, NoSuchObject, NoSuchPool, OutOfRange, ProtocolError,
                      ServerUnavailable, Timeout)
from . import record as rec
from .combine import Combiner
from .log import pieces, prepare_allowance_s
from ..limits import (MAX_PLOG_BATCH, MAX_PLOG_CAPACITY_BYTES, MAX_PLOG_RECORD_BYTES, MAX_PLOG_STAGED_BYTES,
                      MAX_RPC_PAYLOAD_BYTES, PLOG_COMBINE_MOST_BYTES, PLOG_COMBINE_SLACK_S, PLOG_INLINE_BYTES,
                      PLOG_RPC_READ_BYTES, PLOG_SHARED_STAGE_KEPT_BYTES)

if TYPE_CHECKING:
    from ..client.session import Namespace

try:    # one record appended on this host in one compiled call: ./dev builds it
    from .. import _records
except ImportError:      # pragma: no cover
    _records = None

READ_OPS = frozenset({"plog_info", "plog_records", "plog_read"})   # a copy answers these when the home does not
HOME_AWAY = (ServerUnavailable, Timeout)
INLINE_SLACK_BYTES = 1024                  # the request's other fields, and msgpack's framing


def _as_records(records: Iterable[Any]) -> tuple[list[Any], list[int]]:
    """The records as C-contiguous buffers, and their lengths in bytes."""
    if isinstance(records, (bytes, bytearray, memoryview, str)):
        raise InvalidArgument("append_many takes a list of records (buffers), not one buffer; "
                              "append(data) appends one")
    # A list of contiguous buffers (the common case) is measured in one compiled call; the
    # rest one by one (as_bytes_view: a strided array made contiguous, and what is wrong said).
    # A copy of the caller's list: another thread may change it while the batch is sent, and
    # each record must still be the one measured here.
    lengths = None
    if type(records) is list and _records is not None:
        parts: list[Any] = records[:]
        lengths = _records.buffer_lengths(parts)
    if lengths is None:
        try:
            parts = [memoryview(r) if type(r) is bytes else as_bytes_view(r) for r in records]
        except TypeError:
            raise InvalidArgument(f"records must be an iterable of buffers, got {type(records).__name__}") from None
        lengths = [v.nbytes for v in parts]
    if not 0 < len(parts) <= MAX_PLOG_BATCH:
        raise InvalidArgument(f"append_many takes 1 to {MAX_PLOG_BATCH} records, got {len(parts)}")
    if max(lengths) > MAX_PLOG_RECORD_BYTES:
        raise _record_too_large(max(lengths))
    return parts, lengths


def _record_too_large(nbytes: int) -> InvalidArgument:
    """The error of a record past MAX_PLOG_RECORD_BYTES, append's and append_many's (the check
    stays with each: a call on the hot path only when it fails)."""
    return InvalidArgument(f"a record is at most {MAX_PLOG_RECORD_BYTES} bytes, got {nbytes}")


def _append_head(wire_args: dict[str, Any]) -> bytes:
    """What _records.call_append sends before a record: a map of `wire_args`, "op", then
    "records" and its one-item array's header (it adds the record's bin, "budget_s" and "id")."""
    entries = len(wire_args) + 4
    assert entries <= 15, "a fixmap's header"
    pack = msgpack.Packer(use_bin_type=True).pack
    return (bytes([0x80 | entries]) + b"".join(pack(k) + pack(v) for k, v in wire_args.items())
            + pack("op") + pack("plog_append") + pack("records") + b"\x91")


class _StageHolder:
    """A same-host link's shared stage for record batches (the server's plog_share_stage):
    memory both map, which a batch is written into, so that it costs one request and no copy
    into messages. One per link, whatever the namespace (the server counts a connection's
    stages), attached to it: it goes with the link. One batch at a time (`lock`)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.token: int | None = None       # the server's number for it: the last one, kept after a discard
        self.mapped: Any = None

    def stage_for(self, link: Any, wire_creds: dict[str, Any], length: int) -> Any:
        """The stage mapped, at least `length` bytes (a larger one asked for in its place)."""
        if self.mapped is None or self.mapped.size < length:
            self.discard()
            # Its number is kept in the same line as the reply comes: a Ctrl-C after it would
            # leave a stage on the connection that no later request replaces.
            reply, fds = self._keep_token(*link.call_with_fds("plog_share_stage", **wire_creds, length=length,
                                                               replaces=self.token))
            try:
                if len(fds) != 1 or type(reply.get("size")) is not int or reply["size"] < length:
                    raise ProtocolError(f"plog_share_stage answered {reply!r:.80} with {len(fds)} fds")
                self.mapped = link.map_shared(fds.pop(), reply["size"], wire_creds["pool"], wire_creds["ns"])
            finally:
                for fd in fds:
                    os.close(fd)
        return self.mapped

    def _keep_token(self, reply: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        if type(reply.get("stage")) is int:
            self.token = reply["stage"]
        else:
            reply = {**reply, "size": None}       # refused below
        return reply, fds

    def discard(self) -> None:
        # Forgotten first: a Ctrl-C between the two leaves a mapping open, never a revoked
        # one that the next batch would be written into (the server reading the last one).
        mapped, self.mapped = self.mapped, None
        if mapped is not None:
            mapped.close()          # revoked: a thread still writing it writes nowhere

    close = discard


_HOLDERS_LOCK = threading.Lock()
forks.fresh_locks(sys.modules[__name__], "_HOLDERS_LOCK")


_HOLDER_KEY = ("", "", "plog_stage")       # the link's, not a namespace's: no namespace release closes it


def _stage_holder(link: Any) -> _StageHolder:
    holder = link.attached.get(_HOLDER_KEY)
    if holder is None:
        with _HOLDERS_LOCK:
            holder = link.attached.get(_HOLDER_KEY)
            if holder is None:
                holder = link.attached[_HOLDER_KEY] = _StageHolder()
    return holder


def _refuse_stage_reentry(holder: _StageHolder) -> None:
    """append_many, its stage's lock held by this thread: BUSY when re-entered from a signal's
    handler while an append_many of this thread's further up holds it (the stage holds that
    batch, or the server is reading it: another written there now would be stored as that
    one's); else a Ctrl-C left it held (between its acquire and the release in append_many's
    finally) with no batch under way: let go, the call goes on (as datapath/reentry.py)."""
    if further_up(holder, _APPEND_MANY_CODES, sys._getframe(2), "holder"):    # past append_many's call
        raise Busy("this thread is part way through a batch on this connection's shared stage: another "
                   "cannot be made on it from a signal's handler")
    while holder.lock._is_owned():
        holder.lock.release()


class Plog:
    """A handle on one plog (MemPlog): an append-only log of records in a namespace's
    persistent memory. Made by `Namespace.create_plog` or `Namespace.plog`."""

    # The combining of its threads' appends (combine.py), made by its first append: a handle
    # that only reads needs none. Until then the instance has none of its own.
    _combiner: Combiner | None = None

    def __init__(self, namespace: "Namespace", name: str, home: int, plog_id: int | None = None,
                 sequencer: int | None = None) -> None:
        self.namespace = namespace
        self.name = name
        self.home = home            # the server this handle reads from: the plog's home, or a copy
        # Where appends go, always: the plog's home (a handle that reads a copy, its home away
        # or slow for a moment, appends there again once it answers).
        self._sequencer = home if sequencer is None else sequencer
        # This plog's own id: once it is deleted, its handles get NO_SUCH_OBJECT, even when a
        # new plog of the same name is made.
        self.plog_id = plog_id
        self._wire = {**namespace.wire_creds, "name": name}
        if plog_id is not None:
            self._wire["plog_id"] = plog_id
        # Same host: where the plog's bytes lie (extents, nonce) and the places (payload offset,
        # length) of committed records 0..n-1 as learned from the server. Committed records never
        # change, so record(i) of a known place is read from the mapped segments with no round
        # trip, its frame checked (a deleted plog's reused memory, or a destroyed namespace's
        # zeros, fail the check: then the server is asked, and says what happened).
        self._layout: tuple[list[tuple[int, int, int]], list[int], int] | None = None
        self._places: list[tuple[int, int]] = []
        self._head: bytes | None = None      # a compiled append's request, but its record, budget and id

    def __repr__(self) -> str:
        return f"Plog({self.namespace.pool!r}/{self.namespace.name!r}/{self.name!r} on server {self.home})"

    def _link(self) -> Any:
        self.namespace.session.check_open()
        return self.namespace.session.link(self.home)

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self._link().call(op, **self._wire, **args)
        except HOME_AWAY:
            if op not in READ_OPS or not self._fail_over():
                raise
        return self._link().call(op, **self._wire, **args)

    def _holders(self) -> list[tuple[tuple[bool, bool, int, int], int]]:
        """The other servers that answer for this plog now, best first: its home, then copies
        that are not stale, the longest first (a copy its home stopped forwarding to and could
        not tell yet may be shorter)."""
        found = []
        for server_id in _servers_of(self.namespace):
            if server_id == self.home:           # the one that did not answer
                continue
            try:
                info = self.namespace.session.link(server_id).call("plog_info", **self._wire)["info"]
            except (NoSuchObject, *HOME_AWAY):
                continue
            found.append(((info.get("role") != "home", bool(info.get("stale")), -int(info.get("length", 0)),
                           server_id), server_id))
        return sorted(found)

    def _fail_over(self) -> bool:
        """Talk to another server holding this plog from now on (its home, else a copy that is
        not stale, else a stale one, which says so): whether there is one."""
        ranked = self._holders()
        if not ranked:
            return False
        self._go_to(ranked[0][1])
        return True

    def _go_to(self, server_id: int) -> None:
        self.home = server_id
        self._layout = None          # a copy's bytes lie elsewhere (same offsets and records)
        self._places = []

    # ---- appends ----------------------------------------------------------------------------

    def append(self, data: Any) -> int:
        """Append one record, `data` (any buffer: bytes, bytearray, memoryview, numpy array; 0 to
        MAX_PLOG_RECORD_BYTES bytes). Returns the offset of its payload in the log. Atomic:
        the whole record is there once this returns, and survives a crash of the server
        (on pmem, of the host); or it raises and nothing of it is visible. Raises
        OUT_OF_SPACE (the plog is full), SEALED, NO_SUCH_OBJECT (deleted), PERMISSION_DENIED.

        Threads appending through one handle at once share requests and flushes: the
        records queued while one request is under way go together in the next (combine.py)."""
        # bytes as they are (call_append reads any buffer); the rest as a flat byte view
        # (not a buffer: INVALID_ARGUMENT, as append_many says)
        view = data if type(data) is bytes else as_bytes_view(data)
        nbytes = len(view) if type(view) is bytes else view.nbytes
        if nbytes > MAX_PLOG_RECORD_BYTES:
            raise _record_too_large(nbytes)
        session = self.namespace.session
        session.check_open()
        combiner = self._combiner
        if combiner is None:
            combiner = self._first_combiner()
        return combiner.append(view, nbytes, self._send_records, 2 * session.timeout_s + PLOG_COMBINE_SLACK_S,
                               self._refuse_reentry)

    def _refuse_reentry(self) -> None:
        """(The combiner's, on the main thread.) BUSY when a signal's handler appends while its
        thread is part way through a request on this plog's link: before its record joins
        other threads' batch (combine.py)."""
        link = self.namespace.session._cached_link(self._sequencer)
        if link is not None:
            link._refuse_reentry("plog_append")

    def _first_combiner(self) -> Combiner:
        """The handle's combiner, made at its first append. Threads whose first appends come at
        once get the same one: the instance's setdefault is one step (under the GIL), with no
        lock that a child forked meanwhile would find held for ever. Tracked before it is
        anyone's, so a child forked at any moment starts it afresh."""
        made = forks.tracked(Combiner(MAX_PLOG_BATCH, PLOG_COMBINE_MOST_BYTES))
        return vars(self).setdefault("_combiner", made)

    def _send_records(self, views: list[Any], nbytes: int) -> list[int]:
        """Appends `views` (`nbytes` in all) in one request (a batch of the combiner); their
        offsets."""
        if len(views) == 1:
            offset = self._append_compiled(views[0], nbytes)
            if offset is not None:
                return [offset]
        return self.append_many(views)

    def _append_compiled(self, view: Any, nbytes: int) -> int | None:
        """append() of one record (`view`, `nbytes` long) to a server on this host in one
        compiled call (_plogcall.c call_append: the request written from `view` itself, the
        reply read without Python), when the link is idle; None when not taken (nothing was
        sent)."""
        if _records is None:
            return None
        if nbytes > PLOG_INLINE_BYTES - 8 - INLINE_SLACK_BYTES:
            return None
        session = self.namespace.session           # (append checked it is open)
        call_compiled = getattr(session.link(self._sequencer), "call_compiled", None)
        if call_compiled is None:    # another host's server
            return None
        head = self._head
        if head is None:
            head = self._head = _append_head(self._wire)
        got = call_compiled("plog_append", self._wire, lambda fd, buffer, poll_s, request_id, timeout_s:
                            _records.call_append(fd, head, view, timeout_s, request_id, buffer, poll_s))
        return got["offsets"][0] if isinstance(got, dict) else got

    def append_many(self, records: Iterable[Any]) -> list[int]:
        """Append records in order, in one request and one flush. The offsets of their
        payloads. All of them fit or none is written (OUT_OF_SPACE)."""
        views, lengths = _as_records(records)
        total = sum(lengths)
        self.namespace.session.check_open()
        link = self.namespace.session.link(self._sequencer)
        creds = dict(self._wire)
        if not link.is_local:
            if total > MAX_RPC_PAYLOAD_BYTES:
                raise InvalidArgument(f"one append_many carries at most {MAX_RPC_PAYLOAD_BYTES} bytes to another "
                                      f"host, got {total}: append fewer at a time")
            timeout_s = call_timeout_s(link.timeout_s)
            sent = [as_bytes_view(v) for v in views]      # (views: a record can no longer be resized)
            if [v.nbytes for v in sent] != lengths:
                raise InvalidArgument("a record changed size while append_many sent it: nothing appended")
            return link.request("plog_append_payload", {**creds, "lengths": lengths, "budget_s": timeout_s},
                                payload=[v for v in sent if v.nbytes], timeout_s=timeout_s)["offsets"]
        if total + 8 * len(views) + INLINE_SLACK_BYTES <= PLOG_INLINE_BYTES:
            # memoryview(v), not bytes(v): bytes() of a numpy integer (scalar or 0-d array) is that
            # many zero bytes, not its buffer.
            return link.call("plog_append", **creds,
                             records=[v if type(v) is bytes else memoryview(v).tobytes() for v in views])["offsets"]
        if total > MAX_PLOG_STAGED_BYTES:
            raise InvalidArgument(f"one append_many carries at most {MAX_PLOG_STAGED_BYTES} bytes, got {total}: "
                                  "append fewer at a time")
        holder = _stage_holder(link)
        if holder.lock._is_owned():
            _refuse_stage_reentry(holder)
        wait_s = call_timeout_s(link.timeout_s)
        try:
            # Taken inside the try, given back in its finally (an RLock: release() tells
            # whether it is ours): a Ctrl-C as a `with` leaves it must not keep it taken,
            # and every later large batch of the link waiting for ever.
            if not holder.lock.acquire(timeout=wait_s):
                raise Timeout(f"other batches of this process held the link's shared stage for {wait_s:.3g}s")
            return self._append_shared(link, holder, creds, views, lengths, total)
        finally:
            try:
                holder.lock.release()     # no call (where a signal's handler runs) before it
            except RuntimeError:
                pass                      # not ours: the wait timed out or was interrupted

    def _append_shared(self, link: Any, holder: _StageHolder, creds: dict[str, Any], views: list[memoryview],
                       lengths: list[int], total: int) -> list[int]:
        stage = holder.stage_for(link, self.namespace.wire_creds, total)
        one_batch = stage.size > PLOG_SHARED_STAGE_KEPT_BYTES
        if one_batch:
            holder.mapped = None     # a large stage serves this batch only: the server drops it after
        try:
            if _records is not None:        # straight into memory the server maps
                # A record resized since it was measured (by another thread: no view holds it)
                # would shift the records after it: refused (gather_into checks each length).
                try:
                    _records.gather_into(stage.view, views, lengths)
                except ValueError:
                    raise InvalidArgument("a record changed size while append_many sent it: nothing appended") \
                        from None
            else:
                at = 0
                for v in views:
                    stage.view[at:at + v.nbytes] = v
                    at += v.nbytes
            return link.call("plog_append", **creds, shared=holder.token, lengths=lengths)["offsets"]
        except BaseException:
            # Given up on (a timeout, Ctrl-C) the server may still be reading it: it is not
            # written again; the next batch asks for another in its place (the server
            # serves a connection's requests in order, so by then this one is done).
            holder.discard()
            raise
        finally:
            if one_batch:
                stage.close()

    # ---- reads ------------------------------------------------------------------------------

    def read(self, offset: int, length: int, *, into: Any = None) -> bytes | None:
        """The log's raw bytes [offset, offset + length) (committed ones only: OUT_OF_RANGE
        past the committed length, or for a negative offset or length). Returns them as
        bytes, or fills `into` (any writable buffer of at least `length` bytes) and returns
        None."""
        offset = as_int(offset, "offset")
        length = as_int(length, "length")
        if offset < 0 or length < 0:
            raise OutOfRange(f"offset {offset} and length {length} must not be negative")
        if offset > MAX_PLOG_CAPACITY_BYTES or length > MAX_PLOG_CAPACITY_BYTES:
            raise OutOfRange(f"[{offset}, {offset + length}) reaches past any plog ({MAX_PLOG_CAPACITY_BYTES} bytes "
                             "at most)")
        if into is None:
            out = bytearray(length)
            self._read_over(offset, memoryview(out))
            return bytes(out)
        view = as_bytes_view(into, writable=True)
        if view.nbytes < length:
            raise InvalidArgument(f"into holds {view.nbytes} bytes, {length} asked")
        self._read_over(offset, view[:length])
        return None

    def _read_over(self, offset: int, into: memoryview) -> None:
        try:
            self._read_into(offset, into)
        except HOME_AWAY:
            if not self._fail_over():
                raise
            self._read_into(offset, into)

    def _read_into(self, offset: int, into: memoryview) -> None:
        link = self._link()
        creds = dict(self._wire)
        if into.nbytes == 0:
            link.call("plog_read", **creds, offset=offset, length=0)     # still checked: past the end?
            return
        step = PLOG_INLINE_BYTES if link.is_local else PLOG_RPC_READ_BYTES
        for at in range(0, into.nbytes, step):
            n = min(step, into.nbytes - at)
            if link.is_local:
                data = link.call("plog_read", **creds, offset=offset + at, length=n)["data"]
                if len(data) != n:
                    raise ProtocolError(f"plog_read of {n} bytes answered {len(data)}")
                into[at:at + n] = data
            else:
                timeout_s = call_timeout_s(link.timeout_s)
                reply = link.request("plog_read", {**creds, "offset": offset + at, "length": n, "budget_s": timeout_s},
                                     into=into[at:at + n], timeout_s=timeout_s)
                if reply.get("length") != n:
                    raise ProtocolError(f"plog_read of {n} bytes answered {reply.get('length')!r}")

    def record(self, index: int) -> bytes:
        """Committed record `index` (0 is the first). Raises OUT_OF_RANGE past the committed
        records or for a negative index."""
        index = as_int(index, "index")
        if index < 0:
            raise OutOfRange(f"record index {index} is negative")
        if index > MAX_PLOG_CAPACITY_BYTES:         # no plog holds that many: not worth asking
            raise OutOfRange(f"record {index} is not among plog {self.name!r}'s committed records")
        try:
            return self._record(index)
        except HOME_AWAY:
            if not self._fail_over():
                raise
            return self._record(index)

    def _record(self, index: int) -> bytes:
        link = self._link()
        if link.is_local:
            if index >= len(self._places):
                self._learn_places(index)
            payload = self._local_record(link, index)
            if payload is not None:
                return payload
        for payload in self.records(index, 1):
            return payload
        raise OutOfRange(f"record {index} is not among plog {self.name!r}'s committed records")

    def _learn_places(self, index: int) -> None:
        """Ask for the places of committed records from the first unknown one up to `index`
        (a round trip per 4,096), so later record() calls up to it ask no server."""
        while len(self._places) <= index:
            known = len(self._places)
            reply = self._call("plog_records", start=known, count=min(MAX_PLOG_BATCH, index + 1 - known), data=False)
            places = reply["places"]
            if not places or len(self._places) != known:
                return
            self._places.extend((int(o), int(n)) for o, n in places)

    def _local_record(self, link: Any, index: int) -> bytes | None:
        """Record `index` read from the mapped segments, if its place is known and its frame
        checks; None: ask the server."""
        if index >= len(self._places):
            return None
        if self._layout is None:
            reply = self._call("plog_info", layout=True)
            extents = [tuple(e) for e in reply["extents"]]
            self._layout = (extents, list(accumulate(e[2] for e in extents)), reply["nonce"])
        extents, ends, nonce = self._layout
        offset, length = self._places[index]
        start = offset - rec.HEADER_BYTES
        end = offset + length
        creds = self.namespace.creds
        try:
            i = bisect_right(ends, start)
            if end <= ends[i]:                  # the common case: the frame lies in one extent
                segment, at, n = extents[i]
                at += start - (ends[i] - n)
                view = link.segment_view(creds, segment)
                if _records is not None:        # checked and copied in one call
                    return _records.read_frame(view, at, length, nonce, index)
                frame = view[at:at + end - start].tobytes()
            else:
                frame = b"".join(link.segment_view(creds, segment)[at:at + n]
                                 for segment, at, n in pieces(extents, start, end - start))
        except MemfabricError:
            return None
        magic, stored_length, low_index, crc = rec.HEADER.unpack_from(frame)
        payload = frame[rec.HEADER_BYTES:]
        if magic != rec.MAGIC or stored_length != length or low_index != index & 0xFFFFFFFF \
                or rec.checksum(nonce, index, payload) != crc:
            return None
        return payload

    def records(self, start: int = 0, count: int | None = None) -> Iterator[bytes]:
        """Committed records from index `start`, `count` of them (None: to the end as it is
        when each batch is asked), in order, fetched in batches."""
        start = as_int(start, "start")
        if start < 0:
            raise OutOfRange(f"record index {start} is negative")
        if start > MAX_PLOG_CAPACITY_BYTES:
            raise OutOfRange(f"record index {start} is past any plog's records")
        if count is not None:
            count = as_int(count, "count")
            if count < 0:
                raise InvalidArgument(f"count must not be negative, got {count}")
        return self._records(start, count)

    def _records(self, start: int, count: int | None) -> Iterator[bytes]:
        left = count
        while left is None or left > 0:
            asked = MAX_PLOG_BATCH if left is None else min(left, MAX_PLOG_BATCH)
            reply = self._call("plog_records", start=start, count=asked)
            places = reply["places"]
            if not places:
                return
            data = reply.get("data")
            if data is None:                 # one record too large for a reply: read by offset
                offset, length = places[0]
                data = [self.read(offset, length)]
            for payload in data:
                yield payload
            start += len(places)
            if left is not None:
                left -= len(places)

    # ---- the rest --------------------------------------------------------------------------

    def seal(self) -> dict[str, Any]:
        """No append from anyone succeeds after this (SEALED); reads go on. Appends answered
        before it are in. Returns info(). Sealing a sealed plog is no error. When the home
        does not answer, every copy that does is sealed (the home, should it come back, seals
        itself at its next append), and this handle reads from one of them from then on."""
        try:
            return self._call("plog_seal")["info"]
        except HOME_AWAY:
            holders = self._holders()
            if not holders:
                raise
        sealed: list[tuple[int, dict[str, Any]]] = []
        for _, server_id in holders:            # best first
            try:
                sealed.append((server_id, self.namespace.session.link(server_id).call("plog_seal", **self._wire)["info"]))
            except HOME_AWAY:
                continue
        if not sealed:
            raise ServerUnavailable(f"no server holding plog {self.name!r} answers: it was not sealed")
        self._go_to(sealed[0][0])
        return sealed[0][1]

    def delete(self) -> None:
        """Delete the plog: its memory goes back to the namespace. Its handles get
        NO_SUCH_OBJECT from then on."""
        self._call("plog_delete")

    def info(self) -> dict[str, Any]:
        """name, capacity, length (committed bytes), records (committed), state ("open" or
        "sealed"), replicas, dead_replicas; and home (its server), pool, ns."""
        return self._call("plog_info")["info"]

    def __len__(self) -> int:
        return self.info()["records"]


# ---- the namespace's side -----------------------------------------------------------------------

def _pool_namespace(namespace: "Namespace", pool: Any) -> "Namespace":
    """The namespace a plog of `pool` lives in: this one, or (another pool named) the
    namespace of the same name and secId in that pool, which must exist."""
    if pool is None or pool == namespace.pool:
        return namespace
    check_name("pool", pool)
    return namespace.session.namespace(namespace.name, namespace.sec_id, pool=pool)


def _servers_of(namespace: "Namespace") -> list[int]:
    """Live servers that give memory to the namespace's pool, this client's own first.
    NO_SUCH_POOL when no server of the cluster, live or not, has that pool."""
    session = namespace.session
    having = [s for s in session.servers() if namespace.pool in (s.get("pools") or {})]
    if not having:
        raise NoSuchPool(f"no server of the fabric gives memory to pool {namespace.pool!r}")
    servers = [s for s in having if s.get("alive")]
    own = session.local.server_id        # (the home link may be down: its server dead)
    return sorted((s["server_id"] for s in servers), key=lambda sid: (sid != own, sid))


def create_plog(namespace: "Namespace", name: str, capacity: int, *, replicas: int = 1, pool: Any = None) -> Plog:
    ns = _pool_namespace(namespace, pool)
    name = check_name("plog", name)
    capacity = as_int(capacity, "capacity")
    if not 0 < capacity <= MAX_PLOG_CAPACITY_BYTES:
        raise InvalidArgument(f"capacity must be 1 to {MAX_PLOG_CAPACITY_BYTES} bytes, got {capacity}")
    replicas = as_int(replicas, "replicas")
    servers = _servers_of(ns)
    if not servers:
        raise InvalidArgument(f"no live server gives memory to pool {ns.pool!r}")
    if _find(ns, name, servers) is not None:
        raise InvalidArgument(f"plog {name!r} already exists in namespace {ns.name!r} (ns.plog(name) opens it)")
    home = servers[0]
    with allowing(prepare_allowance_s(capacity, max(replicas, 1))):   # its memory made ready, copy by copy
        reply = ns.session.link(home).call("plog_create", **ns.wire_creds, name=name, capacity=capacity,
                                           replicas=replicas)
    made = Plog(ns, name, reply["info"]["home"], reply["info"]["id"])
    # Another server may have made one of this name meanwhile (a name is checked per server).
    # Each creator looks again after making its own: of two racing, at least one sees the
    # other's (and both may), and whoever sees another deletes its own: never two of one name.
    found = _find(ns, name, [s for s in servers if s != made.home])
    if found is not None and found[1] != made.plog_id:      # (not one of its own copies)
        try:
            made.delete()
        except MemfabricError:
            pass
        raise InvalidArgument(f"plog {name!r} already exists in namespace {ns.name!r} (made on another server "
                              "at the same time; ns.plog(name) opens it)")
    return made


def _find(ns: "Namespace", name: str, servers: list[int]) -> tuple[int, int, int] | None:
    """(server, plog id, its home) of the plog of this name, asking these servers in turn: its home when
    one of them is it, else a copy (one that is not stale first, the longest first)."""
    copies = []
    queue, asked = list(servers), set()
    while queue:
        server_id = queue.pop(0)
        if server_id in asked:
            continue
        asked.add(server_id)
        try:
            info = ns.session.link(server_id).call("plog_info", **ns.wire_creds, name=name)["info"]
        except (NoSuchObject, *HOME_AWAY):
            continue
        if info.get("role", "home") == "home":
            return server_id, info["id"], server_id
        copies.append((bool(info.get("stale")), -int(info.get("length", 0)), server_id, info["id"], info["home"]))
        if info.get("home") in servers:
            queue.insert(0, info["home"])        # ask its home next
    if copies:
        _, _, server_id, plog_id, home = min(copies)
        return server_id, plog_id, home
    return None


def open_plog(namespace: "Namespace", name: str, *, pool: Any = None) -> Plog:
    ns = _pool_namespace(namespace, pool)
    name = check_name("plog", name)
    found = _find(ns, name, _servers_of(ns))
    if found is None:
        raise NoSuchObject(f"no plog {name!r} in namespace {ns.name!r} of pool {ns.pool!r} on a live server "
                           "(ns.plogs() lists them)")
    return Plog(ns, name, *found)


def list_plogs(namespace: "Namespace", *, pool: Any = None) -> list[dict[str, Any]]:
    ns = _pool_namespace(namespace, pool)
    infos: list[dict[str, Any]] = []
    for server_id in _servers_of(ns):
        try:
            infos.extend(ns.session.link(server_id).call("plog_list", **ns.wire_creds)["plogs"])
        except ServerUnavailable:
            continue
        except MemfabricError:
            raise
    # Each plog once: its home's info, or (its home away) a copy's, one not stale first.
    best: dict[Any, dict[str, Any]] = {}
    for info in sorted(infos, key=lambda i: (i.get("role", "home") != "home", bool(i.get("stale")),
                                             -int(i.get("length", 0)))):
        best.setdefault(info.get("id"), info)
    return sorted(best.values(), key=lambda i: i["name"])


_APPEND_MANY_CODES = frozenset({Plog.append_many.__code__})

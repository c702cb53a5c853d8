"""Batches of reads and writes across objects: `Session.read_many` and `Session.write_many`.

A batch is a list of (BigMemory, offset, length, buffer) items: a read fills buffer[:length]
in place with bytes [offset, offset+length) of the object; a write copies buffer[:length]
(any buffer) there. `length` may be None: the whole buffer.

Checked first, all or nothing. Every item is checked before a byte moves: its handle (a
BigMemory of this session), its offset and length (ints, the range inside the object as
this process knows it), its buffer (a buffer of at least `length` bytes; for a read,
writable and C-contiguous). A bad item raises INVALID_ARGUMENT or OUT_OF_RANGE, naming it,
and nothing moves; so does a batch of more than MAX_BATCH_ITEMS items.

Then one result per item. The call returns a list of error codes, one per item, 0 when the
item was done whole: an object freed before or during the batch gives NO_SUCH_OBJECT, a
server lost or silent gives SERVER_UNAVAILABLE or TIMEOUT to the items with bytes there,
and the other items go on. An item that failed midway may have moved part of its bytes (a
read filled part of its buffer, a write changed part of its range), as read() and write()
do when they fail; its code says it did not finish. Items move in no promised order.

Paths. Bytes on this host are copied at once from the mapped segments (memcpy), with the
object's generation checked before and after each copy (for the batch's first CHUNK_BYTES,
the check before is the one of the checking pass, moments earlier): no round trip at all.
Bytes on
other hosts go as one request per server, to all servers at once: its header lists the
spans (object, segment, offset, length) and its payload is their bytes back to back, sent
straight from the callers' buffers (a gathering sendmsg) or received straight into them (a
scattering recvmsg_into). A request holds at most MAX_BATCH_SPANS_PER_REQUEST spans and
MAX_BATCH_REQUEST_BYTES bytes; a larger share for one server goes as several requests, at
most BATCH_REQUESTS_IN_FLIGHT per server at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..datapath.rpc_link import InFlight
from ..errors import BmError, InvalidArgument, LimitExceeded, MemfabricError, OutOfRange
from ..limits import (BATCH_REQUESTS_IN_FLIGHT, MAX_BATCH_ITEMS, MAX_BATCH_REQUEST_BYTES,
                      MAX_BATCH_SPANS_PER_REQUEST)
from .client import CHUNK_BYTES, BigMemory
from .layout import RemoteSegment, as_bytes_view

try:           # the compiled same-host copies (src/memfabric/_native.c); without it, the same in Python
    from .. import _native
except ImportError:        # pragma: no cover - a machine that could not build it
    _native = None

if TYPE_CHECKING:
    from ..client.session import Session

READ_OP = "seg_read_many"
WRITE_OP = "seg_write_many"
_FREED = int(BmError.NO_SUCH_OBJECT)


def read_many(session: "Session", items: Iterable[Any]) -> list[int]:
    """Fill each item's buffer from its object; one result code per item (0: done)."""
    return _run(session, items, writing=False)


def write_many(session: "Session", items: Iterable[Any]) -> list[int]:
    """Copy each item's buffer into its object; one result code per item (0: done)."""
    return _run(session, items, writing=True)


def _run(session: "Session", items: Iterable[Any], writing: bool) -> list[int]:
    session.check_open()
    if not isinstance(items, (list, tuple)):
        try:
            items = list(items)
        except TypeError:
            raise InvalidArgument(f"items must be a list of (BigMemory, offset, length, buffer), "
                                  f"got {type(items).__name__}") from None
    if len(items) > MAX_BATCH_ITEMS:
        raise LimitExceeded(f"a batch takes at most {MAX_BATCH_ITEMS} items, got {len(items)}")
    results = [0] * len(items)
    remote = _Requests(writing)
    plan, rest = _plan(session, items, writing)
    try:
        local, others = _check(session, items, writing, results, remote, rest)
    except BaseException:
        if plan is not None:
            plan.release()          # the callers' buffers are theirs again at once
        raise
    if plan is not None:
        plan.run(results, _FREED)
    _copy_local(local, writing, results)
    homes = []
    for i, lay, offset, view in others:
        results[i] = _spans(i, lay, offset, view, writing, remote)
        homes.append((lay.gens, lay.gen_index, lay.generation, i))
    remote.take_queued()
    if remote.links:
        remote.run(results)
    # A home on this host says whether the object lived throughout (for a home elsewhere,
    # whose servers checked every span, the word always says yes).
    for gens, gi, generation, i in homes:
        if gens[gi] != generation and not results[i]:
            results[i] = _FREED
    for _, _, _, i, gens, gi, generation in remote.queued:
        if gens[gi] != generation and not results[i]:
            results[i] = _FREED
    return results


def _plan(session: "Session", items: list | tuple, writing: bool) -> tuple[Any, Any]:
    """The compiled plan of the items _check would find in one piece on this host, and the
    indices of the others (_native.c, plan_copies: the same checks, the same copies); without
    it, (None, every index)."""
    if _native is None:
        return None, range(len(items))
    alive = set()
    for link in list(session._links.values()):
        if link.is_local and not link.closed:
            try:
                link.check_alive()
            except MemfabricError:
                continue
            alive.add(link)
    return _native.plan_copies(items, alive, writing, CHUNK_BYTES)


def _copy_local(local: list, writing: bool, results: list[int]) -> None:
    """Items in one piece on this host: one copy each, the object's generation checked after
    it. Before it too, except for the first CHUNK_BYTES of the batch, which follow the checks
    of _check closely: freed memory rests REUSE_GRACE_S before reuse, far longer than
    that takes (the same bound as a lone read's or write's chunks)."""
    done_bytes = 0
    for i, gens, gi, generation, segment, view in local:
        if done_bytes > CHUNK_BYTES and gens[gi] != generation:
            results[i] = _FREED
            continue
        if writing:
            segment[:] = view
        else:
            view[:] = segment
        if gens[gi] != generation:
            results[i] = _FREED
        if done_bytes <= CHUNK_BYTES:
            done_bytes += view.nbytes


def _check(session: "Session", items: list | tuple, writing: bool, results: list[int],
           remote: "_Requests", indices: Iterable[int]) -> tuple[list, list]:
    """Every item checked before a byte moves (raises on a bad one). Returns the plan: items
    in one piece on this host, (index, generation words, index in them, generation, its bytes
    in the segment, buffer view), and the items in several pieces, (index, layout, offset,
    buffer view); items in one piece on another host are queued in `remote`. An item whose
    object is gone gets its code in `results` and is in none of them."""
    local, others = [], []
    alive: set = set()         # links checked alive during this batch: once each is enough
    for i in indices:
        item = items[i]
        try:
            bm, offset, length, buffer = item
            single = bm._described.single
        except (TypeError, ValueError, AttributeError):
            raise _bad_item(i, item) from None
        view = buffer if type(buffer) is memoryview else _view(i, buffer, writing)
        if view.format != "B" or view.ndim != 1 or not view.c_contiguous or (view.readonly and not writing):
            view = _as_bytes(i, buffer, writing)
        nbytes = view.nbytes
        if length is None:
            length = nbytes
        elif type(length) is not int or not 0 <= length <= nbytes:
            raise InvalidArgument(f"item {i}: length {length!r} does not fit its {nbytes}-byte buffer")
        elif length != nbytes:
            view = view[:length]
        if type(offset) is not int:
            raise InvalidArgument(f"item {i}: offset must be an int, got {offset!r}")
        if single is not None:
            gens, gi, generation, size, segment, base, link = single
            # Its link was checked alive in this batch, so it is this session's: the handle is too.
            # (A range past the size known goes the full way: the object may have grown.)
            if link in alive and gens[gi] == generation and 0 <= offset and offset + length <= size:
                if type(segment) is memoryview:
                    if length <= CHUNK_BYTES:
                        start = base + offset
                        local.append((i, gens, gi, generation, segment[start:start + length], view))
                        continue
                else:
                    if length:
                        remote.queued.append((segment, base + offset, view, i, gens, gi, generation))
                    continue
        if bm.namespace.session is not session:
            raise InvalidArgument(f"item {i}: object {bm.bm_id} belongs to another session")
        try:
            lay = bm._checked()         # freed, grown, a link to look at: the full check
        except MemfabricError as exc:
            results[i] = int(exc.code)
            continue
        alive.update(bm._described.links)
        if offset < 0 or offset + length > lay.size:
            raise _outside(i, bm, offset, length, lay.size)
        if lay.local_single and length <= CHUNK_BYTES:
            _, _, segment, base = lay.pieces[0]
            local.append((i, lay.gens, lay.gen_index, lay.generation, segment[base + offset:base + offset + length],
                          view))
        else:
            others.append((i, lay, offset, view))
    return local, others


def _view(i: int, buffer: object, writing: bool) -> memoryview:
    try:
        return memoryview(buffer)
    except TypeError:
        raise InvalidArgument(f"item {i}: expected a buffer (bytes, bytearray, memoryview, numpy array), "
                              f"got {type(buffer).__name__}") from None


def _as_bytes(i: int, buffer: object, writing: bool) -> memoryview:
    """A buffer that is not a flat, C-contiguous byte view as the batch needs it: made one,
    or refused (a read's destination must be writable and C-contiguous)."""
    try:
        return as_bytes_view(buffer, writable=not writing)
    except InvalidArgument as exc:
        raise InvalidArgument(f"item {i}: {exc.message}") from None


def _bad_item(i: int, item: object) -> InvalidArgument:
    try:
        bm, _, _, _ = item          # type: ignore[misc]
    except (TypeError, ValueError):
        return InvalidArgument(f"item {i}: expected (BigMemory, offset, length, buffer), got {_quote(item)}")
    return InvalidArgument(f"item {i}: expected a BigMemory, got {type(bm).__name__}")


def _outside(i: int, bm: BigMemory, offset: int, length: int, size: int) -> OutOfRange:
    return OutOfRange(f"item {i}: range [{offset}, {offset}+{length}) is outside object {bm.bm_id} of {size} bytes")


def _spans(i: int, lay: Any, offset: int, view: memoryview, writing: bool, remote: "_Requests") -> int:
    """Item i's pieces: those on this host copied now (in chunks, checked between), those on
    other hosts queued for their servers. Returns the item's code so far."""
    gens, gi, generation = lay.gens, lay.gen_index, lay.generation
    queued = []
    for target, a, b, pos in lay.spans(offset, view.nbytes):
        if type(target) is RemoteSegment:
            queued.append((target, a, view[pos:pos + b - a]))
            continue
        for start in range(a, b, CHUNK_BYTES):
            if gens[gi] != generation:
                return _FREED
            end = min(b, start + CHUNK_BYTES)
            at = pos + start - a
            if writing:
                target[start:end] = view[at:at + end - start]
            else:
                view[at:at + end - start] = target[start:end]
        if gens[gi] != generation:
            return _FREED
    for target, at, piece in queued:
        remote.add(target, at, piece, i)
    return 0


class _Request:
    """One request's worth of spans for one server. Each span names its own entry of
    `objects` (an object named twice is looked up twice: cheaper than finding out here)."""

    __slots__ = ("creds", "last_creds", "objects", "spans", "views", "items", "nbytes")

    def __init__(self) -> None:
        self.creds: list[list] = []
        self.last_creds: tuple | None = None
        self.objects: list[list] = []         # [creds index, bm_id] per span
        self.spans: list[int] = []            # object index, segment, offset, length; flat
        self.views: list[memoryview] = []
        self.items: list[int] = []            # the item each span belongs to
        self.nbytes = 0

    def header(self) -> dict[str, Any]:
        return {"creds": self.creds, "objects": self.objects, "spans": self.spans}


class _Requests:
    """Spans bound for other hosts, as requests per server; run() sends them all and waits."""

    def __init__(self, writing: bool) -> None:
        self.writing = writing
        self.links: dict[Any, list[_Request]] = {}
        # Items in one piece on another host, as _check found them: (segment, offset in it,
        # buffer view, item, generation words, index in them, generation).
        self.queued: list[tuple] = []

    def take_queued(self) -> None:
        """The queued items into requests (add(), inlined for the common case)."""
        links = self.links
        for segment, at, view, item, _, _, _ in self.queued:
            n = view.nbytes
            requests = links.get(segment.link)
            request = requests[-1] if requests is not None else None
            if request is None or n > MAX_BATCH_REQUEST_BYTES or len(request.objects) == MAX_BATCH_SPANS_PER_REQUEST \
                    or request.nbytes + n > MAX_BATCH_REQUEST_BYTES or segment.creds is not request.last_creds:
                self.add(segment, at, view, item)
                continue
            objects = request.objects
            objects.append([request.creds.index(segment.creds) if len(request.creds) > 1 else 0, segment.bm_id])
            request.spans += (len(objects) - 1, segment.segment, at, n)
            request.views.append(view)
            request.items.append(item)
            request.nbytes += n

    def add(self, segment: RemoteSegment, at: int, view: memoryview, item: int) -> None:
        n = view.nbytes
        if n > MAX_BATCH_REQUEST_BYTES:
            for start in range(0, n, MAX_BATCH_REQUEST_BYTES):
                self.add(segment, at + start, view[start:start + MAX_BATCH_REQUEST_BYTES], item)
            return
        requests = self.links.get(segment.link)
        if requests is None:
            requests = self.links[segment.link] = [_Request()]
        request = requests[-1]
        objects = request.objects
        if len(objects) == MAX_BATCH_SPANS_PER_REQUEST or request.nbytes + n > MAX_BATCH_REQUEST_BYTES:
            request = _Request()
            requests.append(request)
            objects = request.objects
        creds = segment.creds
        if creds is not request.last_creds:
            if creds not in request.creds:
                request.creds.append(creds)
            request.last_creds = creds
        objects.append([request.creds.index(creds) if len(request.creds) > 1 else 0, segment.bm_id])
        request.spans += (len(objects) - 1, segment.segment, at, n)
        request.views.append(view)
        request.items.append(item)
        request.nbytes += n

    def run(self, results: list[int]) -> None:
        """Every request sent, all servers at once (at most BATCH_REQUESTS_IN_FLIGHT per server
        in flight), each reply's codes given to its items. Interrupted, it cancels what is in
        flight before going on up, so no reply lands in a caller's buffer afterwards."""
        op = WRITE_OP if self.writing else READ_OP
        queues = {link: list(reversed(requests)) for link, requests in self.links.items()}
        in_flight: list[tuple[Any, Any, _Request]] = []
        with InFlight() as flight:      # however this ends, no reply lands after it
            while queues or in_flight:
                for link in list(queues):
                    waiting = queues[link]
                    while waiting and sum(1 for f in in_flight if f[0] is link) < BATCH_REQUESTS_IN_FLIGHT:
                        request = waiting.pop()
                        try:
                            if self.writing:
                                pending = flight.submit(link, op, request.header(), payload=request.views)
                            else:
                                pending = flight.submit(link, op, request.header(), into=request.views)
                        except MemfabricError as exc:
                            _fail(results, request.items, int(exc.code))
                            continue
                        in_flight.append((link, pending, request))
                    if not waiting:
                        del queues[link]
                if not in_flight:
                    continue
                link, pending, request = in_flight.pop(0)
                try:
                    reply = flight.wait(link, pending)
                except MemfabricError as exc:
                    _fail(results, request.items, int(exc.code))
                    continue
                _take_reply(results, request, reply)


def _fail(results: list[int], items: list[int], code: int) -> None:
    for i in items:
        if not results[i]:
            results[i] = code


def _take_reply(results: list[int], request: _Request, reply: dict[str, Any]) -> None:
    """The reply names the spans that failed ("failed": indices) and why ("codes")."""
    failed, codes = reply.get("failed") or [], reply.get("codes") or []
    spans = len(request.items)
    if not isinstance(failed, list) or not isinstance(codes, list) or len(failed) != len(codes) \
            or not all(type(k) is int and 0 <= k < spans for k in failed):
        _fail(results, request.items, int(BmError.PROTOCOL_ERROR))
        return
    for span, code in zip(failed, codes):
        i = request.items[span]
        if not results[i]:
            results[i] = code if type(code) is int and code < 0 else int(BmError.PROTOCOL_ERROR)


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."

"""An object's bytes as pieces of mapped segments, and bounds-checked copies over them.

Used by clients (their own mappings of the servers' segments) and by servers (copy and
gather over their own and their peers' segments) alike.
"""

from __future__ import annotations

import array
import bisect
from typing import Any, Callable, Iterator

import numpy as np

from ..datapath.rpc_link import InFlight, segment_args
from ..errors import InvalidArgument, NoSuchObject, OutOfRange


class RemoteSegment:
    """A segment on another host: its bytes move by RPC, straight to and from the caller's
    buffer. A lone read or write on an idle link goes through the link's compiled path
    (rpc_link.py call_span), with the request's constant part encoded once here."""

    __slots__ = ("link", "creds", "bm_id", "segment", "_read_head", "_write_head")

    def __init__(self, link: Any, creds: tuple, bm_id: str, segment: int) -> None:
        self.link, self.creds, self.bm_id, self.segment = link, creds, bm_id, segment
        self._read_head = self._write_head = None

    def submit_write(self, at: int, src: memoryview, flight: InFlight) -> None:
        """Start sending `src` to offset `at` of the segment, as one of `flight`."""
        flight.submit(self.link, "seg_write", segment_args(self.creds, self.bm_id, self.segment, at, len(src)),
                      payload=src)

    def submit_read(self, at: int, dst: memoryview, flight: InFlight) -> None:
        """Start reading into `dst` from offset `at`, as one of `flight`."""
        flight.submit(self.link, "seg_read", segment_args(self.creds, self.bm_id, self.segment, at, len(dst)),
                      into=dst)

    # write and read build segment_args' request in place: one call fewer on the hot path.
    def write(self, at: int, src: memoryview) -> None:
        link = self.link
        head = self._write_head
        if head is None:
            head = self._write_head = link.span_head(self.creds, self.bm_id, self.segment, "seg_write")
        if not link.call_span("seg_write", head, at, len(src), src, None):
            creds = self.creds
            link.request("seg_write", {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": self.bm_id,
                                       "segment": self.segment, "offset": at, "length": len(src)}, payload=src)

    def read(self, at: int, dst: memoryview) -> None:
        link = self.link
        head = self._read_head
        if head is None:
            head = self._read_head = link.span_head(self.creds, self.bm_id, self.segment, "seg_read")
        if not link.call_span("seg_read", head, at, len(dst), None, dst):
            creds = self.creds
            link.request("seg_read", {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": self.bm_id,
                                      "segment": self.segment, "offset": at, "length": len(dst)}, into=dst)


def always_live(generation: int, size: int) -> memoryview:
    """The generation words of an object homed on another host: its servers check liveness
    on every request, so the local check always passes."""
    return memoryview(array.array("Q", [generation, size]))


class Layout:
    """Where an object's bytes are, plus the generation word that says it still lives."""

    __slots__ = ("bm_id", "size", "generation", "gens", "gen_index", "starts", "pieces", "local_single",
                 "remote_single")

    def __init__(self, bm_id: str, size: int, generation: int, gens: memoryview, slot: int,
                 pieces: list[tuple[int, int, memoryview, int]]) -> None:
        self.bm_id = bm_id
        self.size = size
        self.generation = generation
        self.gens = gens                 # the home server's table: [gen, size] per slot
        self.gen_index = 2 * slot
        self.pieces = pieces             # (object start, object end, segment view, segment offset)
        self.starts = [p[0] for p in pieces]
        self.local_single = len(pieces) == 1 and type(pieces[0][2]) is memoryview
        self.remote_single = len(pieces) == 1 and type(pieces[0][2]) is RemoteSegment

    def check_alive(self) -> None:
        if self.gens[self.gen_index] != self.generation:
            raise NoSuchObject(f"object {self.bm_id} was freed")

    def spans(self, offset: int, length: int) -> Iterator[tuple[memoryview, int, int, int]]:
        """(segment view, segment start, segment end, position in the request) for a range."""
        check_range(self.bm_id, self.size, offset, length)
        end = offset + length
        i = bisect.bisect_right(self.starts, offset) - 1
        pieces = self.pieces
        while offset < end:
            start, stop, view, base = pieces[i]
            take = min(stop, end) - offset
            yield view, base + offset - start, base + offset - start + take, offset - (end - length)
            offset += take
            i += 1


def check_range(bm_id: str, size: int, offset: object, length: object) -> None:
    if type(offset) is not int or type(length) is not int:
        raise InvalidArgument(f"offset and length must be ints, got {offset!r} and {length!r}")
    if offset < 0 or length < 0 or offset + length > size:
        raise OutOfRange(f"range [{offset}, {offset}+{length}) is outside object {bm_id} of {size} bytes")


def described_layout(d: dict, gens: memoryview | None,
                     view_of: Callable[[int, int], memoryview]) -> Layout:
    """The layout a `describe` reply gives. `gens` is the home's generation table as this
    process maps it, or None when the home is on another host (then always_live, one slot)."""
    if gens is None:
        gens, slot = always_live(d["generation"], d["size"]), 0
    else:
        slot = d["slot"]
    return build_layout(d["bm_id"], d["size"], d["generation"], slot, d["extents"], gens, view_of)


def build_layout(bm_id: str, size: int, generation: int, slot: int, extents: list[list[int]],
                 gens: memoryview, view_of: Callable[[int, int], memoryview]) -> Layout:
    """`extents` are [server id, segment, offset, length]; `view_of(server, segment)` maps one."""
    pieces = []
    position = 0
    for server_id, segment, offset, length in extents:
        if position >= size:
            break
        take = min(length, size - position)
        pieces.append((position, position + take, view_of(server_id, segment), offset))
        position += take
    if position != size:
        raise NoSuchObject(f"object {bm_id}: its extents cover {position} of {size} bytes")
    return Layout(bm_id, size, generation, gens, slot, pieces)


def as_bytes_view(buffer: object, writable: bool = False) -> memoryview:
    """Any buffer-protocol object as a flat byte view, without copying."""
    try:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        readonly = view.readonly
    except TypeError:
        raise InvalidArgument(f"expected a buffer (bytes, bytearray, memoryview, numpy array), "
                              f"got {type(buffer).__name__}") from None
    except ValueError as exc:       # a released memoryview, a closed mmap
        raise InvalidArgument(f"the {type(buffer).__name__} given cannot be read: {exc}") from None
    if writable and readonly:
        raise InvalidArgument("the destination buffer is read-only")
    if not view.c_contiguous:
        if writable:
            raise InvalidArgument("the destination buffer must be C-contiguous (use numpy.ascontiguousarray)")
        # A strided source is made contiguous by numpy first: one fast copy, instead of a
        # byte-by-byte copy far slower than the reuse grace assumes.
        view = memoryview(np.ascontiguousarray(np.asarray(view)))
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def write_at(layout: Layout, offset: int, src: memoryview) -> None:
    n = src.nbytes
    if layout.local_single:
        check_range(layout.bm_id, layout.size, offset, n)
        _, _, view, base = layout.pieces[0]
        view[base + offset: base + offset + n] = src
        return
    if layout.remote_single:            # one request, nothing to gather
        if type(offset) is not int or offset < 0 or offset + n > layout.size:
            check_range(layout.bm_id, layout.size, offset, n)
        _, _, segment, base = layout.pieces[0]
        if n:
            segment.write(base + offset, src)
        return
    with InFlight() as flight:          # however this ends, no reply lands after it
        for target, a, b, pos in layout.spans(offset, n):
            if type(target) is memoryview:
                target[a:b] = src[pos: pos + b - a]
            else:
                target.submit_write(a, src[pos: pos + b - a], flight)
        flight.wait_all()


def read_into(layout: Layout, offset: int, dst: memoryview) -> None:
    n = dst.nbytes
    if layout.local_single:
        check_range(layout.bm_id, layout.size, offset, n)
        _, _, view, base = layout.pieces[0]
        dst[:] = view[base + offset: base + offset + n]
        return
    if layout.remote_single:
        if type(offset) is not int or offset < 0 or offset + n > layout.size:
            check_range(layout.bm_id, layout.size, offset, n)
        _, _, segment, base = layout.pieces[0]
        if n:
            segment.read(base + offset, dst)
        return
    with InFlight() as flight:          # no reply may land in `dst` once this has returned or raised
        for target, a, b, pos in layout.spans(offset, n):
            if type(target) is memoryview:
                dst[pos: pos + b - a] = target[a:b]
            else:
                target.submit_read(a, dst[pos: pos + b - a], flight)
        flight.wait_all()


def read_bytes(layout: Layout, offset: int, length: int) -> bytes:
    """A new bytes, made in one copy from the mapped pieces (join allocates it once); pieces
    on other hosts are received into buffers of their own first."""
    if layout.local_single:
        check_range(layout.bm_id, layout.size, offset, length)
        _, _, view, base = layout.pieces[0]
        return bytes(view[base + offset: base + offset + length])
    parts: list[memoryview] = []
    with InFlight() as flight:
        for target, a, b, _ in layout.spans(offset, length):
            if type(target) is memoryview:
                parts.append(target[a:b])
            else:
                received = memoryview(bytearray(b - a))
                target.submit_read(a, received, flight)
                parts.append(received)
        flight.wait_all()
    return b"".join(parts)


def copy_between(src: Layout, src_offset: int, dst: Layout, dst_offset: int, length: int) -> None:
    """Object to object, piece by piece; both ranges are checked before a byte moves.

    Like memmove: when source and destination overlap in one object and the destination
    is higher, the pieces are copied from the end so no source byte is overwritten first.
    Pieces on other hosts move by RPC straight into (or out of) the local piece; only a
    remote-to-remote piece needs a bounce buffer.
    """
    check_range(src.bm_id, src.size, src_offset, length)
    check_range(dst.bm_id, dst.size, dst_offset, length)
    dst_spans = list(dst.spans(dst_offset, length))
    moves = []
    for sview, sa, sb, spos in src.spans(src_offset, length):
        for dview, da, db, dpos in dst_spans:
            lo, hi = max(spos, dpos), min(spos + sb - sa, dpos + db - da)
            if lo < hi:
                moves.append((dview, da + lo - dpos, da + hi - dpos, sview, sa + lo - spos, sa + hi - spos))
    same_object = src.bm_id == dst.bm_id
    if same_object and dst_offset > src_offset:
        moves.reverse()
    for dview, da, db, sview, sa, sb in moves:
        if type(dview) is memoryview and type(sview) is memoryview:
            dview[da:db] = sview[sa:sb]    # memoryview assignment is memmove-safe within a piece
        elif type(dview) is memoryview:
            sview.read(sa, dview[da:db])
        else:
            if type(sview) is memoryview:
                chunk = sview[sa:sb]
            else:
                chunk = memoryview(bytearray(sb - sa))
                sview.read(sa, chunk)
            dview.write(da, chunk)

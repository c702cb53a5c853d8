"""BigMemory handles: reads and writes that never leave this process once the layout is known.

A handle keeps its object's layout (pieces of segments this process has mapped) and checks
the home server's generation word before and after each copy: a freed object fails with
NO_SUCH_OBJECT, and freed memory rests for a grace period before reuse, so a copy that
passed the first check cannot land in the next tenant's bytes.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .layout import (Layout, RemoteSegment, as_bytes_view, described_layout, check_range,
                               read_bytes, read_into, write_at)
from ..core.allocator import round_up
from ..limits import PAGE_SIZE_BYTES
from ..client.types import Affinity, OperatorCode
from ..errors import (Busy, InvalidArgument, IOError_, MemfabricError, NoSuchNamespace, NoSuchObject, NotInitialized,
                      OutOfRange)
from .objects import parse_bm_id

# Copies larger than this go in chunks, with the object's generation checked in between.
CHUNK_BYTES = 4 << 20

if TYPE_CHECKING:
    from .session import Namespace


# One handle may be used by many threads: a description is adopted whole, under this lock,
# and never over a newer one (held briefly, by adoptions only, so one lock serves all handles).
_ADOPTING = threading.Lock()


class _Described:
    """What one description of the object says, taken as a whole: threads reading a handle
    see one description's layout, links and extents, never a mix of two."""

    __slots__ = ("layout", "links", "extents", "raw_extents", "single")

    def __init__(self, layout: Layout, links: list, raw_extents: list[list[int]]) -> None:
        self.layout = layout
        self.links = links                       # links to every server holding its bytes
        self.extents = [(e[0], e[3]) for e in raw_extents]
        self.raw_extents = raw_extents           # [server id, segment, offset, length]
        # All a batch needs of an object in one piece, at one look (batch.py): (generation
        # words, index, generation, size, segment: a view on this host, else a RemoteSegment,
        # its base, link).
        self.single = ((layout.gens, layout.gen_index, layout.generation, layout.size,
                        layout.pieces[0][2], layout.pieces[0][3], links[0])
                       if len(layout.pieces) == 1 and len(links) == 1 else None)


class BigMemory:
    __slots__ = ("bm_id", "namespace", "_described", "_home", "__weakref__")

    def __init__(self, namespace: "Namespace", described: dict[str, Any]) -> None:
        self.namespace = namespace
        self.bm_id: str = described["bm_id"]
        self._home = namespace.session.link_for_object(self.bm_id)
        self._described: _Described | None = None
        self._adopt(described)

    def __repr__(self) -> str:
        return f"BigMemory({self.bm_id!r}, size={self.size}, ns={self.namespace.name!r})"

    @property
    def size(self) -> int:
        return self._described.layout.size

    @property
    def extents(self) -> list[tuple[int, int]]:
        """(server id, bytes) of each extent, for the curious and the tests."""
        return self._described.extents

    @property
    def _layout(self) -> Layout:
        return self._described.layout

    # ---- layout -----------------------------------------------------------------------

    def _adopt(self, d: dict[str, Any]) -> None:
        """Take a fresh description; all of it or, on any error, none (the old state stays).
        An object never shrinks: a description smaller than the one held is older (another
        thread adopted a newer one meanwhile) and is not taken."""
        ns = self.namespace
        creds = ns.creds
        session = ns.session
        by_server: dict[int, list[int]] = {}
        for server_id, segment, _, _ in d["extents"]:
            by_server.setdefault(server_id, []).append(segment)
        links = []
        for server_id, segments in by_server.items():
            link = session.link(server_id)
            if link.is_local:
                link.fetch_segments(creds, segments)
            links.append(link)
        home = self._home
        gens = home.gen_table(creds, d["incarnation"]) if home.is_local else None
        bm_id = d["bm_id"]

        def view_of(server_id: int, segment: int) -> memoryview | RemoteSegment:
            link = session.link(server_id)
            return link.segment_view(creds, segment) if link.is_local else RemoteSegment(link, creds, bm_id, segment)

        described = _Described(described_layout(d, gens, view_of), links, d["extents"])
        with _ADOPTING:
            held = self._described
            if held is None or described.layout.size >= held.layout.size:
                self._described = described

    def populate(self) -> None:
        """Fault in this object's bytes in this process's mappings before they are written:
        a new object's first write then runs at memcpy speed instead of faulting page by page
        (about 4x slower). Costs ~300 us per 4 MiB, and nothing for remote extents."""
        session = self.namespace.session
        for server_id, segment, offset, length in self._described.raw_extents:
            link = session.cached_link(server_id)
            if link is not None and link.is_local:
                link.populate(self.namespace.creds, segment, offset, length)

    def home_link(self) -> Any:
        """The home server's link, rebound through the session if it broke (the session
        reconnects, or reports the server unavailable)."""
        if self._home.closed:
            self._home = self.namespace.session.link_for_object(self.bm_id)
        return self._home

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self.namespace.session.check_open()
        return self.home_link().call(op, **self.namespace.wire_creds, bm_id=self.bm_id, **args)

    def refresh(self) -> None:
        self._adopt(self._call("describe"))

    def _checked(self) -> Layout:
        described = self._described
        lay = described.layout
        gens = lay.gens
        i = lay.gen_index
        if gens[i] != lay.generation:    # revoked tables read 0: a destroyed namespace lands here too
            if not self._home.closed:
                raise NoSuchObject(f"object {self.bm_id} was freed (or its namespace destroyed)")
            # The link broke (and revoked its memory); a new one may still find the object
            # (refresh() asks through home_link(), which rebinds a closed link).
            self.refresh()
            described = self._described
            lay = described.layout
            gens, i = lay.gens, lay.gen_index
        if gens[i + 1] != lay.size:      # expanded by someone: pick up the new extents
            self.refresh()
            described = self._described
            lay = described.layout
        for link in described.links:
            if link.closed:
                # A link broke earlier (a lost server): describe again; the session
                # reconnects or says the server is unavailable.
                self.refresh()
                return self._described.layout
            link.check_alive()
        return lay

    # ---- data -------------------------------------------------------------------------

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy `data` (any buffer) into the object at `offset`.

        The range is checked whole before a byte moves: a write out of range, to a freed
        object or from a bad buffer changes nothing. Once the copy is under way it is not
        undone: a write cut off midway (KeyboardInterrupt, TIMEOUT, a server lost, the object
        freed meanwhile) has written every 4 MiB chunk before the one under way and nothing
        after it, and part of that one (on this host, a prefix of it). Writing again finishes
        the job. Readers may see a write in progress, as with memory."""
        self._copy(write_at, as_bytes_view(data), offset, "write")

    def read(self, offset: int = 0, length: int | None = None, *, into: Any = None) -> bytes | None:
        """Bytes [offset, offset+length); with `into`, fill that buffer in place and return None
        (a read cut off midway may have filled part of it, as a write does the object)."""
        lay = self._checked()
        if into is None:
            if length is None:
                length = lay.size - offset if type(offset) is int else 0
            if type(length) is int and 0 <= length <= CHUNK_BYTES:
                data = read_bytes(lay, offset, length)
                self._still_alive(lay, "read")
                return data
            check_range(self.bm_id, lay.size, offset, length)
            into = bytearray(length)
            self.read(offset, into=into)
            return bytes(into)
        dst = as_bytes_view(into, writable=True)
        if length is not None:
            if type(length) is not int or not 0 <= length <= dst.nbytes:
                raise InvalidArgument(f"length {length!r} does not fit the {dst.nbytes}-byte buffer")
            dst = dst[:length]
        self._copy(read_into, dst, offset, "read", lay)
        return None

    def _copy(self, copy: Any, buf: memoryview, offset: int, what: str, lay: Layout | None = None) -> None:
        """`copy(layout, offset, buf)`, in chunks of CHUNK_BYTES when large, one after another,
        the range checked whole first (see write())."""
        lay = lay or self._checked()
        n = buf.nbytes
        if n <= CHUNK_BYTES:
            copy(lay, offset, buf)
        else:
            check_range(self.bm_id, lay.size, offset, n)
            for start in range(0, n, CHUNK_BYTES):
                copy(lay, offset + start, buf[start:start + CHUNK_BYTES])
                self._still_alive(lay, what)
        self._still_alive(lay, what)

    def _still_alive(self, lay: Layout, what: str) -> None:
        # Checked after every chunk: freed memory rests REUSE_GRACE_S before reuse, far longer
        # than one chunk's copy, so a copy that started on a live object never reaches the next.
        if lay.gens[lay.gen_index] != lay.generation:
            raise NoSuchObject(f"object {self.bm_id} was freed during the {what}")

    def swap_in(self, path: str, *, file_offset: int = 0, offset: int = 0, length: int | None = None) -> int:
        """Read a file range straight into the object's memory (no intermediate bytes)."""
        lay = self._checked()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise IOError_(f"cannot open {path}: {exc.strerror}") from None
        try:
            file_size = os.fstat(fd).st_size
            if type(file_offset) is not int or file_offset < 0:
                raise InvalidArgument(f"file offset must be a non-negative int, got {file_offset!r}")
            if length is None:
                length = max(0, min(file_size - file_offset, lay.size - offset))
            check_range(self.bm_id, lay.size, offset, length)
            if file_offset + length > file_size:
                raise OutOfRange(f"{path} has {file_size} bytes; [{file_offset}, {file_offset}+{length}) "
                                 "goes past its end")
            for target, a, b, pos in lay.spans(offset, length):
                # A local piece is read into in place; a piece on another host has to cross
                # the network anyway, so it goes through a buffer and one RPC.
                dst = target[a:b] if type(target) is memoryview else memoryview(bytearray(b - a))
                done = 0
                while done < len(dst):
                    got = os.preadv(fd, [dst[done:]], file_offset + pos + done)
                    if got <= 0:
                        raise IOError_(f"{path} shrank while being read")
                    done += got
                if type(target) is not memoryview:
                    target.write(a, dst)
        except OSError as exc:
            raise IOError_(f"reading {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        lay.check_alive()
        return length

    # ---- control ----------------------------------------------------------------------

    def map(self, writable: bool = True) -> "Mapping":
        """The whole object as one contiguous buffer; writes are seen by every process at once."""
        d = self._call("map_pin")
        try:
            self._adopt(d)
            creds = self.namespace.creds
            session = self.namespace.session
            links = {s: session.link(s) for s, _, _, _ in d["extents"]}
            if not all(link.is_local for link in links.values()):
                return RemoteMapping(self, d["size"], writable)
            pieces = [(links[s].segment_fd(creds, seg), off, length) for s, seg, off, length in d["extents"]]
            segments = frozenset(seg for _, seg, _, _ in d["extents"])
            first, *others = links.values()
            shared = first.map_object(pieces, writable, tag=(creds[0], creds[1], segments))
            for link in others:
                link.track(shared)
        except BaseException:
            self._call("map_unpin")
            raise
        return Mapping(self, shared, d["size"], writable)

    def expand(self, new_size: int) -> None:
        """Grow to `new_size` bytes; contents are kept, new bytes are zero."""
        self._adopt(self._call("expand", size=new_size))
        self.populate()

    def copy_to(self, dst: "BigMemory", *, src_offset: int = 0, dst_offset: int = 0,
                length: int | None = None) -> None:
        """Copy between objects on the servers; no byte passes through this process."""
        self.namespace.session.check_open()
        if length is None:
            length = self.size - src_offset
        dst.home_link().call("copy", src={**self.namespace.wire_creds, "bm_id": self.bm_id},
                       dst={**dst.namespace.wire_creds, "bm_id": dst.bm_id},
                       src_offset=src_offset, dst_offset=dst_offset, length=length)

    def free(self) -> None:
        self._call("free")
        self.namespace.session.forget(self.bm_id)

    def info(self) -> dict[str, Any]:
        """All another process needs to open this object: pass it with the secId."""
        self.namespace.session.check_open()
        return {"bm_id": self.bm_id, "pool": self.namespace.pool, "ns": self.namespace.name, "size": self.size}


class Mapping:
    """A contiguous mapping of one object. Use as a context manager, or call close().

    If the server holding its memory is lost (or the namespace destroyed), the view is
    revoked: it reads zeros and writes to it go nowhere, from the moment this process
    notices; the next call on the mapping (flush, close) raises SERVER_UNAVAILABLE (or
    NO_SUCH_NAMESPACE), as does the next call on its handle."""

    def __init__(self, bm: BigMemory, shared: Any, size: int, writable: bool) -> None:
        self.bm = bm
        self._shared = shared
        self.view: memoryview = shared.view()[:size]
        self.writable = writable

    def _lost(self) -> Exception | None:
        reason = self._shared.revoked_by if self._shared is not None else None
        return type(reason)(str(reason)) if reason is not None else None

    def flush(self) -> None:
        """Same-host mappings are the pool's memory itself: nothing to send back. Raises if
        the mapping was revoked (its server lost, its namespace destroyed)."""
        lost = self._lost()
        if lost is not None:
            raise lost

    def close(self) -> None:
        if self._shared is None:
            return
        lost = self._lost()
        try:
            self.view.release()
        except BufferError:
            raise Busy("numpy arrays or memoryviews made from this mapping are still alive; "
                       "drop them before unmapping") from None
        self._shared.close()          # Busy too while other buffers of it live
        self._shared = None
        if lost is not None:
            raise lost                # its pin went with the server (or the namespace)
        _unpin(self.bm)

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteMapping:
    """A contiguous mapping of an object with bytes on other hosts: a private copy taken at
    map time; `flush` (and closing) writes back only the pages that changed since."""

    def __init__(self, bm: BigMemory, size: int, writable: bool) -> None:
        self.bm = bm
        self.writable = writable
        self._size = size
        self._area = mmap.mmap(-1, max(round_up(size, PAGE_SIZE_BYTES), PAGE_SIZE_BYTES))
        self._pages = np.frombuffer(self._area, dtype=np.uint8).reshape(-1, PAGE_SIZE_BYTES)
        whole = memoryview(self._area)
        bm.read(0, into=whole[:size])
        self._clean = self._pages.copy()
        self.view: memoryview = whole[:size] if writable else whole[:size].toreadonly()
        whole.release()

    def flush(self) -> int:
        """Send the changed pages; returns how many were sent."""
        if not self.writable or self._area is None:
            return 0
        dirty = np.flatnonzero((self._pages != self._clean).any(axis=1))
        if not len(dirty):
            return 0
        # Runs of adjacent dirty pages go as one write each.
        breaks = np.flatnonzero(np.diff(dirty) != 1)
        starts = np.concatenate(([dirty[0]], dirty[breaks + 1]))
        ends = np.concatenate((dirty[breaks], [dirty[-1]])) + 1
        flat = memoryview(self._area)
        try:
            for first, last in zip(starts.tolist(), ends.tolist(), strict=True):
                lo, hi = first * PAGE_SIZE_BYTES, min(last * PAGE_SIZE_BYTES, self._size)
                self.bm.write(flat[lo:hi], offset=lo)
                self._clean[first:last] = self._pages[first:last]
        finally:
            flat.release()
        return len(dirty)

    def close(self) -> None:
        """Flush and unmap. On a closed session nothing can be sent: the mapping is released
        all the same, and NOT_INITIALIZED says how many changed pages were lost."""
        if self._area is None:
            return
        lost = 0
        if self.bm.namespace.session.closed:
            lost = int((self._pages != self._clean).any(axis=1).sum()) if self.writable else 0
        else:
            self.flush()
        try:
            self.view.release()
        except BufferError:
            raise Busy("numpy arrays or memoryviews made from this mapping are still alive; "
                       "drop them before unmapping") from None
        del self._pages
        try:
            self._area.close()
        except BufferError:
            raise Busy("buffers made from this mapping are still alive; drop them before unmapping") from None
        self._area = None
        _unpin(self.bm)
        if lost:
            raise NotInitialized(f"the session is closed: {lost} changed pages of this mapping of "
                                 f"{self.bm.bm_id} were not written back")

    def __enter__(self) -> "RemoteMapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unpin(bm: BigMemory) -> None:
    if bm.namespace.session.closed:
        return     # its connections closed: the servers dropped its pins with them
    try:
        bm._call("map_unpin")
    except (NoSuchObject, NoSuchNamespace):
        pass   # the namespace went first: the pin went with it


class NamespaceObjects:
    """BigMemory's part of a client's Namespace: allocating, opening, freeing and gathering
    objects. Mixed into client.session.Namespace, which gives it `session`, `creds` and
    `wire_creds`."""

    session: Any
    creds: tuple[str, str, bytes]
    wire_creds: dict[str, Any]

    def alloc(self, size: int, affinity: Affinity | None = None) -> BigMemory:
        affinity = affinity or Affinity()
        link = self.session.home()
        if affinity.policy == "server":
            link = self.session.link(affinity.server_id)   # its home is where its bytes are
        d = link.call("alloc", **self.wire_creds, size=size, policy=affinity.policy,
                      server_id=affinity.server_id)
        bm = self._handle(d)
        bm.populate()          # a new object is about to be written
        return bm

    def open(self, bm_id: str) -> BigMemory:
        """A handle on an object another client made (same namespace, same secId)."""
        cached = self.session.cached_handle(bm_id)
        if cached is not None and cached.namespace.creds == self.creds:
            return cached
        home = self.session.link_for_object(bm_id)
        return self._handle(home.call("describe", **self.wire_creds, bm_id=bm_id))

    def _handle(self, described: dict[str, Any]) -> BigMemory:
        bm = BigMemory(self, described)
        self.session.remember(bm)
        return bm

    def batch_free(self, bm_ids: Iterable[str]) -> list[int]:
        """Free many objects; one result code per id (0 = freed), grouped by home server."""
        self.session.check_open()
        ids = list(bm_ids)
        results = [0] * len(ids)
        by_home: dict[int, list[int]] = {}
        for i, bm_id in enumerate(ids):
            try:
                by_home.setdefault(parse_bm_id(bm_id)[0], []).append(i)
            except MemfabricError as exc:
                results[i] = int(exc.code)
        for home, positions in by_home.items():
            try:
                codes = self.session.link(home).call(
                    "batch_free", **self.wire_creds, bm_ids=[ids[i] for i in positions])["results"]
            except MemfabricError as exc:
                codes = [int(exc.code)] * len(positions)
            for i, code in zip(positions, codes):
                results[i] = code
                if code == 0:
                    self.session.forget(ids[i])
        return results

    def gather(self, inputs: list[tuple[BigMemory, int, int]], op: OperatorCode = OperatorCode.CONCAT,
               dst: BigMemory | None = None, dtype: str = "uint8") -> tuple[BigMemory, int]:
        """Concatenate or reduce (object, offset, length) inputs into `dst`, or a new object here.

        A reduction's `dtype` is a string naming an integer or float type of at most 8 bytes, as
        numpy spells it ("float32", "<i8", "u2"); anything else is INVALID_ARGUMENT.
        Returns (the destination, the result's length in bytes).
        """
        wire_inputs = [{**bm.namespace.wire_creds, "bm_id": bm.bm_id, "offset": offset, "length": length}
                       for bm, offset, length in inputs]
        link = dst.home_link() if dst is not None else self.session.home()
        target = {**(dst.namespace.wire_creds if dst else self.wire_creds), "bm_id": dst.bm_id if dst else ""}
        reply = link.call("gather", inputs=wire_inputs, operator=OperatorCode(op).name.lower(),
                          dtype=dtype, dst=target)
        result = dst if dst is not None else self.open(reply["bm_id"])
        if dst is not None and reply["size"] != dst.size:
            dst.refresh()
        return result, reply["length"]

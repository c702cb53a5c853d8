"""BigMemory handles: reads and writes that never leave this process once the layout is known.

A handle keeps its object's layout (pieces of segments this process has mapped) and checks
the home server's generation word before and after each copy: a freed object fails with
NO_SUCH_OBJECT, and freed memory rests for a grace period before reuse, so a copy that
passed the first check cannot land in the next tenant's bytes.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .layout import (Layout, RemoteSegment, as_bytes_view, described_layout, check_range,
                               read_bytes, read_into, write_at)
from ..core.allocator import round_up
from ..datapath import forks, fresh_bytes
from ..limits import PAGE_SIZE_BYTES
from ..client.arguments import (as_bool, as_dtype, as_id_list, as_int, as_optional_int, as_path, as_position,
                                as_size)
from ..client.types import Affinity, ObjectInfo, OperatorCode, affinity_of
from ..errors import (Busy, InvalidArgument, MemfabricError, MemfabricIOError, NoSuchNamespace, NoSuchObject,
                      NotInitialized, OutOfRange, ProtocolError)
from . import arrays
from .objects import parse_bm_id

# Copies larger than this go in chunks, with the object's generation checked in between.
CHUNK_BYTES = 4 << 20

if TYPE_CHECKING:
    from ..client.session import Namespace


# One handle may be used by many threads: a description is adopted whole, under this lock,
# and never over a newer one (held briefly, by adoptions only, so one lock serves all handles).
_ADOPTING = threading.Lock()
forks.fresh_locks(sys.modules[__name__], "_ADOPTING")


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
    """A handle on one BigMemory object: `Namespace.alloc` makes one, `Namespace.open` finds
    one another client made. `bm_id` names the object cluster-wide; `size` is its size in
    bytes (it only grows, by `expand`).

    Reads and writes on this host copy straight to and from the pool's memory (no server
    round trip once the layout is known); bytes on other hosts move by RPC. One handle may
    be used by many threads. Every method raises NO_SUCH_OBJECT once the object is freed,
    NOT_INITIALIZED once the session is closed, SERVER_UNAVAILABLE (or TIMEOUT) when a
    server holding its bytes is lost, and INVALID_ARGUMENT for arguments of the wrong kind.
    Integers may be any integer type (numpy's too), never a bool.
    """

    __slots__ = ("bm_id", "namespace", "_described", "_home", "__weakref__")

    def __init__(self, namespace: "Namespace", described: dict[str, Any]) -> None:
        self.namespace = namespace
        self.bm_id: str = described["bm_id"]
        self._home = namespace.session._link_for_object(self.bm_id)
        self._described: _Described | None = None
        self._adopt(described)

    def __repr__(self) -> str:
        return f"BigMemory({self.bm_id!r}, size={self.size}, ns={self.namespace.name!r})"

    @property
    def size(self) -> int:
        """The object's size in bytes, as this handle last saw it (another client's expand
        shows at this handle's next read or write)."""
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
            link = session._cached_link(server_id)
            if link is not None and link.is_local:
                link.populate(self.namespace.creds, segment, offset, length)

    def _home_link(self) -> Any:
        """The home server's link, rebound through the session if it broke (the session
        reconnects, or reports the server unavailable)."""
        if self._home.closed:
            self._home = self.namespace.session._link_for_object(self.bm_id)
        return self._home

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self.namespace.session.check_open()
        return self._home_link().call(op, **self.namespace.wire_creds, bm_id=self.bm_id, **args)

    def refresh(self) -> None:
        """Describe the object again (its size and where its bytes are). Reads and writes do
        this by themselves when the object grew; call it to see another client's expand in
        `size` at once. Raises NO_SUCH_OBJECT if it was freed."""
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
            # (refresh() asks through _home_link(), which rebinds a closed link).
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
        """Copy `data` (any buffer: bytes, bytearray, memoryview, a numpy array) into the
        object at byte `offset`. Returns None.

        The range is checked whole before a byte moves: a write out of range (OUT_OF_RANGE),
        to a freed object (NO_SUCH_OBJECT) or from something that is not a buffer
        (INVALID_ARGUMENT) changes nothing. Once the copy is under way it is not undone: a
        write cut off midway (KeyboardInterrupt, TIMEOUT, a server lost, the object freed
        meanwhile) has written every 4 MiB chunk before the one under way and nothing after
        it, and part of that one (on this host, a prefix of it). Writing again finishes the
        job. Readers may see a write in progress, as with memory."""
        if type(offset) is not int:
            offset = as_int(offset, "offset")
        self._copy(write_at, as_bytes_view(data), offset, "write")

    def read(self, offset: int = 0, length: int | None = None, *, into: Any = None) -> bytes | None:
        """The object's bytes [offset, offset+length) (`length` None: to the object's end, or
        the whole of `into`).

        Without `into`, returns them as bytes, made in one copy from the pool, and from 4 MiB
        up straight into a new bytes marked for huge pages (datapath/fresh_bytes.py): a large
        result is fresh memory, and faulting it in 4 KiB at a time took 50 ms of a 64 MiB read
        here, against 8 ms of copying. With `into` (a writable C-contiguous buffer: bytearray,
        memoryview, numpy array), fills it in place and returns None; a read cut off midway may
        have filled part of it, as a write does the object. Raises OUT_OF_RANGE for a range
        outside the object or a length `into` cannot hold, INVALID_ARGUMENT for a read-only or
        non-contiguous `into`."""
        if type(offset) is not int:
            offset = as_int(offset, "offset")
        if length is not None and type(length) is not int:
            length = as_int(length, "length")
        lay = self._checked()
        if into is None:
            if length is None:
                length = lay.size - offset if type(offset) is int else 0
            if fresh_bytes.available and type(length) is int and length >= fresh_bytes.FRESH_BYTES_MIN:
                check_range(self.bm_id, lay.size, offset, length)     # before allocating
                return fresh_bytes.fresh_bytes(length, lambda view: self._copy(read_into, view, offset, "read", lay))
            data = read_bytes(lay, offset, length)
            self._still_alive(lay, "read")
            return data
        dst = as_bytes_view(into, writable=True)
        if length is not None:
            if type(length) is not int:
                raise InvalidArgument(f"length must be an int, got {length!r}")
            if not 0 <= length <= dst.nbytes:
                raise OutOfRange(f"length {length} does not fit the {dst.nbytes}-byte buffer")
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
        if lay.gens[lay.gen_index] != lay.generation:      # _still_alive(), on every call: inline
            self._still_alive(lay, what)

    def _still_alive(self, lay: Layout, what: str) -> None:
        # Checked after every chunk: freed memory rests REUSE_GRACE_S before reuse, far longer
        # than one chunk's copy, so a copy that started on a live object never reaches the next.
        if lay.gens[lay.gen_index] != lay.generation:
            # Or the session closed part way (its mappings revoked: the generation reads back
            # as another): NOT_INITIALIZED then, as for any call of a closed session.
            self.namespace.session.check_open()
            raise NoSuchObject(f"object {self.bm_id} was freed during the {what}")

    def swap_in(self, path: str, *, file_offset: int = 0, offset: int = 0, length: int | None = None) -> int:
        """Read `length` bytes of the file at `path`, from `file_offset`, straight into the
        object's memory at `offset` (no intermediate copy on this host). `length` None: as
        much as both the file (from file_offset) and the object (from offset) have.

        Returns the number of bytes read. Raises MEMFABRIC_IO_ERROR (MemfabricIOError) when
        the file cannot be opened or read, OUT_OF_RANGE when the range passes the end of the
        object or of the file, INVALID_ARGUMENT for a path that is not one."""
        path = as_path(path)
        file_offset = as_int(file_offset, "file_offset")
        offset = as_int(offset, "offset")
        length = as_optional_int(length, "length")
        lay = self._checked()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MemfabricIOError(f"cannot open {path!r}: {exc.strerror}") from None
        try:
            file_size = os.fstat(fd).st_size
            if file_offset < 0:
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
                        raise MemfabricIOError(f"{path!r} shrank while being read")
                    done += got
                if type(target) is not memoryview:
                    target.write(a, dst)
        except OSError as exc:
            raise MemfabricIOError(f"reading {path!r}: {exc.strerror}") from None
        finally:
            os.close(fd)
        lay.check_alive()
        return length

    # ---- control ----------------------------------------------------------------------

    def map(self, writable: bool = True) -> "Mapping | RemoteMapping":
        """The whole object as one contiguous buffer, `.view` (a memoryview; read-only unless
        `writable`, which must be True or False). Use it as a context manager, or close() it.

        On this host (a Mapping) the view is the pool's memory itself: every process mapping
        the object sees every write at once. An object with bytes on another host (a
        RemoteMapping) is a private copy taken now; flush() and close() send back the pages
        that changed. Closing while numpy arrays or memoryviews of the view live raises BUSY.
        A freed object stays mapped (its memory held) until its last mapping closes."""
        writable = as_bool(writable, "writable")
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
        """Grow the object to `new_size` bytes (at most 2**40); its bytes are kept, the new
        ones are zero. Returns None. Raises INVALID_ARGUMENT for a size smaller than the
        object's, OUT_OF_MEMORY when no server has room for the growth."""
        self._adopt(self._call("expand", size=as_size(new_size, "new_size")))
        self.populate()

    def copy_to(self, dst: "BigMemory", *, src_offset: int = 0, dst_offset: int = 0,
                length: int | None = None) -> None:
        """Copy `length` bytes of this object from `src_offset` into object `dst` (a
        BigMemory, of any namespace this session has the secId of; this one too, like
        memmove) at `dst_offset`; `length` None: to this object's end. The servers copy:
        no byte passes through this process. Returns None. Raises OUT_OF_RANGE when either
        range passes its object's end, INVALID_ARGUMENT when `dst` is not a BigMemory."""
        self.namespace.session.check_open()
        if not isinstance(dst, BigMemory):
            raise InvalidArgument(f"dst must be a BigMemory, got {type(dst).__name__}")
        src_offset = as_position(src_offset, "src_offset")
        dst_offset = as_position(dst_offset, "dst_offset")
        length = self.size - src_offset if length is None else as_position(length, "length")
        dst._home_link().call("copy", src={**self.namespace.wire_creds, "bm_id": self.bm_id},
                              dst={**dst.namespace.wire_creds, "bm_id": dst.bm_id},
                              src_offset=src_offset, dst_offset=dst_offset, length=length)

    def ndarray(self, dtype: Any, shape: Any = None, *, offset: int = 0, writable: bool = True) -> np.ndarray:
        """A numpy array over this object's memory: `shape` items of `dtype` from byte
        `offset` (`shape` None: as many items as fit from there, in one dimension; an int or
        a tuple of ints; () for one item).

        The array is made over a mapping of its own (see `map`): on this host it is the
        pool's memory, so other processes see its writes at once and it sees theirs; for an
        object with bytes on other hosts it is a private copy, whose changed pages go back on
        `ArrayMapping.of(arr).flush()` and when the mapping closes. The mapping lives as long
        as the array or any view of it does (the handle may go first); when the last goes, it
        is closed soon after on a thread of memfabric's. `ArrayMapping.of(arr).close()` cuts
        the arrays off at once (they then read zeros and writes go
        nowhere, safely). Closing the session, destroying the namespace or losing the server
        cut them off the same way. `writable=False` gives a read-only array.

        Raises INVALID_ARGUMENT for a dtype no memory can hold (Python objects, no bytes,
        sub-arrays) or a bad shape, OUT_OF_RANGE when the items pass the object's end."""
        dtype = as_dtype(dtype)
        if dtype.subdtype is not None:
            raise InvalidArgument(f"dtype {dtype} is a sub-array: give its shape in `shape` instead")
        offset = as_int(offset, "offset")
        writable = as_bool(writable, "writable")
        size = self.size
        if not 0 <= offset <= size:
            raise OutOfRange(f"offset {offset} is outside object {self.bm_id} of {size} bytes")
        if shape is None:
            shape = ((size - offset) // dtype.itemsize,)
        else:
            shape = _shape(shape)
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if offset + nbytes > size:
            raise OutOfRange(f"{count} items of {dtype} ({nbytes} bytes) from offset {offset} pass the end of "
                             f"object {self.bm_id} of {size} bytes")
        arrays.start_closer()
        owner = arrays.ArrayMapping(self, self.map(writable), offset, nbytes, writable)
        return np.asarray(owner).view(dtype).reshape(shape)

    def free(self) -> None:
        """Free the object, on every server holding its bytes. Returns None. Every handle on
        it fails with NO_SUCH_OBJECT from then on; mappings of it keep its memory until they
        close. Raises NO_SUCH_OBJECT if it was freed already."""
        self._call("free")
        self.namespace.session._forget(self.bm_id)

    def info(self) -> dict[str, Any]:
        """{"bm_id", "pool", "ns", "size"}: all another process needs to open this object
        (with the namespace's secId, passed some other way). Raises NOT_INITIALIZED once
        the session is closed."""
        self.namespace.session.check_open()
        return {"bm_id": self.bm_id, "pool": self.namespace.pool, "ns": self.namespace.name, "size": self.size}


class Mapping:
    """A contiguous mapping of one object on this host (`BigMemory.map`): `view` is a
    memoryview of the pool's memory itself, `bm` its handle, `writable` whether the view
    may be written. Use as a context manager, or call close().

    If the server holding its memory is lost (or the namespace destroyed), the view is
    revoked: it reads zeros and writes to it go nowhere, from the moment this process
    notices; the next call on the mapping (flush, close) raises SERVER_UNAVAILABLE (or
    NO_SUCH_NAMESPACE), as does the next call on its handle."""

    def __init__(self, bm: BigMemory, shared: Any, size: int, writable: bool) -> None:
        self.bm = bm
        self._shared = shared
        self.view: memoryview = shared.view()[:size]
        self.writable = writable
        self._unpinned = False

    def _lost(self) -> Exception | None:
        reason = self._shared.revoked_by if self._shared is not None else None
        return type(reason)(str(reason)) if reason is not None else None

    def flush(self) -> None:
        """Same-host mappings are the pool's memory itself: nothing to send back. Raises if
        the mapping was revoked (its server lost, its namespace destroyed), or its session
        closed (which revokes it: writes since went nowhere)."""
        lost = self._lost()
        if lost is not None:
            raise lost
        self.bm.namespace.session.check_open()

    def close(self) -> None:
        """Unmap, and let the object go (a freed object's memory is held until its last
        mapping closes). Returns None; a second close does nothing. Raises BUSY while numpy
        arrays or memoryviews made from `view` live (nothing changes: drop them and close
        again), SERVER_UNAVAILABLE or NO_SUCH_NAMESPACE if the mapping was revoked (it is
        unmapped all the same)."""
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
        if not self._unpinned:
            _unpin(self.bm)

    def _cut_off(self) -> None:
        """For arrays over this mapping's address (arrays.py): zero pages over it, and the
        pin given back, the address range left mapped until _unmap_after_cut_off."""
        if self._shared is None or self._unpinned:
            return
        self._shared.revoke()
        self._unpinned = True
        if self._lost() is None:
            _unpin(self.bm)

    def _unmap_after_cut_off(self) -> None:
        self._unpinned = True
        self.close()

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteMapping:
    """A contiguous mapping of an object with bytes on other hosts (`BigMemory.map`): `view`
    is a private copy taken at map time; `flush` (and closing) writes back only the pages
    that changed since. Use as a context manager, or call close()."""

    def __init__(self, bm: BigMemory, size: int, writable: bool) -> None:
        self.bm = bm
        self.writable = writable
        self._cut = False
        self._size = size
        self._area = mmap.mmap(-1, max(round_up(size, PAGE_SIZE_BYTES), PAGE_SIZE_BYTES))
        self._pages = np.frombuffer(self._area, dtype=np.uint8).reshape(-1, PAGE_SIZE_BYTES)
        whole = memoryview(self._area)
        bm.read(0, into=whole[:size])
        self._clean = self._pages.copy()
        self.view: memoryview = whole[:size] if writable else whole[:size].toreadonly()
        whole.release()

    def flush(self) -> int:
        """Send the pages changed since the map or the last flush; returns how many were sent.
        Raises what the writes raise (NO_SUCH_OBJECT, SERVER_UNAVAILABLE, NOT_INITIALIZED);
        pages not sent stay changed, for the next flush."""
        if not self.writable or self._area is None or self._cut:
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
        """Flush and unmap; returns None. On a closed session nothing can be sent: the mapping
        is released all the same, and NOT_INITIALIZED says how many changed pages were lost.
        Raises BUSY while numpy arrays or memoryviews made from `view` live."""
        if self._area is None:
            return
        lost = 0
        if self._cut:
            pass                   # sent, pinned and zeroed at the cut: only the memory is left
        elif self.bm.namespace.session.closed:
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
        if not self._cut:
            _unpin(self.bm)
        if lost:
            raise NotInitialized(f"the session is closed: {lost} changed pages of this mapping of "
                                 f"{self.bm.bm_id} were not written back")

    def _cut_off(self) -> None:
        """For arrays over this copy's address (arrays.py): send the changes, then zero the
        copy and let the object go, leaving the address range mapped."""
        if self._area is None or self._cut:
            return
        try:
            if not self.bm.namespace.session.closed:
                self.flush()
        finally:
            self._cut = True
            arrays.zero_private(self._area)
            _unpin(self.bm)

    def _unmap_after_cut_off(self) -> None:
        self._cut = True
        self.close()

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
    """BigMemory's part of a client's Namespace: allocating, opening, listing, freeing and
    gathering objects. Mixed into client.session.Namespace, which gives it `session`,
    `creds` and `wire_creds`."""

    session: Any
    pool: str
    creds: tuple[str, str, bytes]
    wire_creds: dict[str, Any]

    def alloc(self, size: int, affinity: Affinity | str | None = None) -> BigMemory:
        """A new object of `size` bytes (an integer in [1, 2**40]), zeroed, placed as
        `affinity` says: an Affinity, a policy's name as shorthand ("local", "spread"), or
        None for local (this client's server, else the roomiest other one).

        Returns its handle. Raises OUT_OF_MEMORY when no placement has room (a local one
        larger than any one server suggests Affinity("spread")), LIMIT_EXCEEDED at the
        namespace's object limit, INVALID_ARGUMENT for a bad size or affinity,
        PERMISSION_DENIED for a wrong secId, NO_SUCH_NAMESPACE / NO_SUCH_POOL."""
        size = as_size(size)
        affinity = affinity_of(affinity)
        link = self.session.home()
        if affinity.policy == "server":
            link = self.session.link(affinity.server_id)   # its home is where its bytes are
        d = link.call("alloc", **self.wire_creds, size=size, policy=affinity.policy,
                      server_id=affinity.server_id)
        bm = self._handle(d)
        bm.populate()          # a new object is about to be written
        return bm

    def open(self, bm_id: str) -> BigMemory:
        """A handle on the object `bm_id` (a string such as "1-0-4294967297"), which any
        client made in this namespace. Raises NO_SUCH_OBJECT if there is none (freed, or
        never made), INVALID_ARGUMENT for a string that is not an id, PERMISSION_DENIED for
        a wrong secId."""
        parse_bm_id(bm_id)
        cached = self.session._cached_handle(bm_id)
        if cached is not None and cached.namespace.creds == self.creds:
            return cached
        home = self.session._link_for_object(bm_id)
        return self._handle(home.call("describe", **self.wire_creds, bm_id=bm_id))

    def _handle(self, described: dict[str, Any]) -> BigMemory:
        bm = BigMemory(self, described)
        self.session._remember(bm)
        return bm

    def objects(self) -> list[ObjectInfo]:
        """Every object of this namespace on the live servers of its pool, each an ObjectInfo
        (bm_id, size, home server, age in seconds), by home server and slot. Each server
        lists the objects it is home of, a page at a time. Objects homed on a server the
        cluster counts dead are not listed (they are unreachable until it returns). Raises
        PERMISSION_DENIED for a wrong secId, NO_SUCH_NAMESPACE, SERVER_UNAVAILABLE."""
        self.session.check_open()
        found: list[ObjectInfo] = []
        for record in sorted(self.session.servers(), key=lambda r: r["server_id"]):
            if not record["alive"] or self.pool not in record["pools"]:
                continue
            home = record["server_id"]
            link = self.session.link(home)
            after = -1
            while True:
                reply = link.call("objects", **self.wire_creds, after=after)
                found += [ObjectInfo(bm_id, size, home, age_s) for bm_id, size, age_s in reply["objects"]]
                if reply["next"] is None:
                    break
                if type(reply["next"]) is not int or reply["next"] <= after:
                    raise ProtocolError(f"server {home} listed objects out of order")
                after = reply["next"]
        return found

    def batch_free(self, bm_ids: Iterable[str]) -> list[int]:
        """Free many objects: `bm_ids` is a list (any iterable) of ids, never one id alone.
        Returns one code per id, in order: 0 freed, else its error's code (BmError), so one
        bad id does not stop the rest; ids are grouped by home server, one request each.
        Raises INVALID_ARGUMENT for a str or anything not iterable."""
        self.session.check_open()
        ids = as_id_list(bm_ids)
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
                    self.session._forget(ids[i])
        return results

    def gather(self, inputs: list[tuple[BigMemory, int, int]], op: OperatorCode = OperatorCode.CONCAT,
               dst: BigMemory | None = None, dtype: Any = "uint8") -> tuple[BigMemory, int]:
        """Concatenate or reduce `inputs`, a list of (BigMemory, offset, length), into `dst`
        from its byte 0, or into a new object in this namespace when `dst` is None. The
        servers compute; no byte passes through this process.

        `op`: an OperatorCode, its value, or its name ("sum"). A reduction works element-wise
        over `dtype`, an integer or float type of at most 8 bytes, as numpy names it
        ("float32", "<i8", np.float32, np.dtype("u2")); all its inputs have one length.
        Returns (the destination, the result's length in bytes). Raises INVALID_ARGUMENT for
        malformed inputs, an unknown operator or dtype, or reduction inputs of different
        lengths; OUT_OF_RANGE when an input passes its object's end or the result does not
        fit `dst`."""
        wire_inputs = [{**bm.namespace.wire_creds, "bm_id": bm.bm_id, "offset": offset, "length": length}
                       for bm, offset, length in _gather_inputs(inputs)]
        operator = _operator(op)
        if not isinstance(dtype, str):
            dtype = as_dtype(dtype).str
        if dst is not None and not isinstance(dst, BigMemory):
            raise InvalidArgument(f"dst must be a BigMemory or None, got {type(dst).__name__}")
        link = dst._home_link() if dst is not None else self.session.home()
        target = {**(dst.namespace.wire_creds if dst else self.wire_creds), "bm_id": dst.bm_id if dst else ""}
        reply = link.call("gather", inputs=wire_inputs, operator=operator.name.lower(),
                          dtype=dtype, dst=target)
        result = dst if dst is not None else self.open(reply["bm_id"])
        if dst is not None and reply["size"] != dst.size:
            dst.refresh()
        return result, reply["length"]


def _gather_inputs(inputs: object) -> list[tuple[BigMemory, int, int]]:
    """A gather's inputs, each (BigMemory, offset, length) with plain ints."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise InvalidArgument(f"inputs must be a list of (BigMemory, offset, length), got {type(inputs).__name__}")
    checked = []
    for item in inputs:
        if not isinstance(item, (tuple, list)) or len(item) != 3 or not isinstance(item[0], BigMemory):
            raise InvalidArgument(f"each gather input is (BigMemory, offset, length), got {item!r:.120}")
        checked.append((item[0], as_position(item[1], "an input's offset"), as_position(item[2], "an input's length")))
    return checked


def _operator(op: object) -> OperatorCode:
    if isinstance(op, str):
        try:
            return OperatorCode[op.upper()]
        except KeyError:
            pass
    elif not isinstance(op, (bool, np.bool_)):
        try:
            return OperatorCode(as_int(op, "op"))
        except (ValueError, InvalidArgument):
            pass
    raise InvalidArgument(f"op must be one of {', '.join(o.name for o in OperatorCode)} (or its value), got {op!r:.100}")


def _shape(shape: object) -> tuple[int, ...]:
    """An array's shape: an integer or a sequence of them, none negative."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Iterable, int, np.integer)):
        raise InvalidArgument(f"shape must be an integer or a tuple of them, got {shape!r:.100}")
    dims = (shape,) if not isinstance(shape, Iterable) else tuple(shape)
    checked = tuple(as_int(n, "a shape's dimension") for n in dims)
    if any(n < 0 for n in checked):
        raise InvalidArgument(f"a shape's dimensions are never negative, got {checked}")
    return checked

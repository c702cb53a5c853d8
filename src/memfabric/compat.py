"""The seed's C API, name for name, with integer return codes (0 = success, < 0 = a BmError).

One process-wide session, as in the C library: BM_Init opens it, BM_Exit closes it.
Buffers are anything with the buffer protocol; BM_ReadSec fills its buffer in place.
Integers may be any integer type (numpy's too). No call raises: a wrong argument of any
type is INVALID_ARGUMENT (-1). `flags` arguments are accepted and ignored, as the seed's.
Each BM_* does what the Pythonic call it names does (see memfabric.Session, Namespace,
BigMemory), and returns the code of the error that call would raise.

    from memfabric.compat import *
    BM_Init("run/fabric")
    BM_CreateNSSec("default", "cache", 0, "s3cret")
    info = BmInfo(ns="cache", sec_id="s3cret")
    BM_AllocSec(info, 1 << 20, 0, None)        # fills info.bm_id and info.size
    BM_WriteSec(info, 0, 5, b"hello", 0)

Once this process knows an object's layout (it allocated the object, or used it once), its
BM_ReadSec and BM_WriteSec ask no server: compat keeps the handles it used, the most recent
COMPAT_HANDLES_KEPT of them, until the object is freed. A call that fails returns a negative
code; BM_GetLastError() then says why, for the calling thread.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .bigmemory.client import BigMemory, Mapping
from .bigmemory.layout import as_bytes_view
from .client.arguments import as_id_list, as_int
from .client.session import Namespace, Session
from .datapath import forks
from .client.types import Affinity, OperatorCode
from .errors import (AlreadyInitialized, BmError, InvalidArgument, MemfabricError, NoSuchNamespace, NoSuchObject,
                     NotInitialized, OutOfRange, error_from_code)
from .limits import COMPAT_HANDLES_KEPT

BmAffinity = Affinity
BmOperatorCode = OperatorCode

PROT_READ = 0x1
PROT_WRITE = 0x2


@dataclass
class BmInfo:
    """An object's identity: what another process needs to use the same object. `ns` and
    `sec_id` name its namespace (in `pool`) and prove the right to it; `bm_id` and `size`
    are filled by BM_AllocSec (and BM_GatherSec, BM_ExpandSec)."""
    ns: str = ""
    sec_id: str | bytes = ""
    bm_id: str = ""
    size: int = 0
    pool: str = "default"


@dataclass
class DiskFileDesc:
    """A file range's start for BM_SpecificObjSwapInSec: the file's path and the offset
    in it to read from."""
    path: str
    offset: int = 0


@dataclass(frozen=True)
class QueryNsCache:
    """One namespace as BM_QueryNSCache lists it: `pool`, `ns`, its `attribute`, and its
    objects' `object_count` and `used_bytes` over the live servers."""
    pool: str
    ns: str
    attribute: int
    object_count: int
    used_bytes: int


class _KnownHandles:
    """The handles this session used, by bm_id, least recently used first: a BmInfo carries
    no layout, so without them every BM_ReadSec/BM_WriteSec would ask the home server to
    describe its object again. Bounded (COMPAT_HANDLES_KEPT); a handle goes when its object
    is freed through compat, or a call finds it freed (or its namespace gone).

    Each handle is kept with the secId its server accepted, as the caller gave it (a str or
    bytes, which cannot change): a BmInfo presenting that very object is let through without
    comparing bytes again."""

    def __init__(self) -> None:
        self._handles: OrderedDict[str, tuple[BigMemory, str | bytes | None]] = OrderedDict()
        # Threads call BM_* at once. An RLock: a signal's handler may call BM_* while its own
        # thread is in here (between two of the dict's calls), and must not wait for it for
        # ever; each use is one step of the dict's, but for the two below that allow for it.
        self._lock = threading.RLock()
        forks.fresh_locks(self, "_lock")

    def get(self, bm_id: str) -> tuple[BigMemory, str | bytes | None] | None:
        with self._lock:
            entry = self._handles.get(bm_id)
            if entry is not None:
                try:
                    self._handles.move_to_end(bm_id)
                except KeyError:       # dropped since, by a signal's handler
                    pass
        return entry

    def keep(self, bm: BigMemory, sec_id: object) -> None:
        accepted = sec_id if type(sec_id) in (str, bytes) else None    # a bytearray may change
        with self._lock:
            self._handles[bm.bm_id] = (bm, accepted)
            self._handles.move_to_end(bm.bm_id)
            while len(self._handles) > COMPAT_HANDLES_KEPT:
                self._handles.popitem(last=False)

    def drop(self, bm_id: str) -> None:
        with self._lock:
            self._handles.pop(bm_id, None)

    def clear(self) -> None:
        with self._lock:
            self._handles.clear()

    def drop_namespace(self, pool: str, ns: str) -> None:
        with self._lock:
            for bm_id, (bm, _) in tuple(self._handles.items()):    # (in one step: no handler's change in it)
                if bm.namespace.creds[:2] == (pool, ns):
                    self._handles.pop(bm_id, None)


_session: Session | None = None
_known = _KnownHandles()               # of _session; emptied when it ends
_session_lock = threading.Lock()
_mappings: dict[int, Mapping] = {}     # id(view) -> mapping, for BM_Unmap
_mappings_lock = threading.Lock()      # threads map and unmap at once
_last_error = threading.local()        # .message: why this thread's last failed call failed
forks.fresh_locks(sys.modules[__name__], "_session_lock", "_mappings_lock")


def BM_GetLastError() -> str:
    """Why the calling thread's last failed BM_* call failed ("" if none has): the call's
    name and the error's message. Like errno, a call that succeeds leaves it as it was, so
    read it right after a call returned a negative code."""
    return getattr(_last_error, "message", "")


def _coded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn memfabric exceptions into the seed's negative return codes, and keep the reason
    for BM_GetLastError."""
    name = fn.__name__
    paired = name in _PAIRED

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MemfabricError as exc:
            code = int(exc.code)
            _last_error.message = f"{name}: {exc.message}"
        except (TypeError, ValueError) as exc:
            code = int(BmError.INVALID_ARGUMENT)
            _last_error.message = f"{name}: {exc}"
        return (code, None) if paired else code
    return wrapper


_PAIRED = {"BM_QueryNSCache", "BM_MapSec", "BM_GatherSec"}


def _current() -> Session:
    if _session is None:
        raise NotInitialized("call BM_Init first")
    return _session


def _namespace(info: BmInfo) -> Namespace:
    if not isinstance(info, BmInfo):
        raise InvalidArgument(f"expected a BmInfo, got {type(info).__name__}")
    return _current().namespace(info.ns, info.sec_id, pool=info.pool)


def _object(info: BmInfo) -> BigMemory:
    if not isinstance(info, BmInfo):
        raise InvalidArgument(f"expected a BmInfo, got {type(info).__name__}")
    session = _current()
    entry = _known.get(info.bm_id) if type(info.bm_id) is str else None
    if entry is not None:
        # The fast path never asks the server, so the secId presented is checked here,
        # against the one the known handle proved to its server.
        bm, accepted = entry
        ns = bm.namespace
        sec_id = info.sec_id
        if (ns.session is session and ns.name == info.ns and ns.pool == info.pool
                and ((sec_id is accepted and accepted is not None) or ns._same_secret(sec_id))):
            return bm
    bm = _namespace(info).open(info.bm_id)
    _known.keep(bm, info.sec_id)
    return bm


def _forget_if_gone(bm: BigMemory, exc: MemfabricError) -> None:
    """A known handle whose call failed: forgotten if its object was found freed, or its
    namespace gone (the next call asks the server, which says so)."""
    if isinstance(exc, NoSuchObject):
        _known.drop(bm.bm_id)
    elif isinstance(exc, NoSuchNamespace):
        _known.drop_namespace(bm.namespace.pool, bm.namespace.name)


def _code_name(code: int) -> str:
    try:
        return BmError(code).name
    except ValueError:
        return str(code)


@_coded
def BM_Init(ock_path: str, flags: int = 0) -> int:
    """Open the process's session on the fabric at `ock_path` (as memfabric.init). Returns 0;
    ALREADY_INITIALIZED if one is open, INVALID_ARGUMENT for a missing or wrong
    configuration, SERVER_UNAVAILABLE when no server answers. `flags` is ignored."""
    return BM_InitWithExtAttr.__wrapped__(ock_path, flags, None)    # its failure is BM_Init's


@_coded
def BM_InitWithExtAttr(ock_path: str, flags: int, attr: dict[str, Any] | None) -> int:
    """BM_Init of `ock_path` with `attr`, a dict of memfabric.init's keyword arguments: `server` (index of
    the configured server to use), `timeout_s`, `busy_poll_us`. Returns 0 or BM_Init's
    codes; INVALID_ARGUMENT for an unknown key. `flags` is ignored."""
    global _session
    attr = dict(attr or {})
    unknown = set(attr) - {"server", "timeout_s", "busy_poll_us"}
    if unknown:
        raise InvalidArgument(f"unknown init attribute(s): {', '.join(sorted(unknown))}")
    with _session_lock:
        if _session is not None:
            raise AlreadyInitialized("BM_Init was already called; BM_Exit first")
        _session = Session(ock_path, **attr)
    return 0


@_coded
def BM_Exit() -> int:
    """Close the process's session, and every mapping made through it. Returns 0;
    NOT_INITIALIZED without a session."""
    global _session
    with _session_lock:
        if _session is None:
            raise NotInitialized("BM_Exit without BM_Init")
        session, _session = _session, None
        _known.clear()
    with _mappings_lock:
        mappings = list(_mappings.values())
        _mappings.clear()
    for mapping in mappings:
        try:
            mapping.close()
        except MemfabricError:
            pass
    session.close()
    return 0


@_coded
def BM_CreateNSSec(pool_name: str, ns: str, attribute: int, sec_id: str | bytes) -> int:
    """Create namespace `ns` in pool `pool_name` with `attribute` and `sec_id` (as
    Session.create_namespace). Returns 0; NAMESPACE_EXISTS, NO_SUCH_POOL, LIMIT_EXCEEDED,
    INVALID_ARGUMENT."""
    _current().create_namespace(ns, sec_id, pool=pool_name, attribute=attribute)
    return 0


@_coded
def BM_DestroyNSSec(pool_name: str, ns: str, sec_id: str | bytes) -> int:
    """Destroy namespace `ns` of pool `pool_name` and every object in it. Returns 0;
    NO_SUCH_NAMESPACE, PERMISSION_DENIED for a wrong `sec_id`."""
    _current().destroy_namespace(ns, sec_id, pool=pool_name)
    _known.drop_namespace(pool_name, ns)
    return 0


@_coded
def BM_QueryNSCache() -> tuple[int, list[QueryNsCache]]:
    """Every namespace of the cluster. Returns (0, [QueryNsCache]), or (code, None)."""
    return 0, [QueryNsCache(n.pool, n.ns, n.attribute, n.object_count, n.used_bytes)
               for n in _current().namespaces()]


@_coded
def BM_AllocSec(info: BmInfo, size: int, flags: int, affinity: Affinity | None) -> int:
    """Allocate `size` bytes in info's namespace, placed by `affinity` (an Affinity, a
    policy's name, or None for local); fills info.bm_id and info.size. Returns 0;
    OUT_OF_MEMORY, LIMIT_EXCEEDED, PERMISSION_DENIED, INVALID_ARGUMENT. `flags` is ignored."""
    bm = _namespace(info).alloc(size, affinity)
    _known.keep(bm, info.sec_id)
    info.bm_id, info.size = bm.bm_id, bm.size
    return 0


@_coded
def BM_FreeSec(info: BmInfo, flags: int) -> int:
    """Free info's object. Returns 0; NO_SUCH_OBJECT, PERMISSION_DENIED. `flags` is ignored."""
    bm = _object(info)
    try:
        bm.free()
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    _known.drop(bm.bm_id)
    return 0


@_coded
def BM_BatchFreeSec(bm_ids: list[str], num: int, flags: int, ns: str, sec_id: str | bytes,
                    pool: str = "default") -> int:
    """Free bm_ids[:num] (a list of ids) in namespace `ns` of `pool` with `sec_id`. Returns 0
    when all were freed, else the first failure's code (the rest still go; BM_GetLastError says
    which id); INVALID_ARGUMENT for a `num` outside [0, len(bm_ids)] or a str for `bm_ids`.
    `flags` is ignored."""
    num = as_int(num, "num")
    all_ids = as_id_list(bm_ids)
    if not 0 <= num <= len(all_ids):
        raise InvalidArgument(f"num must be in [0, {len(all_ids)}], got {num!r}")
    ids = all_ids[:num]
    results = _current().namespace(ns, sec_id, pool=pool).batch_free(ids)
    for bm_id, code in zip(ids, results):
        if code in (0, BmError.NO_SUCH_OBJECT):
            _known.drop(bm_id)
    failed = next((i for i, code in enumerate(results) if code), None)
    if failed is not None:
        code = results[failed]
        raise error_from_code(code, f"{ids[failed]!r}: {_code_name(code)} (of {len(ids)} ids, "
                                    f"{results.count(0)} were freed)")
    return 0


@_coded
def BM_ExpandSec(info: BmInfo, new_size: int, flags: int) -> int:
    """Grow info's object to `new_size` bytes (new bytes zero); updates info.size. Returns 0;
    INVALID_ARGUMENT for a smaller size, OUT_OF_MEMORY. `flags` is ignored."""
    bm = _object(info)
    try:
        bm.expand(new_size)
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    info.size = bm.size
    return 0


@_coded
def BM_MapSec(info: BmInfo, prot: int, flags: int) -> tuple[int, memoryview]:
    """Map info's object whole, `prot` PROT_READ or PROT_READ|PROT_WRITE. Returns (0, a
    memoryview of it) — unmap it with BM_Unmap — or (code, None): INVALID_ARGUMENT for
    another prot, NO_SUCH_OBJECT, PERMISSION_DENIED. `flags` is ignored."""
    prot = as_int(prot, "prot")
    if prot & ~(PROT_READ | PROT_WRITE) or not prot & PROT_READ:
        raise InvalidArgument(f"prot must be PROT_READ or PROT_READ|PROT_WRITE, got {prot!r}")
    bm = _object(info)
    try:
        mapping = bm.map(writable=bool(prot & PROT_WRITE))
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    with _mappings_lock:
        _mappings[id(mapping.view)] = mapping
    return 0, mapping.view


@_coded
def BM_Unmap(bm_id: str, view: memoryview) -> int:
    """Unmap the view BM_MapSec returned for object `bm_id`. Returns 0; INVALID_ARGUMENT for a
    view that is not one, BUSY while numpy arrays or memoryviews of it live (it stays mapped:
    drop them and unmap again)."""
    with _mappings_lock:     # taken out first: of two threads unmapping it, one does
        mapping = _mappings.get(id(view))
        if mapping is None or mapping.view is not view or mapping.bm.bm_id != bm_id:
            raise InvalidArgument(f"that view is not a live mapping of object {bm_id}")
        del _mappings[id(view)]
    try:
        mapping.close()
    except BaseException:
        with _mappings_lock:     # still mapped (BUSY: buffers of it live): unmap it later
            _mappings[id(view)] = mapping
        raise
    return 0


@_coded
def BM_CopySec(src: BmInfo, src_offset: int, dst: BmInfo, dst_offset: int, length: int, flags: int) -> int:
    """Copy `length` bytes from src's object at `src_offset` to dst's at `dst_offset`, on the
    servers. Returns 0; OUT_OF_RANGE, NO_SUCH_OBJECT, PERMISSION_DENIED. `flags` is ignored."""
    source, target = _object(src), _object(dst)
    try:
        source.copy_to(target, src_offset=src_offset, dst_offset=dst_offset, length=length)
    except MemfabricError as exc:
        _forget_if_gone(source, exc)      # either may be the one gone: both are asked again
        _forget_if_gone(target, exc)
        raise
    return 0


@_coded
def BM_SpecificObjSwapInSec(file: DiskFileDesc, info: BmInfo, flags: int, offset: int, length: int) -> int:
    """Read `length` bytes of `file` (a DiskFileDesc: path, and offset in it) into info's
    object at `offset`. Returns 0; IO_ERROR when the file cannot be read, OUT_OF_RANGE. `flags` is ignored."""
    if not isinstance(file, DiskFileDesc):
        raise InvalidArgument(f"file must be a DiskFileDesc, got {type(file).__name__}")
    bm = _object(info)
    try:
        bm.swap_in(file.path, file_offset=file.offset, offset=offset, length=length)
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    return 0


@_coded
def BM_ReadSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    """Read `length` bytes of info's object from `offset` into `buffer` (writable, at least
    `length` bytes), in place. Returns 0; OUT_OF_RANGE, INVALID_ARGUMENT, NO_SUCH_OBJECT. `flags` is ignored."""
    bm = _object(info)
    try:
        bm.read(offset, length, into=buffer)
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    return 0


@_coded
def BM_WriteSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    """Write the first `length` bytes of `buffer` into info's object at `offset`. Returns 0;
    OUT_OF_RANGE (also for a `length` past the buffer), INVALID_ARGUMENT, NO_SUCH_OBJECT. `flags` is ignored."""
    view = as_bytes_view(buffer)
    if type(length) is not int:
        length = as_int(length, "length")
    if not 0 <= length <= view.nbytes:
        raise OutOfRange(f"length {length} does not fit the {view.nbytes}-byte buffer")
    bm = _object(info)
    try:
        bm.write(view[:length] if length != view.nbytes else view, offset)
    except MemfabricError as exc:
        _forget_if_gone(bm, exc)
        raise
    return 0


@dataclass
class BmBatchItem:
    """One item of BM_BatchReadSec/BM_BatchWriteSec: `length` bytes at `offset` of the object
    `info` names, to or from `buffer` (any buffer; written into in place by a read)."""
    info: BmInfo
    offset: int
    length: int
    buffer: Any


def _batch(items: list, num: int, results: list | None, write: bool) -> int:
    """Items [:num] resolved to handles and moved in one batch (Session.read_many/write_many):
    one request per server, all servers at once; on this host, no round trip at all."""
    if results is not None and not isinstance(results, list):
        raise InvalidArgument(f"results must be a list (or None), got {type(results).__name__}")
    try:
        codes = _batch_codes(items, num, write)
    except MemfabricError as exc:        # a bad item: nothing moved
        if results is not None:
            results[:] = [int(exc.code)] * (num if type(num) is int and num >= 0 else 0)
        raise
    if results is not None:
        results[:] = codes
    return next((code for code in codes if code), 0)


def _batch_codes(items: list, num: int, write: bool) -> list[int]:
    if not isinstance(items, (list, tuple)) or type(num) is not int or not 0 <= num <= len(items):
        raise InvalidArgument(f"items must be a list and num in [0, its length], got {num!r}")
    codes = [0] * num
    resolved, positions = [], []
    for i, item in enumerate(items[:num]):
        if isinstance(item, BmBatchItem):
            item = (item.info, item.offset, item.length, item.buffer)
        try:
            info, offset, length, buffer = item
        except (TypeError, ValueError):
            raise InvalidArgument(f"item {i}: expected a BmBatchItem or (BmInfo, offset, length, buffer)") from None
        try:
            bm = _object(info)       # an object that is gone fails its item, not the batch
        except MemfabricError as exc:
            if isinstance(exc, (InvalidArgument, NotInitialized)):
                raise
            codes[i] = int(exc.code)
            continue
        resolved.append((bm, offset, length, buffer))
        positions.append(i)
    moved = _current().write_many(resolved) if write else _current().read_many(resolved)
    for i, code in zip(positions, moved):
        codes[i] = code
    return codes


@_coded
def BM_BatchReadSec(items: list, num: int, flags: int, results: list | None = None) -> int:
    """Reads items[:num] (BmBatchItem or (BmInfo, offset, length, buffer)), each into its
    buffer in place. Every item is checked first: a bad one (a range outside its object, a
    buffer too small or read-only) returns its error and nothing moves. Otherwise returns 0
    when every item was read, else the first failed item's code (the rest still go);
    `results`, a list when given, gets every item's code (0: done). `flags` is ignored."""
    return _batch(items, num, results, write=False)


@_coded
def BM_BatchWriteSec(items: list, num: int, flags: int, results: list | None = None) -> int:
    """Writes items[:num] (BmBatchItem or (BmInfo, offset, length, buffer)) to their objects;
    checked and answered as BM_BatchReadSec is; `results`, a list when given, gets every
    item's code (0: done). `flags` is ignored."""
    return _batch(items, num, results, write=True)


@_coded
def BM_GatherSec(inputs: list[tuple[BmInfo, int, int]], op: OperatorCode, flags: int, info: BmInfo,
                 *, dtype: str = "uint8") -> tuple[int, int]:
    """Gather `inputs`, a list of (BmInfo, offset, length), with `op` (an OperatorCode) over
    `dtype` into info's object, or, when info.bm_id is empty, a new object in info's
    namespace (info.bm_id and info.size are filled). Returns (0, the result's length in
    bytes) or (code, None): INVALID_ARGUMENT, OUT_OF_RANGE, NO_SUCH_OBJECT. `flags` is ignored."""
    if isinstance(inputs, (str, bytes)):
        raise InvalidArgument("inputs must be a list of (BmInfo, offset, length)")
    resolved = [(_object(i), offset, length) for i, offset, length in inputs]
    ns = _namespace(info)
    dst = _object(info) if info.bm_id else None
    result, length = ns.gather(resolved, OperatorCode(op), dst=dst, dtype=dtype)
    _known.keep(result, info.sec_id)
    info.bm_id, info.size = result.bm_id, result.size
    return 0, length


__all__ = [name for name in globals() if name.startswith("BM_")] + [
    "BmAffinity", "BmBatchItem", "BmError", "BmInfo", "BmOperatorCode", "DiskFileDesc", "PROT_READ", "PROT_WRITE",
    "QueryNsCache"]

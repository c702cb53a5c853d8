"""The seed's C API, name for name, with integer return codes (0 = success, < 0 = a BmError).

One process-wide session, as in the C library: BM_Init opens it, BM_Exit closes it.
Buffers are anything with the buffer protocol; BM_ReadSec fills its buffer in place.

    from memfabric.compat import *
    BM_Init("run/fabric")
    BM_CreateNSSec("default", "cache", 0, "s3cret")
    info = BmInfo(ns="cache", sec_id="s3cret")
    BM_AllocSec(info, 1 << 20, 0, None)        # fills info.bm_id and info.size
    BM_WriteSec(info, 0, 5, b"hello", 0)
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .bigmemory.client import BigMemory, Mapping
from .client.session import Namespace, Session
from .client.types import Affinity, OperatorCode
from .errors import (AlreadyInitialized, BmError, InvalidArgument, MemfabricError, NotInitialized)

BmAffinity = Affinity
BmOperatorCode = OperatorCode

PROT_READ = 0x1
PROT_WRITE = 0x2


@dataclass
class BmInfo:
    """An object's identity: what another process needs to use the same object."""
    ns: str = ""
    sec_id: str | bytes = ""
    bm_id: str = ""
    size: int = 0
    pool: str = "default"


@dataclass
class DiskFileDesc:
    path: str
    offset: int = 0


@dataclass(frozen=True)
class QueryNsCache:
    pool: str
    ns: str
    attribute: int
    object_count: int
    used_bytes: int


_session: Session | None = None
_session_lock = threading.Lock()
_mappings: dict[int, Mapping] = {}     # id(view) -> mapping, for BM_Unmap
_mappings_lock = threading.Lock()      # threads map and unmap at once


def _coded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn memfabric exceptions into the seed's negative return codes."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except MemfabricError as exc:
            code = int(exc.code)
            return (code, None) if fn.__name__ in _PAIRED else code
        except (TypeError, ValueError):
            code = int(BmError.INVALID_ARGUMENT)
            return (code, None) if fn.__name__ in _PAIRED else code
        return result
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
    cached = _current().cached_handle(info.bm_id)
    if cached is not None:
        # The fast path never asks the server, so the secId presented is checked here,
        # against the one the cached handle proved to its server.
        ns = cached.namespace
        if ns.name == info.ns and ns.pool == info.pool and ns.same_secret(info.sec_id):
            return cached
    return _namespace(info).open(info.bm_id)


def BM_Init(ock_path: str, flags: int = 0) -> int:
    return BM_InitWithExtAttr(ock_path, flags, None)


@_coded
def BM_InitWithExtAttr(ock_path: str, flags: int, attr: dict[str, Any] | None) -> int:
    """attr keys: `server` (index of the configured server to use), `timeout_s`, `busy_poll_us`."""
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
    global _session
    with _session_lock:
        if _session is None:
            raise NotInitialized("BM_Exit without BM_Init")
        session, _session = _session, None
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
    _current().create_namespace(ns, sec_id, pool=pool_name, attribute=attribute)
    return 0


@_coded
def BM_DestroyNSSec(pool_name: str, ns: str, sec_id: str | bytes) -> int:
    _current().destroy_namespace(ns, sec_id, pool=pool_name)
    return 0


@_coded
def BM_QueryNSCache() -> tuple[int, list[QueryNsCache]]:
    return 0, [QueryNsCache(n.pool, n.ns, n.attribute, n.object_count, n.used_bytes)
               for n in _current().namespaces()]


@_coded
def BM_AllocSec(info: BmInfo, size: int, flags: int, affinity: Affinity | None) -> int:
    bm = _namespace(info).alloc(size, affinity)
    info.bm_id, info.size = bm.bm_id, bm.size
    return 0


@_coded
def BM_FreeSec(info: BmInfo, flags: int) -> int:
    _object(info).free()
    return 0


@_coded
def BM_BatchFreeSec(bm_ids: list[str], num: int, flags: int, ns: str, sec_id: str | bytes,
                    pool: str = "default") -> int:
    """Frees bm_ids[:num]; 0 when all were freed, else the first failure's code (the rest still go)."""
    if type(num) is not int or not 0 <= num <= len(bm_ids):
        raise InvalidArgument(f"num must be in [0, {len(bm_ids)}], got {num!r}")
    results = _current().namespace(ns, sec_id, pool=pool).batch_free(bm_ids[:num])
    return next((code for code in results if code), 0)


@_coded
def BM_ExpandSec(info: BmInfo, new_size: int, flags: int) -> int:
    bm = _object(info)
    bm.expand(new_size)
    info.size = bm.size
    return 0


@_coded
def BM_MapSec(info: BmInfo, prot: int, flags: int) -> tuple[int, memoryview]:
    if prot & ~(PROT_READ | PROT_WRITE) or not prot & PROT_READ:
        raise InvalidArgument(f"prot must be PROT_READ or PROT_READ|PROT_WRITE, got {prot!r}")
    mapping = _object(info).map(writable=bool(prot & PROT_WRITE))
    with _mappings_lock:
        _mappings[id(mapping.view)] = mapping
    return 0, mapping.view


@_coded
def BM_Unmap(bm_id: str, view: memoryview) -> int:
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
    _object(src).copy_to(_object(dst), src_offset=src_offset, dst_offset=dst_offset, length=length)
    return 0


@_coded
def BM_SpecificObjSwapInSec(file: DiskFileDesc, info: BmInfo, flags: int, offset: int, length: int) -> int:
    _object(info).swap_in(file.path, file_offset=file.offset, offset=offset, length=length)
    return 0


@_coded
def BM_ReadSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    _object(info).read(offset, length, into=buffer)
    return 0


@_coded
def BM_WriteSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    view = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer.cast("B")
    if type(length) is not int or not 0 <= length <= view.nbytes:
        raise InvalidArgument(f"length {length!r} does not fit the {view.nbytes}-byte buffer")
    _object(info).write(view[:length], offset)
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
    `results`, a list when given, gets every item's code (0: done)."""
    return _batch(items, num, results, write=False)


@_coded
def BM_BatchWriteSec(items: list, num: int, flags: int, results: list | None = None) -> int:
    """Writes items[:num] (BmBatchItem or (BmInfo, offset, length, buffer)) to their objects;
    checked, answered and reported as BM_BatchReadSec is."""
    return _batch(items, num, results, write=True)


@_coded
def BM_GatherSec(inputs: list[tuple[BmInfo, int, int]], op: OperatorCode, flags: int, info: BmInfo,
                 *, dtype: str = "uint8") -> tuple[int, int]:
    """Into info's object, or, when info.bm_id is empty, a new object in info's namespace."""
    resolved = [(_object(i), offset, length) for i, offset, length in inputs]
    ns = _namespace(info)
    dst = _object(info) if info.bm_id else None
    result, length = ns.gather(resolved, OperatorCode(op), dst=dst, dtype=dtype)
    info.bm_id, info.size = result.bm_id, result.size
    return 0, length


__all__ = [name for name in globals() if name.startswith("BM_")] + [
    "BmAffinity", "BmBatchItem", "BmError", "BmInfo", "BmOperatorCode", "DiskFileDesc", "PROT_READ", "PROT_WRITE",
    "QueryNsCache"]

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
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .bigmemory.client import BigMemory, Mapping
from .client.arguments import as_id_list, as_int
from .client.session import Namespace, Session
from .client.types import Affinity, OperatorCode
from .errors import (AlreadyInitialized, BmError, InvalidArgument, MemfabricError, NotInitialized)

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
    cached = _current()._cached_handle(info.bm_id)
    if cached is not None:
        # The fast path never asks the server, so the secId presented is checked here,
        # against the one the cached handle proved to its server.
        ns = cached.namespace
        if ns.name == info.ns and ns.pool == info.pool and ns._same_secret(info.sec_id):
            return cached
    return _namespace(info).open(info.bm_id)


def BM_Init(ock_path: str, flags: int = 0) -> int:
    """Open the process's session on the fabric at `ock_path` (as memfabric.init). Returns 0;
    ALREADY_INITIALIZED if one is open, INVALID_ARGUMENT for a missing or wrong
    configuration, SERVER_UNAVAILABLE when no server answers. `flags` is ignored."""
    return BM_InitWithExtAttr(ock_path, flags, None)


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
    info.bm_id, info.size = bm.bm_id, bm.size
    return 0


@_coded
def BM_FreeSec(info: BmInfo, flags: int) -> int:
    """Free info's object. Returns 0; NO_SUCH_OBJECT, PERMISSION_DENIED. `flags` is ignored."""
    _object(info).free()
    return 0


@_coded
def BM_BatchFreeSec(bm_ids: list[str], num: int, flags: int, ns: str, sec_id: str | bytes,
                    pool: str = "default") -> int:
    """Free bm_ids[:num] (a list of ids) in namespace `ns` of `pool` with `sec_id`. Returns 0
    when all were freed, else the first failure's code (the rest still go); INVALID_ARGUMENT
    for a `num` outside [0, len(bm_ids)] or a str for `bm_ids`. `flags` is ignored."""
    num = as_int(num, "num")
    ids = as_id_list(bm_ids)
    if not 0 <= num <= len(ids):
        raise InvalidArgument(f"num must be in [0, {len(ids)}], got {num!r}")
    results = _current().namespace(ns, sec_id, pool=pool).batch_free(ids[:num])
    return next((code for code in results if code), 0)


@_coded
def BM_ExpandSec(info: BmInfo, new_size: int, flags: int) -> int:
    """Grow info's object to `new_size` bytes (new bytes zero); updates info.size. Returns 0;
    INVALID_ARGUMENT for a smaller size, OUT_OF_MEMORY. `flags` is ignored."""
    bm = _object(info)
    bm.expand(new_size)
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
    mapping = _object(info).map(writable=bool(prot & PROT_WRITE))
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
    _object(src).copy_to(_object(dst), src_offset=src_offset, dst_offset=dst_offset, length=length)
    return 0


@_coded
def BM_SpecificObjSwapInSec(file: DiskFileDesc, info: BmInfo, flags: int, offset: int, length: int) -> int:
    """Read `length` bytes of `file` (a DiskFileDesc: path, and offset in it) into info's
    object at `offset`. Returns 0; IO_ERROR when the file cannot be read, OUT_OF_RANGE. `flags` is ignored."""
    if not isinstance(file, DiskFileDesc):
        raise InvalidArgument(f"file must be a DiskFileDesc, got {type(file).__name__}")
    _object(info).swap_in(file.path, file_offset=file.offset, offset=offset, length=length)
    return 0


@_coded
def BM_ReadSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    """Read `length` bytes of info's object from `offset` into `buffer` (writable, at least
    `length` bytes), in place. Returns 0; OUT_OF_RANGE, INVALID_ARGUMENT, NO_SUCH_OBJECT. `flags` is ignored."""
    _object(info).read(offset, length, into=buffer)
    return 0


@_coded
def BM_WriteSec(info: BmInfo, offset: int, length: int, buffer: Any, flags: int) -> int:
    """Write the first `length` bytes of `buffer` into info's object at `offset`. Returns 0;
    OUT_OF_RANGE, INVALID_ARGUMENT, NO_SUCH_OBJECT. `flags` is ignored."""
    view = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer.cast("B")
    if type(length) is not int:
        length = as_int(length, "length")
    if not 0 <= length <= view.nbytes:
        raise InvalidArgument(f"length {length!r} does not fit the {view.nbytes}-byte buffer")
    _object(info).write(view[:length], offset)
    return 0


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
    info.bm_id, info.size = result.bm_id, result.size
    return 0, length


__all__ = [name for name in globals() if name.startswith("BM_")] + [
    "BmAffinity", "BmError", "BmInfo", "BmOperatorCode", "DiskFileDesc", "PROT_READ", "PROT_WRITE",
    "QueryNsCache"]

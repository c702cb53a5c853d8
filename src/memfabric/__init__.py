"""memfabric: a distributed memory pool with BigMemory objects.

    import memfabric
    with memfabric.init("run/fabric") as session:
        ns = session.create_namespace("cache", sec_id="s3cret", exist_ok=True)
        bm = ns.alloc(1 << 20)
        bm.write(b"hello", offset=0)
        assert bm.read(0, 5) == b"hello"

`init` opens a Session; a Session's namespaces (`create_namespace`, `namespace`) allocate and
open BigMemory objects. Every error is a MemfabricError, one class per code of BmError.
`memfabric.compat` is the seed's BM_* API, with integer return codes.
"""

from __future__ import annotations

import importlib as _importlib
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING

# Loaded when first used (PEP 562), not at `import memfabric`: the `memfabric` command puts its
# Ctrl-C handler in place before it imports the client (numpy and the rest, ~0.4 s), and a Ctrl-C
# landing in those imports was sometimes dropped by Python, and the fabric started anyway.
_WHERE = {
    "ArrayMapping": "bigmemory.arrays", "BigMemory": "bigmemory.client", "Mapping": "bigmemory.client",
    "RemoteMapping": "bigmemory.client", "Namespace": "client.session", "Session": "client.session",
    "init": "client.session", "Affinity": "client.types", "NamespaceInfo": "client.types",
    "ObjectInfo": "client.types", "OperatorCode": "client.types", "KV": "kv.client", "Plog": "plog.client",
    **{name: "errors" for name in (
        "AlreadyInitialized", "BmError", "Busy", "InternalError", "InvalidArgument", "IOError_", "LimitExceeded",
        "MemfabricError", "MemfabricIOError", "NamespaceExists", "NoSuchNamespace", "NoSuchObject", "NoSuchPool",
        "NotInitialized", "OutOfMemory", "OutOfRange", "OutOfSpace", "PermissionDenied", "ProtocolError", "Sealed",
        "ServerUnavailable", "Timeout")},
}

if TYPE_CHECKING:
    from .bigmemory.arrays import ArrayMapping
    from .bigmemory.client import BigMemory, Mapping, RemoteMapping
    from .client.session import Namespace, Session, init
    from .client.types import Affinity, NamespaceInfo, ObjectInfo, OperatorCode
    from .kv.client import KV
    from .plog.client import Plog
    from .errors import (AlreadyInitialized, BmError, Busy, InternalError, InvalidArgument, IOError_, LimitExceeded,
                         MemfabricError, MemfabricIOError, NamespaceExists, NoSuchNamespace, NoSuchObject, NoSuchPool,
                         NotInitialized, OutOfMemory, OutOfRange, OutOfSpace, PermissionDenied, ProtocolError, Sealed,
                         ServerUnavailable, Timeout)

__version__ = "0.1.0"

__all__ = [
    "Affinity", "AlreadyInitialized", "ArrayMapping", "BigMemory", "BmError", "Busy", "IOError_", "InternalError",
    "InvalidArgument", "KV", "LimitExceeded", "Mapping", "MemfabricError", "MemfabricIOError", "Namespace",
    "NamespaceExists", "NamespaceInfo", "NoSuchNamespace", "NoSuchObject", "NoSuchPool", "NotInitialized",
    "ObjectInfo", "OperatorCode", "OutOfMemory", "OutOfRange", "OutOfSpace", "PermissionDenied", "Plog",
    "ProtocolError", "RemoteMapping", "Sealed", "ServerUnavailable", "Session", "Timeout", "init",
]
assert set(__all__) == set(_WHERE)


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:        # a submodule not imported yet (memfabric.compat, memfabric.errors, ...)
        if name.isidentifier() and not name.startswith("__"):
            try:
                return _importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the submodules imported so far."""
    loaded = [name for name, value in globals().items() if isinstance(value, _ModuleType) and not name.startswith("_")]
    return sorted({*__all__, "__version__", *loaded})

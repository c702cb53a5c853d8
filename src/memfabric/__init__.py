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

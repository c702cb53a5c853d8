"""memfabric: a distributed memory pool with BigMemory objects.

    import memfabric
    with memfabric.init("run/fabric") as session:
        ns = session.create_namespace("cache", sec_id="s3cret")
        bm = ns.alloc(1 << 20)
        bm.write(b"hello", offset=0)
        assert bm.read(0, 5) == b"hello"
"""

from .bigmemory.client import BigMemory, Mapping
from .client.session import Namespace, Session, init
from .client.types import Affinity, NamespaceInfo, OperatorCode
from .errors import (AlreadyInitialized, BmError, Busy, InvalidArgument, IOError_, LimitExceeded,
                     MemfabricError, NamespaceExists, NoSuchNamespace, NoSuchObject, NoSuchPool,
                     NotInitialized, OutOfMemory, OutOfRange, PermissionDenied, ProtocolError,
                     ServerUnavailable, Timeout)

__version__ = "0.1.0"

__all__ = [
    "Affinity", "AlreadyInitialized", "BigMemory", "BmError", "Busy", "IOError_", "InvalidArgument",
    "LimitExceeded", "Mapping", "MemfabricError", "Namespace", "NamespaceExists", "NamespaceInfo",
    "NoSuchNamespace", "NoSuchObject", "NoSuchPool", "NotInitialized", "OperatorCode", "OutOfMemory",
    "OutOfRange", "PermissionDenied", "ProtocolError", "ServerUnavailable", "Session", "Timeout", "init",
]

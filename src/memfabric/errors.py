"""The one error vocabulary: the seed's integer codes and an exception for each.

The Pythonic API raises these exceptions; `memfabric.compat` returns `exc.code`.
An operating error (bad input, a dead peer, a full pool) is one of these; a broken
invariant is an AssertionError and a bug.
"""

from __future__ import annotations

from enum import IntEnum


class BmError(IntEnum):
    OK = 0
    INVALID_ARGUMENT = -1
    NOT_INITIALIZED = -2
    NO_SUCH_POOL = -3
    NO_SUCH_NAMESPACE = -4
    NAMESPACE_EXISTS = -5
    PERMISSION_DENIED = -6
    NO_SUCH_OBJECT = -7
    OUT_OF_MEMORY = -8
    OUT_OF_RANGE = -9
    SERVER_UNAVAILABLE = -10
    TIMEOUT = -11
    IO_ERROR = -12
    BUSY = -13
    PROTOCOL_ERROR = -14
    LIMIT_EXCEEDED = -15
    ALREADY_INITIALIZED = -16
    INTERNAL_ERROR = -17
    OUT_OF_SPACE = -18
    SEALED = -19


class MemfabricError(Exception):
    """Base of every memfabric error; `code` is the seed's integer code."""

    code: BmError = BmError.INVALID_ARGUMENT

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.name.lower().replace("_", " "))

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(MemfabricError):
    """An argument of the wrong type or value (the message names it)."""
    code = BmError.INVALID_ARGUMENT


class NotInitialized(MemfabricError):
    """The session is closed (or, in compat, BM_Init was not called)."""
    code = BmError.NOT_INITIALIZED


class NoSuchPool(MemfabricError):
    """No live server gives memory to that pool (`memfabric status` lists the pools)."""
    code = BmError.NO_SUCH_POOL


class NoSuchNamespace(MemfabricError):
    """No such namespace in that pool (never created, or destroyed)."""
    code = BmError.NO_SUCH_NAMESPACE


class NamespaceExists(MemfabricError):
    """create_namespace of a name that exists (exist_ok=True opens it instead)."""
    code = BmError.NAMESPACE_EXISTS


class PermissionDenied(MemfabricError):
    """A wrong secId for the namespace, or an operation for servers only."""
    code = BmError.PERMISSION_DENIED


class NoSuchObject(MemfabricError):
    """No such object: freed, its namespace destroyed, or never made."""
    code = BmError.NO_SUCH_OBJECT


class OutOfMemory(MemfabricError):
    """No room for an allocation where its affinity allows it (the message gives the figures,
    and what would fit)."""
    code = BmError.OUT_OF_MEMORY

    def __init__(self, message: str = "", retry_at_s: float | None = None) -> None:
        super().__init__(message)
        # Set when memory freed moments ago will be reusable at this monotonic time.
        self.retry_at_s = retry_at_s


class OutOfRange(MemfabricError):
    """A range outside an object, a file or a buffer."""
    code = BmError.OUT_OF_RANGE


class ServerUnavailable(MemfabricError):
    """A server is dead, unreachable or not running (the message says which)."""
    code = BmError.SERVER_UNAVAILABLE


class Timeout(MemfabricError):
    """A request ran out of time (`timeout_s`); its connection stays usable."""
    code = BmError.TIMEOUT


class MemfabricIOError(MemfabricError):
    """A file or a mapping failed (swap_in's file, a pool's segment file, mmap). Not named
    `IoError`: one letter's case from the builtin `IOError` (an OSError), which an `except
    IOError:` would catch instead of this."""
    code = BmError.IO_ERROR


IOError_ = MemfabricIOError     # its first name, kept for code written against it


class Busy(MemfabricError):
    """Not now: buffers of a mapping still live, or a server is busy checking a secId."""
    code = BmError.BUSY


class ProtocolError(MemfabricError):
    """A message that is not memfabric's protocol (a bug, or not a memfabric server)."""
    code = BmError.PROTOCOL_ERROR


class LimitExceeded(MemfabricError):
    """A limit of limits.py reached (objects, namespaces, wrong secIds, open files)."""
    code = BmError.LIMIT_EXCEEDED


class AlreadyInitialized(MemfabricError):
    """compat's BM_Init while a session is open."""
    code = BmError.ALREADY_INITIALIZED


class InternalError(MemfabricError):
    """A bug in memfabric: the server logged it and keeps serving."""
    code = BmError.INTERNAL_ERROR


class OutOfSpace(MemfabricError):
    """A plog (MemPlog) has no room for the records: nothing of them was written."""
    code = BmError.OUT_OF_SPACE


class Sealed(MemfabricError):
    """A plog (MemPlog) is sealed: no append succeeds after seal; reads go on."""
    code = BmError.SEALED


_BY_CODE: dict[int, type[MemfabricError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotInitialized, NoSuchPool, NoSuchNamespace, NamespaceExists,
        PermissionDenied, NoSuchObject, OutOfMemory, OutOfRange, ServerUnavailable,
        Timeout, MemfabricIOError, Busy, ProtocolError, LimitExceeded, AlreadyInitialized, InternalError,
        OutOfSpace, Sealed,
    )
}


def error_from_code(code: int, message: str) -> MemfabricError:
    """Rebuild the exception a peer reported as (code, message)."""
    cls = _BY_CODE.get(code, ProtocolError)
    if cls is ProtocolError and code != BmError.PROTOCOL_ERROR:
        message = f"peer sent unknown error code {code}: {message}"
    return cls(message)

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


class MemfabricError(Exception):
    """Base of every memfabric error; `code` is the seed's integer code."""

    code: BmError = BmError.INVALID_ARGUMENT

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.name.lower().replace("_", " "))

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(MemfabricError):
    code = BmError.INVALID_ARGUMENT


class NotInitialized(MemfabricError):
    code = BmError.NOT_INITIALIZED


class NoSuchPool(MemfabricError):
    code = BmError.NO_SUCH_POOL


class NoSuchNamespace(MemfabricError):
    code = BmError.NO_SUCH_NAMESPACE


class NamespaceExists(MemfabricError):
    code = BmError.NAMESPACE_EXISTS


class PermissionDenied(MemfabricError):
    code = BmError.PERMISSION_DENIED


class NoSuchObject(MemfabricError):
    code = BmError.NO_SUCH_OBJECT


class OutOfMemory(MemfabricError):
    code = BmError.OUT_OF_MEMORY

    def __init__(self, message: str = "", retry_at_s: float | None = None) -> None:
        super().__init__(message)
        # Set when memory freed moments ago will be reusable at this monotonic time.
        self.retry_at_s = retry_at_s


class OutOfRange(MemfabricError):
    code = BmError.OUT_OF_RANGE


class ServerUnavailable(MemfabricError):
    code = BmError.SERVER_UNAVAILABLE


class Timeout(MemfabricError):
    code = BmError.TIMEOUT


class IOError_(MemfabricError):
    code = BmError.IO_ERROR


class Busy(MemfabricError):
    code = BmError.BUSY


class ProtocolError(MemfabricError):
    code = BmError.PROTOCOL_ERROR


class LimitExceeded(MemfabricError):
    code = BmError.LIMIT_EXCEEDED


class AlreadyInitialized(MemfabricError):
    code = BmError.ALREADY_INITIALIZED


class InternalError(MemfabricError):
    """A bug in memfabric: the server logged it and keeps serving."""
    code = BmError.INTERNAL_ERROR


_BY_CODE: dict[int, type[MemfabricError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotInitialized, NoSuchPool, NoSuchNamespace, NamespaceExists,
        PermissionDenied, NoSuchObject, OutOfMemory, OutOfRange, ServerUnavailable,
        Timeout, IOError_, Busy, ProtocolError, LimitExceeded, AlreadyInitialized, InternalError,
    )
}


def error_from_code(code: int, message: str) -> MemfabricError:
    """Rebuild the exception a peer reported as (code, message)."""
    cls = _BY_CODE.get(code, ProtocolError)
    if cls is ProtocolError and code != BmError.PROTOCOL_ERROR:
        message = f"peer sent unknown error code {code}: {message}"
    return cls(message)

"""Arguments of the public API, made plain at the boundary.

Anything `operator.index()` takes is an integer here (numpy's int64, uint32, intp...), and
comes out a plain `int`: the wire (msgpack) carries only Python's own types, and the core's
checks compare `type(x) is int`. A bool is not a size, an offset or an id, though Python
counts it an int: `alloc(True)` is a mistake, not one byte. Every refusal is one of the
library's errors, never a raw TypeError, ValueError or OverflowError.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np

from ..errors import InvalidArgument, OutOfRange
from ..limits import MAX_OBJECT_BYTES


def as_int(value: object, what: str) -> int:
    """`value` as a plain int, or INVALID_ARGUMENT naming `what`."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{what} must be an integer, not a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def as_size(value: object, what: str = "size") -> int:
    """An object's size in bytes: an integer in [1, MAX_OBJECT_BYTES]."""
    size = as_int(value, what)
    if not 0 < size <= MAX_OBJECT_BYTES:
        raise InvalidArgument(f"{what} must be in [1, {MAX_OBJECT_BYTES}] bytes, got {size}")
    return size


def as_position(value: object, what: str) -> int:
    """An offset or length that travels to a server: no object reaches past MAX_OBJECT_BYTES,
    so beyond that (or below 0) it is out of every object's range, whatever the object."""
    position = as_int(value, what)
    if not 0 <= position <= MAX_OBJECT_BYTES:
        raise OutOfRange(f"{what} {position} is outside every object (0 to {MAX_OBJECT_BYTES} bytes)")
    return position


def as_optional_int(value: object, what: str) -> int | None:
    return None if value is None else as_int(value, what)


def as_bool(value: object, what: str) -> bool:
    """True or False (numpy's too): `map("no")` must not mean writable."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgument(f"{what} must be True or False, got {value!r}")


def as_path(value: object, what: str = "path") -> str | bytes:
    """A file system path: str, bytes or os.PathLike, without NUL bytes."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, (str, bytes)):
        raise InvalidArgument(f"{what} must be a path (str, bytes or os.PathLike), got {type(value).__name__}")
    if (b"\0" if isinstance(value, bytes) else "\0") in value:
        raise InvalidArgument(f"{what} {value!r} contains a NUL byte")
    return value


def as_dtype(value: object, what: str = "dtype") -> np.dtype:
    """Anything numpy takes as a dtype ("float32", np.float32, np.dtype("<i8")...), with at
    least one byte per item and no Python objects in it (their bytes are pointers)."""
    try:
        dtype = np.dtype(value)   # type: ignore[call-overload]
    except (TypeError, ValueError, SyntaxError):
        raise InvalidArgument(f"{what} {value!r} is not a numpy dtype") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise InvalidArgument(f"{what} {dtype} has {'Python objects' if dtype.hasobject else 'no bytes'} "
                              "in it: no memory can hold it")
    return dtype


def as_id_list(value: object, what: str = "bm_ids") -> list[Any]:
    """A list of object ids from any iterable of them; one id alone is refused, since a
    string is an iterable of characters."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{what} must be a list of ids, got one {type(value).__name__} "
                              f"{_short(value)}: pass [bm_id], or free one object with BigMemory.free()")
    try:
        return list(value)    # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"{what} must be a list of ids, got {type(value).__name__}") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""Message encoding shared by every transport: one msgpack map per message.

A request is {"op": str, "id": int, ...arguments}; a reply is {"id": int, ...results}
or {"id": int, "error": code, "msg": text}. Anything else is a protocol error.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from ..errors import MemfabricError, ProtocolError
from ..limits import MAX_ERROR_MESSAGE_CHARS, MAX_MESSAGE_BYTES


_local = threading.local()     # a Packer per thread: packb() would make one per message


def encode(message: dict[str, Any]) -> bytes:
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    try:
        data = packer.pack(message)
    except BaseException:
        _local.packer = msgpack.Packer(use_bin_type=True)   # its buffer may hold a part message
        raise
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage; data is already bounded
        raise ProtocolError(f"undecodable message: {exc.__class__.__name__}") from None
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise ProtocolError("a message must be a map with an integer 'id'")
    return message


def error_reply(request_id: int, exc: MemfabricError) -> dict[str, Any]:
    # A message quotes the input it refuses, and a quote can be larger than the input (repr of
    # bytes): cut, it cannot make the reply too large to send, leaving the client no answer.
    message = exc.message
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = f"{message[:MAX_ERROR_MESSAGE_CHARS]}... ({len(message)} characters)"
    return {"id": request_id, "error": int(exc.code), "msg": message}

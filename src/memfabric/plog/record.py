"""How a plog's records lie in its bytes, and how a scan finds where the whole ones end. Pure:
no I/O, no clock.

A record is a 16-byte header, its payload, and zeros up to the next multiple of 8:

    magic "PLG1" | payload length (u32) | index (u32, low bits) | CRC-32C (u32)     little-endian

The CRC covers the plog's nonce (64 random bits chosen at create), the record's index, its
length and its payload. So a torn record (a crash part way through its bytes) fails its
check, a frame left from an earlier plog in the same memory (another nonce) or out of place
(another index) fails it too, and zeroed memory never passes (no magic). A scan from the
start accepts frames while they check and stops at the first that does not: what it returns
is always a prefix of the appended records, never a corrupt one.

CRC-32C (Castagnoli) and not zlib's CRC-32: it is what storage systems use for this (iSCSI,
ext4 and btrfs metadata, RocksDB's WAL, BookKeeper's entries), it detects more error
patterns at these lengths, and the `crc32c` package computes it with the CPU's instruction
(SSE 4.2 here: ~1 us per 4 KiB against zlib.crc32's ~4 us).
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator

from crc32c import crc32c

try:    # the batch framed in one call (_framing.c): ./dev builds it
    from .. import _records
except ImportError:      # pragma: no cover
    _records = None

MAGIC = b"PLG1"
HEADER = struct.Struct("<4sIII")          # magic, length, index & 0xFFFFFFFF, crc
HEADER_BYTES = HEADER.size
ALIGN_BYTES = 8
_SEED = struct.Struct("<QQI")              # nonce, index, length: what the CRC starts from
assert HEADER_BYTES % ALIGN_BYTES == 0


def frame_bytes(payload_bytes: int) -> int:
    """The bytes a record of this payload takes in the log, header and padding included."""
    return HEADER_BYTES + (payload_bytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def checksum(nonce: int, index: int, payload: memoryview | bytes) -> int:
    return crc32c(payload, crc32c(_SEED.pack(nonce, index, len(payload))))


def header(nonce: int, index: int, payload: memoryview | bytes) -> bytes:
    """The header of record `index` with this payload."""
    return HEADER.pack(MAGIC, len(payload), index & 0xFFFFFFFF, checksum(nonce, index, payload))


def padding(payload_bytes: int) -> bytes:
    return bytes(frame_bytes(payload_bytes) - HEADER_BYTES - payload_bytes)


_PADDINGS = tuple(bytes(n) for n in range(ALIGN_BYTES))


def frames(nonce: int, first_index: int, data: memoryview, lengths: list[int]) -> list[bytes | memoryview]:
    """The parts of the frames of records `first_index`, ... whose payloads lie back to back in
    `data` (of these `lengths`), in order: header, payload, padding for each. The same bytes as
    header() and padding() make, in one loop with no call per record beyond the CRC and the
    header's pack: a batch of 100 records is framed in a fraction of the time."""
    parts: list[bytes | memoryview] = []
    append = parts.append
    seed, pack, magic = _SEED.pack, HEADER.pack, MAGIC
    at, index = 0, first_index
    for n in lengths:
        payload = data[at:at + n]
        append(pack(magic, n, index & 0xFFFFFFFF, crc32c(payload, crc32c(seed(nonce, index, n)))))
        append(payload)
        pad = -n % ALIGN_BYTES
        if pad:
            append(_PADDINGS[pad])
        at += n
        index += 1
    return parts


def framed(nonce: int, first_index: int, data: memoryview, lengths: list[int]) -> bytes:
    """The frames of the batch (as frames() makes them) joined in one buffer: compiled where
    it is built, at the cost of the CRCs and one copy."""
    if _records is not None:
        return _records.frame_batch(nonce, first_index, data, lengths)
    return b"".join(frames(nonce, first_index, data, lengths))


def compiled() -> bool:
    """Whether batches are framed in compiled code (frame_into works)."""
    return _records is not None


def frame_into(nonce: int, first_index: int, data: memoryview, lengths: list[int], into: bytearray) -> int:
    """The frames of the batch written into `into` (a buffer kept for the next batch), each
    CRC computed over the bytes in the frame (so `data` may change meanwhile: a client's
    shared stage); their length. Only where compiled() is true."""
    return _records.frame_batch(nonce, first_index, data, lengths, into)


def encode(nonce: int, index: int, payload: bytes | memoryview) -> bytes:
    """One whole frame (tests and small records; the server writes the parts without joining)."""
    return header(nonce, index, payload) + bytes(payload) + padding(len(payload))


def scan(read: Callable[[int, int], bytes | memoryview], size: int, nonce: int,
         max_record_bytes: int, start: int = 0, first_index: int = 0) -> Iterator[tuple[int, int]]:
    """The records whose frames check, from offset `start` (record `first_index`; a replica
    checks what its home sent from where its log ends) of a log of `size` bytes, in order:
    (start of the frame, payload length). Stops at the first frame that does not check.
    `read(offset, length)` gives the log's bytes there (never past `size`)."""
    at, index = start, first_index
    while at + HEADER_BYTES <= size:
        magic, length, low_index, crc = HEADER.unpack(read(at, HEADER_BYTES))
        if magic != MAGIC or low_index != index & 0xFFFFFFFF or length > max_record_bytes:
            return
        end = at + frame_bytes(length)
        if end > size:
            return
        if checksum(nonce, index, read(at + HEADER_BYTES, length)) != crc:
            return
        yield at, length
        at, index = end, index + 1

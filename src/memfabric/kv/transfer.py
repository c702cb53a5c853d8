"""Large values moved between a caller and a server: copied once on each side.

A put of a value too large to ride in a request (KV_INLINE_BYTES) reserves extents of the
namespace's memory at the key's home, fills them in place and commits them under the key:
on the same host the caller copies into its mapping of the extents; from another host each
fill's payload is received by the server straight into them. A get of a large value is
the converse: the server holds the record and says where its bytes are; the caller copies
them out of its mapping, or reads them over RPC straight into its buffer, then lets go.

Used by the client (kv/client.py) and by servers passing a large value on to a replica.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..datapath.rpc_link import InFlight
from ..errors import InvalidArgument, MemfabricError, ProtocolError, Timeout
from ..limits import MAX_RPC_PAYLOAD_BYTES

Creds = tuple[str, str, bytes]
IN_FLIGHT = 8                    # fills or reads pipelined at once on an RPC link
CHUNK_BYTES = 16 << 20           # the most one fill or read carries (within MAX_RPC_PAYLOAD_BYTES)
assert CHUNK_BYTES <= MAX_RPC_PAYLOAD_BYTES


def _wire(creds: Creds) -> dict[str, Any]:
    return {"pool": creds[0], "ns": creds[1], "sec": creds[2]}


def _spans(targets: list[tuple[int, int, int]], sources: list[memoryview]) -> Iterator[tuple[int, int, int, memoryview]]:
    """(value position, segment, offset, source bytes) runs where target extents and source
    pieces overlap, each at most CHUNK_BYTES."""
    position, source_index, source_at = 0, 0, 0
    for segment, offset, length in targets:
        done = 0
        while done < length and source_index < len(sources):
            source = sources[source_index]
            take = min(length - done, source.nbytes - source_at, CHUNK_BYTES)
            if take:
                yield position, segment, offset + done, source[source_at:source_at + take]
            done += take
            position += take
            source_at += take
            if source_at == source.nbytes:
                source_index, source_at = source_index + 1, 0


def _copy_into_segment(target: Any, offset: int, src: memoryview) -> None:
    if isinstance(target, memoryview):
        target[offset:offset + src.nbytes] = src
    else:                                    # a peer's file segment, reached through its fd
        target.write(offset, src)


def copy_from_segment(source: Any, offset: int, dst: memoryview) -> None:
    if isinstance(source, memoryview):
        dst[:] = source[offset:offset + dst.nbytes]
    else:
        source.read(offset, dst)


def put_large(link: Any, creds: Creds, key: bytes, sources: list[memoryview], length: int,
              commit: dict[str, Any]) -> dict[str, Any]:
    """Reserve `length` bytes at the server of `link`, fill them from `sources` (memoryviews
    whose bytes, in order, are the value), commit them under `key` with `commit`'s options;
    the commit's reply. Anything failing on the way gives the reservation back."""
    if sum(s.nbytes for s in sources) != length:
        raise InvalidArgument(f"a value of {length} bytes from pieces of {sum(s.nbytes for s in sources)}")
    reply = link.call("kv_reserve", **_wire(creds), length=length)
    token = reply["token"]
    try:
        targets = [tuple(e) for e in reply["extents"]]
        if sum(e[2] for e in targets) < length:
            raise ProtocolError(f"a reservation of {sum(e[2] for e in targets)} bytes for {length}")
        if link.is_local:
            for _, segment, offset, src in _spans(targets, sources):
                _copy_into_segment(link.segment_view(creds, segment), offset, src)
        else:
            with InFlight() as flight:      # however this ends, no request is left in flight
                for i, (at, _, _, src) in enumerate(_spans(targets, sources)):
                    if i >= IN_FLIGHT:
                        flight.wait(link, flight.requests[i - IN_FLIGHT][1])
                    flight.submit(link, "kv_fill", {**_wire(creds), "token": token, "at": at, "length": src.nbytes},
                                  payload=src)
                flight.wait_all()
    except BaseException:
        _let_go(link, "kv_abort", **_wire(creds), token=token)
        raise
    return link.call("kv_commit", **_wire(creds), token=token, key=key, **commit)


def put_large_from(link: Any, creds: Creds, key: bytes, pieces: list[tuple[Any, int, int]], length: int,
                   expiry: int, version: int, replicas: int) -> None:
    """A server passing a large value on to a replica: `pieces` are (segment memory, offset,
    length) of its own record, sent from where they are (file segments through a buffer)."""
    sources: list[memoryview] = []
    for mem, offset, n in pieces:
        if mem.view is not None:
            sources.append(mem.view[offset:offset + n])
        else:
            buffer = memoryview(bytearray(n))
            mem.read(offset, buffer)
            sources.append(buffer)
    put_large(link, creds, key, sources, length, {"expiry": expiry, "version": version, "replicas": replicas})


def read_held(link: Any, creds: Creds, reply: dict[str, Any], into: memoryview) -> None:
    """The bytes of a value the server holds for us (a kv_get's `hold` and `pieces`), into
    `into` (its first `length` bytes); the hold is let go whatever happens."""
    try:
        position = 0
        with InFlight() as flight:          # no reply may land in `into` once this has returned or raised
            for segment, offset, length in reply["pieces"]:
                if link.is_local:
                    copy_from_segment(link.segment_view(creds, segment), offset, into[position:position + length])
                    position += length
                    continue
                done = 0
                while done < length:
                    take = min(CHUNK_BYTES, length - done)
                    sent = len(flight.requests)
                    if sent >= IN_FLIGHT:
                        flight.wait(link, flight.requests[sent - IN_FLIGHT][1])
                    flight.submit(link, "kv_read", {**_wire(creds), "hold": reply["hold"], "at": position + done,
                                                    "length": take}, into=into[position + done:position + done + take])
                    done += take
                position += length
            flight.wait_all()
    finally:
        _let_go(link, "kv_let_go", **_wire(creds), hold=reply["hold"])


def _let_go(link: Any, op: str, **args: Any) -> None:
    """`op` (giving back what the server holds for us), answered or not: on a link too busy to
    send it in time it goes with the link's next request (else what it holds stayed held for
    the link's life: a server's link to a peer lives as long as both); on a link that failed,
    the server gives it back when the connection closes."""
    try:
        link.call(op, **args)
    except Timeout:
        link.send_later(op, **args)
    except MemfabricError:
        pass

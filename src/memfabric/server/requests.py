"""What a request meets at the server: the connection it came on, and the shapes of replies."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import MemfabricError
from ..transport import wire


class Connection:
    """What the server remembers about one connected client or peer."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, peer_pid: int | None = None, client: str = "", carries_fds: bool = False) -> None:
        self.id = next(Connection._ids)
        self.peer_pid = peer_pid
        self.client = client         # who, as the kernel or the transport says: "uid N", "host A"
        self.carries_fds = carries_fds   # its transport can hand over file descriptors (IPC)
        self.rpc_member = False      # proved the cluster token (RPC): may act as a peer
        self.role = "client"
        # (pool, ns) -> (incarnation, secId) proven on this connection.
        self.verified: dict[tuple[str, str], tuple[int, bytes]] = {}
        # Segments whose fds this client was handed, and those of them destroyed since: the
        # next reply tells it, so it unmaps them (they read zeros now) and closes their fds.
        self.segments: set[tuple[str, int]] = set()
        self.gone: list[list] = []
        # What each semantic keeps for this connection (its name -> its own record).
        self.services: dict[str, Any] = {}


Reply = dict[str, Any] | tuple[dict[str, Any], list[int]]


class Payload:
    """A reply with raw bytes after it (RPC only: IPC peers read each other's memory): one
    buffer, or several sent as one. `done` runs once they are sent, or could not be: memory
    lent to the send is let go then."""

    def __init__(self, reply: dict[str, Any], data: memoryview | list[memoryview],
                 done: Callable[[], None] | None = None) -> None:
        self.reply, self.data, self.done = reply, data, done


def receive_into_segment(frames: Any, request_id: int, mem: Any, offset: int, length: int,
                         deadline: float) -> None:
    """A transfer's payload received into segment memory, then its reply: straight into the
    mapping, or (a file segment: the server never maps files) through a buffer and the fd."""
    reply: dict[str, Any] = {"id": request_id}
    if mem.view is not None:
        frames.recv_into_exact(mem.view[offset:offset + length], deadline)
    else:
        buffer = memoryview(bytearray(length))
        frames.recv_into_exact(buffer, deadline)
        try:
            mem.write(offset, buffer)
        except MemfabricError as exc:     # the payload is read: answer here
            reply = wire.error_reply(request_id, exc)
    frames.send(reply)


def send_from_segment(frames: Any, request_id: int, mem: Any, offset: int, length: int) -> None:
    """A transfer's reply with segment bytes as its payload: from the mapping, or read from a
    file segment first."""
    if mem.view is not None:
        frames.send({"id": request_id}, mem.view[offset:offset + length])
    else:
        buffer = memoryview(bytearray(length))
        mem.read(offset, buffer)
        frames.send({"id": request_id}, buffer)

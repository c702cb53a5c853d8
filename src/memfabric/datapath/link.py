"""A connection to one server on this host, and the memory it has handed over.

Calls are synchronous request/reply over one IPC channel (a lock keeps them whole when
threads share a link). Segment fds and namespace generation tables arrive once, are
mapped once, and are kept for the life of the link: the server never lends a segment to
another namespace while a link that holds it is open.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from typing import Any

from ..errors import BmError, MemfabricError, ProtocolError, ServerUnavailable, Timeout, error_from_code
from ..limits import DEFAULT_REQUEST_TIMEOUT_S, MAX_FDS_PER_MESSAGE
from ..transport.ipc import IpcChannel, PeerClosed

# A same-host client reads memory without asking the server; how often it checks that
# the server is still there (one non-blocking peek).
LIVENESS_CHECK_EVERY_S = 0.002


class _Mapped:
    __slots__ = ("fd", "mapping", "view", "size", "ns")

    def __init__(self, fd: int, size: int, readonly: bool, ns: str = "") -> None:
        self.ns = ns
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        self.fd = fd
        self.size = size
        self.mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot)
        self.view = memoryview(self.mapping)

    def close(self) -> None:
        self.view.release()
        try:
            self.mapping.close()
        except BufferError:
            pass   # a user still holds a view; the kernel unmaps when it goes
        os.close(self.fd)


Creds = tuple[str, str, bytes]   # (pool, ns, secId)


class ServerLink:
    def __init__(self, ipc_socket: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 role: str = "client") -> None:
        self.ipc_socket = ipc_socket
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._next_id = 1
        self._segments: dict[tuple[str, int], _Mapped] = {}
        self._gen_tables: dict[tuple[str, str, int], tuple[_Mapped, memoryview]] = {}
        self._checked_at = 0.0
        self._closed = False
        self._channel = IpcChannel.connect(ipc_socket, timeout_s)
        self._channel.sock.settimeout(timeout_s)
        hello = self.call("hello", role=role, pid=os.getpid())
        self.server_id: int = hello["server_id"]
        self.host: str = hello["host"]

    # ---- requests ---------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        reply, fds = self.call_with_fds(op, **args)
        for fd in fds:
            os.close(fd)
        return reply

    def call_with_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self._closed:
                raise ServerUnavailable(f"the connection to {self.ipc_socket} is closed")
            request_id = self._next_id
            self._next_id += 1
            args["op"] = op
            args["id"] = request_id
            try:
                self._channel.send(args)
                reply, fds = self._channel.recv()
            except socket.timeout:
                self._fail()
                raise Timeout(f"server at {self.ipc_socket} did not answer {op!r} "
                              f"within {self.timeout_s}s") from None
            except (PeerClosed, ConnectionError, OSError) as exc:
                self._fail()
                raise ServerUnavailable(f"server at {self.ipc_socket} is gone ({op!r}: "
                                        f"{exc.__class__.__name__})") from None
            except ProtocolError:
                self._fail()
                raise
        if reply.get("id") != request_id:
            for fd in fds:
                os.close(fd)
            self._fail()
            raise ProtocolError(f"reply to request {request_id} carried id {reply.get('id')}")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            if reply["error"] == BmError.NO_SUCH_NAMESPACE and op != "segments_release":
                self.release_namespace(str(args.get("pool")), str(args.get("ns")))
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        return reply, fds

    def _fail(self) -> None:
        # After a timeout or a broken reply the stream position is unknown: start over never.
        self._closed = True
        self._channel.close()

    # ---- liveness -------------------------------------------------------------------

    def check_alive(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < LIVENESS_CHECK_EVERY_S:
            if self._closed:
                raise ServerUnavailable(f"server at {self.ipc_socket} is gone")
            return
        self._checked_at = now
        if self._closed or self._channel.peer_gone():
            self._closed = True
            raise ServerUnavailable(f"server {self.server_id} at {self.ipc_socket} is gone")

    # ---- memory it hands over -----------------------------------------------------------

    def gen_table(self, creds: Creds, incarnation: int) -> memoryview:
        pool, ns, _ = creds
        key = (pool, ns, incarnation)
        entry = self._gen_tables.get(key)
        if entry is None:
            reply, fds = self.call_with_fds("ns_open", pool=pool, ns=ns, sec=creds[2])
            if len(fds) != 1:
                raise ProtocolError(f"ns_open sent {len(fds)} fds, expected 1")
            mapped = _Mapped(fds[0], reply["table_bytes"], readonly=True)
            entry = (mapped, mapped.view.cast("Q"))
            self._gen_tables[(pool, ns, reply["incarnation"])] = entry
        return entry[1]

    def segment_view(self, creds: Creds, segment: int) -> memoryview:
        mapped = self._segments.get((creds[0], segment))
        if mapped is None:
            self.fetch_segments(creds, [segment])
            mapped = self._segments[(creds[0], segment)]
        return mapped.view

    def segment_fd(self, creds: Creds, segment: int) -> int:
        self.segment_view(creds, segment)
        return self._segments[(creds[0], segment)].fd

    def fetch_segments(self, creds: Creds, segments: list[int]) -> None:
        pool = creds[0]
        missing = sorted({s for s in segments if (pool, s) not in self._segments})
        for i in range(0, len(missing), MAX_FDS_PER_MESSAGE):
            batch = missing[i:i + MAX_FDS_PER_MESSAGE]
            reply, fds = self.call_with_fds("segments", pool=pool, ns=creds[1], sec=creds[2],
                                            segments=batch)
            if len(fds) != len(batch):
                for fd in fds:
                    os.close(fd)
                raise ProtocolError(f"asked for {len(batch)} segments, got {len(fds)} fds")
            for segment, fd in zip(batch, fds):
                self._segments[(pool, segment)] = _Mapped(fd, reply["segment_bytes"], readonly=False,
                                                          ns=creds[1])

    def release_namespace(self, pool: str, ns: str) -> None:
        """Unmap a gone namespace's segments and tell the server, so it can lend them again."""
        gone = [key for key, m in self._segments.items() if key[0] == pool and m.ns == ns]
        for key in gone:
            self._segments.pop(key).close()
        for key in [k for k in self._gen_tables if k[:2] == (pool, ns)]:
            self._gen_tables.pop(key)[0].close()
        if gone and not self._closed:
            try:
                self.call("segments_release", pool=pool, segments=[seg for _, seg in gone])
            except MemfabricError:
                pass   # the server is gone: nothing is held there any more

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._channel.close()
        for mapped in list(self._segments.values()) + [m for m, _ in self._gen_tables.values()]:
            mapped.close()
        self._segments.clear()
        self._gen_tables.clear()

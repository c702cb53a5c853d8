"""A connection to a server on another host: pipelined RPC over one TCP connection.

Requests go out under a send lock. There is no reader thread: a waiting caller takes the
receive lock and reads replies itself, handing each to the request it answers (its payload
lands straight in the buffer that request registered) until its own arrives. A lone request
so costs no thread hand-off; many in flight share one reader at a time. Every wait has a
deadline: a server that stops answering costs TIMEOUT and the connection is shut down,
never a hang.
"""

from __future__ import annotations

import ssl
import socket
import threading
import time
from typing import Any

from ..errors import (LimitExceeded, MemfabricError, ProtocolError, ServerUnavailable, Timeout,
                      error_from_code)
from ..limits import BUSY_POLL_US, DEFAULT_REQUEST_TIMEOUT_S, MAX_RPC_IN_FLIGHT
from ..transport import rpc
from .link import LIVENESS_CHECK_EVERY_S, Creds


class Pending:
    __slots__ = ("event", "reply", "into", "payload", "error")

    def __init__(self, into: memoryview | None) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.into = into
        self.payload: bytes | None = None
        self.error: MemfabricError | None = None


class RpcLink:
    is_local = False

    def __init__(self, address: str, token: bytes, tls: ssl.SSLContext | None = None,
                 timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, role: str = "client",
                 busy_poll_s: float = BUSY_POLL_US / 1e6) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.busy_poll_s = busy_poll_s
        self._frames = rpc.connect(address, tls, timeout_s, busy_poll_s)
        try:
            self.server_id = rpc.client_handshake(self._frames, token)
        except BaseException:
            self._frames.close()
            raise
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self._closed = False
        self._checked_at = 0.0
        hello = self.call("hello", role=role)
        self.host: str = hello["host"]

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, op: str, args: dict[str, Any], payload: memoryview | None = None,
               into: memoryview | None = None) -> tuple[int, Pending]:
        pending = Pending(into)
        with self._lock:
            if self._closed:
                raise ServerUnavailable(f"the connection to server {self.server_id} at {self.address} is closed")
            if len(self._pending) >= MAX_RPC_IN_FLIGHT:
                raise LimitExceeded(f"{MAX_RPC_IN_FLIGHT} requests already in flight to {self.address}")
            request_id = self._next_id
            self._next_id += 1
            self._pending[request_id] = pending
        args["op"] = op
        args["id"] = request_id
        try:
            with self._send_lock:
                self._frames.send(args, payload)
        except socket.timeout:
            self._shut(Timeout(f"server at {self.address} took no request for {self.timeout_s}s ({op!r})"))
        except (OSError, ValueError):
            self._shut(ServerUnavailable(f"server at {self.address} is gone (sending {op!r})"))
        return request_id, pending

    def wait(self, request_id: int, pending: Pending, op: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while not pending.event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._shut(Timeout(f"server at {self.address} did not answer {op!r} within {self.timeout_s}s"))
            if self._recv_lock.acquire(blocking=False):
                try:
                    while not pending.event.is_set():
                        self._read_one(deadline)   # every receive checks the deadline
                except socket.timeout:
                    failure: MemfabricError = Timeout(f"server at {self.address} did not answer {op!r} "
                                                      f"within {self.timeout_s}s")
                except (OSError, ConnectionError, ValueError, MemfabricError) as exc:
                    failure = ServerUnavailable(f"server {self.server_id} at {self.address} is gone "
                                                f"({exc.__class__.__name__})")
                else:
                    failure = None
                finally:
                    self._recv_lock.release()
                if failure is not None:
                    self._shut(failure)
            else:
                # Another caller is reading; it hands us our reply, or we take over when it is done.
                pending.event.wait(min(remaining, 0.0005))
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        if "error" in reply:
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        return reply

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        request_id, pending = self.submit(op, args)
        return self.wait(request_id, pending, op)

    def call_with_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        raise ProtocolError("file descriptors cannot cross hosts")

    # ---- data ---------------------------------------------------------------------------------

    def submit_write(self, creds: Creds, bm_id: str, segment: int, offset: int, src: memoryview):
        return self.submit("seg_write", {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": bm_id,
                                         "segment": segment, "offset": offset, "length": len(src)}, payload=src)

    def submit_read(self, creds: Creds, bm_id: str, segment: int, offset: int, dst: memoryview):
        return self.submit("seg_read", {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": bm_id,
                                        "segment": segment, "offset": offset, "length": len(dst)}, into=dst)

    # ---- reading (done by whichever caller holds the receive lock) -------------------------------

    def _read_one(self, deadline: float) -> None:
        frames = self._frames
        header, payload_len = frames.recv_header(deadline)
        with self._lock:
            pending = self._pending.pop(header.get("id"), None)
        if pending is None:
            frames.discard(payload_len, deadline)     # a reply nobody waits for any more
            return
        if payload_len:
            if pending.into is not None and payload_len == len(pending.into) and "error" not in header:
                frames.recv_into_exact(pending.into, deadline)
            else:
                frames.discard(payload_len, deadline)
                if "error" not in header:
                    pending.error = ProtocolError(f"a reply of {payload_len} bytes for a buffer of "
                                                  f"{0 if pending.into is None else len(pending.into)}")
        elif pending.into is not None and len(pending.into) and "error" not in header:
            pending.error = ProtocolError("a reply without the bytes it should carry")
        pending.reply = header
        pending.event.set()

    def _shut(self, error: MemfabricError) -> None:
        """Fail every request in flight and close; raises `error`. Callers hold no buffer of
        ours afterwards: only the holder of the receive lock writes into them, and it is us
        or it has let go."""
        with self._lock:
            already = self._closed
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        if not already:
            self._frames.close()
        with self._recv_lock:   # wait out a reader that may be mid-payload into a caller's buffer
            pass
        for p in pending:
            p.error = error
            p.event.set()
        raise error

    # ---- liveness and life ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_gone(self) -> bool:
        """Closed, or the server hung up (a restarted peer leaves our old link so)."""
        if not self._closed and self._frames.peer_gone():
            self.close()
        return self._closed

    def check_alive(self) -> None:
        """peer_gone(), at most once per LIVENESS_CHECK_EVERY_S: reads and writes call this."""
        now = time.monotonic()
        if now - self._checked_at < LIVENESS_CHECK_EVERY_S and not self._closed:
            return
        self._checked_at = now
        if self.peer_gone():
            raise ServerUnavailable(f"server {self.server_id} at {self.address} is gone")

    def release_namespace(self, pool: str, ns: str) -> None:
        """Nothing is mapped across hosts; nothing to give back."""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        self._frames.close()
        for p in pending:
            p.error = ServerUnavailable("connection closed")
            p.event.set()

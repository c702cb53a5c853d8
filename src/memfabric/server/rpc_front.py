"""The server's door for other hosts: TCP (optionally TLS), token handshake, framed requests.

Requests on one connection are handled in order (the client pipelines them). Data moves
in place: a write's payload is received straight into the segment bytes the request was
checked against, and a read's reply is sent straight from them. A bad request whose
payload is already on the wire has that payload drained, then gets its error reply.

On plain TCP, the connection waits for its requests in compiled code (_spans.c), which
serves the span reads and writes of objects the connection was granted (span_grants.py),
and the gets of small values of keyspaces it was granted (kv/get_grants.py), by itself and
hands every other frame to the loop here.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time

from ..errors import InternalError, LimitExceeded, MemfabricError, ProtocolError
from ..limits import DEFAULT_REQUEST_TIMEOUT_S as REQUEST_TIMEOUT_S
from ..transport import rpc, wire
from ..transport.rpc import _frames
from .accepting import AcceptLoop
from .requests import Connection, Payload
from .server import Server

# Connections still proving the token, at once. Each handshake ends within HANDSHAKE_TIMEOUT_S;
# a bound this high means idle strangers need thousands of sockets to crowd out a client.
MAX_HANDSHAKING = 1024


class RpcFront:
    def __init__(self, server: Server, listener: socket.socket, token: bytes,
                 tls: ssl.SSLContext | None, max_clients: int, busy_poll_s: float) -> None:
        self.server = server
        self.busy_poll_s = busy_poll_s
        self._listener = listener
        self._token = token
        self._tls = tls
        self.max_clients = max_clients
        self._connections: dict[int, rpc.FrameSocket] = {}
        self._handshaking = 0
        self._lock = threading.Lock()
        # Operations that move a payload themselves (BigMemory's span reads and writes).
        self._transfers = server.transfers      # every semantic's
        self._accept = AcceptLoop("RPC", listener, self._take,
                                  lambda accepting: server.door_accepting("rpc", accepting))

    door = "rpc"

    def start(self) -> None:
        self._accept.start()

    def connected(self) -> int:
        """Connections served now (the metrics' clients)."""
        return len(self._connections)

    def _take(self, sock: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(sock,), name="rpc-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            # A client over RPC is its address as TCP says it (the port changes per connection).
            conn = Connection(client=f"host {sock.getpeername()[0]}")
        except OSError:
            sock.close()
            return
        # Strangers cost a bounded number of handshake slots, never a client's slot.
        with self._lock:
            if self._handshaking >= MAX_HANDSHAKING:
                sock.close()
                return
            self._handshaking += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock.settimeout(rpc.HANDSHAKE_TIMEOUT_S)
                sock = self._tls.wrap_socket(sock, server_side=True)
            frames = rpc.FrameSocket(sock, self.busy_poll_s, send_timeout_s=REQUEST_TIMEOUT_S)
            rpc.server_handshake(frames, self._token, self.server.server_id)
            with self._lock:
                if len(self._connections) >= self.max_clients:
                    raise LimitExceeded(f"the server has {self.max_clients} RPC connections, the most it takes")
                self._connections[conn.id] = frames
        except (OSError, ssl.SSLError, MemfabricError) as exc:
            self.server.limited_log.info("rpc refused", "RPC connection refused: %s", exc)
            sock.close()
            return
        finally:
            with self._lock:
                self._handshaking -= 1
        # The token makes a peer a member of the cluster: it may use the peer operations.
        conn.rpc_member = True
        try:
            self._loop(conn, frames)
        finally:
            with self._lock:
                self._connections.pop(conn.id, None)
            frames.close()
            self.server.disconnected(conn)

    def _loop(self, conn: Connection, frames: rpc.FrameSocket) -> None:
        grants = self.server.bigmemory.open_span_grants(conn) if frames.compiled else None
        kv_grants = self.server.kv.open_get_grants(conn) if grants is not None else None
        while True:
            try:
                # An idle connection may wait for its next request; a begun frame must finish.
                if grants is not None:
                    request, payload_len = self._next_request(conn, frames, grants, kv_grants)
                else:
                    request, payload_len = frames.recv_header(frame_timeout_s=REQUEST_TIMEOUT_S)
            except (OSError, ConnectionError, ValueError):
                return
            except ProtocolError as exc:
                self.server.limited_log.warning("rpc malformed", "RPC connection %d closed: %s", conn.id, exc)
                return
            op = request.get("op")
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            payload = None
            done = None          # a Payload's: runs once it is sent, or cannot be
            transfer = None
            try:
                transfer = self._transfers.get(op) if type(op) is str else None
                if transfer is not None:
                    # It moves the payload between the socket and pool memory, and answers.
                    transfer(conn, request, payload_len, frames, deadline)
                    continue
                else:
                    if payload_len:
                        raise ProtocolError(f"{op!r} carries no payload")
                    result = self.server.serve(conn, request)
                    if isinstance(result, tuple):
                        # Server.FD_OPS should have refused it before it made any: a bug, but
                        # not one that may cost an fd.
                        _close_owned(result)
                        self.server.limited_log.log(logging.ERROR, "rpc fd reply bug",
                                                    "%.60r answered with file descriptors over RPC", op)
                        raise InternalError(f"{op!r} answered with file descriptors over RPC")
                    if isinstance(result, Payload):
                        reply, payload, done = result.reply, result.data, result.done
                    else:
                        reply = result
            except MemfabricError as exc:
                reply, payload = wire.error_reply(request["id"], exc), None
            except (OSError, ConnectionError) as exc:   # the client stalled or went away mid-transfer
                self.server.limited_log.info("rpc transfer", "RPC connection %d closed during %.60r: %s",
                                             conn.id, op, exc)
                return
            except Exception as exc:   # a bug in the transfer path (serve() covers the rest)
                self.server.limited_log.exception("rpc transfer bug", "RPC operation %.60r failed", op)
                if transfer is not None:
                    return             # perhaps part way through its payload: the stream cannot go on
                reply, payload = wire.error_reply(request["id"], InternalError(f"internal error in {op!r}: {exc!r}")), None
            try:
                if payload_len:
                    frames.discard(payload_len, deadline)   # refused before its payload was read
                reply["id"] = request["id"]
                try:
                    frames.send(reply, payload)
                except ProtocolError as exc:     # too large to send: nothing went out yet
                    frames.send(wire.error_reply(request["id"], LimitExceeded(
                        f"the reply to {op!r} is too large: {exc}")))
            except (OSError, ConnectionError, MemfabricError):
                return
            finally:
                if done is not None:
                    done()

    def _next_request(self, conn: Connection, frames: rpc.FrameSocket, grants, kv_grants) -> tuple[dict, int]:
        """The next request the compiled loop leaves to us: it serves granted span reads and
        writes, and granted gets, itself (OSError: the stream broke)."""
        kv_table = None if kv_grants is None else kv_grants.table
        while True:
            status, failure = frames.serve_spans(grants.table, REQUEST_TIMEOUT_S, kv_table)
            if status == _frames.OWED:
                self.server.bigmemory.settle_span_grants(conn)
                continue
            if status == _frames.TRANSFER_FAILED:
                self.server.limited_log.info("rpc transfer", "RPC connection %d closed during %s", conn.id, failure)
                raise ConnectionError(failure)
            return frames.header_in_block(REQUEST_TIMEOUT_S)

    def stop(self) -> None:
        self._accept.close()
        with self._lock:
            frames = list(self._connections.values())
        for f in frames:
            f.close()
        self._accept.join(timeout_s=5)


def _close_owned(result: tuple) -> None:
    """The fds of a (reply, fds, owned) result, if they were made for the reply."""
    _, fds, *rest = result
    if rest and rest[0]:
        for fd in fds:
            os.close(fd)

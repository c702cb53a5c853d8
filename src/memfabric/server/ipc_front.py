"""The server's same-host front door: a SEQPACKET Unix socket, one thread per connection.

A connection that sends garbage, an oversized message or an unknown shape is closed;
nothing else is touched. Operating errors go back as error replies.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from ..errors import InternalError, InvalidArgument, LimitExceeded, MemfabricError, ProtocolError
from ..transport import wire
from ..transport.ipc import IpcChannel, PeerClosed, listen
from .accepting import AcceptLoop
from .requests import Connection, Payload
from .server import Server


class IpcFront:
    def __init__(self, server: Server, path: str, max_clients: int, busy_poll_s: float,
                 mode: int = 0o600, gid: int | None = None) -> None:
        self.server = server
        self.path = path
        self.max_clients = max_clients
        self.busy_poll_s = busy_poll_s
        self._sock = listen(path, backlog=min(max_clients, 128), mode=mode, gid=gid)
        self._connections: dict[int, IpcChannel] = {}
        self._lock = threading.Lock()
        self._accept = AcceptLoop("IPC", self._sock, self._take,
                                  lambda accepting: server.door_accepting("ipc", accepting))

    door = "ipc"

    def start(self) -> None:
        self._accept.start()

    def connected(self) -> int:
        """Connections served now (the metrics' clients)."""
        return len(self._connections)

    def _take(self, sock: socket.socket) -> None:
        channel = IpcChannel(sock, self.busy_poll_s)
        pid, uid = _peer_creds(sock)
        # The cluster's own servers never count against the clients' slots: a client holding
        # them all must not cut the servers off from each other.
        is_peer = self.server.is_server_pid(pid)
        with self._lock:
            full = len(self._connections) >= self.max_clients and not is_peer
            if not full:
                conn = Connection(peer_pid=pid, client=f"uid {uid}", carries_fds=True)
                self._connections[conn.id] = channel
        if full:
            self._refuse(channel)
            return
        try:
            threading.Thread(target=self._serve, args=(conn, channel), name=f"conn-{conn.id}",
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self._connections.pop(conn.id, None)
            channel.close()
            raise

    def _refuse(self, channel: IpcChannel) -> None:
        try:
            channel.set_deadline(1.0)
            request, fds = channel.recv()
            for fd in fds:
                os.close(fd)
            channel.send(wire.error_reply(request["id"], LimitExceeded(
                f"server has {self.max_clients} connections, the most it takes")))
        except Exception:
            pass
        channel.close()

    def _serve(self, conn: Connection, channel: IpcChannel) -> None:
        # Clients' puts of small values and appends to plogs they were granted may be answered
        # in the receive itself (kv/put_grants.py, plog/fast_append.py); on a peer's connection,
        # a same-host home's forwards to the copies here (fast_append.grant_replica).
        peer = self.server.is_server_pid(conn.peer_pid)
        grants = None if peer else self.server.kv.open_put_grants(conn)
        puts = grants.table if grants is not None else None
        plogs = self.server.plog.fast_grants(conn)
        try:
            while True:
                try:
                    packet, fds = channel.recv_packet(puts, plogs, conn)
                    fast = None
                    if packet is None:       # an append its loop wrote, to commit here (pmem)
                        fast = self.server.plog.fast_finish(fds, time.perf_counter())
                        fds = []
                    else:
                        request, fds = channel.decode(packet, fds)
                except (PeerClosed, ConnectionError, OSError):
                    return
                except ProtocolError as exc:
                    self.server.limited_log.warning("ipc malformed", "IPC connection %d closed: %s", conn.id, exc)
                    return
                if fast is not None:
                    try:
                        channel.send_encoded(fast)
                    except (OSError, MemfabricError):
                        return
                    continue
                for fd in fds:   # clients have no reason to send fds
                    os.close(fd)
                reply_fds: list[int] = []
                owned_fds: list[int] = []    # made for this reply: closed once it is sent, or not
                try:
                    result = self.server.serve(conn, request)
                    if isinstance(result, Payload):
                        raise InvalidArgument(f"{request.get('op')!r} answers with raw bytes: RPC only")
                    if isinstance(result, tuple):
                        reply, reply_fds, *rest = result
                        if rest and rest[0]:
                            owned_fds = list(reply_fds)
                    else:
                        reply = result
                    reply["id"] = request["id"]
                    gone = self.server.take_gone(conn)
                    if gone:       # segments destroyed since: the client unmaps them
                        reply["gone"] = gone
                    data = wire.encode(reply)
                except MemfabricError as exc:
                    if isinstance(exc, ProtocolError):   # our reply would not fit in one message
                        exc = LimitExceeded(f"the reply to {request.get('op')!r} is too large: {exc}")
                    data, reply_fds = wire.encode(wire.error_reply(request["id"], exc)), []
                except Exception as exc:   # a reply we could not encode: a bug; keep serving
                    self.server.limited_log.exception("ipc reply bug", "the reply to %r could not be encoded",
                                                      request.get("op"))
                    data, reply_fds = wire.encode(wire.error_reply(request["id"], InternalError(
                        f"internal error in {request.get('op')!r}: {exc!r}"))), []
                try:
                    channel.send_encoded(data, reply_fds)
                except (OSError, MemfabricError):
                    return
                finally:
                    for fd in owned_fds:
                        os.close(fd)
        finally:
            with self._lock:
                self._connections.pop(conn.id, None)
            channel.close()
            self.server.disconnected(conn)

    def stop(self) -> None:
        self._accept.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        with self._lock:
            channels = list(self._connections.values())
        for channel in channels:
            try:
                channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept.join(timeout_s=5)


def _peer_creds(sock: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid, from the kernel (SO_PEERCRED): they cannot be forged."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid

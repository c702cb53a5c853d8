"""The Redis-protocol door: a front of the server, like IPC and RPC, for stock Redis clients.

One thread per connection (as the RPC door). It reads what the client sent, answers every
whole command in it in order (pipelining: the replies go out together, at most
RESP_REPLY_BUFFER_BYTES at a time), then reads again. GETs and SETs of an authenticated client
are answered in compiled code by one thread for all connections (_resp.c RespLoop, with
epoll), the connection's thread waiting meanwhile; anything else comes back to it. A
malformed request gets Redis's error after the replies before it, and the connection is closed, as Redis closes it; a client
leaving more than RESP_QUERY_BUFFER_MAX_BYTES unparsed is closed without a word, as Redis
does. Nothing one connection sends reaches another.

Who may use which namespace: a door on a loopback address serves its default namespace
without AUTH (Redis's protected mode lets loopback in too); on any other address every
connection starts unauthenticated and must AUTH ns secId (or AUTH secId, for the default
namespace). A wrong secId, a namespace that does not exist and a name that cannot be all
get the same WRONGPASS: AUTH reveals nothing; guesses spend the failure budget of the
client's address (server/sec_ids.py), as RPC's do. Anyone who reaches such a door can open
connections, so those not authenticated yet are bounded apart from the rest: at most a share
of maxclients (a newcomer past it, or past maxclients, closes the oldest of them, never an
authenticated client), each closed when it has not authenticated within auth_timeout_s.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import socket
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ...core.namespaces import check_name
from ...errors import MemfabricError
from ...limits import (RESP_AUTH_TIMEOUT_S, RESP_MAX_CLIENTS, RESP_RECV_BYTES, RESP_REPLY_BUDGET_BYTES,
                       RESP_REPLY_BUFFER_BYTES, RESP_SEND_TIMEOUT_S, RESP_UNAUTH_CLIENTS_SHARE)
from ...server.accepting import AcceptLoop
from ...server.requests import Connection
from ...transport import rpc
from ...transport.sockets import timeval

try:    # the compiled GET and SET (_resp.c)
    from ... import _frames
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = None
from . import commands
from . import protocol as p
from .sending import send_all
from .commands import Client, Quit, RedisError
from .budget import ReplyBudget
from .failures import internal_error_reply
from .held import HeldValue
from .mget import MgetReply, ReplyCut
from .keys import Keyspace

if TYPE_CHECKING:
    from ...server.server import Server

log = logging.getLogger("memfabric.server")

WRONGPASS = "-WRONGPASS invalid username-password pair or user is disabled."
# Commands the door's loop answers for a connection before handing it back to its thread
# (the door's counters catch up then).
DOOR_COMMANDS_PER_CALL = 4096
# How long the door's loop answers what a connection sends before Python checks it again: it
# answers only while every key is homed here (_compiled), which a server joining the pool
# changes; Python's view of the pool is as old as this (server.py VIEW_TTL_S).
DOOR_CALL_MAX_S = 0.25
DOOR_PENDING_MAX_BYTES = 128 << 10     # a pipeline's rest the compiled path takes from the parser


def _bound_waits(sock: socket.socket, seconds: float) -> None:
    """Bound each receive and send in the kernel (SO_RCVTIMEO, SO_SNDTIMEO) on a blocking
    socket. A Python socket timeout would poll() before every recv and send: two more system
    calls per command, which cost more than the command itself. A bound that runs out raises
    BlockingIOError (an OSError, as socket.timeout is)."""
    sock.settimeout(None)
    bound = timeval(max(seconds, 0.001))      # 0 would mean no bound
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class DoorCollector(Collector):
    """The door's figures for Prometheus, read when scraped. Labels are bounded: command names
    come from the command table, anything else counts as "unknown" (or "protocol", "quit")."""

    def __init__(self, front: "RespFront") -> None:
        self.front = front

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        f = self.front.figures()
        yield CounterMetricFamily("memfabric_resp_connections", "Connections the Redis-protocol door took",
                                  value=f["connections_total"])
        yield CounterMetricFamily("memfabric_resp_rejected_connections", "Connections the door turned away "
                                  "(at its limit of clients)", value=f["rejected_total"])
        commands = CounterMetricFamily("memfabric_resp_commands", "Commands the door answered, by command",
                                       labels=["command"])
        for name, count in sorted(f["commands"].items()):
            commands.add_metric([name], count)
        yield commands
        errors = CounterMetricFamily("memfabric_resp_errors", "Commands the door answered with an error "
                                     "(\"protocol\": malformed requests), by command", labels=["command"])
        for name, count in sorted(f["errors"].items()):
            errors.add_metric([name], count)
        yield errors


class RespFront:
    door = "resp"

    def __init__(self, server: "Server", listen: str, pool: str, namespace: str, sec_id: bytes | None,
                 max_clients: int = RESP_MAX_CLIENTS, auth_timeout_s: float = RESP_AUTH_TIMEOUT_S,
                 reply_budget_bytes: int = RESP_REPLY_BUDGET_BYTES) -> None:
        self.server = server
        self._listener = rpc.listen(listen, backlog=511)
        self.host, self.port = self._listener.getsockname()[:2]
        self.pool, self.namespace, self.sec_id = pool, namespace, sec_id
        # Loopback and a secId to serve it with: the default namespace without AUTH.
        self.require_auth = not is_loopback(self.host) or sec_id is None
        self.max_clients = max_clients
        self.max_unauthenticated = max(1, int(max_clients * RESP_UNAUTH_CLIENTS_SHARE))
        self.auth_timeout_s = auth_timeout_s
        self.started_s = time.monotonic()
        self._lock = threading.Lock()
        self._clients: dict[int, tuple[Client, Connection]] = {}
        self._unauthenticated: dict[int, Client] = {}     # oldest first
        self.reply_budget = ReplyBudget(reply_budget_bytes)
        # Figures for `memfabric status` and the metrics: bounded labels (the command table's
        # names and "unknown").
        self.connections_total = 0
        self.rejected_total = 0
        self.commands = Counter[str]()
        self.errors = Counter[str]()
        self._accept = AcceptLoop("RESP", self._listener, self._take,
                                  lambda accepting: server.door_accepting("resp", accepting))
        # The grants its connections' GETs and SETs are answered in compiled code under
        # (_resp.c), the door's, shared: a client that connects for a few commands (as
        # redis-benchmark's do) finds them made by those before it.
        self._grants_conn = Connection(client="resp door")
        self._grants: tuple[Any, Any] | None = None
        # One thread answers every connection's GETs and SETs in compiled code, as they come
        # (_resp.c RespLoop); a connection's own thread waits meanwhile, for everything else.
        self._door_loop: Any = None
        self._door_thread: threading.Thread | None = None
        if _frames is not None and hasattr(_frames, "RespLoop"):
            gets, puts = server.kv.open_get_grants(self._grants_conn), server.kv.open_put_grants(self._grants_conn)
            if gets is not None and puts is not None:
                self._grants = (gets, puts)
                self._door_loop = _frames.RespLoop(RESP_SEND_TIMEOUT_S)
        server.kv.door = self
        server.metrics.registry.register(DoorCollector(self))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        if self.sec_id is not None:
            self._open_default()
        if self._door_loop is not None:
            self._door_thread = threading.Thread(target=self._door_loop.run, name="resp-loop", daemon=True)
            self._door_thread.start()
        self._accept.start()

    def _open_default(self) -> None:
        """The default namespace exists (made with the configured secId if it did not)."""
        conn = Connection(client="resp door")
        try:
            self.server.serve(conn, {"op": "ns_create", "pool": self.pool, "ns": self.namespace,
                                     "sec": self.sec_id, "exist_ok": True})
        except MemfabricError as exc:
            log.warning("RESP door: namespace %r of pool %r cannot be served without AUTH: %s",
                        self.namespace, self.pool, exc)
            self.require_auth = True

    def connected(self) -> int:
        return len(self._clients)

    def figures(self) -> dict:
        """What `memfabric status` and the metrics show of the door."""
        with self._lock:
            commands, errors = dict(self.commands), dict(self.errors)
            connected = len(self._clients)
        return {"address": self.address, "pool": self.pool, "ns": self.namespace, "auth_required": self.require_auth,
                "connected": connected, "connections_total": self.connections_total,
                "rejected_total": self.rejected_total, "commands": commands, "errors": errors}

    def stop(self) -> None:
        self._accept.close()
        with self._lock:
            conns = [c for c, _ in self._clients.values()]
        for client in conns:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)       # its thread wakes and ends
            except OSError:
                pass
        self._accept.join(timeout_s=5)
        if self._door_loop is not None:
            self._door_loop.stop()                           # what it holds goes back, closed
            if self._door_thread is not None:
                self._door_thread.join(timeout=5)
        self.server.disconnected(self._grants_conn)          # the shared grants go

    # ---- connections ----------------------------------------------------------------------------

    def _take(self, sock: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(sock,), name="resp-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _bound_waits(sock, RESP_SEND_TIMEOUT_S)
        except OSError:
            sock.close()
            return
        conn = Connection(client=f"host {peer[0]}")
        # Its GETs and SETs may be answered in compiled code (_resp.c) under the door's grants,
        # which Python's GETs and SETs make with the secId checked (kv/get_grants.py,
        # kv/put_grants.py).
        if self._grants is not None:
            conn.services["kv_get_grants"], conn.services["kv_put_grants"] = self._grants
        keys = None if self.require_auth else Keyspace(self.server, conn, (self.pool, self.namespace, self.sec_id))
        client = Client(commands.next_client_id(), f"{peer[0]}:{peer[1]}", self, keys, conn=conn, sock=sock)
        unauthenticated = keys is None
        evicted: Client | None = None
        with self._lock:
            if unauthenticated and self._unauthenticated and (len(self._unauthenticated) >= self.max_unauthenticated
                                                              or len(self._clients) >= self.max_clients):
                evicted = self._unauthenticated.pop(next(iter(self._unauthenticated)))
                self._clients.pop(evicted.id, None)       # its slot is free now; its thread ends soon
            if len(self._clients) >= self.max_clients:
                self.rejected_total += 1
                full = True
            else:
                self._clients[client.id] = (client, conn)
                if unauthenticated:
                    self._unauthenticated[client.id] = client
                self.connections_total += 1
                full = False
        if evicted is not None:
            _close_with(evicted.sock, "closed: too many connections are waiting to authenticate")
        if full:
            try:
                sock.sendall(p.error("max number of clients reached"))
            except OSError:
                pass
            sock.close()
            return
        try:
            self._loop(client, sock)
        except OSError:
            pass                      # the client went away, or read nothing for too long
        finally:
            with self._lock:
                self._clients.pop(client.id, None)
                self._unauthenticated.pop(client.id, None)
            sock.close()
            if client.buffer is not None:
                client.buffer.close()
            conn.services.pop("kv_get_grants", None)       # the door's: they stay
            conn.services.pop("kv_put_grants", None)
            self.server.disconnected(conn)

    def _loop(self, client: Client, sock: socket.socket) -> None:
        parser = p.RequestParser()
        pending = b""                 # received, for the compiled path to answer first
        # Until it authenticates, a connection has until this to (None: authenticated at once).
        deadline_s = time.monotonic() + self.auth_timeout_s if client.keys is None else None
        while True:
            parser.auth_required = client.keys is None
            if deadline_s is not None:
                if client.keys is not None:
                    deadline_s = None
                    _bound_waits(sock, RESP_SEND_TIMEOUT_S)
                else:
                    left_s = deadline_s - time.monotonic()
                    if left_s <= 0:
                        _close_with(sock, f"closed: no AUTH within {self.auth_timeout_s:g} seconds")
                        return
                    _bound_waits(sock, min(left_s, RESP_SEND_TIMEOUT_S))
            compiled = self._compiled(client, parser)
            if compiled is not None:
                status, data, gets, sets = self._door_loop.serve(sock.fileno(), *compiled, pending,
                                                                 DOOR_COMMANDS_PER_CALL, DOOR_CALL_MAX_S,
                                                                 client.resp == 3)
                pending = b""
                self._count_compiled(gets, sets)
                if status == _frames.DOOR_CLOSED:
                    return            # what it left unfinished goes with it, as with Redis
                if status == _frames.DOOR_MORE:
                    pending = data    # checked again, then back to the compiled path with it
                    continue
                if not data:
                    continue          # idle, or a batch answered: read on
            elif pending:             # the compiled path's rest, no longer its to answer
                data, pending = pending, b""
            else:
                try:
                    data = sock.recv(RESP_RECV_BYTES)
                except (socket.timeout, BlockingIOError):      # SO_RCVTIMEO ran out
                    continue              # idle is fine once authenticated (Redis's timeout 0)
                if not data:
                    return
            try:
                parser.feed(data)
            except p.QueryBufferFull as exc:
                self.server.limited_log.warning("resp buffer", "RESP connection %s closed: %s", client.address, exc)
                return
            out: list[bytes] = []
            size = 0
            closing = False
            while True:
                try:
                    args = parser.next()
                except p.RespProtocolError as exc:
                    out.append(p.error(str(exc)))
                    self._count("protocol", True)
                    closing = True
                    break
                if args is None:
                    break
                reply = self._execute(client, args)
                if reply is None:          # QUIT
                    out.append(p.OK)
                    closing = True
                    break
                if isinstance(reply, (MgetReply, HeldValue)):   # sent as its values are read
                    try:
                        if out:
                            send_all(sock, b"".join(out))
                            out, size = [], 0
                        reply.send(sock)
                    except ReplyCut as exc:
                        self.server.limited_log.warning("resp cut", "RESP connection %s closed half-way "
                                                        "through a %s reply: %s", client.address,
                                                        reply.label.upper(), exc)
                        self._count_error(reply.label)      # counted as a command already
                        return
                    except OSError:
                        raise                          # the client went away, or read nothing for too long
                    except Exception:                  # a bug, half-way through a reply: it is closed
                        self.server.limited_log.exception("resp bug", "RESP %s reply to %s failed",
                                                          reply.label.upper(), client.address)
                        self._count_error(reply.label)
                        return
                    finally:
                        reply.close()                  # its budget and holds, however it ended
                    continue
                out.append(reply)
                size += len(reply)
                parser.auth_required = client.keys is None
                if size >= RESP_REPLY_BUFFER_BYTES:
                    send_all(sock, b"".join(out))
                    out, size = [], 0
                # More of a pipeline after this command: back to the compiled path with it.
                if parser.buffered_bytes() and 0 < len(rest := self._hand_back(client, parser)):
                    pending = rest
                    break
            if out:
                send_all(sock, b"".join(out))
            if closing:
                return

    def _compiled(self, client: Client, parser: p.RequestParser) -> tuple | None:
        """RespLoop.serve's arguments for this connection's next read, when its GETs and SETs may
        be answered in compiled code: authenticated, nothing of the parser's pending,
        grants open, and every key homed here (the pool's one live server); else None."""
        keys = client.keys
        grants = client.conn.services
        if keys is None or not parser.idle() or "kv_get_grants" not in grants or self._door_loop is None:
            return None
        try:
            if keys.servers() != [self.server.server_id]:
                return None
        except MemfabricError:
            return None
        if client.buffer is None:     # an anonymous mapping: memory only as far as a client's reads reach
            client.buffer = mmap.mmap(-1, _frames.DOOR_BUFFER_BYTES)
        pool, ns, sec = keys.creds
        return (client.buffer, grants["kv_get_grants"].table, grants["kv_put_grants"].table, pool, ns, sec)

    def _hand_back(self, client: Client, parser: p.RequestParser) -> bytes:
        """What the parser has left between two requests, taken from it for the compiled
        path (b"": the parser keeps it: that path does not serve this connection, or the
        parser is in the middle of a request, or it is more than that path's buffer)."""
        if parser.buffered_bytes() > DOOR_PENDING_MAX_BYTES:
            return b""
        rest = parser.take_rest()
        if rest and self._compiled(client, parser) is None:
            parser.feed(rest)            # not ours to hand on after all
            return b""
        return rest

    def _count_compiled(self, gets: int, sets: int) -> None:
        if gets or sets:
            with self._lock:
                self.commands["get"] += gets
                self.commands["set"] += sets

    def _execute(self, client: Client, args: list[bytes]) -> bytes | MgetReply | HeldValue | None:
        try:
            reply, label = commands.execute(client, args)
        except Quit:
            self._count("quit", False)
            return None
        except Exception:              # a bug: the client hears that it happened, the connection goes on
            self.server.limited_log.exception("resp bug", "RESP command %.40r failed", args[0])
            self._count("internal", True)
            return internal_error_reply()
        self._count(label, isinstance(reply, bytes) and reply[:1] == b"-")
        return reply

    def _count_error(self, label: str) -> None:
        with self._lock:
            self.errors[label] += 1

    def _count(self, label: str, failed: bool) -> None:
        # Counter updates under the GIL are not atomic across threads: a lock keeps them exact.
        with self._lock:
            self.commands[label] += 1
            if failed:
                self.errors[label] += 1

    # ---- AUTH ------------------------------------------------------------------------------------

    def authenticate(self, client: Client, ns: bytes | None, sec: bytes) -> None:
        conn: Connection = client.conn
        try:
            name = self.namespace if ns is None else check_name("namespace", ns.decode("utf-8"))
            creds = (self.pool, name, bytes(sec))
            if not creds[2]:
                raise RedisError(WRONGPASS)
            self.server.check_creds(conn, creds)
        except (MemfabricError, UnicodeDecodeError):
            raise RedisError(WRONGPASS) from None
        client.keys = Keyspace(self.server, conn, creds)
        with self._lock:
            self._unauthenticated.pop(client.id, None)

    # ---- what INFO and CLIENT LIST show --------------------------------------------------------------

    def client_line(self, client: Client) -> bytes:
        age = int(time.monotonic() - client.since_s)
        ns = client.keys.creds[1] if client.keys is not None else ""
        return (f"id={client.id} addr={client.address} laddr={self.host}:{self.port} name="
                f"{(client.name or b'').decode('latin-1')} age={age} db=0 ns={ns} "
                f"lib-name={client.lib_name.decode('latin-1')} lib-ver={client.lib_ver.decode('latin-1')}").encode()

    def client_lines(self) -> list[bytes]:
        with self._lock:
            clients = [c for c, _ in self._clients.values()]
        return [self.client_line(c) for c in clients]

    def info_section(self, client: Client, section: str) -> bytes:
        if section == "server":
            fields = commands.server_info(client)
        elif section == "clients":
            fields = [("connected_clients", self.connected()), ("maxclients", self.max_clients)]
        elif section == "memory":
            used = self._keyspace_figure(client, "bytes")
            # mem_clients_normal: what Redis counts there, the clients' reply buffers (here:
            # the bytes of values MGET replies hold of the door's reply budget).
            fields = [("used_memory", used), ("maxmemory", 0), ("maxmemory_policy", "noeviction"),
                      ("mem_clients_normal", self.reply_budget.used_bytes),
                      ("reply_budget", self.reply_budget.limit_bytes),
                      ("reply_budget_peak", self.reply_budget.peak_bytes),
                      ("reply_budget_refused", self.reply_budget.refused)]
        elif section == "stats":
            with self._lock:
                total, errors = sum(self.commands.values()), sum(self.errors.values())
            fields = [("total_connections_received", self.connections_total), ("total_commands_processed", total),
                      ("rejected_connections", self.rejected_total), ("total_error_replies", errors),
                      ("keyspace_hits", self._keyspace_figure(client, "hits")),
                      ("keyspace_misses", self._keyspace_figure(client, "misses")),
                      ("expired_keys", self._keyspace_figure(client, "expired")),
                      ("evicted_keys", self._keyspace_figure(client, "evictions"))]
        else:
            keys = self._keyspace_figure(client, "keys")
            fields = [("db0", f"keys={keys},expires=0,avg_ttl=0")] if keys else []
        title = section.capitalize() if section != "keyspace" else "Keyspace"
        lines = [f"# {title}"] + [f"{k}:{v}" for k, v in fields]
        return ("\r\n".join(lines) + "\r\n").encode()

    def _keyspace_figure(self, client: Client, name: str) -> int:
        if client.keys is None:
            return 0
        try:
            return sum(r["stats"][name] for r in client.keys.everywhere("kv_stats"))
        except MemfabricError:
            return 0


def _close_with(sock: socket.socket, why: str) -> None:
    """Tell a connection why it is closed, if it can take the line now (it may read nothing),
    and close it: its thread wakes from its read and ends."""
    try:
        sock.send(p.error(why), socket.MSG_DONTWAIT)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

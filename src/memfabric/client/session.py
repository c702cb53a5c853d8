"""A client session: the connection to this host's server, and links to the others.

`memfabric.init(ock_path)` reads the fabric configuration, connects to a server on this
host, and learns the rest of the cluster from it. Namespaces are opened with their secId;
objects are BigMemory handles.
"""

from __future__ import annotations

import atexit
import hmac
import numbers
import os
import resource
import threading
import weakref
from typing import Any, Iterable

from ..core.namespaces import check_attribute, check_name, check_sec_id
from ..bigmemory.objects import parse_bm_id
from ..datapath import forks
from ..datapath.connect import connect_to
from ..datapath.link import Creds, ServerLink
from ..datapath.reentry import methods_code, refuse_reentry
from ..datapath.rpc_link import RpcLink
from ..transport import rpc
from ..errors import InvalidArgument, MemfabricError, NotInitialized, ServerUnavailable, Timeout
from ..limits import BUSY_POLL_US, DEFAULT_REQUEST_TIMEOUT_S, MAX_REQUEST_TIMEOUT_S
from ..config import FABRIC_FILE, ConfigError, check_busy_poll_us, load_fabric_config
from ..bigmemory import batch
from ..bigmemory.client import BigMemory, NamespaceObjects
from ..kv.client import KV
from ..plog import client as plog_client
from ..plog.client import Plog
from .arguments import as_bool, as_int, as_path
from .types import NamespaceInfo


# Sessions still open when the interpreter exits are closed then (a Ctrl-C that ends a
# program mid-call included): requests given up on are settled, nothing is left behind.
_open_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()


@atexit.register
def _close_open_sessions() -> None:
    for session in list(_open_sessions):
        try:
            session.close()
        except Exception:       # noqa: BLE001 (exiting: nothing more to do about it)
            pass


def _raise_fd_limit() -> None:
    # Each mapped segment keeps its fd (needed again to map objects contiguously).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check_timeout(timeout_s: object) -> float:
    """A request timeout: a positive number of seconds (numpy's too), at most a day. It rides
    in every request as the caller's budget, so it must be a plain float."""
    if isinstance(timeout_s, numbers.Real) and not isinstance(timeout_s, bool):
        seconds = float(timeout_s)
        if 0 < seconds <= MAX_REQUEST_TIMEOUT_S:
            return seconds
    raise InvalidArgument(f"timeout_s must be a number of seconds in (0, {MAX_REQUEST_TIMEOUT_S:g}], "
                          f"got {timeout_s!r}")


def _load_fabric(ock_path: object) -> Any:
    """The fabric configuration at an ockPath; a missing one says how to start a fabric."""
    path = os.fsdecode(as_path(ock_path, "ock_path"))
    try:
        return load_fabric_config(path)
    except ConfigError as exc:
        message = str(exc)
    if os.path.isdir(path) or not os.path.exists(path) and not path.endswith(".toml"):
        if not os.path.exists(os.path.join(path, FABRIC_FILE)):
            message = f"no fabric at {path} (no {FABRIC_FILE}): start one with `memfabric up --dir {path}`"
    elif not os.path.exists(path):
        message += " (an ockPath is a fabric directory, its fabric.toml, or a server's configuration file)"
    raise InvalidArgument(message)


def _how_to_start(source: str) -> str:
    """What to run when no server of a fabric answers."""
    if os.path.basename(source) == FABRIC_FILE:
        return f"is the fabric running? `memfabric up --dir {os.path.dirname(source)}` starts it"
    if os.path.basename(source) == "remote.toml":
        return "are its servers running, and reachable from here?"
    return f"is the server running? `memfabric server --config {source}` starts it"


class Session:
    """A client's connection to one fabric: namespaces are created, opened, listed and
    destroyed here; their objects are BigMemory handles. `memfabric.init(ock_path, server=,
    timeout_s=, busy_poll_us=)` makes one; see it for the arguments and errors.

    `timeout_s` is every request's timeout. One session may be shared by any number of
    threads. Use it as a context manager, or call close(): every call on it, its
    namespaces and handles raises NOT_INITIALIZED after that."""

    def __init__(self, ock_path: str, *, server: int | None = None,
                 timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, busy_poll_us: int = BUSY_POLL_US) -> None:
        self.fabric = _load_fabric(ock_path)
        _raise_fd_limit()
        self.timeout_s = _check_timeout(timeout_s)
        try:
            busy_poll_us = check_busy_poll_us(as_int(busy_poll_us, "busy_poll_us"))
        except ValueError as exc:
            raise InvalidArgument(f"busy_poll_us {exc}") from None
        self.busy_poll_s = busy_poll_us / 1e6
        self.closed = False
        _open_sessions.add(self)
        # Links are made under it. An RLock to tell its owner: a signal's handler that needs it
        # while its own thread holds it (connecting) gets BUSY, not a wait for ever (_locked).
        self._lock = threading.RLock()
        self._links: dict[int, ServerLink] = {}
        # Handles by id, so compat calls find the layout again; weak: a dropped handle goes.
        # Threads add to it while another walks it (destroy): its own lock.
        self._handles: weakref.WeakValueDictionary[str, BigMemory] = weakref.WeakValueDictionary()
        # An RLock: a signal's handler (an open(), an alloc()) may come while its own thread is in
        # here (WeakValueDictionary runs Python), and must not wait for it for ever. Each use is
        # one step of the dict's but the walk of _forget_namespace, which takes a snapshot first.
        self._handles_lock = threading.RLock()
        forks.fresh_locks(self, "_lock", "_handles_lock")
        sockets = self.fabric.ipc_sockets
        if server is not None:
            server = as_int(server, "server")
            if not 0 <= server < len(sockets):
                raise InvalidArgument(f"server must be an index into the {len(sockets)} configured servers")
            sockets = [sockets[server]]
        self._token: bytes | None = None
        self._tls = None
        if self.fabric.rpc_addresses or (self.fabric.cluster and self.fabric.cluster.token_file):
            try:
                self._token = self.fabric.cluster.token()
            except ConfigError as exc:
                if not sockets:
                    raise InvalidArgument(str(exc)) from None
            if self.fabric.cluster.tls_ca:
                self._tls = rpc.client_tls(self.fabric.cluster.tls_ca)
        errors = []
        self.local: ServerLink | RpcLink | None = None
        for path in sockets:                              # a server on this host first
            try:
                self.local = ServerLink(path, self.timeout_s, busy_poll_s=self.busy_poll_s)
                break
            except MemfabricError as exc:
                errors.append(str(exc))
        if self.local is None and self._token is not None:
            for address in self.fabric.rpc_addresses:     # else any server, over the network
                try:
                    self.local = RpcLink(address, self._token, self._tls, self.timeout_s, busy_poll_s=self.busy_poll_s)
                    break
                except MemfabricError as exc:
                    errors.append(f"{address}: {exc}")
        if self.local is None:
            raise ServerUnavailable("no server of this fabric answers (" + "; ".join(errors) + "): "
                                    + _how_to_start(self.fabric.source))
        self._links[self.local.server_id] = self.local

    def check_open(self) -> None:
        """Raises NOT_INITIALIZED once the session is closed."""
        if self.closed:
            raise NotInitialized("the session is closed: open another with memfabric.init(ock_path)")

    # ---- links ----------------------------------------------------------------------------

    def home(self) -> ServerLink | RpcLink:
        """This client's own server (reconnected if the link broke)."""
        return self.link(self.local.server_id)

    def _cached_link(self, server_id: int) -> ServerLink | None:
        link = self._links.get(server_id)
        return None if link is None or link.closed else link

    def link(self, server_id: int) -> ServerLink:
        """The link to server `server_id`, reconnected if it broke (never once the session is
        closed). Raises SERVER_UNAVAILABLE for a server that is not alive or not known."""
        link = self._links.get(server_id)
        if link is not None and not link.closed:
            return link
        with self._locked(f"a link to server {server_id}"):
            self.check_open()
            link = self._links.get(server_id)
            if link is not None and not link.closed:
                return link
            if link is not None:
                link.close()        # finishes a close an interruption (Ctrl-C) cut short
            if server_id == self.local.server_id or self.local.closed:
                self.local.close()
                try:
                    self.local = self._reconnect(self.local)
                    self._links[self.local.server_id] = self.local
                except MemfabricError:
                    if server_id == self.local.server_id:
                        raise
                    # This host's server is down: the others still serve; any open link knows them.
                if server_id == self.local.server_id:
                    return self.local
            for record in self._cluster_view(server_id):
                if record["server_id"] == server_id:
                    if not record["alive"]:
                        raise ServerUnavailable(f"server {server_id} is not alive")
                    link = connect_to(server_id, record["host"], record["ipc_socket"], record["rpc_address"],
                                      local_host=self.local.host if self.local.is_local else None,
                                      token=self._token, tls=self._tls, timeout_s=self.timeout_s,
                                      busy_poll_s=self.busy_poll_s)
                    self._links[server_id] = link
                    return link
        raise ServerUnavailable(f"the cluster knows no server {server_id}")

    def _locked(self, what: str) -> Any:
        """The session's lock, to take with `with`; BUSY when this thread holds it part way
        through a call of the session's further up (a signal's handler run while its thread
        connects would wait for it for ever); let go when held with none (a Ctrl-C left it)."""
        if self._lock._is_owned():
            refuse_reentry(self, (self._lock,), _SESSION_CODES, f"this session ({what})")
        return self._lock

    def _cluster_view(self, wanted: int) -> list[dict[str, Any]]:
        """The cluster as a live server sees it: this host's, or any other this session has a
        link to, or any the fabric's configuration names (under the session lock)."""
        candidates = [self.local] + [ln for ln in self._links.values() if ln is not self.local]
        for link in candidates:
            if not link.closed:
                try:
                    return link.call("cluster_view")["servers"]
                except (ServerUnavailable, Timeout):
                    continue
        for path in self.fabric.ipc_sockets:
            try:
                link = ServerLink(path, self.timeout_s, busy_poll_s=self.busy_poll_s)
            except MemfabricError:
                continue
            self._links[link.server_id] = link
            return link.call("cluster_view")["servers"]
        for address in self.fabric.rpc_addresses if self._token is not None else []:
            try:
                link = RpcLink(address, self._token, self._tls, self.timeout_s, busy_poll_s=self.busy_poll_s)
            except MemfabricError:
                continue
            self._links[link.server_id] = link
            return link.call("cluster_view")["servers"]
        raise ServerUnavailable(f"no server of this fabric answers (server {wanted} was asked for)")

    def _reconnect(self, link: ServerLink | RpcLink) -> ServerLink | RpcLink:
        if link.is_local:
            return ServerLink(link.ipc_socket, self.timeout_s, busy_poll_s=self.busy_poll_s)
        return RpcLink(link.address, self._token, self._tls, self.timeout_s, busy_poll_s=self.busy_poll_s)

    def _link_for_object(self, bm_id: str) -> ServerLink:
        return self.link(parse_bm_id(bm_id)[0])

    # ---- handles by id ------------------------------------------------------------------------

    def _remember(self, bm: BigMemory) -> None:
        with self._handles_lock:
            self._handles[bm.bm_id] = bm

    def _cached_handle(self, bm_id: str) -> BigMemory | None:
        with self._handles_lock:
            return self._handles.get(bm_id)

    def _forget(self, bm_id: str) -> None:
        with self._handles_lock:
            self._handles.pop(bm_id, None)

    def _forget_namespace(self, pool: str, ns: str) -> None:
        with self._handles_lock:
            for bm_id in tuple(self._handles.data):     # (in one step: no handler's change comes in it)
                bm = self._handles.get(bm_id)
                if bm is not None and bm.namespace.creds[:2] == (pool, ns):
                    self._handles.pop(bm_id, None)

    # ---- namespaces -------------------------------------------------------------------------

    def create_namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default",
                         attribute: int = 0, exist_ok: bool = False) -> "Namespace":
        """Create namespace `ns` (1-64 of A-Z a-z 0-9 _ . : -) in `pool`, guarded by `sec_id`
        (1-256 bytes, or a str as UTF-8: every later use must present it), with `attribute`
        (an integer in [0, 2**31) the fabric keeps for you).

        With `exist_ok=True`, a namespace of that name is opened instead, if `sec_id` is its
        own: a script can run again. Returns its Namespace. Raises NAMESPACE_EXISTS (without
        exist_ok, or with a different attribute), PERMISSION_DENIED (exist_ok and another
        secId), NO_SUCH_POOL, LIMIT_EXCEEDED (this client's or the cluster's namespace limit),
        INVALID_ARGUMENT for a bad name, secId or attribute."""
        handle = Namespace(self, pool, ns, sec_id)
        attribute = check_attribute(as_int(attribute, "attribute"))
        self.home().call("ns_create", **handle.wire_creds, attribute=attribute,
                         exist_ok=as_bool(exist_ok, "exist_ok"))
        return handle

    def namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default") -> "Namespace":
        """A handle on the existing namespace `ns` of `pool`, with its `sec_id`. No server is
        asked: the secId is checked on first use (PERMISSION_DENIED then), and a namespace
        that does not exist fails then with NO_SUCH_NAMESPACE. Raises INVALID_ARGUMENT for a
        bad name or secId, NOT_INITIALIZED on a closed session."""
        self.check_open()
        return Namespace(self, pool, ns, sec_id)

    def destroy_namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default") -> None:
        """Destroy namespace `ns` of `pool` and every object in it, on every server; its
        memory goes back to the pool and its name is free again. Every handle and mapping of
        it dies (mappings read zeros). Returns None. Raises NO_SUCH_NAMESPACE,
        PERMISSION_DENIED for a wrong `sec_id`."""
        self.namespace(ns, sec_id, pool=pool).destroy()

    def namespaces(self) -> list[NamespaceInfo]:
        """Every namespace of the cluster, each a NamespaceInfo (pool, ns, attribute, and its
        objects' count and bytes over the live servers). Needs no secId: names and figures
        only. Raises NOT_INITIALIZED, SERVER_UNAVAILABLE."""
        return [NamespaceInfo(**row) for row in self.home().call("ns_query")["namespaces"]]

    def servers(self) -> list[dict[str, Any]]:
        """The cluster's servers as its service knows them: per server a dict with
        `server_id`, `host`, `alive`, `pid`, `pools` (figures per pool), and its addresses.
        Raises NOT_INITIALIZED, SERVER_UNAVAILABLE (no server of the fabric answers)."""
        try:
            return self.home().call("cluster_view")["servers"]
        except (ServerUnavailable, Timeout):
            # This session's own server is gone: any other live one knows the cluster.
            with self._locked("the cluster's view"):
                self.check_open()
                return self._cluster_view(self.local.server_id)

    # ---- batches across objects -------------------------------------------------------------

    def read_many(self, items: Iterable[tuple[BigMemory, int, int | None, Any]]) -> list[int]:
        """Read many (object, offset, length, buffer) items at once: each buffer[:length] is
        filled in place from [offset, offset+length) of its object (length None: the whole
        buffer). Bytes on this host are copied with no round trip; bytes elsewhere go as one
        request per server, all servers at once, straight into the buffers.

        Every item is checked first; a bad one (not this session's object, a range outside
        the object, a buffer too small or read-only) raises and nothing moves. Then returns
        one error code per item, 0 when done: a freed object, a lost server or a timeout
        fails only its items (which may have filled part of their buffers). See
        bigmemory/batch.py."""
        return batch.read_many(self, items)

    def write_many(self, items: Iterable[tuple[BigMemory, int, int | None, Any]]) -> list[int]:
        """Write many (object, offset, length, buffer) items at once: buffer[:length] (any
        buffer) goes to [offset, offset+length) of its object. Checked and answered as
        read_many is: a failed item may have written part of its range."""
        return batch.write_many(self, items)

    # ---- life ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection (revoking every mapping made through them). From here on,
        every call on this session, its namespaces and handles raises NOT_INITIALIZED; a call
        under way in another thread ends with that or SERVER_UNAVAILABLE."""
        with self._locked("closing the session"):   # a link() under way finishes first, its link closed too
            self.closed = True
            links = list(self._links.values())
        with self._handles_lock:
            self._handles.clear()
        # Let go of only once all are closed: a close cut short (Ctrl-C) is finished by the
        # next close() (a program's, or atexit's), not left to the collector.
        for link in links:
            link.close()
        with self._lock:
            self._links.clear()

    def __enter__(self) -> "Session":
        self.check_open()
        return self

    def __repr__(self) -> str:
        return f"Session({self.fabric.source!r}{', closed' if self.closed else ''})"

    def __exit__(self, *exc: object) -> None:
        self.close()


class Namespace(NamespaceObjects):
    """A namespace, (pool, ns) with its secId: where objects live (`alloc`, `open`,
    `objects`, `batch_free`, `gather`; bigmemory/client.py's NamespaceObjects). Made by
    `Session.create_namespace` or `Session.namespace`; `pool` and `name` name it."""

    def __init__(self, session: Session, pool: str, ns: str, sec_id: str | bytes) -> None:
        self.session = session
        self.pool = check_name("pool", pool)
        self.name = check_name("namespace", ns)
        self.sec_id = check_sec_id(sec_id)
        self.creds: Creds = (self.pool, self.name, self.sec_id)
        self.wire_creds = {"pool": self.pool, "ns": self.name, "sec": self.sec_id}

    def __repr__(self) -> str:
        return f"Namespace({self.pool!r}/{self.name!r})"

    def _same_secret(self, sec_id: str | bytes) -> bool:
        return hmac.compare_digest(self.sec_id, check_sec_id(sec_id))

    def kv(self) -> KV:
        """The namespace's key-value store (MemKV): one keyspace per namespace, guarded by its
        secId. See memfabric.kv.client.KV."""
        kv = self.__dict__.get("_kv")
        if kv is None:
            kv = self.__dict__.setdefault("_kv", KV(self))
        return kv

    def create_plog(self, name: str, capacity: int, *, replicas: int = 1, pool: str | None = None) -> Plog:
        """Create plog `name` (MemPlog: an append-only log of `capacity` bytes, records
        framed and checksummed) in this namespace, on a pmem or ramdisk pool: this namespace's
        (pool None), or the namespace of this name and secId in `pool`. Its home is this
        client's server when it gives the pool. `replicas`: copies on other servers; only 1
        (the home alone) for now. Raises INVALID_ARGUMENT for a dram pool, a
        name taken or a bad argument, OUT_OF_MEMORY, PERMISSION_DENIED. See plog/client.py."""
        return plog_client.create_plog(self, name, capacity, replicas=replicas, pool=pool)

    def plog(self, name: str, *, pool: str | None = None) -> Plog:
        """The existing plog `name` (NO_SUCH_OBJECT when no live server has it); `pool` as for
        create_plog."""
        return plog_client.open_plog(self, name, pool=pool)

    def plogs(self, *, pool: str | None = None) -> list[dict]:
        """info() of each of the namespace's plogs, on every live server, by name; `pool` as
        for create_plog."""
        return plog_client.list_plogs(self, pool=pool)

    def destroy(self) -> None:
        """Destroy the namespace and every object in it, on every server (as
        Session.destroy_namespace). Returns None. Raises NO_SUCH_NAMESPACE, PERMISSION_DENIED."""
        self.session.home().call("ns_destroy", **self.wire_creds)
        self.session._forget_namespace(self.pool, self.name)
        for link in list(self.session._links.values()):
            link.release_namespace(self.pool, self.name)   # so the servers may lend it again


def init(ock_path: str, *, server: int | None = None, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
         busy_poll_us: int = BUSY_POLL_US) -> Session:
    """Start a client session on the fabric described at `ock_path` (a fabric directory as
    `memfabric up` makes it, its fabric.toml, a server's configuration file, or a
    remote.toml for a host without a server). Returns the Session.

    `server`: the index of the configured server to connect to (default: the first on this
    host that answers, else any over the network). `timeout_s`: each request's timeout, in
    (0, 86400] seconds (10 by default). `busy_poll_us`: how long a call polls for its reply
    before sleeping, 0 to 10000 (0: never poll). Polling saves the wake-up, most of a control
    call's latency; it costs this thread's CPU only while the server answers within the window.

    Raises INVALID_ARGUMENT for a missing or wrong configuration (no fabric there says how to
    start one) or a bad argument, SERVER_UNAVAILABLE when no server of the fabric answers."""
    return Session(ock_path, server=server, timeout_s=timeout_s, busy_poll_us=busy_poll_us)


_SESSION_CODES = methods_code(Session)

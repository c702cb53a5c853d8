"""A client session: the connection to this host's server, and links to the others.

`memfabric.init(ock_path)` reads the fabric configuration, connects to a server on this
host, and learns the rest of the cluster from it. Namespaces are opened with their secId;
objects are BigMemory handles.
"""

from __future__ import annotations

import hmac
import numbers
import resource
import threading
import weakref
from typing import Any, Iterable

from ..core.namespaces import check_attribute, check_name, check_sec_id
from ..bigmemory.objects import parse_bm_id
from ..datapath.connect import connect_to
from ..datapath.link import Creds, ServerLink
from ..datapath.rpc_link import RpcLink
from ..transport import rpc
from ..errors import InvalidArgument, MemfabricError, NotInitialized, ServerUnavailable
from ..limits import BUSY_POLL_US, DEFAULT_REQUEST_TIMEOUT_S, MAX_REQUEST_TIMEOUT_S
from ..config import ConfigError, check_busy_poll_us, load_fabric_config
from ..bigmemory import batch
from ..bigmemory.client import BigMemory, NamespaceObjects
from .types import NamespaceInfo


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


class Session:
    def __init__(self, ock_path: str, *, server: int | None = None,
                 timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, busy_poll_us: int = BUSY_POLL_US) -> None:
        try:
            self.fabric = load_fabric_config(ock_path)
        except ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        _raise_fd_limit()
        self.timeout_s = _check_timeout(timeout_s)
        try:
            check_busy_poll_us(busy_poll_us)
        except ValueError as exc:
            raise InvalidArgument(f"busy_poll_us {exc}") from None
        self.busy_poll_s = busy_poll_us / 1e6
        self.closed = False
        self._lock = threading.Lock()
        self._links: dict[int, ServerLink] = {}
        # Handles by id, so compat calls find the layout again; weak: a dropped handle goes.
        # Threads add to it while another walks it (destroy): its own lock.
        self._handles: weakref.WeakValueDictionary[str, BigMemory] = weakref.WeakValueDictionary()
        self._handles_lock = threading.Lock()
        sockets = self.fabric.ipc_sockets
        if server is not None:
            if type(server) is not int or not 0 <= server < len(sockets):
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
            raise ServerUnavailable("no server of this fabric answers: " + "; ".join(errors))
        self._links[self.local.server_id] = self.local

    def check_open(self) -> None:
        if self.closed:
            raise NotInitialized("the session is closed")

    # ---- links ----------------------------------------------------------------------------

    def home(self) -> ServerLink | RpcLink:
        """This client's own server (reconnected if the link broke)."""
        return self.link(self.local.server_id)

    def cached_link(self, server_id: int) -> ServerLink | None:
        link = self._links.get(server_id)
        return None if link is None or link.closed else link

    def link(self, server_id: int) -> ServerLink:
        """The link to a server, reconnected if it broke (never once the session is closed)."""
        link = self._links.get(server_id)
        if link is not None and not link.closed:
            return link
        with self._lock:
            self.check_open()
            link = self._links.get(server_id)
            if link is not None and not link.closed:
                return link
            if server_id == self.local.server_id or self.local.closed:
                self.local = self._reconnect(self.local)
                self._links[self.local.server_id] = self.local
                if server_id == self.local.server_id:
                    return self.local
            for record in self.local.call("cluster_view")["servers"]:
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

    def _reconnect(self, link: ServerLink | RpcLink) -> ServerLink | RpcLink:
        if link.is_local:
            return ServerLink(link.ipc_socket, self.timeout_s, busy_poll_s=self.busy_poll_s)
        return RpcLink(link.address, self._token, self._tls, self.timeout_s, busy_poll_s=self.busy_poll_s)

    def link_for_object(self, bm_id: str) -> ServerLink:
        return self.link(parse_bm_id(bm_id)[0])

    # ---- handles by id ------------------------------------------------------------------------

    def remember(self, bm: BigMemory) -> None:
        with self._handles_lock:
            self._handles[bm.bm_id] = bm

    def cached_handle(self, bm_id: str) -> BigMemory | None:
        with self._handles_lock:
            return self._handles.get(bm_id)

    def forget(self, bm_id: str) -> None:
        with self._handles_lock:
            self._handles.pop(bm_id, None)

    def forget_namespace(self, pool: str, ns: str) -> None:
        with self._handles_lock:
            for bm_id in [i for i, bm in self._handles.items() if bm.namespace.creds[:2] == (pool, ns)]:
                self._handles.pop(bm_id, None)

    # ---- namespaces -------------------------------------------------------------------------

    def create_namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default",
                         attribute: int = 0) -> "Namespace":
        handle = Namespace(self, pool, ns, sec_id)
        self.home().call("ns_create", **handle.wire_creds, attribute=check_attribute(attribute))
        return handle

    def namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default") -> "Namespace":
        """A handle on an existing namespace; the secId is checked on first use."""
        self.check_open()
        return Namespace(self, pool, ns, sec_id)

    def destroy_namespace(self, ns: str, sec_id: str | bytes, *, pool: str = "default") -> None:
        self.namespace(ns, sec_id, pool=pool).destroy()

    def namespaces(self) -> list[NamespaceInfo]:
        return [NamespaceInfo(**row) for row in self.home().call("ns_query")["namespaces"]]

    def servers(self) -> list[dict[str, Any]]:
        return self.home().call("cluster_view")["servers"]

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
        with self._lock:           # a link() under way finishes first, and its link is closed too
            if self.closed:
                return
            self.closed = True
            links = list(self._links.values())
            self._links.clear()
        with self._handles_lock:
            self._handles.clear()
        for link in links:
            link.close()

    def __enter__(self) -> "Session":
        self.check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Namespace(NamespaceObjects):
    """(pool, ns) with its secId: where every semantic's data lives (BigMemory objects:
    bigmemory/client.py's NamespaceObjects)."""

    def __init__(self, session: Session, pool: str, ns: str, sec_id: str | bytes) -> None:
        self.session = session
        self.pool = check_name("pool", pool)
        self.name = check_name("namespace", ns)
        self.sec_id = check_sec_id(sec_id)
        self.creds: Creds = (self.pool, self.name, self.sec_id)
        self.wire_creds = {"pool": self.pool, "ns": self.name, "sec": self.sec_id}

    def __repr__(self) -> str:
        return f"Namespace({self.pool!r}/{self.name!r})"

    def same_secret(self, sec_id: str | bytes) -> bool:
        return hmac.compare_digest(self.sec_id, check_sec_id(sec_id))

    def destroy(self) -> None:
        """Destroy the namespace and every object in it, on every server."""
        self.session.home().call("ns_destroy", **self.wire_creds)
        self.session.forget_namespace(self.pool, self.name)
        for link in list(self.session._links.values()):
            link.release_namespace(self.pool, self.name)   # so the servers may lend it again


def init(ock_path: str, *, server: int | None = None, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
         busy_poll_us: int = BUSY_POLL_US) -> Session:
    """Start a client session on the fabric described at `ock_path` (a fabric directory,
    its fabric.toml, or a server's configuration file).

    `busy_poll_us`: how long a call polls for its reply before sleeping (0: never poll).
    Polling saves the wake-up, most of a control call's latency; it costs this thread's CPU
    only while the server answers within the window."""
    return Session(ock_path, server=server, timeout_s=timeout_s, busy_poll_us=busy_poll_us)

"""`memfabric server --config PATH`: run one server in the foreground until SIGINT/SIGTERM/SIGHUP."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys

from ..capacity import NotEnoughCapacity, check_pools, segment_slots
from ..errors import MemfabricError
from ..config import ConfigError, load_server_config
from ..transport import rpc
from .ipc_front import IpcFront
from .metrics import MetricsEndpoint
from .rpc_front import RpcFront
from ..kv.resp.front import RespFront
from .server import Server
from ..stop_request import StopRequest, stop_signals


PR_SET_DUMPABLE = 4


SWITCH_INTERVAL_S = 0.0005


def make_undumpable() -> None:
    """Every namespace's memory is an fd of this process. A process of the same user could
    open them as /proc/<pid>/fd/N (or read /proc/<pid>/mem, or ptrace us) and bypass every
    secId; a process that is not dumpable the kernel opens to no one but a holder of
    CAP_SYS_PTRACE. It also means no core dump, which would hold pool memory too."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(errno)}")


def raise_fd_limit() -> None:
    """Each segment costs the server two fds (its memfd or file, and the mapping's own), each
    client connection one: the common soft limit of 1,024 would cap a pool at a few hundred
    small namespaces. Take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_server(config_path: str) -> int:
    # First of all: before any secret is read or any fd of pool memory exists.
    try:
        make_undumpable()
        raise_fd_limit()
    except OSError as exc:
        print(f"memfabric server: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        cfg = load_server_config(config_path)
    except ConfigError as exc:
        print(f"memfabric server: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        notes = check_pools(cfg.pools, cfg.source)    # before anything is written or reserved
        segment_slots(cfg.pools, cfg.segment_bytes)
    except NotEnoughCapacity as exc:
        print(f"memfabric server: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    # A thread waiting for the GIL asks its holder to let go after the switch interval (5 ms by
    # default): the compiled loops take the GIL a moment per put and again at once, so a
    # request Python serves meanwhile waited about that at each of its waits, and held the
    # keyspace's locks meanwhile (a door's 64 KiB SETs served by Python took 5 ms each, the
    # others stalled behind them).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for note in notes:
        logging.getLogger("memfabric.server").warning("%s: %s", cfg.source, note)
    stop = StopRequest()
    try:
        server = Server(cfg, stop=stop)
    except MemfabricError as exc:      # the cluster service cannot be opened
        print(f"memfabric server: cannot start: {exc}", file=sys.stderr)
        return 1

    stop.on_signals(stop_signals())      # the server's start polls it too (Server(stop=))
    fronts: list = []
    metrics = None
    try:
        if cfg.metrics_listen:       # bound before memory is reserved: a taken port fails at once
            try:
                metrics = MetricsEndpoint(cfg.metrics_listen, server,
                                          lambda: {front.door: front.connected() for front in fronts})
            except OSError as exc:
                raise OSError(exc.errno, f"server.metrics_listen {cfg.metrics_listen}: "
                                         f"{exc.strerror or exc}") from None
            metrics.start()
        if cfg.resp_listen:          # bound before memory is reserved too
            try:
                fronts.append(RespFront(server, cfg.resp_listen, cfg.resp_pool, cfg.resp_namespace, cfg.resp_sec_id,
                                        cfg.resp_max_clients, cfg.resp_auth_timeout_s, cfg.resp_reply_budget_bytes))
            except OSError as exc:
                raise OSError(exc.errno, f"server.resp_listen {cfg.resp_listen}: {exc.strerror or exc}") from None
        server.start()
        fronts.append(IpcFront(server, cfg.ipc_socket, cfg.max_clients, cfg.busy_poll_us / 1e6,
                               cfg.ipc_socket_mode, cfg.ipc_socket_gid))
        if server.rpc_listener is not None:
            tls = rpc.server_tls(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
            fronts.append(RpcFront(server, server.rpc_listener, server.token, tls, cfg.max_clients,
                                   cfg.busy_poll_us / 1e6))
        for front in fronts:
            front.start()
    except (MemfabricError, ConfigError, OSError) as exc:
        print(f"memfabric server: cannot start: {exc}", file=sys.stderr)
        for front in fronts:
            front.stop()
        if metrics is not None:
            metrics.stop()
        server.stop()
        return 2 if isinstance(exc, ConfigError) else 1
    pools = ", ".join(f"{p.name}={p.capacity_bytes}B {p.medium}" for p in cfg.pools)
    server.announce()
    resp = next((f for f in fronts if f.door == "resp"), None)
    rpc_address = next((s.rpc_address for s in server.view(fresh=True) if s.server_id == server.server_id), "")
    print(f"memfabric server {server.server_id} ready pid={os.getpid()} ipc={cfg.ipc_socket} "
          f"rpc={rpc_address or '-'} metrics={metrics.address if metrics else '-'} "
          f"{f'resp={resp.address} ' if resp else ''}pools: {pools}", flush=True)
    # Polled: a SIGTERM the kernel hands to another thread interrupts no wait here, and its
    # handler runs only once this thread runs Python again (seen: a server that ignored it).
    stop.wait(float("inf"))
    stop.ignore_signals()      # asked once is enough; one more as we exit must not kill us
    for front in fronts:
        front.stop()
    if metrics is not None:
        metrics.stop()
    server.stop()
    print(f"memfabric server {server.server_id} stopped", flush=True)
    return 0

"""Configuration files (TOML) of servers and clients, validated into plain dataclasses.

Every problem is one ConfigError naming the key and what is wrong with it; the CLI
prints it and exits with status 2.
"""

from __future__ import annotations

import grp
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .cluster import BACKENDS
from .core.namespaces import check_name
from .errors import InvalidArgument
from .limits import (BUSY_POLL_US, HEARTBEAT_INTERVAL_S, LIVENESS_TIMEOUT_S, MAX_BUSY_POLL_US,
                     MAX_CLIENTS_PER_SERVER, MAX_NAMESPACES, MAX_NAMESPACES_PER_CLIENT, MIN_BEATS_PER_LIVENESS_TIMEOUT,
                     MIN_SEGMENT_BYTES, PAGE_SIZE_BYTES)
from .limits import RESP_AUTH_TIMEOUT_S, RESP_MAX_CLIENTS, RESP_REPLY_BUDGET_BYTES, RESP_REPLY_BUDGET_MIN_BYTES
from .media.base import MEDIA
from .units import parse_size

FABRIC_FILE = "fabric.toml"
DEFAULT_SEGMENT_BYTES = 4 << 20


class ConfigError(Exception):
    """A configuration file is wrong; the message names the file, the key and the problem."""


@dataclass
class PoolConfig:
    name: str
    medium: str
    capacity_bytes: int
    path: str | None = None


@dataclass
class ClusterConfig:
    backend: str
    path: str | None = None                 # embedded: the SQLite file
    endpoints: list[str] = field(default_factory=list)   # etcd: HOST:PORT of its client URLs
    prefix: str = "/memfabric"                          # etcd: where this fabric's keys live
    liveness_timeout_s: float = LIVENESS_TIMEOUT_S
    token_file: str | None = None      # the cluster token, proved (never sent) on every RPC connection
    tls_ca: str | None = None          # set: RPC connections to servers use TLS, checked against this CA

    def token(self) -> bytes:
        if self.token_file is None:
            raise ConfigError("cluster.token_file is required to talk to servers over RPC")
        try:
            with open(self.token_file, "rb") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cluster.token_file {self.token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise ConfigError(f"cluster.token_file {self.token_file}: a token needs at least 16 bytes")
        return token

    def settings(self) -> dict[str, Any]:
        return {"path": self.path, "endpoints": self.endpoints, "prefix": self.prefix,
                "liveness_timeout_s": self.liveness_timeout_s}


@dataclass
class ServerConfig:
    source: str
    data_dir: str
    ipc_socket: str
    rpc_listen: str
    host: str
    segment_bytes: int
    min_segment_bytes: int
    tls_cert: str | None
    tls_key: str | None
    heartbeat_interval_s: float
    max_clients: int
    busy_poll_us: int
    cluster: ClusterConfig
    pools: list[PoolConfig]
    # Who may connect to the IPC socket is who may be a client: by default the server's user
    # alone; a group (and mode 0660) opens it to that group's members.
    ipc_socket_mode: int = 0o600
    ipc_socket_gid: int | None = None
    max_namespaces_per_client: int = MAX_NAMESPACES_PER_CLIENT
    metrics_listen: str = ""        # HOST:PORT of the Prometheus endpoint; empty: none
    # The Redis-protocol door (kv/resp/): HOST:PORT, empty: none. It serves namespace
    # resp_namespace of pool resp_pool, whose secId is resp_sec_id (from resp_sec_id_file):
    # without AUTH on loopback, with AUTH elsewhere (or without a secId configured).
    resp_listen: str = ""
    resp_pool: str = "default"
    resp_namespace: str = "default"
    resp_sec_id: bytes | None = None
    resp_max_clients: int = RESP_MAX_CLIENTS
    resp_auth_timeout_s: float = RESP_AUTH_TIMEOUT_S
    resp_reply_budget_bytes: int = RESP_REPLY_BUDGET_BYTES


def _resp_sec_id(s: "_Table", base_dir: str) -> bytes | None:
    """The door's default namespace's secId: resp_sec_id_file (its first line), or none."""
    path = _maybe_path(s.get("resp_sec_id_file", str, None), base_dir)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            sec = f.read(4096).split(b"\n", 1)[0].strip()
    except OSError as exc:
        raise s._fail("resp_sec_id_file", f"cannot read {path}: {exc.strerror}") from None
    if not sec:
        raise s._fail("resp_sec_id_file", f"{path} is empty")
    return sec


class _Table:
    """Reads keys out of one TOML table, remembering which were used."""

    def __init__(self, source: str, where: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [{where}] must be a table")
        self.source, self.where, self.data, self.used = source, where, data, set()

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where}.{key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., ) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self._fail(key, "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self._fail(key, f"must be a {names}, got {value!r}")
        return value

    def size(self, key: str, default: Any = ...) -> int:
        value = self.get(key, (int, str), default)
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self._fail(key, str(exc)) from None

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, (int, float) if kind is float else kind, default)
        if value <= 0:
            raise self._fail(key, f"must be positive, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self._fail(unknown[0], "is not a known key")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _absolute(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def parse_cluster(source: str, data: object, base_dir: str, client: bool = False) -> ClusterConfig:
    t = _Table(source, "cluster", data)
    backend = t.get("backend", str, "embedded")
    if backend not in BACKENDS:
        raise t._fail("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cfg = ClusterConfig(backend=backend)
    cfg.liveness_timeout_s = float(t.positive("liveness_timeout_s", float, LIVENESS_TIMEOUT_S))
    if backend == "embedded":
        cfg.path = _absolute(t.get("path", str), base_dir) if not client else t.get("path", str, None)
    else:
        endpoints = t.get("endpoints", list, [] if client else ...)
        if not client and (not endpoints or not all(isinstance(e, str) and _is_host_port(e) for e in endpoints)):
            raise t._fail("endpoints", f"must be a non-empty list of HOST:PORT strings, got {endpoints!r}")
        cfg.endpoints = endpoints
        cfg.prefix = t.get("prefix", str, "/memfabric")
    token_file = t.get("token_file", str, None)
    cfg.token_file = None if token_file is None else _absolute(token_file, base_dir)
    tls_ca = t.get("tls_ca", str, None)
    cfg.tls_ca = None if tls_ca is None else _absolute(tls_ca, base_dir)
    t.done()
    return cfg


def check_busy_poll_us(value: object) -> int:
    """A polling window (transport/busy_poll.py) in microseconds; ValueError says what is wrong.
    The one check for the server's config, init() and the command line."""
    if type(value) is not int or not 0 <= value <= MAX_BUSY_POLL_US:
        raise ValueError(f"must be a whole number of microseconds from 0 (never poll) to {MAX_BUSY_POLL_US}, "
                         f"got {value!r}")
    return value


def load_server_config(path: str) -> ServerConfig:
    path = os.path.abspath(path)
    base_dir = os.path.dirname(path)
    doc = _Table(path, "", _read_toml(path))
    doc.where = "(top)"
    s = _Table(path, "server", doc.get("server", dict))
    cluster = parse_cluster(path, doc.get("cluster", dict), base_dir)
    pools_data = doc.get("pool", list)
    doc.done()

    data_dir = _absolute(s.get("data_dir", str), base_dir)
    cfg = ServerConfig(
        source=path,
        data_dir=data_dir,
        ipc_socket=_absolute(s.get("ipc_socket", str, os.path.join(data_dir, "ipc.sock")), base_dir),
        rpc_listen=s.get("rpc_listen", str, ""),
        host=s.get("host", str, socket.gethostname()),
        segment_bytes=s.size("segment_size", DEFAULT_SEGMENT_BYTES),
        min_segment_bytes=s.size("min_segment_size", MIN_SEGMENT_BYTES),
        tls_cert=_maybe_path(s.get("tls_cert", str, None), base_dir),
        tls_key=_maybe_path(s.get("tls_key", str, None), base_dir),
        heartbeat_interval_s=float(s.positive("heartbeat_interval_s", float, min(
            HEARTBEAT_INTERVAL_S, cluster.liveness_timeout_s / MIN_BEATS_PER_LIVENESS_TIMEOUT))),
        max_clients=s.positive("max_clients", int, MAX_CLIENTS_PER_SERVER),
        busy_poll_us=s.get("busy_poll_us", int, BUSY_POLL_US),
        cluster=cluster,
        pools=[],
        ipc_socket_mode=_socket_mode(s),
        ipc_socket_gid=_group(s),
        max_namespaces_per_client=s.positive("max_namespaces_per_client", int, MAX_NAMESPACES_PER_CLIENT),
        metrics_listen=s.get("metrics_listen", str, ""),
        resp_listen=s.get("resp_listen", str, ""),
        resp_pool=s.get("resp_pool", str, "default"),
        resp_namespace=s.get("resp_namespace", str, "default"),
        resp_sec_id=_resp_sec_id(s, base_dir),
        resp_max_clients=s.positive("resp_max_clients", int, RESP_MAX_CLIENTS),
        resp_auth_timeout_s=float(s.positive("resp_auth_timeout_s", float, RESP_AUTH_TIMEOUT_S)),
        resp_reply_budget_bytes=s.size("resp_reply_budget", RESP_REPLY_BUDGET_BYTES),
    )
    if cfg.max_namespaces_per_client > MAX_NAMESPACES:
        raise s._fail("max_namespaces_per_client", f"must be at most {MAX_NAMESPACES} (the cluster's limit), "
                                                   f"got {cfg.max_namespaces_per_client}")
    try:
        check_busy_poll_us(cfg.busy_poll_us)
    except ValueError as exc:
        raise s._fail("busy_poll_us", str(exc)) from None
    if cfg.segment_bytes < PAGE_SIZE_BYTES or cfg.segment_bytes % PAGE_SIZE_BYTES:
        raise s._fail("segment_size", f"must be a positive multiple of {PAGE_SIZE_BYTES} bytes")
    if cfg.min_segment_bytes < PAGE_SIZE_BYTES or cfg.min_segment_bytes % PAGE_SIZE_BYTES:
        raise s._fail("min_segment_size", f"must be a positive multiple of {PAGE_SIZE_BYTES} bytes")
    # The largest segment bounds the smallest (a pool of small segments needs no smaller start).
    cfg.min_segment_bytes = min(cfg.min_segment_bytes, cfg.segment_bytes)
    if len(cfg.ipc_socket.encode()) > 107:
        raise s._fail("ipc_socket", "path is longer than the 107 bytes a Unix socket allows")
    if cfg.rpc_listen and not _is_host_port(cfg.rpc_listen):
        raise s._fail("rpc_listen", f"must be HOST:PORT, got {cfg.rpc_listen!r}")
    if cfg.metrics_listen and not _is_host_port(cfg.metrics_listen):
        raise s._fail("metrics_listen", f'must be HOST:PORT (such as "127.0.0.1:9400"), got {cfg.metrics_listen!r}')
    if cfg.heartbeat_interval_s * MIN_BEATS_PER_LIVENESS_TIMEOUT > cluster.liveness_timeout_s:
        raise s._fail("heartbeat_interval_s", f"must be at most cluster.liveness_timeout_s / "
                                              f"{MIN_BEATS_PER_LIVENESS_TIMEOUT} ({cluster.liveness_timeout_s:g} s / "
                                              f"{MIN_BEATS_PER_LIVENESS_TIMEOUT}), got {cfg.heartbeat_interval_s:g}: "
                                              "one late heartbeat would have the server taken for dead")
    if cfg.resp_listen and not _is_host_port(cfg.resp_listen):
        raise s._fail("resp_listen", f'must be HOST:PORT (such as "127.0.0.1:6390"), got {cfg.resp_listen!r}')
    if cfg.resp_reply_budget_bytes < RESP_REPLY_BUDGET_MIN_BYTES:
        raise s._fail("resp_reply_budget", f"must be at least {RESP_REPLY_BUDGET_MIN_BYTES} bytes (two batches of "
                                            f"values), got {cfg.resp_reply_budget_bytes}")
    if cfg.rpc_listen and cluster.token_file is None:
        raise ConfigError(f"{path}: cluster.token_file: is required when server.rpc_listen is set")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise s._fail("tls_cert" if cfg.tls_cert is None else "tls_key", "tls_cert and tls_key go together")
    s.done()

    if not pools_data:
        raise ConfigError(f"{path}: at least one [[pool]] is required")
    seen: set[str] = set()
    for i, pool_data in enumerate(pools_data):
        p = _Table(path, f"pool[{i}]", pool_data)
        name = p.get("name", str)
        try:
            check_name("pool", name)
        except InvalidArgument as exc:
            raise p._fail("name", exc.message) from None
        if name in seen:
            raise p._fail("name", f"pool {name!r} is configured twice")
        seen.add(name)
        medium = p.get("medium", str, "dram")
        if medium not in MEDIA:
            raise p._fail("medium", f"must be one of {', '.join(MEDIA)}, got {medium!r}")
        capacity = p.size("capacity")
        if capacity < cfg.segment_bytes or capacity % PAGE_SIZE_BYTES:
            raise p._fail("capacity", f"must be a multiple of {PAGE_SIZE_BYTES} bytes and at least the segment "
                                      f"size ({cfg.segment_bytes} bytes), got {capacity}")
        pool_path = p.get("path", str, None)
        if medium != "dram" and pool_path is None:
            raise p._fail("path", f"is required for medium {medium!r} (the directory of its files)")
        if medium == "dram" and pool_path is not None:
            raise p._fail("path", "has no meaning for medium 'dram'")
        cfg.pools.append(PoolConfig(name, medium, capacity,
                                    None if pool_path is None else _absolute(pool_path, base_dir)))
        p.done()
    return cfg


def _socket_mode(s: _Table) -> int:
    """An octal string such as "0660" (a TOML integer would be read as decimal)."""
    text = s.get("ipc_socket_mode", str, "0600")
    try:
        mode = int(text, 8)
    except ValueError:
        raise s._fail("ipc_socket_mode", f'must be an octal mode such as "0660", got {text!r}') from None
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise s._fail("ipc_socket_mode", f"must give the owner read and write (the server's own peers connect "
                                         f"as its user) and no bits beyond 0777, got {text!r}")
    return mode


def _group(s: _Table) -> int | None:
    """A group name or number that exists on this host."""
    value = s.get("ipc_socket_group", (str, int), None)
    if value is None:
        return None
    try:
        return grp.getgrnam(value).gr_gid if isinstance(value, str) and not value.isdigit() else \
            grp.getgrgid(int(value)).gr_gid
    except (KeyError, OverflowError):
        raise s._fail("ipc_socket_group", f"no group {value!r} on this host") from None


def _maybe_path(value: str | None, base_dir: str) -> str | None:
    return None if value is None else _absolute(value, base_dir)


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


@dataclass
class FabricConfig:
    """What a client reads from its ockPath: the servers it may talk to, and how."""
    source: str
    cluster: ClusterConfig | None
    ipc_sockets: list[str]
    rpc_addresses: list[str] = field(default_factory=list)


def load_fabric_config(ock_path: str) -> FabricConfig:
    """ockPath is a fabric directory (with fabric.toml), a fabric.toml, or a server's TOML.

    A fabric file lists [[servers]], each with an ipc_socket (same host) and/or an
    rpc_address (HOST:PORT, another host); [cluster] carries token_file and tls_ca for RPC.
    """
    path = os.path.abspath(ock_path)
    if os.path.isdir(path):
        path = os.path.join(path, FABRIC_FILE)
    data = _read_toml(path)
    base_dir = os.path.dirname(path)
    if "server" in data and isinstance(data["server"], dict):   # a server's own configuration
        cfg = load_server_config(path)
        return FabricConfig(path, cfg.cluster, [cfg.ipc_socket], [cfg.rpc_listen] if cfg.rpc_listen else [])
    doc = _Table(path, "(top)", data)
    cluster = parse_cluster(path, doc.get("cluster", dict, {}), base_dir, client=True)
    sockets, addresses = [], []
    for i, entry in enumerate(doc.get("servers", list)):
        t = _Table(path, f"servers[{i}]", entry)
        ipc = t.get("ipc_socket", str, None)
        rpc = t.get("rpc_address", str, None)
        if ipc is None and rpc is None:
            raise t._fail("ipc_socket", "a server entry needs an ipc_socket or an rpc_address")
        if rpc is not None and not _is_host_port(rpc):
            raise t._fail("rpc_address", f"must be HOST:PORT, got {rpc!r}")
        if ipc is not None:
            sockets.append(_absolute(ipc, base_dir))
        if rpc is not None:
            addresses.append(rpc)
        t.get("config", str, "")
        t.done()
    doc.done()
    if not sockets and not addresses:
        raise ConfigError(f"{path}: servers: at least one server is required")
    if addresses and cluster.token_file is None:
        raise ConfigError(f"{path}: cluster.token_file: is required to reach servers over RPC")
    return FabricConfig(path, cluster, sockets, addresses)

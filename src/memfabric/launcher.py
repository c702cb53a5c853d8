"""Writing a local fabric's files, and running one in a child process.

`memfabric up` uses `write_fabric`; the demo, the benchmark and the tests use `LocalFabric`,
which runs the real `memfabric up` as a child process and stops it with SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass
from typing import Callable

import tomli_w

from .config import FABRIC_FILE
from .limits import BUSY_POLL_US
from .stop_request import StopRequest
from .units import format_size

READY_TIMEOUT_S = 60.0
STOP_CHECK_S = 0.1           # how often a wait for a starting child looks for a stop request
STOP_TIMEOUT_S = 15.0       # for a server to stop after SIGTERM; then `up` kills it
# For `up` to stop after SIGTERM: longer than it gives its servers, so its own kill reaches a
# server that hangs, before ours would orphan it (seen: a server left running after a test).
UP_STOP_TIMEOUT_S = STOP_TIMEOUT_S + 10.0


def write_resp_sec_id(directory: str) -> str:
    """The secId of the namespace the Redis-protocol door serves (`AUTH <secId>`; library
    clients open that namespace with it). Kept if one exists, as the token."""
    path = os.path.join(directory, RESP_SEC_ID_FILE)
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
    return path


RESP_SEC_ID_FILE = "resp.secid"


def write_token(directory: str) -> str:
    """The cluster token (kept if one exists: a restarted fabric keeps its clients' config)."""
    path = os.path.join(directory, "token")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


@dataclass(frozen=True)
class PoolSpec:
    """A pool each server of a local fabric gives (`memfabric up --pool NAME:MEDIUM:SIZE`)."""
    name: str
    medium: str
    capacity_bytes: int

    def path(self, directory: str, server: int) -> str | None:
        """Where server `server`'s files of this pool live; None for DRAM."""
        return None if self.medium == "dram" else os.path.join(directory, POOLS_DIR, f"{self.name}-server-{server}")


POOLS_DIR = "pools"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_fabric(directory: str, servers: int, capacity_bytes: int, segment_bytes: int,
                 liveness_timeout_s: float = 3.0, rpc_host: str = "127.0.0.1",
                 busy_poll_us: int = BUSY_POLL_US, rpc_port: int = 0, metrics_port: int | None = None,
                 pools: list[PoolSpec] | None = None, resp_port: int | None = None,
                 resp_host: str = "127.0.0.1") -> list[str]:
    """Configuration for N servers sharing an embedded cluster service; returns the server configs.

    Servers listen for RPC on `rpc_host`, server i at `rpc_port` + i - 1 (at a port of the
    kernel's choosing when `rpc_port` is 0); once they run, `write_client_files` records the
    real addresses for clients. With `metrics_port`, server i serves its metrics on
    127.0.0.1:`metrics_port` + i - 1. With `resp_port`, server 1 opens the Redis-protocol door on
    `resp_host`:`resp_port` (namespace "default" of pool "default", secId in resp.secid). `pools` (default: one DRAM pool "default" of
    `capacity_bytes`) is what each server gives; file pools live under directory/pools.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    cluster = {"backend": "embedded", "path": os.path.join(directory, "cluster.db"),
               "liveness_timeout_s": liveness_timeout_s, "token_file": write_token(directory)}
    pools = pools if pools is not None else [PoolSpec("default", "dram", capacity_bytes)]
    configs, entries = [], []
    for i in range(1, servers + 1):
        server_dir = os.path.join(directory, f"server-{i}")
        os.makedirs(server_dir, exist_ok=True)
        socket_path = os.path.join(server_dir, "ipc.sock")
        server = {"data_dir": server_dir, "ipc_socket": socket_path,
                  "rpc_listen": host_port(rpc_host, rpc_port + i - 1 if rpc_port else 0),
                  "segment_size": format_size(segment_bytes) if segment_bytes % 1024 == 0 else segment_bytes,
                  "busy_poll_us": busy_poll_us}
        if resp_port is not None and i == 1:
            server["resp_listen"] = host_port(resp_host, resp_port)
            server["resp_sec_id_file"] = write_resp_sec_id(directory)
        if metrics_port is not None:
            server["metrics_listen"] = host_port("127.0.0.1", metrics_port + i - 1)
        config = {
            "server": server,
            "cluster": cluster,
            "pool": [{"name": p.name, "medium": p.medium, "capacity": p.capacity_bytes,
                      **({"path": p.path(directory, i)} if p.medium != "dram" else {})} for p in pools],
        }
        path = os.path.join(server_dir, "server.toml")
        with open(path, "wb") as f:
            tomli_w.dump(config, f)
        configs.append(path)
        entries.append({"ipc_socket": socket_path, "config": path})
    with open(os.path.join(directory, FABRIC_FILE), "wb") as f:
        tomli_w.dump({"cluster": cluster, "servers": entries}, f)
    return configs


REMOTE_FILE = "remote.toml"


def write_client_files(directory: str) -> None:
    """Once the servers run: their RPC addresses into fabric.toml, and remote.toml for a client
    on a host without a server (RPC only: token, addresses, no sockets)."""
    from .cluster import open_cluster
    directory = os.path.abspath(directory)
    path = os.path.join(directory, FABRIC_FILE)
    with open(path, "rb") as f:
        fabric = tomllib.load(f)
    cluster = open_cluster("embedded", path=fabric["cluster"]["path"])
    try:
        addresses = {s.ipc_socket: s.rpc_address for s in cluster.servers() if s.alive}
    finally:
        cluster.close()
    for entry in fabric["servers"]:
        if addresses.get(entry["ipc_socket"]):
            entry["rpc_address"] = addresses[entry["ipc_socket"]]
    _write_atomically(path, fabric)
    # The token's path relative to remote.toml: the two files copied into one directory of
    # another host make a working client configuration there.
    token_file = fabric["cluster"]["token_file"]
    if os.path.dirname(token_file) == directory:
        token_file = os.path.basename(token_file)
    remote = {"cluster": {"token_file": token_file},
              "servers": [{"rpc_address": e["rpc_address"]} for e in fabric["servers"] if "rpc_address" in e]}
    _write_atomically(os.path.join(directory, REMOTE_FILE), remote)


def _write_atomically(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        tomli_w.dump(data, f)
    os.replace(tmp, path)


def die_with_parent() -> None:
    """Run in a child before exec: the kernel sends it SIGTERM if its parent dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class StartStopped(RuntimeError):
    """Asked to stop (a signal) while waiting for a child to be ready."""


def stop_children(children: list[subprocess.Popen], timeout_s: float) -> list[subprocess.Popen]:
    """SIGTERM each child still running; kill those not gone `timeout_s` after (one deadline
    for all, so stopping N hung children takes no longer than one). Returns those killed."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    killed = []
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            killed.append(child)
    return killed


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float, lines: list[str],
                  echo: Callable[[str], None] | None = None, stop: StopRequest | None = None) -> None:
    """Read the child's output until a line contains `needle`; keep draining it after
    (into `lines`, and to `echo` when given), so the child never blocks on a full pipe.
    `stop` set meanwhile ends the wait with StartStopped (the caller stops the child)."""
    seen, ended, wake = threading.Event(), threading.Event(), threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if echo is not None:
                echo(line)
            if needle in line:
                seen.set()
                wake.set()
        ended.set()
        wake.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not wake.wait(min(STOP_CHECK_S, max(deadline - time.monotonic(), 0))):
        if stop is not None and stop.is_set():
            raise StartStopped(f"asked to stop while {proc.args} was starting")
        if time.monotonic() >= deadline:
            break
    if seen.is_set() and proc.poll() is None:
        return
    if ended.is_set() or proc.poll() is not None:     # it exited without being ready: say so, at once
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        raise RuntimeError(f"{proc.args} exited with status {code} before it was ready:\n" + "".join(lines[-40:]))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{proc.args} did not become ready within {timeout_s}s:\n" + "".join(lines[-40:]))


class LocalFabric:
    """`memfabric up` in a child process: a context manager for demos, benchmarks and tests."""

    def __init__(self, directory: str, servers: int = 2, capacity: str | None = "256MiB",
                 segment_size: str | None = None, liveness_timeout_s: float | None = None,
                 busy_poll_us: int | None = None, extra_args: list[str] | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.args = [sys.executable, "-m", "memfabric", "up", "--dir", self.directory, "--servers", str(servers)]
        if capacity is not None:          # None: a --pool in extra_args replaces the default pool
            self.args += ["--capacity", capacity]
        if segment_size:
            self.args += ["--segment-size", segment_size]
        if liveness_timeout_s:
            self.args += ["--liveness-timeout", str(liveness_timeout_s)]
        if busy_poll_us is not None:
            self.args += ["--busy-poll-us", str(busy_poll_us)]
        self.args += extra_args or []     # --metrics-port, --pool, --rpc-port ...
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self) -> "LocalFabric":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=die_with_parent)
        try:
            wait_for_line(self.proc, "fabric ready", READY_TIMEOUT_S, self.output)
        except BaseException:        # a Ctrl-C too: no `with` stops a fabric whose start raised
            self.stop()
            raise
        return self

    def server_pids(self) -> dict[int, int]:
        """server id -> pid, from the servers' ready lines."""
        pids = {}
        for line in self.output:
            if line.startswith("memfabric server ") and " ready " in line and "pid=" in line:
                parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
                pids[int(line.split()[2])] = int(parts["pid"])
        return pids

    def stop(self) -> int:
        if self.proc is None:
            return 0
        stop_children([self.proc], UP_STOP_TIMEOUT_S)
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> "LocalFabric":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

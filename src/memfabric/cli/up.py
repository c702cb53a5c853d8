"""`memfabric up`: a whole local fabric in the foreground (embedded cluster service, N servers).

While it runs, the directory holds `up.lock` (flocked: one `up` per directory), `up.pid`
(what `memfabric down` signals; removed when `up` stops) and `up.log` (everything `up` and
its servers print, across runs).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from typing import TextIO

from ..capacity import NotEnoughCapacity, check_memory, check_pools
from ..config import PoolConfig
from ..launcher import (READY_TIMEOUT_S, STOP_TIMEOUT_S, PoolSpec, StartStopped, die_with_parent, stop_children,
                        wait_for_line, write_client_files, write_fabric)
from ..limits import UP_LOG_MAX_BYTES
from ..stop_request import StopRequest, stop_signals
from ..units import format_size

UP_LOCK_FILE = "up.lock"
UP_PID_FILE = "up.pid"
UP_LOG_FILE = "up.log"


class FabricRunning(Exception):
    """A fabric already runs in the directory: nothing of it may be rewritten."""


def run_up(directory: str, servers: int, capacity_bytes: int, segment_bytes: int,
           liveness_timeout_s: float, busy_poll_us: int, *, pools: list[PoolSpec] | None = None,
           rpc_host: str = "127.0.0.1", rpc_port: int = 0, metrics_port: int | None = None,
           resp_port: int | None = None, resp_host: str = "127.0.0.1") -> int:
    pools = pools if pools is not None else [PoolSpec("default", "dram", capacity_bytes)]
    directory = os.path.abspath(directory)
    # Refusals come before anything is written: a running fabric's files stay as they are.
    dram_bytes = sum(p.capacity_bytes for p in pools if p.medium == "dram")
    try:
        if dram_bytes:
            check_memory(servers * dram_bytes,
                         f"{servers} server{'s' if servers > 1 else ''} x {format_size(dram_bytes)} of DRAM")
        file_pools = [PoolConfig(p.name, p.medium, p.capacity_bytes, p.path(directory, i))
                      for i in range(1, servers + 1) for p in pools if p.medium != "dram"]
        if file_pools:
            check_pools(file_pools, "memfabric up")
    except NotEnoughCapacity as exc:
        print(f"memfabric up: {exc}; ask for less with --capacity, --pool or --servers", file=sys.stderr)
        return 2
    # Handled before up.pid names us: `memfabric down` may signal as soon as it does.
    stop = StopRequest()
    stop.on_signals(stop_signals())
    try:
        lock_fd = _lock_directory(directory, servers)
    except FabricRunning as exc:
        print(f"memfabric up: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"memfabric up: cannot use {directory}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        with UpLog(os.path.join(directory, UP_LOG_FILE)) as up_log:
            up_log.say(f"memfabric up: pid {os.getpid()} starting {servers} server(s) in {directory} "
                       f"at {time.strftime('%Y-%m-%d %H:%M:%S %z')}", echo=False)
            return _run(directory, servers, capacity_bytes, segment_bytes, liveness_timeout_s, busy_poll_us,
                        pools, rpc_host, rpc_port, metrics_port, up_log, resp_port, resp_host, stop=stop)
    finally:
        _remove_pid_file(directory)
        os.close(lock_fd)      # the kernel would drop the lock with us anyway


def _lock_directory(directory: str, servers: int) -> int:
    """Hold `directory/up.lock` for as long as this `up` runs (the kernel drops it when we
    die); refuse if another `up` holds it, or if a server runs on one of the data directories
    we would configure (one started by hand, or left by an `up` of an earlier version).
    Holding it, write `up.pid`: whatever pid file was there is a dead `up`'s."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, UP_LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FabricRunning(f"a fabric is already running in {directory} (memfabric up, pid {holder}); "
                            f"stop it first (memfabric down --dir {directory}), or choose another --dir") from None
    try:
        for i in range(1, servers + 1):
            server_lock = os.path.join(directory, f"server-{i}", "server.lock")
            if os.path.exists(server_lock) and locked(server_lock):
                raise FabricRunning(f"a server is running on {os.path.dirname(server_lock)} (its data directory "
                                    "is locked); stop it first, or choose another --dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        tmp = os.path.join(directory, UP_PID_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, os.path.join(directory, UP_PID_FILE))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_pid_file(directory: str) -> None:
    """Ours only: the file names this process."""
    path = os.path.join(directory, UP_PID_FILE)
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def locked(path: str) -> bool:
    """Whether another process holds an flock on `path` (which must exist)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)       # also lets go of the lock, if we took it
    return False


class UpLog:
    """What `up` prints, and its servers' output: to the terminal and, appended, to up.log.
    Server threads write at once, hence the lock; past UP_LOG_MAX_BYTES the file moves to
    up.log.1 (one old file kept) and a new one begins."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: TextIO | None = None

    def __enter__(self) -> "UpLog":
        self._file = open(self.path, "a", encoding="utf-8", errors="replace")
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def say(self, line: str, stream: TextIO | None = None, echo: bool = True) -> None:
        if not line.endswith("\n"):
            line += "\n"
        if echo:
            stream = stream or sys.stdout
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):     # the terminal went away: the file goes on
                pass
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line)
                self._file.flush()
                if self._file.tell() > UP_LOG_MAX_BYTES:
                    self._file.close()
                    os.replace(self.path, self.path + ".1")
                    self._file = open(self.path, "a", encoding="utf-8", errors="replace")
            except OSError:                   # a full disk must not stop the fabric
                pass


def _run(directory: str, servers: int, capacity_bytes: int, segment_bytes: int, liveness_timeout_s: float,
         busy_poll_us: int, pools: list[PoolSpec], rpc_host: str, rpc_port: int, metrics_port: int | None,
         up_log: UpLog, resp_port: int | None = None, resp_host: str = "127.0.0.1", *,
         stop: StopRequest) -> int:
    configs = write_fabric(directory, servers, capacity_bytes, segment_bytes, liveness_timeout_s,
                           rpc_host=rpc_host, busy_poll_us=busy_poll_us, rpc_port=rpc_port,
                           metrics_port=metrics_port, pools=pools, resp_port=resp_port,
                           resp_host=resp_host)
    children: list[subprocess.Popen] = []
    try:
        for config in configs:
            if stop.is_set():         # `down` (or Ctrl-C) while starting: start no more
                break
            # Servers start one after another: ids are handed out in start order. Each in a
            # process group of its own: a terminal's Ctrl-C reaches `up` alone, which stops them
            # (in ours, one still starting took it as a KeyboardInterrupt, traceback and all).
            child = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=die_with_parent, process_group=0)
            children.append(child)
            wait_for_line(child, " ready ", READY_TIMEOUT_S, [], echo=up_log.say, stop=stop)
        if not stop.is_set():
            write_client_files(directory)
            up_log.say(f"memfabric fabric ready: {servers} server(s), ockPath={directory} "
                       f"(remote clients: {directory}/remote.toml)")
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None and not getattr(child, "reported", False):
                    child.reported = True
                    up_log.say(f"memfabric: server process {child.pid} exited with {child.returncode}")
    except StartStopped:
        up_log.say("memfabric up: stopped while starting", stream=sys.stderr)
        return 1
    except RuntimeError as exc:
        up_log.say(f"memfabric up: {exc}", stream=sys.stderr)
        return 1
    finally:
        for child in stop_children(children, STOP_TIMEOUT_S):
            up_log.say(f"memfabric up: server process {child.pid} still ran {STOP_TIMEOUT_S:g}s after its SIGTERM: "
                       "killed (SIGKILL)", stream=sys.stderr)
        stop.ignore_signals()      # nothing left to stop; one more signal as we exit must not kill us
    up_log.say("memfabric fabric stopped")
    return 0

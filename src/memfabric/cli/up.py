"""`memfabric up`: a whole local fabric in the foreground (embedded cluster service, N servers)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading

from ..capacity import NotEnoughCapacity, check_memory
from ..launcher import (READY_TIMEOUT_S, STOP_TIMEOUT_S, StartStopped, die_with_parent, wait_for_line,
                        write_client_files,
                        write_fabric)
from ..units import format_size

UP_LOCK_FILE = "up.lock"


class FabricRunning(Exception):
    """A fabric already runs in the directory: nothing of it may be rewritten."""


def run_up(directory: str, servers: int, capacity_bytes: int, segment_bytes: int,
           liveness_timeout_s: float, busy_poll_us: int) -> int:
    # Refusals come before anything is written: a running fabric's files stay as they are.
    try:
        check_memory(servers * capacity_bytes,
                     f"{servers} server{'s' if servers > 1 else ''} x {format_size(capacity_bytes)} of DRAM")
    except NotEnoughCapacity as exc:
        print(f"memfabric up: {exc}; ask for less with --capacity or --servers", file=sys.stderr)
        return 2
    directory = os.path.abspath(directory)
    try:
        lock_fd = _lock_directory(directory, servers)
    except FabricRunning as exc:
        print(f"memfabric up: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"memfabric up: cannot use {directory}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        return _run(directory, servers, capacity_bytes, segment_bytes, liveness_timeout_s, busy_poll_us)
    finally:
        os.close(lock_fd)      # the kernel would drop the lock with us anyway


def _lock_directory(directory: str, servers: int) -> int:
    """Hold `directory/up.lock` for as long as this `up` runs (the kernel drops it when we
    die); refuse if another `up` holds it, or if a server runs on one of the data directories
    we would configure (one started by hand, or left by an `up` of an earlier version)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, UP_LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FabricRunning(f"a fabric is already running in {directory} (memfabric up, pid {holder}); "
                            "stop it first, or choose another --dir") from None
    try:
        for i in range(1, servers + 1):
            server_lock = os.path.join(directory, f"server-{i}", "server.lock")
            if os.path.exists(server_lock) and _locked(server_lock):
                raise FabricRunning(f"a server is running on {os.path.dirname(server_lock)} (its data directory "
                                    "is locked); stop it first, or choose another --dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _locked(path: str) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)       # also lets go of the lock, if we took it
    return False


def _run(directory: str, servers: int, capacity_bytes: int, segment_bytes: int,
         liveness_timeout_s: float, busy_poll_us: int) -> int:
    configs = write_fabric(directory, servers, capacity_bytes, segment_bytes, liveness_timeout_s,
                           busy_poll_us=busy_poll_us)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children: list[subprocess.Popen] = []
    try:
        for config in configs:
            # Servers start one after another: ids are handed out in start order.
            child = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=die_with_parent)
            children.append(child)
            wait_for_line(child, " ready ", READY_TIMEOUT_S, [], echo=_echo, stop=stop)
        write_client_files(directory)
        print(f"memfabric fabric ready: {servers} server(s), ockPath={directory} "
              f"(remote clients: {directory}/remote.toml)", flush=True)
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None and not getattr(child, "reported", False):
                    child.reported = True
                    print(f"memfabric: server process {child.pid} exited with {child.returncode}", flush=True)
    except StartStopped:
        print("memfabric up: stopped while starting", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"memfabric up: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    print("memfabric fabric stopped", flush=True)
    return 0



def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()

"""`memfabric server --config PATH`: run one server in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from ..errors import MemfabricError
from .config import ConfigError, load_server_config
from .ipc_front import IpcFront
from .server import Server


def run_server(config_path: str) -> int:
    try:
        cfg = load_server_config(config_path)
    except ConfigError as exc:
        print(f"memfabric server: bad configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(cfg)
    front = None
    try:
        server.start()
        front = IpcFront(server, cfg.ipc_socket, cfg.max_clients)
        front.start()
    except MemfabricError as exc:
        print(f"memfabric server: cannot start: {exc}", file=sys.stderr)
        if front:
            front.stop()
        server.stop()
        return 1
    pools = ", ".join(f"{p.name}={p.capacity_bytes}B {p.medium}" for p in cfg.pools)
    print(f"memfabric server {server.server_id} ready pid={os.getpid()} ipc={cfg.ipc_socket} pools: {pools}",
          flush=True)
    stop.wait()
    front.stop()
    server.stop()
    print(f"memfabric server {server.server_id} stopped", flush=True)
    return 0

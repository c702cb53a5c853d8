"""`memfabric up`: a whole local fabric in the foreground (embedded cluster service, N servers)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from ..launcher import (READY_TIMEOUT_S, STOP_TIMEOUT_S, die_with_parent, wait_for_line, write_client_files,
                        write_fabric)


def run_up(directory: str, servers: int, capacity_bytes: int, segment_bytes: int,
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
            wait_for_line(child, " ready ", READY_TIMEOUT_S, [], echo=_echo)
        write_client_files(directory)
        print(f"memfabric fabric ready: {servers} server(s), ockPath={directory} "
              f"(remote clients: {directory}/remote.toml)", flush=True)
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None and not getattr(child, "reported", False):
                    child.reported = True
                    print(f"memfabric: server process {child.pid} exited with {child.returncode}", flush=True)
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

"""One server with a door, configured as a test needs (server.resp_* keys that `memfabric up`
does not set), on an address other than loopback where the test needs AUTH required."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

from memfabric.launcher import host_port, wait_for_line, write_resp_sec_id

from ..conftest import short_tmp_dir
from ..helpers import free_ports

MF = [sys.executable, "-m", "memfabric"]


def non_loopback_address() -> tuple[str, str]:
    """(where the door listens, where a test connects): this machine's first global IPv4
    address, or 0.0.0.0 reached over 127.0.0.1 (the door takes 0.0.0.0 for non-loopback too,
    kv/resp/front.py is_loopback)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            address = fields[fields.index("inet") + 1].split("/")[0]
            return address, address
    return "0.0.0.0", "127.0.0.1"


@dataclass
class OneDoor:
    host: str               # where to connect
    port: int
    sec_id: str
    pid: int
    output: list[str]


@contextlib.contextmanager
def one_door(listen_host: str, connect_host: str, capacity: str = "64MiB", **server: Any) -> Iterator[OneDoor]:
    directory = short_tmp_dir("mf-resp-one-")
    port = free_ports(1)
    sec_file = write_resp_sec_id(directory)
    extra = "".join(f"{k} = {v!r}\n" if isinstance(v, str) else f"{k} = {v}\n" for k, v in server.items())
    config = os.path.join(directory, "server.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = "{directory}/data"\nipc_socket = "{directory}/s.sock"\n'
                f'segment_size = "1MiB"\nresp_listen = "{host_port(listen_host, port)}"\n'
                f'resp_sec_id_file = "{sec_file}"\n{extra}'
                f'[cluster]\nbackend = "embedded"\npath = "{directory}/cluster.db"\n'
                f'[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "{capacity}"\n')
    proc = subprocess.Popen(MF + ["server", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        wait_for_line(proc, " ready ", 60, lines)
        yield OneDoor(connect_host, port, open(sec_file).read().strip(), proc.pid, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""A process stopped while it holds the embedded catalog's write lock: the fabric's liveness
does not hang on it (issue 7, item 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import memfabric
from memfabric.errors import ServerUnavailable

from ..helpers import WAIT_S, wait_until

LOCK_AND_STOP = r"""
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def alive_servers(directory: str) -> dict[int, bool]:
    out = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", directory, "--json"],
                         capture_output=True, text=True, timeout=WAIT_S, check=True).stdout
    return {s["server_id"]: s["alive"] for s in json.loads(out)["servers"]}


def test_healthy_servers_stay_alive_while_a_stopped_process_holds_the_catalog_lock(fresh_fabric):
    fab = fresh_fabric(servers=2)          # liveness 2 s
    with memfabric.init(fab.directory) as session:
        ns = session.create_namespace("before", sec_id="k")
        bm = ns.alloc(4096)
        bm.write(b"still here")
        writer = subprocess.Popen([sys.executable, "-c", LOCK_AND_STOP, os.path.join(fab.directory, "cluster.db")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "locked"
            wait_until(lambda: open(f"/proc/{writer.pid}/stat").read().rpartition(")")[2].split()[0] == "T",
                       "the lock holder to stop")
            end = time.monotonic() + 3 * 2.0          # three liveness periods
            while time.monotonic() < end:
                assert alive_servers(fab.directory) == {1: True, 2: True}
                assert {s["server_id"]: s["alive"] for s in session.servers()} == {1: True, 2: True}
                time.sleep(0.2)
            with pytest.raises(ServerUnavailable) as err:
                session.create_namespace("during", sec_id="k")
            assert "locked by another process" in str(err.value)
            assert bm.read(0, 10) == b"still here"             # namespaces that exist go on
            spread = ns.alloc(3 << 20, memfabric.Affinity("spread"))
            spread.write(b"x" * (3 << 20))
        finally:
            writer.send_signal(signal.SIGCONT)
            writer.kill()
            writer.wait()
        session.create_namespace("after", sec_id="k").alloc(4096).write(b"ok")

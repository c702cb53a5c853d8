"""A fabric across hosts: network namespaces with a server each, etcd on host 1, a client-only
host 4 that reaches everything over RPC. Tests run in order; the destructive ones come last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from memfabric.launcher import wait_for_line

from ..conftest import short_tmp_dir
from ..etcd_server import EtcdServer
from ..hosts import TestBed

SERVERS = (1, 2, 3)
CLIENT = 4
RPC_PORT = 7400

CLIENT_PRELUDE = """
import json, sys, hashlib, time
import numpy as np
import memfabric
from memfabric import Affinity, OperatorCode
s = memfabric.init(sys.argv[1], timeout_s=3.0)
ns = s.namespace("multi", sec_id="k")
def out(**kw): print(json.dumps(kw)); sys.stdout.flush()
"""


class Fabric:
    def __init__(self) -> None:
        self.dir = short_tmp_dir("mf-hosts-")
        self.bed = TestBed(hosts=4)
        self.servers: dict[int, subprocess.Popen] = {}
        try:
            self.etcd = EtcdServer(host=self.bed.address(1), netns=self.bed.names[1])
            self.bed.procs.append(self.etcd.start().proc)
            with open(os.path.join(self.dir, "token"), "w") as f:
                f.write("multi-host-token-" * 4)
            for host in SERVERS:
                self.start_server(host)
            with open(os.path.join(self.dir, "remote.toml"), "w") as f:
                f.write(f'[cluster]\ntoken_file = "{self.dir}/token"\n\n')
                for host in SERVERS:
                    f.write(f'[[servers]]\nrpc_address = "{self.bed.address(host)}:{RPC_PORT}"\n\n')
        except BaseException:
            self.close()
            raise

    def start_server(self, host: int) -> None:
        config = os.path.join(self.dir, f"server-{host}.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nhost = "h{host}"\ndata_dir = "{self.dir}/data-{host}"\n'
                    f'ipc_socket = "{self.dir}/ipc-{host}.sock"\nrpc_listen = "{self.bed.address(host)}:{RPC_PORT}"\n'
                    f'segment_size = "1MiB"\n{self.server_toml(host)}\n[cluster]\nbackend = "etcd"\n'
                    f'endpoints = ["{self.etcd.endpoint}"]\nliveness_timeout_s = 2.0\ntoken_file = "{self.dir}/token"\n\n'
                    + self.pools_toml(host))
        proc = self.bed.run(host, [sys.executable, "-m", "memfabric", "server", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_line(proc, " ready ", 60, [])
        self.servers[host] = proc

    def server_toml(self, host: int) -> str:
        """More lines of the [server] table of the server on `host` (a subclass gives them)."""
        return ""

    def pools_toml(self, host: int) -> str:
        """The [[pool]] tables of the server on `host` (a subclass gives it more pools)."""
        return '[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "32MiB"\n'

    def client(self, code: str, *args: str, timeout_s: float = 120) -> list[dict]:
        result = self.bed.python(CLIENT, CLIENT_PRELUDE + code, os.path.join(self.dir, "remote.toml"), *args,
                                 timeout_s=timeout_s)
        assert result.returncode == 0, result.stdout + result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def close(self) -> None:
        self.bed.close()
        if hasattr(self, "etcd"):
            self.etcd.cleanup()


@pytest.fixture(scope="module")
def fabric():
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests make network namespaces and need root (CI runs as root)")
    fab = Fabric()
    yield fab
    fab.close()


def test_servers_on_three_hosts_form_one_cluster_over_etcd(fabric):
    (view,) = fabric.client("""
s.create_namespace("multi", sec_id="k")
out(servers=[(x["server_id"], x["host"], x["alive"], x["rpc_address"]) for x in s.servers()])
""")
    assert sorted((sid, host, alive) for sid, host, alive, _ in view["servers"]) == \
        [(1, "h1", True), (2, "h2", True), (3, "h3", True)]
    assert all(address.startswith("10.213.77.") for *_, address in view["servers"])


def test_object_bigger_than_any_server_spreads_and_reads_back(fabric):
    (r,) = fabric.client("""
bm = ns.alloc(80 << 20, Affinity("spread"))            # each server has 32 MiB
data = np.random.default_rng(11).integers(0, 256, bm.size, dtype=np.uint8)
bm.write(data)
back = np.empty_like(data); bm.read(0, into=back)
out(servers=sorted({sid for sid, _ in bm.extents}), same=bool(np.array_equal(back, data)))
bm.free()
""")
    assert r == {"servers": [1, 2, 3], "same": True}


def test_copy_gather_and_map_across_hosts(fabric):
    (r,) = fabric.client("""
a = ns.alloc(3 << 20, Affinity("server", 1)); b = ns.alloc(3 << 20, Affinity("server", 3))
payload = np.random.default_rng(5).integers(0, 256, a.size, dtype=np.uint8)
a.write(payload)
a.copy_to(b, src_offset=1000, dst_offset=7, length=2 << 20)      # server 3 pulls from server 1
copied = b.read(7, 2 << 20) == payload[1000:1000 + (2 << 20)].tobytes()
parts = []
for sid, value in ((1, 1.5), (2, 2.0), (3, -4.0)):
    p = ns.alloc(8192, Affinity("server", sid)); p.write(np.full(2048, value, dtype=np.float32)); parts.append(p)
total, n = ns.gather([(p, 0, 8192) for p in parts], OperatorCode.SUM, dtype="float32")
summed = bool((np.frombuffer(total.read(), dtype=np.float32) == -0.5).all())
big = ns.alloc(6 << 20, Affinity("spread"))
big.write(b"\\x00" * big.size)
with big.map() as m:
    m.view[5:8] = b"one"; m.view[(5 << 20) + 1:(5 << 20) + 4] = b"two"
    sent = m.flush()
mapped = big.read(5, 3) == b"one" and big.read((5 << 20) + 1, 3) == b"two"
out(copied=copied, gather_len=n, summed=summed, pages_sent=sent, mapped=mapped)
""")
    assert r == {"copied": True, "gather_len": 8192, "summed": True, "pages_sent": 2, "mapped": True}


def test_etcd_restart_keeps_servers_registered_and_objects(fabric):
    (made,) = fabric.client("""
keep = ns.alloc(1 << 20, Affinity("spread")); keep.write(b"survives etcd" * 1000)
out(bm_id=keep.bm_id)
""")
    fabric.etcd.stop()
    time.sleep(3)                        # longer than the 2 s lease
    fabric.bed.procs.append(fabric.etcd.start().proc)
    deadline = time.monotonic() + 30
    while True:
        (view,) = fabric.client("out(alive=sorted(x['server_id'] for x in s.servers() if x['alive']))")
        if view["alive"] == [1, 2, 3] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert view["alive"] == [1, 2, 3]
    (r,) = fabric.client("out(data=ns.open(sys.argv[2]).read(0, 13000) == b'survives etcd' * 1000)", made["bm_id"])
    assert r == {"data": True}


def test_host_cut_off_is_seen_dead_and_its_objects_fail(fabric):
    (made,) = fabric.client("""
out(there=ns.alloc(4096, Affinity("server", 2)).bm_id, here=ns.alloc(4096, Affinity("server", 1)).bm_id)
""")
    fabric.bed.cut_off(2)
    try:
        started = time.monotonic()
        while True:
            (view,) = fabric.client("out(alive=sorted(x['server_id'] for x in s.servers() if x['alive']))")
            if 2 not in view["alive"] or time.monotonic() - started > 30:
                break
            time.sleep(0.2)
        print(f"cut-off host noticed dead after {time.monotonic() - started:.1f} s (liveness timeout 2 s)")
        assert view["alive"] == [1, 3]
        (r,) = fabric.client("""
try:
    ns.open(sys.argv[2]).write(b"x"); there = "no error"
except (memfabric.ServerUnavailable, memfabric.Timeout) as e: there = e.code.name
here = ns.open(sys.argv[3]); here.write(b"fine"); 
fresh = ns.alloc(6 << 20, Affinity("spread"))
out(there=there, here=here.read(0, 4).decode(), fresh=sorted({sid for sid, _ in fresh.extents}))
""", made["there"], made["here"])
        assert r["there"] in ("SERVER_UNAVAILABLE", "TIMEOUT")
        assert r["here"] == "fine" and r["fresh"] == [1, 3]
    finally:
        fabric.bed.reconnect(2)


def test_killed_server_is_noticed_and_only_its_objects_fail(fabric):
    (made,) = fabric.client("""
out(doomed=ns.alloc(4096, Affinity("server", 3)).bm_id, safe=ns.alloc(4096, Affinity("server", 1)).bm_id)
""")
    fabric.servers[3].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        (view,) = fabric.client("out(alive=sorted(x['server_id'] for x in s.servers() if x['alive']))")
        if 3 not in view["alive"] or time.monotonic() - killed_at > 30:
            break
        time.sleep(0.2)
    print(f"killed server noticed dead after {time.monotonic() - killed_at:.1f} s (liveness timeout 2 s)")
    assert 3 not in view["alive"]
    (r,) = fabric.client("""
try:
    ns.open(sys.argv[2]).read(0, 1); doomed = "no error"
except memfabric.ServerUnavailable as e: doomed = e.code.name
safe = ns.open(sys.argv[3]); safe.write(b"ok")
out(doomed=doomed, safe=safe.read(0, 2).decode())
""", made["doomed"], made["safe"])
    assert r == {"doomed": "SERVER_UNAVAILABLE", "safe": "ok"}

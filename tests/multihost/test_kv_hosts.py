"""MemKV across hosts (network namespaces, etcd on host 1, a client-only host 4 over RPC):
keys spread over the servers of three hosts, same-host clients read their host's keys in
place, and killing one host's server loses no key that had a replica on another host."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .test_hosts import CLIENT, Fabric

PRELUDE = """
import json, sys, time
import memfabric
s = memfabric.init(sys.argv[1], timeout_s=3.0)
def out(**kw): print(json.dumps(kw)); sys.stdout.flush()
def value(i): return (f"{i}:".encode() * (300 << 10 if i % 20 == 0 else 50 + i))[: (300 << 10 if i % 20 == 0 else 50 + i)]
KEYS = [f"key-{i}" for i in range(300)]
"""


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests make network namespaces and need root (CI runs as root)")
    fab = Fabric()
    yield fab
    fab.close()


def run(fab: Fabric, host: int, code: str, *args: str) -> list[dict]:
    config = os.path.join(fab.dir, "remote.toml") if host == CLIENT else os.path.join(fab.dir, f"server-{host}.toml")
    result = fab.bed.python(host, PRELUDE + code, config, *args, timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_keys_spread_over_hosts_and_same_host_clients_read_in_place(hosts):
    (r,) = run(hosts, CLIENT, """
kv = s.create_namespace("kvm", sec_id="k").kv()
kv.configure(replicas=2)
s.create_namespace("kv1", sec_id="k").kv().put_many({k: value(i) for i, k in enumerate(KEYS)})
for i, k in enumerate(KEYS):
    kv.put(k, value(i))
per_server = {}
for sid in (1, 2, 3):
    per_server[sid] = s.link(sid).call("kv_stats", pool="default", ns="kvm", sec=b"k")["stats"]["keys"]
out(per_server=per_server, ok=kv.get_many(KEYS) == [value(i) for i in range(len(KEYS))])
""")
    assert r["ok"] and sum(r["per_server"].values()) == 300 and all(n > 30 for n in r["per_server"].values())
    # A client on host 2, beside its server: its keys come from the mapped index, no request.
    (r,) = run(hosts, 2, """
kv = s.namespace("kvm", "k").kv()
assert kv.get_many(KEYS) == [value(i) for i in range(len(KEYS))]
link = s.local
before = link._next_id
local_keys = [k for k in KEYS if kv._homes(k.encode())[0] == link.server_id]
got = [kv.get(k) for k in local_keys]
out(local=len(local_keys), requests=link._next_id - before, ok=got == [value(KEYS.index(k)) for k in local_keys])
""")
    assert r["ok"] and r["local"] > 30
    assert r["requests"] <= 2           # the view of the pool and the replica count, at most; no get asked


def test_an_etcd_outage_the_leases_outlive_costs_no_key(hosts):
    """etcd stopped for longer than the liveness timeout, then started again: it extends its
    leases when it comes back, so each server's lease lived on, no member ever saw a server
    dead, and no key need be forgotten. Before, every server forgot all its keys (keys
    without replicas were lost) because its heartbeat had been silent past the timeout."""
    hosts.etcd.stop()
    time.sleep(3)                        # past the 2 s liveness timeout: KV requests are refused
    hosts.bed.procs.append(hosts.etcd.start().proc)
    (r,) = run(hosts, CLIENT, """
kv = s.namespace("kv1", "k").kv()
deadline = time.monotonic() + 60
while True:
    try:
        got = kv.get_many(KEYS)
        break
    except memfabric.MemfabricError:     # refused until each server's next beat lands
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
out(lost=sum(v is None for v in got), wrong=sum(v is not None and v != value(i) for i, v in enumerate(got)))
""")
    assert r == {"lost": 0, "wrong": 0}


def test_killing_a_hosts_server_loses_no_key_that_had_a_replica(hosts):
    hosts.servers[3].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (r,) = run(hosts, CLIENT, """
kv = s.namespace("kvm", "k").kv()
at_once = kv.get_many(KEYS) == [value(i) for i in range(len(KEYS))]
while any(x["alive"] for x in s.servers() if x["server_id"] == 3):
    time.sleep(0.2)
after = kv.get_many(KEYS) == [value(i) for i in range(len(KEYS))]
single = s.namespace("kv1", "k").kv().get_many(KEYS)
lost = sum(v is None for v in single)
wrong = sum(v is not None and v != value(i) for i, v in enumerate(single))
kv.put("after", b"the kill")
out(at_once=at_once, after=after, lost=lost, wrong=wrong, again=kv.get("after") == b"the kill")
""")
    print(f"server 3 killed; a client saw it dead after {time.monotonic() - killed_at:.1f} s")
    assert r["at_once"] and r["after"] and r["again"]
    assert 0 < r["lost"] < 300 and r["wrong"] == 0     # without a replica: a miss, never wrong bytes

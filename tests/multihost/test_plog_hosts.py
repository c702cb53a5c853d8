"""MemPlog replicas across hosts (network namespaces, etcd on host 1, a client-only host 4 over
RPC, a ramdisk pool on each server's host): the copy's host's server SIGKILLed in the middle of
a stream of appends; the appends go on, the plog's info reports the copy dead, and the plog is
sealed and read whole from the survivor."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .test_hosts import CLIENT, Fabric

METRICS_PORT = 9400

PRELUDE = """
import json, os, signal, struct, sys, time
import memfabric
from memfabric.plog.client import Plog
s = memfabric.init(sys.argv[1], timeout_s=5.0)
def out(**kw): print(json.dumps(kw)); sys.stdout.flush()
def body(i): return struct.pack("<I", i) * (1 + i % 300)
"""


class PlogFabric(Fabric):
    """Fabric's servers, each with a ramdisk pool "logs" besides its dram pool."""

    def server_toml(self, host: int) -> str:
        return f'metrics_listen = "{self.bed.address(host)}:{METRICS_PORT}"\n'

    def pools_toml(self, host: int) -> str:
        return (f'[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "16MiB"\n\n'
                f'[[pool]]\nname = "logs"\nmedium = "ramdisk"\ncapacity = "32MiB"\n'
                f'path = "{self._ramdisk(host)}"\n')

    def _ramdisk(self, host: int) -> str:
        return f"/dev/shm/{os.path.basename(self.dir)}-h{host}"

    def close(self) -> None:
        super().close()
        for host in self.servers:
            shutil.rmtree(self._ramdisk(host), ignore_errors=True)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests make network namespaces and need root (CI runs as root)")
    fab = PlogFabric()
    yield fab
    fab.close()


def run(fab: Fabric, code: str) -> list[dict]:
    result = fab.bed.python(CLIENT, PRELUDE + code, os.path.join(fab.dir, "remote.toml"), timeout_s=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_records_of_one_piece_and_of_several_reach_a_copy_on_another_host_whole(hosts):
    """Over RPC between hosts a forward piece (PLOG_REPLICA_PIECE_BYTES) and its request fit
    one message: records that fill a piece and pass it by a byte. A record of several pieces
    goes as one message with its bytes as the RPC payload (plog_replica_payload), where pieces
    took a round trip each; one past PLOG_PULL_BYTES in two. Each lands whole."""
    (r,) = run(hosts, """
import re, urllib.request
from memfabric.limits import PLOG_PULL_BYTES, PLOG_REPLICA_PIECE_BYTES as PIECE
ns = s.create_namespace("pieces", sec_id="k", pool="logs")
log = ns.create_plog("big", 16 << 20, replicas=2)
info = log.info()
copy = info["replica_servers"][0]
host = {x["server_id"]: x["host"] for x in s.servers()}
address = {x["server_id"]: x["rpc_address"].rsplit(":", 1)[0] for x in s.servers()}
def messages():      # the forwards the copy's server took (operation plog_replica_append)
    text = urllib.request.urlopen(f"http://{address[copy]}:%d/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r'^memfabric_operation_seconds_count{[^}]*op="plog_replica_append"[^}]*} (\\S+)$', text, re.M))
records = [bytes([i + 1]) * n for i, n in enumerate((PIECE - 16, PIECE - 15, 3 * PIECE + 5, 1, PLOG_PULL_BYTES + 9))]
took = []
for record in records:
    before = messages()
    log.append(record)
    took.append(messages() - before)
theirs = list(Plog(ns, "big", copy, log.plog_id).records())
out(same=theirs == records == list(log.records()), dead=log.info()["dead_replicas"], took=took,
    home_host=host[info["home"]], copy_host=host[copy])
log.delete()
""" % METRICS_PORT)
    assert r["home_host"] != r["copy_host"]
    assert r["same"] and r["dead"] == []
    assert r["took"] == [1, 1, 1, 1, 2]


def test_a_copys_server_busy_with_clients_batches_keeps_the_copy(hosts):
    """The copy's server holds at most MAX_PLOG_BUFFERED_BYTES of record bytes being sent,
    its clients' batches in flight (plog_append_payload) among them. While they fill it, a
    forward as an RPC payload (plog_replica_payload) is refused LIMIT_EXCEEDED, "try again
    soon": the home forwards in pieces then, as it did before, and the copy stays live and
    whole. (It was marked dead for good: a busy server lost every copy it held.)"""
    (r,) = run(hosts, """
from memfabric.errors import LimitExceeded, ServerUnavailable
from memfabric.limits import DEFAULT_REQUEST_TIMEOUT_S, MAX_PLOG_BUFFERED_BYTES, MAX_RPC_PAYLOAD_BYTES
from memfabric.transport import rpc, wire
ns = s.create_namespace("busy", sec_id="k", pool="logs")
log = ns.create_plog("wal", 16 << 20, replicas=2)
log.append(b"one")
(copy,) = log.info()["replica_servers"]
address = {x["server_id"]: x["rpc_address"] for x in s.servers()}[copy]
args = {**ns.wire_creds, "name": "wal", "plog_id": log.plog_id}
# Clients whose batches of MAX_RPC_PAYLOAD_BYTES are on their way (stalled): one more than the
# server holds, so that it still fills when a probe below, holding its byte, has one refused.
held = []
for _ in range(MAX_PLOG_BUFFERED_BYTES // MAX_RPC_PAYLOAD_BYTES + 1):
    f = rpc.connect(address, None, 5.0)
    rpc.client_handshake(f, s._token, 5.0)
    f.send({"op": "hello", "id": 1, "role": "client"})
    f.recv_header(time.monotonic() + 5)
    head = wire.encode({"op": "plog_append_payload", "id": 2, **args, "lengths": [MAX_RPC_PAYLOAD_BYTES // 2] * 2})
    f.sock.sendall(rpc.PREFIX.pack(len(head), MAX_RPC_PAYLOAD_BYTES) + head
                   + bytes(rpc.FIRST_BLOCK - rpc.PREFIX.size - len(head)))
    held.append(f)
# Until the copy's server is full (a batch of its own is refused), however slowly it reads the
# batches' heads; it drops a stalled batch DEFAULT_REQUEST_TIMEOUT_S after reading its head, so
# one not full by then never will be.
full = False
until = time.monotonic() + DEFAULT_REQUEST_TIMEOUT_S
while not full and time.monotonic() < until:
    try:
        s.link(copy).request("plog_append_payload", {**args, "lengths": [1]}, payload=[memoryview(b"x")])
    except LimitExceeded:
        full = True
    except ServerUnavailable:     # taken (and refused: a copy takes no appends): not full yet
        time.sleep(0.01)
records = [b"one", bytes(range(256)) * 4096, b"two"]     # 1 MiB: past one piece
for record in records[1:]:
    log.append(record)
dead = log.info()["dead_replicas"]
for f in held:
    f.close()
out(full=full, dead=dead, same=list(Plog(ns, "wal", copy, log.plog_id).records()) == records == list(log.records()))
log.delete()
""")
    assert r["full"]
    assert r["dead"] == [] and r["same"]


def test_a_forward_to_a_copy_cut_off_ends_by_the_peer_links_timeout(hosts):
    """A forward waits on its copy at most the peer link's timeout (PEER_TIMEOUT_S), then the
    copy is dead and the append goes on: so a client that gives its append twice that gets it.
    A forward as an RPC payload (PLOG_PULL_BYTES) to a copy whose host is cut off fills the
    socket's send buffer part way: its send waited the socket's own bound (10 s) instead, and
    the client got TIMEOUT for an append its home then committed."""
    netns = {f"h{host}": name for host, name in hosts.bed.names.items()}
    try:
        (r,) = run(hosts, """
import subprocess
from memfabric.limits import PEER_TIMEOUT_S, PLOG_PULL_BYTES
s = memfabric.init(sys.argv[1], timeout_s=2 * PEER_TIMEOUT_S)
ns = s.create_namespace("cut", sec_id="k", pool="logs")
log = ns.create_plog("wal", 16 << 20, replicas=2)
log.append(b"one")
(copy,) = log.info()["replica_servers"]
netns = %r[next(x["host"] for x in s.servers() if x["server_id"] == copy)]
record = bytes(range(256)) * (PLOG_PULL_BYTES // 256)
subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "down"], check=True)
try:
    try:
        log.append(record)
        err = None
    except memfabric.MemfabricError as exc:
        err = exc.code.name
finally:
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
out(err=err, copy=copy, dead=log.info()["dead_replicas"], whole=list(log.records()) == [b"one", record])
log.delete()
""" % netns)
    finally:
        for host in hosts.servers:
            hosts.bed.reconnect(host)
    assert r["err"] is None, r
    assert r["dead"] == [r["copy"]] and r["whole"]


def test_a_copy_killed_mid_stream_then_sealed_and_read_from_the_survivor(hosts):
    (r,) = run(hosts, """
ns = s.create_namespace("plogs", sec_id="k", pool="logs")
log = ns.create_plog("wal", 8 << 20, replicas=2)
info = log.info()
victim = info["replica_servers"][0]
pid = next(x["pid"] for x in s.servers() if x["server_id"] == victim)
host = next(x["host"] for x in s.servers() if x["server_id"] == victim)
acked, copy_before = [], None
for i in range(400):
    if i == 200:                      # mid-stream: the copy's server dies (one pid namespace for all hosts)
        copy_before = Plog(ns, "wal", victim, log.plog_id).info()["records"]
        os.kill(pid, signal.SIGKILL)
    acked.append(log.append(body(i)))
after = log.info()
sealed = log.seal()
records = list(ns.plog("wal").records())
whole = all(p == body(i) for i, p in enumerate(records))
out(victim=victim, host=host, home=info["home"], copy_before=copy_before, dead=after["dead_replicas"],
    records=len(records), whole=whole, state=sealed["state"], acked=len(acked))
""")
    assert r["copy_before"] == 200                       # the copy held every append before the kill
    assert r["acked"] == 400 and r["dead"] == [r["victim"]]
    assert r["state"] == "sealed" and r["records"] == 400 and r["whole"]
    victim_host = int(r["host"][1:])
    assert hosts.servers[victim_host].wait(30) is not None

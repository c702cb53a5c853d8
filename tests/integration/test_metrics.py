"""Prometheus metrics: each server's endpoint scraped over real HTTP, before and after operations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import memfabric
from memfabric import Affinity
from memfabric.launcher import LocalFabric
from memfabric.limits import MAX_METRICS_SCRAPES

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, free_ports, wait_until

PAGE = 4096
MF = [sys.executable, "-m", "memfabric"]


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=WAIT_S) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ops(samples: dict, op: str) -> float:
    return value(samples, "memfabric_operation_seconds_count", op=op)


def errors(samples: dict, op: str, code: str) -> float:
    return value(samples, "memfabric_operation_errors_total", op=op, code=code)


@pytest.fixture
def metrics_fabric():
    port = free_ports(2)
    fab = LocalFabric(short_tmp_dir("mf-met-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--metrics-port", str(port)]).start()
    try:
        yield fab, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    finally:
        fab.stop()


def test_scraped_figures_move_as_the_operations_go(metrics_fabric):
    fab, (one, two) = metrics_fabric
    before = scrape(one)
    assert any(k[0] == "memfabric_server_info" and ("server_id", "1") in k[1] for k in before)
    assert value(before, "memfabric_server_epoch") >= 1
    assert value(before, "memfabric_server_uptime_seconds") > 0
    pool = {"pool": "default", "medium": "dram"}
    assert value(before, "memfabric_pool_capacity_bytes", **pool) == 16 << 20
    assert value(before, "memfabric_pool_used_bytes", **pool) == 0
    assert value(before, "memfabric_pool_free_bytes", **pool) == 16 << 20
    assert value(before, "memfabric_namespaces") == 0
    assert value(before, "memfabric_peer_up", server_id="1", host=_host(before)) == 1
    assert value(before, "memfabric_peer_up", server_id="2", host=_host(before)) == 1
    assert ops(before, "alloc") == 0
    assert ("process_open_fds", ()) in before          # the process's own figures come along

    with memfabric.init(fab.directory) as session:
        ns = session.create_namespace("metered", sec_id="k")
        kept = [ns.alloc(10000, Affinity("server", 1)) for _ in range(3)]
        kept.pop().free()
        with pytest.raises(memfabric.NoSuchObject):
            ns.open(kept[0].bm_id.rsplit("-", 1)[0] + "-999999")
        with pytest.raises(memfabric.InvalidArgument):
            session.local.call("no_such_operation")
        during = scrape(one)
        assert value(during, "memfabric_clients", door="ipc") >= 1

    after = scrape(one)
    assert ops(after, "ns_create") == ops(before, "ns_create") + 1
    assert ops(after, "alloc") == 3 and ops(after, "free") == 1
    assert errors(after, "describe", "NO_SUCH_OBJECT") == errors(before, "describe", "NO_SUCH_OBJECT") + 1
    assert ops(after, "unknown") == ops(before, "unknown") + 1          # never the wire's name
    assert errors(after, "unknown", "INVALID_ARGUMENT") == 1
    assert not any("no_such_operation" in str(key) for key in after)
    # The histogram is whole: cumulative buckets, +Inf is the count, time was spent.
    buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in after.items()
                      if k[0] == "memfabric_operation_seconds_bucket" and ("op", "alloc") in k[1]))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (float("inf"), 3)
    assert value(after, "memfabric_operation_seconds_sum", op="alloc") > 0
    # Two objects of 10,000 bytes: three pages each, in the pool and in the namespace.
    held = {"pool": "default", "ns": "metered"}
    assert value(after, "memfabric_namespaces") == 1
    assert value(after, "memfabric_namespace_objects", **held) == 2
    assert value(after, "memfabric_namespace_bytes", **held) == 2 * 3 * PAGE
    assert value(after, "memfabric_pool_used_bytes", **pool) == 2 * 3 * PAGE
    assert value(after, "memfabric_pool_free_bytes", **pool) == (16 << 20) - 2 * 3 * PAGE
    assert 0 < value(after, "memfabric_pool_lendable_bytes", **pool) <= (16 << 20) - 2 * 3 * PAGE
    # The other server holds nothing of it, and counted no alloc.
    other = scrape(two)
    assert value(other, "memfabric_pool_used_bytes", **pool) == 0 and ops(other, "alloc") == 0


def _host(samples: dict) -> str:
    return next(dict(k[1])["host"] for k in samples if k[0] == "memfabric_server_info")


def test_rpc_clients_and_peer_liveness(metrics_fabric):
    fab, (one, two) = metrics_fabric
    base = value(scrape(one), "memfabric_clients", door="rpc")
    with memfabric.init(os.path.join(fab.directory, "remote.toml")) as remote:
        assert remote.local.server_id == 1
        assert value(scrape(one), "memfabric_clients", door="rpc") == base + 1
    wait_until(lambda: value(scrape(one), "memfabric_clients", door="rpc") == base, "the RPC client to be gone")
    host = _host(scrape(one))
    os.kill(fab.server_pids()[2], signal.SIGKILL)
    seen = wait_until(lambda: (s := scrape(one)) and value(s, "memfabric_peer_up", server_id="2", host=host) == 0
                      and s, "server 1 to see server 2 dead")
    assert value(seen, "memfabric_peer_up", server_id="1", host=host) == 1
    assert value(seen, "memfabric_peer_last_seen_seconds", server_id="2", host=host) >= 2.0  # its liveness timeout
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(two)


def test_scrapes_at_once_are_bounded_and_garbage_leaves_the_endpoint_serving(metrics_fabric):
    fab, (one, _) = metrics_fabric
    host, port = one.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=WAIT_S) for _ in range(MAX_METRICS_SCRAPES)]
    try:
        # Every slot is taken by a client that says nothing: the next one is closed, not queued.
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                assert extra.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in idle:
            sock.close()
    for junk in (os.urandom(3000), b"GET " + b"A" * 70000 + b"\r\n\r\n", b"\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            try:
                sock.sendall(junk)
                sock.recv(100)
            except OSError:
                pass
    samples = wait_until(lambda: _try_scrape(one), "the endpoint to serve again")
    assert value(samples, "memfabric_server_epoch") >= 1
    with memfabric.init(fab.directory) as session:     # and the server itself never noticed
        session.create_namespace("after-junk", sec_id="k").alloc(4096).write(b"fine")


def _try_scrape(address: str) -> dict | None:
    try:
        return scrape(address)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_a_taken_metrics_port_stops_the_server_before_it_reserves_anything():
    directory = short_tmp_dir("mf-met-")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = os.path.join(directory, "server.toml")
        with open(config, "w") as f:
            f.write(f'[server]\ndata_dir = "{directory}/data"\nmetrics_listen = "127.0.0.1:{port}"\n'
                    f'[cluster]\npath = "{directory}/cluster.db"\n'
                    f'[[pool]]\nname = "default"\ncapacity = "4MiB"\n')
        proc = subprocess.run(MF + ["server", "--config", config], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"server.metrics_listen 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr
    assert "reserving" not in proc.stdout + proc.stderr


def test_up_refuses_metrics_ports_past_the_last():
    directory = os.path.join(short_tmp_dir("mf-met-"), "fabric")
    proc = subprocess.run(MF + ["up", "--dir", directory, "--servers", "2", "--metrics-port", "65535"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--metrics-port 65535 with 2 servers" in proc.stderr, proc.stderr
    assert not os.path.exists(directory)


def test_kv_counters_are_scraped_per_namespace(metrics_fabric):
    fab, (one, two) = metrics_fabric
    with memfabric.init(fab.directory, server=0) as session:
        kv = session.create_namespace("kvmetered", sec_id="k").kv()
        kv.put_many({f"k{i}": b"v" * 100 for i in range(40)})
        kv.put("short", b"x", ttl_s=0.05)
        for i in range(10):
            kv.get(f"k{i}")                      # same host: counted by the client itself
        kv.get("missing")
        kv.configure(memory_limit="8MiB")
        stats = kv.stats()
        wait_until(lambda: kv.stats()["expired"] == 1, "the sweep to expire the short key")
        labels = {"pool": "default", "ns": "kvmetered"}
        both = [scrape(one), scrape(two)]
        total = {name: sum(value(s, name, **labels) for s in both)
                 for name in ("memfabric_kv_keys", "memfabric_kv_hits_total", "memfabric_kv_misses_total",
                              "memfabric_kv_expired_total", "memfabric_kv_evictions_total", "memfabric_kv_bytes")}
        assert total["memfabric_kv_keys"] == 40
        assert total["memfabric_kv_hits_total"] == stats["hits"] >= 10
        assert total["memfabric_kv_misses_total"] == stats["misses"] >= 1
        assert total["memfabric_kv_expired_total"] == 1 and total["memfabric_kv_evictions_total"] == 0
        assert total["memfabric_kv_bytes"] >= 40 * 100
        assert value(both[0], "memfabric_kv_memory_limit_bytes", **labels) == 8 << 20

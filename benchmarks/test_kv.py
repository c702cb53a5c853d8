"""MemKV's benchmark suite: `./dev test benchmarks/test_kv.py`.

Each case has its baseline in the same run, in the same group of pytest-benchmark's table:
a real redis-server on loopback (redis-py), and numpy's memcpy for the same-host copies.
`memfabric bench --kv` prints the issue's targets and the ratios directly.
"""

import os
import tempfile

import numpy as np
import pytest

import memfabric
from memfabric.kv.bench import RedisServer
from memfabric.launcher import LocalFabric

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]


def _ids(size: int) -> str:
    return f"{size >> 10}KiB"


@pytest.fixture(scope="module")
def fabric():
    with tempfile.TemporaryDirectory(prefix="mf-bench-kv-", dir="/tmp") as directory:
        with LocalFabric(directory, servers=1, capacity="512MiB", segment_size="32MiB") as fab:
            yield fab


@pytest.fixture(scope="module")
def kvs(fabric):
    """The same keyspace from a same-host client and from a remote (RPC) one."""
    with memfabric.init(fabric.directory) as local, \
            memfabric.init(os.path.join(fabric.directory, "remote.toml")) as remote:
        ns = local.create_namespace("bench-kv", sec_id="bench")
        try:
            yield {"same-host": ns.kv(), "remote": remote.namespace("bench-kv", "bench").kv()}
        finally:
            ns.destroy()


@pytest.fixture(scope="module")
def redis_client():
    server = RedisServer()
    try:
        yield server.client
    finally:
        server.close()


def _value(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_get_memcpy_baseline(benchmark, size):
    benchmark.group = f"get {_ids(size)}"
    src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    benchmark(np.copyto, dst, src)


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_get_redis_baseline(benchmark, redis_client, size):
    benchmark.group = f"get {_ids(size)}"
    redis_client.set(b"bench", _value(size))
    assert benchmark(redis_client.get, b"bench") == _value(size)


@pytest.mark.parametrize("where", ["same-host", "remote"])
@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_get_into(benchmark, kvs, where, size):
    benchmark.group = f"get {_ids(size)}"
    kv = kvs[where]
    kv.put(f"get-{size}", _value(size))
    into = np.zeros(size, dtype=np.uint8)
    assert benchmark(kv.get_into, f"get-{size}", into) == size
    assert into.tobytes() == _value(size)


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_put_redis_baseline(benchmark, redis_client, size):
    benchmark.group = f"put {_ids(size)}"
    value = _value(size)
    benchmark(redis_client.set, b"bench-put", value)


@pytest.mark.parametrize("where", ["same-host", "remote"])
@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_put(benchmark, kvs, where, size):
    benchmark.group = f"put {_ids(size)}"
    kv = kvs[where]
    value = _value(size)
    assert benchmark(kv.put, f"put-{size}", value) is True
    assert kv.get(f"put-{size}") == value


KEYS = [f"batch-{i}".encode() for i in range(1000)]


def test_get_many_redis_mget_baseline(benchmark, redis_client):
    benchmark.group = "1,000 x 4 KiB in one call"
    redis_client.mset({k: _value(4096) for k in KEYS})
    assert len(benchmark(redis_client.mget, KEYS)) == len(KEYS)


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_get_many(benchmark, kvs, where):
    benchmark.group = "1,000 x 4 KiB in one call"
    kv = kvs[where]
    kv.put_many({k: _value(4096) for k in KEYS})
    got = benchmark(kv.get_many, KEYS)
    assert got == [_value(4096)] * len(KEYS)

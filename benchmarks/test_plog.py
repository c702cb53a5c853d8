"""MemPlog's benchmark suite: `./dev test benchmarks/test_plog.py`.

Each case has its baseline in the same run, in the same group of pytest-benchmark's table:
`os.write` + `os.fsync` of the same record to a file on the same disk as the pmem pool's
files (what a write-ahead log does without MemPlog), and `list.append` (the floor).
`memfabric bench --plog` adds the group-commit run (many appending processes at once).
"""

import os
import tempfile

import pytest

import memfabric
from memfabric.launcher import LocalFabric

SIZES = [64, 4 << 10, 1 << 20]
CAPACITY = 1 << 30        # room for every round pytest-benchmark runs of the largest record


def _ids(size: int) -> str:
    return f"{size}B" if size < 1024 else f"{size >> 10}KiB"


@pytest.fixture(scope="module")
def fabric():
    with tempfile.TemporaryDirectory(prefix="mf-bench-plog-", dir="/tmp") as directory:
        with LocalFabric(directory, servers=1, capacity="64MiB", segment_size="4MiB",
                         extra_args=["--pool", "pmem:pmem:2GiB"]) as fab:
            yield fab


@pytest.fixture(scope="module")
def namespaces(fabric):
    """The same pmem namespace from a same-host client and from a remote (RPC) one."""
    with memfabric.init(fabric.directory) as local, \
            memfabric.init(os.path.join(fabric.directory, "remote.toml")) as remote:
        ns = local.create_namespace("bench-plog", sec_id="bench", pool="pmem")
        try:
            yield {"same-host": ns, "remote": remote.namespace("bench-plog", "bench", pool="pmem")}
        finally:
            ns.destroy()


@pytest.fixture
def plog(namespaces, request):
    where = request.node.callspec.params["where"]
    log = namespaces[where].create_plog(f"bench-{where}-{id(request)}", CAPACITY)
    yield log
    log.delete()


@pytest.fixture
def fsync_file(fabric):
    path = os.path.join(fabric.directory, "baseline.log")       # the pmem pool's disk
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    yield fd
    os.close(fd)
    os.unlink(path)


def _rounds(size: int) -> dict:
    """Bounded rounds: every record stays in the plog's capacity."""
    return {"rounds": 200 if size >= 1 << 20 else 2000, "iterations": 1, "warmup_rounds": 1}


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_append_write_fsync_baseline(benchmark, fsync_file, size):
    benchmark.group = f"append {_ids(size)}"
    record = b"r" * size
    benchmark.pedantic(lambda: (os.write(fsync_file, record), os.fsync(fsync_file)), **_rounds(size))


def test_append_list_floor(benchmark):
    benchmark.group = "append 4KiB"
    floor: list[bytes] = []
    benchmark.pedantic(floor.append, args=(b"r" * 4096,), **_rounds(4096))


@pytest.mark.parametrize("where", ["same-host", "remote"])
@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_append(benchmark, plog, where, size):
    benchmark.group = f"append {_ids(size)}"
    record = bytes(range(256)) * (size // 256) if size >= 256 else b"r" * size
    offset = benchmark.pedantic(plog.append, args=(record,), **_rounds(size))
    assert plog.read(offset, size) == record


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_append_many(benchmark, plog, where):
    benchmark.group = "append_many 100 x 4KiB"
    batch = [bytes([i]) * 4096 for i in range(100)]
    offsets = benchmark.pedantic(plog.append_many, args=(batch,), rounds=200, iterations=1, warmup_rounds=1)
    assert [plog.read(o, 4096) for o in offsets] == batch


def test_append_many_write_fsync_baseline(benchmark, fsync_file):
    benchmark.group = "append_many 100 x 4KiB"
    batch = [bytes([i]) * 4096 for i in range(100)]
    benchmark.pedantic(lambda: (os.writev(fsync_file, batch), os.fsync(fsync_file)),
                       rounds=200, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("where", ["same-host", "remote"])
def test_record_by_index(benchmark, plog, where):
    benchmark.group = "record(i) 4KiB"
    records = [bytes([i % 256]) * 4096 for i in range(1000)]
    plog.append_many(records[:500])
    plog.append_many(records[500:])
    assert benchmark(plog.record, 777) == records[777]

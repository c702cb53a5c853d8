"""`memfabric bench` rows for batches across objects (Session.read_many / write_many).

Same host: 1,000 reads or writes of 4 KiB objects in one call, against 1,000 memoryview
copies of 4 KiB (each a slice of a source copied into its own buffer), the floor of any
Python loop over 1,000 buffers. Remote: the same batch over RPC, against Redis's MGET and
MSET of 1,000 4 KiB values, a real redis-server on loopback with redis-py and its hiredis
parser (skipped, and said so, when either is missing). Every row of a table is measured in
the same run, taking turns in blocks (bench.measure_interleaved).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from typing import Any, Callable

import numpy as np

from .client.session import Session

BATCH_ITEMS = 1000
BATCH_ITEM_BYTES = 4096
REDIS_READY_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 5.0


class RedisBaseline:
    """A redis-server of our own on a free loopback port, with a redis-py client. `skipped`
    says why there is none (no redis-server, no redis module, it did not start)."""

    def __init__(self) -> None:
        self.skipped: str | None = None
        self.client: Any = None
        self._proc: subprocess.Popen | None = None
        binary = shutil.which("redis-server")
        try:
            import redis
        except ImportError:
            self.skipped = "skipped: no redis Python client (pip install redis hiredis)"
            return
        if binary is None:
            self.skipped = "skipped: no redis-server (Debian: apt-get install redis-server)"
            return
        with socket.socket() as probe:       # a free port (the kernel's choice), handed to redis
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                       "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=REDIS_READY_TIMEOUT_S)
        deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
        while True:
            try:
                self.client.ping()
                return
            except redis.RedisError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    self.skipped = "skipped: redis-server did not start"
                    return
                time.sleep(0.05)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class _Batch:
    """1,000 objects of 4 KiB in a namespace of their own, buffers for them, and checks."""

    def __init__(self, session: Session) -> None:
        self.ns = session.create_namespace(f"bench-batch-{time.monotonic_ns()}", sec_id="bench")
        try:
            self.objects = [self.ns.alloc(BATCH_ITEM_BYTES) for _ in range(BATCH_ITEMS)]
        except BaseException:
            self.ns.destroy()
            raise
        n = BATCH_ITEMS * BATCH_ITEM_BYTES
        self.source = memoryview(np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)).cast("B")
        self.ranges = [(i * BATCH_ITEM_BYTES, (i + 1) * BATCH_ITEM_BYTES) for i in range(BATCH_ITEMS)]
        self.sources = [self.source[a:b] for a, b in self.ranges]
        # Each read lands in buffers of its own, touched first (no page faults in any row).
        self.into = [memoryview(bytearray(b"\1" * BATCH_ITEM_BYTES)) for _ in range(BATCH_ITEMS)]
        self.copied = [memoryview(bytearray(b"\1" * BATCH_ITEM_BYTES)) for _ in range(BATCH_ITEMS)]
        self.reads = [(bm, 0, BATCH_ITEM_BYTES, buf) for bm, buf in zip(self.objects, self.into)]
        self.writes = [(bm, 0, BATCH_ITEM_BYTES, src) for bm, src in zip(self.objects, self.sources)]

    def copies(self) -> None:
        source = self.source
        for into, (a, b) in zip(self.copied, self.ranges):
            into[:] = source[a:b]

    def one_by_one(self) -> None:
        for bm, into in zip(self.objects, self.into):
            bm.read(0, into=into)

    def check(self, results: list[int]) -> None:
        assert not any(results), f"a batch failed: {sorted(set(results))}"
        assert all(bytes(into) == bytes(src) for into, src in zip(self.into, self.sources)), \
            "a batch read back differs from what was written"

    def close(self) -> None:
        self.ns.destroy()


def _ok(results: list[int]) -> None:
    if any(results):
        raise AssertionError(f"a batch failed: {sorted(set(results))}")


def bench_batch_local(session: Session, repeat: int) -> dict[str, list[float]]:
    """Same host: read_many and write_many of 1,000 x 4 KiB against 1,000 memoryview copies."""
    batch = _Batch(session)
    try:
        fns: dict[str, Callable[[], object]] = {
            "1,000 memoryview copies of 4KiB (baseline)": batch.copies,
            "write_many 1,000 x 4KiB": lambda: _ok(session.write_many(batch.writes)),
            "read_many 1,000 x 4KiB": lambda: _ok(session.read_many(batch.reads)),
            "1,000 x read(into=) 4KiB, one by one": batch.one_by_one,
        }
        from .bench import measure_interleaved
        samples = measure_interleaved(fns, repeat or 60)
        batch.check(session.read_many(batch.reads))
    finally:
        batch.close()
    return samples


def bench_batch_remote(session: Session, repeat: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Over RPC: read_many and write_many of 1,000 x 4 KiB against Redis's MGET and MSET of
    1,000 4 KiB values; returns the samples and, per Redis row skipped, why."""
    from .bench import measure_interleaved
    redis = RedisBaseline()
    batch = _Batch(session)
    skipped: dict[str, str] = {}
    try:
        fns: dict[str, Callable[[], object]] = {}
        if redis.skipped is None:
            keys = [f"bench:{i}" for i in range(BATCH_ITEMS)]
            values = {key: bytes(src) for key, src in zip(keys, batch.sources)}
            redis.client.mset(values)
            fns["Redis MGET 1,000 x 4KiB (baseline)"] = lambda: redis.client.mget(keys)
            fns["Redis MSET 1,000 x 4KiB (baseline)"] = lambda: redis.client.mset(values)
        else:
            skipped["Redis MGET 1,000 x 4KiB (baseline)"] = redis.skipped
            skipped["Redis MSET 1,000 x 4KiB (baseline)"] = redis.skipped
        fns["write_many 1,000 x 4KiB (RPC)"] = lambda: _ok(session.write_many(batch.writes))
        fns["read_many 1,000 x 4KiB (RPC)"] = lambda: _ok(session.read_many(batch.reads))
        fns["1,000 x read(into=) 4KiB (RPC), one by one"] = batch.one_by_one
        samples = measure_interleaved(fns, repeat or 30)
        batch.check(session.read_many(batch.reads))
        if redis.skipped is None:
            assert redis.client.mget(keys[:3]) == [bytes(src) for src in batch.sources[:3]]
    finally:
        batch.close()
        redis.close()
    return samples, skipped

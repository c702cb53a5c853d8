"""`memfabric bench --kv`: MemKV measured against baselines in the same run.

Baselines: a real `redis-server` on loopback through redis-py (hiredis's parser when it is
installed), numpy's memcpy for same-host copies, and a raw Python socket for the remote
path. Each MemKV figure takes turns in blocks with its baselines (bench.measure_interleaved),
so a noisy stretch of the machine falls on all alike. The issue's targets are printed
beside the figures they bound; the verdicts are this run's, on this machine.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..bench import RawPeer, measure_interleaved, raw_modes, summarize
from ..client.session import Session, init
from ..launcher import LocalFabric
from ..limits import BUSY_POLL_US
from ..units import format_size

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, 64 * KiB, MiB, 16 * MiB)
BATCH_KEYS = 1000
SCALE_SMALL = 1000
SCALE_VALUE_BYTES = 64
SCALE_PROBES = 4096          # keys read at random, in turn, from each keyspace
REDIS_START_S = 10.0


@dataclass
class Row:
    group: str                   # latency, throughput, batch, scale
    name: str
    size_bytes: int
    median_us: float
    p99_us: float
    throughput_gib_s: float | None = None
    baseline: str | None = None  # what the ratio is to
    ratio: float | None = None   # the baseline's median over this one's (> 1: faster than it)
    target: str | None = None
    met: bool | None = None


class RedisServer:
    """A real redis-server on a free loopback port, in a directory of its own, without
    persistence; stopped (and its directory removed) on close."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (./dev setup installs it)")
        import redis
        self.directory = tempfile.mkdtemp(prefix="mf-redis-", dir="/tmp")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.directory, "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        deadline = time.monotonic() + REDIS_START_S
        while True:
            try:
                self.client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self.directory, ignore_errors=True)


def _row(group: str, name: str, size: int, samples: list[float], baseline: tuple[str, float] | None = None,
         target_us: float | None = None, target_text: str | None = None) -> Row:
    r = summarize(name, size, samples, None)
    row = Row(group, name, size, r.median_us, r.p99_us, r.throughput_gib_s)
    if baseline is not None:
        row.baseline, row.ratio = baseline[0], baseline[1] / r.median_us
    if target_us is not None:
        row.target, row.met = target_text or f"median <= {target_us:g} us", r.median_us <= target_us
    return row


def _cycling_get(kv: Any, keys: list[bytes]) -> Callable[[], Any]:
    """A get of the next of `keys`, round and round."""
    cursor = itertools.cycle(keys)
    return lambda: kv.get(next(cursor))


def _value(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


def bench_latency(local: Any, remote: Any, redis_client: Any | None, repeat: int) -> list[Row]:
    """4 KiB get and put: same host, remote, and redis-server, taking turns."""
    value = _value(4 * KiB)
    raw = value.tobytes()
    for kv in (local, remote):
        kv.put(b"lat", value)
    if redis_client is not None:
        redis_client.set(b"lat", raw)
    rows = []
    for op in ("get", "put"):
        fns: dict[str, Callable[[], object]] = {
            f"{op} 4 KiB, same host": (lambda: local.get(b"lat")) if op == "get" else (lambda: local.put(b"lat", value)),
            f"{op} 4 KiB, remote (RPC)": (lambda: remote.get(b"lat")) if op == "get" else (lambda: remote.put(b"lat", value)),
        }
        if redis_client is not None:
            fns[f"redis-server {op} 4 KiB (loopback)"] = ((lambda: redis_client.get(b"lat")) if op == "get"
                                                          else (lambda: redis_client.set(b"lat", raw)))
        samples = measure_interleaved(fns, repeat)
        redis_median = None
        if redis_client is not None:
            redis_name = f"redis-server {op} 4 KiB (loopback)"
            redis_row = _row("latency", redis_name, 4 * KiB, samples.pop(redis_name))
            redis_median = ("redis-server", redis_row.median_us)
        targets = {("get", "same host"): 5.0, ("put", "same host"): 30.0, ("get", "remote (RPC)"): 60.0}
        for name, taken in samples.items():
            where = name.split(", ", 1)[1]
            rows.append(_row("latency", name, 4 * KiB, taken, redis_median, targets.get((op, where))))
        if redis_client is not None:
            rows.append(redis_row)
    return rows


def bench_throughput(local: Any, remote: Any, redis_client: Any | None, sizes: list[int], busy_poll_us: int,
                     repeat: int) -> list[Row]:
    """get (into a buffer) and put per size: same host against memcpy, remote against a raw
    socket moving the same bytes, and redis-server's get and set."""
    rows: list[Row] = []
    modes = raw_modes(busy_poll_us)
    peer = RawPeer(modes[-1][1])          # waits as the fabric does: polling, when it polls
    try:
        for size in sizes:
            n = repeat or max(20, min(2000, (128 * MiB) // size))
            value = _value(size)
            raw = value.tobytes()
            into = np.empty(size, dtype=np.uint8)
            copy_dst = np.empty(size, dtype=np.uint8)
            raw_into = memoryview(bytearray(size))
            key = f"tp-{size}".encode()
            local.put(key, value)
            remote.put(key, value)
            if redis_client is not None:
                redis_client.set(key, raw)
            for op in ("get", "put"):
                fns: dict[str, Callable[[], object]] = {
                    "memcpy": lambda: np.copyto(copy_dst, value),
                    "same host": (lambda: local.get_into(key, into)) if op == "get" else (lambda: local.put(key, value)),
                    "raw socket": (lambda: peer.read(raw_into)) if op == "get" else (lambda: peer.write(memoryview(raw))),
                    "remote (RPC)": ((lambda: remote.get_into(key, into)) if op == "get"
                                     else (lambda: remote.put(key, value))),
                }
                if redis_client is not None:
                    fns["redis-server"] = (lambda: redis_client.get(key)) if op == "get" else (lambda: redis_client.set(key, raw))
                samples = measure_interleaved(fns, n)
                memcpy = _row("throughput", f"memcpy {format_size(size)}", size, samples["memcpy"])
                raw_row = _row("throughput", f"raw socket {'read' if op == 'get' else 'write'} {format_size(size)}",
                               size, samples["raw socket"])
                redis_row = (_row("throughput", f"redis-server {op} {format_size(size)}", size, samples["redis-server"])
                             if redis_client is not None else None)
                same = _row("throughput", f"{op} {format_size(size)}, same host", size, samples["same host"],
                            ("memcpy", memcpy.median_us))
                if op == "get" and size == 16 * MiB:
                    same.target, same.met = ">= 0.80 of memcpy", bool(same.ratio and same.ratio >= 0.8)
                far = _row("throughput", f"{op} {format_size(size)}, remote (RPC)", size, samples["remote (RPC)"],
                           ("raw socket", raw_row.median_us))
                rows += [memcpy, same, raw_row, far] + ([redis_row] if redis_row else [])
            check = np.empty(size, dtype=np.uint8)
            assert remote.get_into(key, check) == size and np.array_equal(check, value), "read back differs"
    finally:
        peer.close()
    return rows


def bench_batch(local: Any, remote: Any, redis_client: Any | None, repeat: int) -> list[Row]:
    """A batch of 1,000 gets of 4 KiB values."""
    keys = [f"batch-{i}".encode() for i in range(BATCH_KEYS)]
    value = _value(4 * KiB)
    raw = value.tobytes()
    local.put_many({k: value for k in keys})
    remote.put_many({k: value for k in keys})
    fns: dict[str, Callable[[], object]] = {
        "get_many 1,000 x 4 KiB, same host": lambda: local.get_many(keys),
        "get_many 1,000 x 4 KiB, remote (RPC)": lambda: remote.get_many(keys),
    }
    if redis_client is not None:
        redis_client.mset({k: raw for k in keys})
        fns["redis-server MGET 1,000 x 4 KiB"] = lambda: redis_client.mget(keys)
    samples = measure_interleaved(fns, repeat)
    redis_median = None
    rows = []
    if redis_client is not None:
        redis_row = _row("batch", "redis-server MGET 1,000 x 4 KiB", BATCH_KEYS * 4 * KiB,
                         samples.pop("redis-server MGET 1,000 x 4 KiB"))
        redis_median = ("redis-server", redis_row.median_us)
    for name, taken in samples.items():
        target = 2000.0 if name.endswith("same host") else None
        rows.append(_row("batch", name, BATCH_KEYS * 4 * KiB, taken, redis_median, target,
                         "median <= 2 ms" if target else None))
    if redis_client is not None:
        rows.append(redis_row)
    assert local.get_many(keys[:3]) == [raw] * 3
    return rows


def bench_scale(session: Session, large_keys: int, repeat: int) -> list[Row]:
    """Same-host get latency in a keyspace of 1,000 keys and in one of `large_keys`; the
    index's bytes per key. Both keyspaces are filled first, then read in turns of a whole
    pass over their probes each: on this shared machine, memory-bound stretches come and go
    for seconds (the 1,000-key case alone read 2.5 us in one stretch and 4.5 us in the next),
    and taking turns puts them on both alike."""
    value = b"v" * SCALE_VALUE_BYTES
    counts = (SCALE_SMALL, large_keys)
    spaces, gets = [], {}        # by turn, not by count: --scale-keys may be SCALE_SMALL too
    try:
        for turn, count in enumerate(counts):
            ns = session.create_namespace(f"bench-kv-scale-{count}-{time.monotonic_ns()}", sec_id="bench")
            spaces.append(ns)
            kv = ns.kv()
            batch = 2000
            for start in range(0, count, batch):
                kv.put_many({f"key-{i:09d}".encode(): value for i in range(start, min(count, start + batch))})
            rng = np.random.default_rng(count)
            probes = [f"key-{i:09d}".encode() for i in rng.integers(0, count, SCALE_PROBES)]
            gets[str(turn)] = _cycling_get(kv, probes)
        samples = measure_interleaved(gets, max(repeat or 20000, SCALE_PROBES), block=SCALE_PROBES)
        rows = []
        for turn, (count, ns) in enumerate(zip(counts, spaces)):
            row = _row("scale", f"get of {count:,} keys, same host", SCALE_VALUE_BYTES, samples[str(turn)])
            stats = ns.kv().stats()
            row.name += f" (index {stats['index_bytes'] / max(stats['keys'], 1):.0f} B/key)"
            rows.append(row)
    finally:
        for ns in spaces:
            ns.destroy()
    small, big = rows
    big.baseline, big.ratio = f"{SCALE_SMALL:,} keys", small.median_us / big.median_us
    big.target, big.met = "within 1.5x of 1,000 keys", big.median_us <= 1.5 * small.median_us
    return rows


def run_kv_bench(directory: str | None, sizes: list[int] | None, repeat: int, as_json: bool,
                 busy_poll_us: int = BUSY_POLL_US, scale_keys: int = 1_000_000) -> int:
    sizes = list(sizes or SIZES)
    with ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-kv-", dir="/tmp"))
            # Room for the largest values (twice: same host and remote), and the scale keyspace.
            capacity = max(1024 * MiB, 8 * max(sizes) + scale_keys * 400)
            stack.enter_context(LocalFabric(directory, servers=1, capacity=f"{capacity >> 20}MiB",
                                            busy_poll_us=busy_poll_us))
        here = stack.enter_context(init(directory, busy_poll_us=busy_poll_us))
        there = stack.enter_context(init(os.path.join(directory, "remote.toml"), busy_poll_us=busy_poll_us))
        name = f"bench-kv-{time.monotonic_ns()}"
        ns = here.create_namespace(name, sec_id="bench")
        stack.callback(ns.destroy)
        local, remote = ns.kv(), there.namespace(name, "bench").kv()
        redis_client, redis_note = None, None
        try:
            redis = RedisServer()
            stack.callback(redis.close)
            redis_client = redis.client
        except (RuntimeError, ImportError) as exc:
            redis_note = f"no redis-server baseline: {exc}"
        rows = bench_latency(local, remote, redis_client, repeat or 5000)
        rows += bench_throughput(local, remote, redis_client, sizes, busy_poll_us, repeat)
        rows += bench_batch(local, remote, redis_client, repeat or 200)
        rows += bench_scale(here, scale_keys, repeat)
    if as_json:
        print(json.dumps({"kv": [asdict(r) for r in rows], "note": redis_note}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console(width=None if os.isatty(1) else 160)
    table = Table(title=f"MemKV (1 server; remote: RPC over loopback; client and server poll {busy_poll_us} us). "
                        "ratio: the baseline's median over this one's (> 1: faster)")
    for column in ("operation", "median", "p99", "throughput", "ratio", "to", "target", "met"):
        table.add_column(column, justify="left" if column in ("operation", "to", "target") else "right")
    for r in rows:
        table.add_row(r.name, f"{r.median_us:.1f} us", f"{r.p99_us:.1f} us",
                      "-" if r.throughput_gib_s is None or r.group != "throughput" else f"{r.throughput_gib_s:.2f} GiB/s",
                      "-" if r.ratio is None else f"{r.ratio:.2f}", r.baseline or "", r.target or "",
                      "" if r.met is None else ("yes" if r.met else "NO"))
    console.print(table)
    if redis_note:
        console.print(redis_note)
    return 0

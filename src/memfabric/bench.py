"""`memfabric bench`: the data and control paths, measured against numpy's memcpy in the same run.

Every figure is a median or p99 over repeated operations; throughput is size / median.
The ratio column is memcpy's median time over the operation's: 1.0 means as fast as memcpy.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .client.session import Session, init
from .launcher import LocalFabric
from .units import format_size


@dataclass
class Result:
    name: str
    size_bytes: int
    median_us: float
    p99_us: float
    throughput_gib_s: float | None
    ratio_to_memcpy: float | None


def measure(fn: Callable[[], object], repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1000)
    return samples


def summarize(name: str, size: int, samples: list[float], memcpy_median_us: float | None) -> Result:
    samples.sort()
    median = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    throughput = size / (median / 1e6) / (1 << 30) if size else None
    ratio = memcpy_median_us / median if memcpy_median_us else None
    return Result(name, size, median, p99, throughput, ratio)


def default_repeat(size: int) -> int:
    return max(10, min(3000, (256 << 20) // max(size, 1) // 2))


def bench_data_path(session: Session, sizes: list[int], repeat: int) -> list[Result]:
    ns = session.create_namespace(f"bench-{time.monotonic_ns()}", sec_id="bench")
    results: list[Result] = []
    try:
        for size in sizes:
            n = repeat or default_repeat(size)
            src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            dst = np.empty(size, dtype=np.uint8)
            dst[:] = 1   # fault it in: memcpy's baseline must not pay for page faults
            base = summarize("memcpy (numpy)", size, measure(lambda: np.copyto(dst, src), n), None)
            results.append(base)
            bm = ns.alloc(size)
            results.append(summarize("write (API)", size, measure(lambda: bm.write(src), n), base.median_us))
            results.append(summarize("read into (API)", size, measure(lambda: bm.read(0, into=dst), n),
                                     base.median_us))
            assert np.array_equal(dst, src), "read back differs from what was written"
            with bm.map() as m:
                view = np.frombuffer(m.view, dtype=np.uint8)
                results.append(summarize("write (mapping)", size, measure(lambda: np.copyto(view, src), n),
                                         base.median_us))
                results.append(summarize("read (mapping)", size, measure(lambda: np.copyto(dst, view), n),
                                         base.median_us))
                del view
            bm.free()
    finally:
        ns.destroy()
    return results


def bench_control_path(session: Session, repeat: int) -> list[Result]:
    n = repeat or 500
    ns = session.create_namespace(f"bench-ctl-{time.monotonic_ns()}", sec_id="bench")
    results = []
    try:
        held = []
        results.append(summarize("alloc 4KiB", 4096, measure(lambda: held.append(ns.alloc(4096)), n), None))
        it = iter(held)
        results.append(summarize("free 4KiB", 4096, measure(lambda: next(it).free(), n, warmup=0), None))
        results.append(summarize("alloc+free 4KiB", 4096, measure(lambda: ns.alloc(4096).free(), n), None))
        bm = ns.alloc(1 << 20)

        def map_unmap() -> None:
            with bm.map():
                pass
        results.append(summarize("map+unmap 1MiB", 1 << 20, measure(map_unmap, n), None))
        names = iter(range(10**9))
        created = []

        def create() -> None:
            name = f"b{time.monotonic_ns()}-{next(names)}"
            created.append(session.create_namespace(name, sec_id="bench"))
        results.append(summarize("namespace create", 0, measure(create, min(n, 200)), None))
        it2 = iter(created)
        results.append(summarize("namespace destroy", 0, measure(lambda: next(it2).destroy(),
                                                                 len(created) - 3, warmup=3), None))
        for leftover in it2:
            leftover.destroy()
    finally:
        ns.destroy()
    for r in results:
        r.throughput_gib_s = None
    return results


def run_bench(directory: str | None, sizes: list[int], repeat: int, as_json: bool) -> int:
    with ExitStack() as stack:
        if directory is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-", dir="/tmp"))
            largest = max(sizes)
            capacity = max(256 << 20, 4 * largest)
            stack.enter_context(LocalFabric(run_dir, servers=1, capacity=f"{capacity >> 20}MiB"))
            directory = run_dir
        session = stack.enter_context(init(directory))
        data = bench_data_path(session, sizes, repeat)
        control = bench_control_path(session, repeat)
    if as_json:
        print(json.dumps({"data_path": [asdict(r) for r in data],
                          "control_path": [asdict(r) for r in control]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console()
    table = Table(title="data path (same host): median and p99 per operation")
    for column in ("size", "operation", "median", "p99", "throughput", "vs memcpy"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for r in data:
        table.add_row(format_size(r.size_bytes), r.name, f"{r.median_us:.1f} us", f"{r.p99_us:.1f} us",
                      f"{r.throughput_gib_s:.2f} GiB/s",
                      "-" if r.ratio_to_memcpy is None else f"{r.ratio_to_memcpy:.2f}")
    console.print(table)
    ctl = Table(title="control path")
    for column in ("operation", "median", "p99"):
        ctl.add_column(column, justify="right" if column != "operation" else "left")
    for r in control:
        ctl.add_row(r.name, f"{r.median_us:.1f} us", f"{r.p99_us:.1f} us")
    console.print(ctl)
    return 0

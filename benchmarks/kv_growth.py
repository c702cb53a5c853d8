"""The longest single put while one keyspace grows to many keys (issue 9: a table that fills
must not stall its writers). Each put is timed alone.

    .venv/bin/python benchmarks/kv_growth.py [--keys 1000000] [--value-bytes 16]
        a same-host fabric of one server, puts through the client (wall time: on a shared
        machine its slowest puts are the machine's as much as the server's)
    .venv/bin/python benchmarks/kv_growth.py --in-process
        the server's own work for each put (kv/store.py on a memfd segment, no RPC): wall
        time and the thread's CPU time, which other processes do not stretch
"""

from __future__ import annotations

import argparse
import array
import os
import tempfile
import time

import memfabric
from memfabric.launcher import LocalFabric


def report(name: str, took: array.array) -> None:
    ordered = sorted(took)
    slowest = sorted(((t, i) for i, t in enumerate(took)), reverse=True)[:5]
    print(f"{name}: total {sum(took):.1f} s; percentiles (ms): " + ", ".join(
        f"p{q}: {ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] * 1000:.3f}" for q in (50, 99, 99.9))
        + "; over 20/50/100/500 ms: " + "/".join(str(sum(1 for t in took if t > limit))
                                                  for limit in (0.02, 0.05, 0.1, 0.5))
        + "; longest (ms @ key index): " + ", ".join(f"{t * 1000:.1f} @ {i}" for t, i in slowest))


def in_process(keys: int, value: bytes) -> None:
    from memfabric.core.allocator import Extent
    from memfabric.kv.heap import PAGE_BYTES
    from memfabric.kv.rules import key_hash
    from memfabric.kv.space import KeySpace, now_ms
    from memfabric.kv.store import Store
    from memfabric.media.dram import DramSegment

    segment_bytes = 1 << 30
    fd = os.memfd_create("kv-growth-bench")
    os.ftruncate(fd, segment_bytes)
    segment = DramSegment(1, fd, segment_bytes)
    pages = iter(range(0, segment_bytes, PAGE_BYTES))
    space = KeySpace("bench", "ns")
    store = space.store = Store(space, lambda _: segment, lambda n: [Extent(1, next(pages), n)],
                                lambda extents: None, lambda: None, "ns")
    wall, cpu = array.array("d", bytes(8 * keys)), array.array("d", bytes(8 * keys))
    view = memoryview(value)
    for i in range(keys):
        key = b"key:%d" % i
        t0, c0 = time.perf_counter(), time.thread_time()
        h = key_hash(key)
        store.write_inline(key, h, view, 0, i + 1, store.live(key, h, now_ms()), primary=True)
        wall[i], cpu[i] = time.perf_counter() - t0, time.thread_time() - c0
    print(f"{keys} puts of {len(value)} B values into one keyspace, in process (kv/store.py)")
    report("wall", wall)
    report("cpu ", cpu)
    print(f"keys: {space.keys()}, table slots: {space.table.slots}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--value-bytes", type=int, default=16)
    parser.add_argument("--in-process", action="store_true")
    args = parser.parse_args()
    value = b"v" * args.value_bytes
    if args.in_process:
        in_process(args.keys, value)
        return
    with tempfile.TemporaryDirectory(prefix="mf-growth-", dir="/tmp") as directory:
        with LocalFabric(directory, servers=1, capacity="1GiB"):
            with memfabric.init(directory) as session:
                kv = session.create_namespace("growth", sec_id="growth").kv()
                kv.put(b"warm", value)
                took = array.array("d", bytes(8 * args.keys))
                started = time.perf_counter()
                for i in range(args.keys):
                    t0 = time.perf_counter()
                    kv.put(b"key:%d" % i, value)
                    took[i] = time.perf_counter() - t0
                total = time.perf_counter() - started
                slowest = sorted(((t, i) for i, t in enumerate(took)), reverse=True)[:8]
                ordered = sorted(took)
                print("put latency percentiles (ms): " + ", ".join(
                    f"p{q}: {ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] * 1000:.2f}"
                    for q in (50, 99, 99.9, 99.99)))
                print("puts slower than 20/50/100/500 ms: " + "/".join(
                    str(sum(1 for t in took if t > limit)) for limit in (0.02, 0.05, 0.1, 0.5)))
                missing = sum(1 for i in range(0, args.keys, 997) if kv.get(b"key:%d" % i) != value)
                print(f"{args.keys} puts of {args.value_bytes} B values: total {total:.1f} s, "
                      f"mean {total / args.keys * 1e6:.0f} us")
                print("longest puts (ms @ key index): " +
                      ", ".join(f"{t * 1000:.1f} @ {i}" for t, i in slowest))
                print(f"sampled keys missing afterwards: {missing}; stats: {kv.stats()}")


if __name__ == "__main__":
    main()

"""The longest single put while one keyspace grows to many keys (issue 9: a table that fills
must not stall its writers). Same-host fabric of one server; each put is timed alone.

    .venv/bin/python benchmarks/kv_growth.py [--keys 1000000] [--value-bytes 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import memfabric
from memfabric.launcher import LocalFabric


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--value-bytes", type=int, default=16)
    args = parser.parse_args()
    value = b"v" * args.value_bytes
    with tempfile.TemporaryDirectory(prefix="mf-growth-", dir="/tmp") as directory:
        with LocalFabric(directory, servers=1, capacity="1GiB"):
            with memfabric.init(directory) as session:
                kv = session.create_namespace("growth", sec_id="growth").kv()
                kv.put(b"warm", value)
                slowest: list[tuple[float, int]] = []
                started = time.perf_counter()
                for i in range(args.keys):
                    t0 = time.perf_counter()
                    kv.put(b"key:%d" % i, value)
                    took = time.perf_counter() - t0
                    if len(slowest) < 8 or took > slowest[-1][0]:
                        slowest.append((took, i))
                        slowest.sort(reverse=True)
                        del slowest[8:]
                total = time.perf_counter() - started
                missing = sum(1 for i in range(0, args.keys, 997) if kv.get(b"key:%d" % i) != value)
                print(f"{args.keys} puts of {args.value_bytes} B values: total {total:.1f} s, "
                      f"mean {total / args.keys * 1e6:.0f} us")
                print("longest puts (ms @ key index): " +
                      ", ".join(f"{t * 1000:.1f} @ {i}" for t, i in slowest))
                print(f"sampled keys missing afterwards: {missing}; stats: {kv.stats()}")


if __name__ == "__main__":
    main()

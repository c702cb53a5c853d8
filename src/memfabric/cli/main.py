"""The `memfabric` command."""

from __future__ import annotations

import argparse
import sys

from ..config import check_busy_poll_us
from ..limits import BUSY_POLL_US
from ..units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _busy_poll_us(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    try:
        return check_busy_poll_us(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfabric", description="A distributed memory pool.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local fabric (embedded cluster service + N servers) in the foreground")
    up.add_argument("--dir", required=True, help="run directory; it becomes the clients' ockPath")
    up.add_argument("--servers", type=int, default=1, help="number of servers (default 1)")
    up.add_argument("--capacity", type=_size, default=256 << 20, help="DRAM each server gives (default 256MiB)")
    up.add_argument("--segment-size", type=_size, default=4 << 20, help="segment size (default 4MiB)")
    up.add_argument("--liveness-timeout", type=float, default=3.0,
                    help="seconds without a heartbeat before a server counts as dead (default 3)")
    up.add_argument("--busy-poll-us", type=_busy_poll_us, default=BUSY_POLL_US,
                    help=f"how long servers poll for a client's next request before sleeping "
                         f"(default {BUSY_POLL_US}; 0: never poll)")

    server = sub.add_parser("server", help="run one server from a TOML configuration")
    server.add_argument("--config", required=True)

    status = sub.add_parser("status", help="servers, pools and namespaces of a fabric")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="a fabric directory (as made by `memfabric up`)")
    where.add_argument("--config", help="a fabric.toml or a server's configuration")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser("demo", help="start a local fabric, run every BigMemory operation, stop")
    demo.add_argument("--dir", help="run directory (default: a temporary one)")

    bench = sub.add_parser("bench", help="measure the data and control paths against memcpy")
    bench.add_argument("--dir", help="use a running fabric at this ockPath instead of starting one")
    bench.add_argument("--sizes", default=None, help="comma-separated (default 4KiB..64MiB; remote 4KiB..16MiB)")
    bench.add_argument("--repeat", type=int, default=0, help="iterations per size (default: by size)")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--remote", action="store_true",
                       help="over RPC (loopback TCP), against a raw socket doing the same transfers")
    bench.add_argument("--busy-poll-us", type=_busy_poll_us, default=BUSY_POLL_US,
                       help=f"polling window of the bench's servers and client (default {BUSY_POLL_US}; 0: never)")
    bench.add_argument("--shm-size", type=_size, default=256 << 20,
                       help="the size whose copies are compared with multiprocessing.shared_memory "
                            "(default 256MiB; 0: skip)")

    load = sub.add_parser("load", help="many clients at once for a while, then an audit of the servers' memory")
    load.add_argument("--dir", help="use a running fabric at this ockPath instead of starting one")
    load.add_argument("--clients", type=int, default=16, help="client processes (default 16)")
    load.add_argument("--threads", type=int, default=1, help="threads per client, sharing its session (default 1)")
    load.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    load.add_argument("--servers", type=int, default=2, help="servers of the fabric it starts (default 2)")
    load.add_argument("--capacity", default="256MiB", help="DRAM each of those servers gives (default 256MiB)")
    load.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        if args.servers < 1:
            print("memfabric up: --servers must be at least 1", file=sys.stderr)
            return 2
        from .up import run_up
        return run_up(args.dir, args.servers, args.capacity, args.segment_size, args.liveness_timeout,
                      args.busy_poll_us)
    if args.command == "server":
        from ..server.main import run_server
        return run_server(args.config)
    if args.command == "status":
        from .status import run_status
        return run_status(args.dir or args.config, as_json=args.json)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.dir)
    if args.command == "bench":
        from ..bench import run_bench
        sizes = args.sizes or ("4KiB,64KiB,1MiB,16MiB" if args.remote else "4KiB,64KiB,1MiB,16MiB,64MiB")
        return run_bench(args.dir, [parse_size(s) for s in sizes.split(",")], args.repeat, args.json, args.remote,
                         args.busy_poll_us, args.shm_size)
    if args.command == "load":
        if args.clients < 1 or args.threads < 1 or not args.duration > 0 or args.servers < 1:
            print("memfabric load: --clients, --threads, --servers and --duration must be positive", file=sys.stderr)
            return 2
        from ..load import run_load
        return run_load(args.dir, args.clients, args.threads, args.duration, args.servers, args.capacity,
                        args.json)
    return 2

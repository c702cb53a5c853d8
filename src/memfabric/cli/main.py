"""The `memfabric` command."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable

from .. import __version__
from ..config import check_busy_poll_us
from ..core.namespaces import check_name
from ..errors import InvalidArgument
from ..launcher import PoolSpec
from ..limits import BUSY_POLL_US, DOWN_TIMEOUT_S, MAX_REQUEST_TIMEOUT_S, PAGE_SIZE_BYTES
from ..media.base import MEDIA
from ..stop_request import raise_if_interrupted
from ..units import format_size, parse_size

DEFAULT_CAPACITY_BYTES = 256 << 20


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


def _keys(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of keys, 1 or more, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {text!r}")
    return int(text)


def _pool(text: str) -> PoolSpec:
    """NAME:MEDIUM:SIZE, e.g. cache:pmem:1GiB (the name may hold colons: split from the right)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a pool is NAME:MEDIUM:SIZE (such as cache:pmem:1GiB), got {text!r}")
    name, medium, size = parts
    try:
        check_name("pool", name)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    if medium not in MEDIA:
        raise argparse.ArgumentTypeError(f"a pool's medium is one of {', '.join(MEDIA)}, got {medium!r} in {text!r}")
    return PoolSpec(name, medium, _size(size))


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_REQUEST_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfabric", description="A distributed memory pool.")
    parser.add_argument("--version", action="version", version=f"memfabric {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local fabric (embedded cluster service + N servers) in the foreground")
    up.add_argument("--dir", required=True, help="run directory; it becomes the clients' ockPath")
    up.add_argument("--servers", type=int, default=1, help="number of servers (default 1)")
    up.add_argument("--capacity", type=_size, default=None,
                    help=f"DRAM each server gives to the pool 'default' (default {format_size(DEFAULT_CAPACITY_BYTES)})")
    up.add_argument("--segment-size", type=_size, default=4 << 20, help="segment size (default 4MiB)")
    up.add_argument("--liveness-timeout", type=float, default=3.0,
                    help="seconds without a heartbeat before a server counts as dead (default 3)")
    up.add_argument("--busy-poll-us", type=_busy_poll_us, default=BUSY_POLL_US,
                    help=f"how long servers poll for a client's next request before sleeping "
                         f"(default {BUSY_POLL_US}; 0: never poll)")
    up.add_argument("--pool", type=_pool, action="append", default=[], metavar="NAME:MEDIUM:SIZE",
                    help="a pool each server gives, such as cache:pmem:1GiB (repeatable); pmem and ramdisk "
                         "files go under DIR/pools; one named 'default' replaces the DRAM pool of --capacity")
    up.add_argument("--rpc-host", default="127.0.0.1",
                    help="address the servers listen on for other hosts, written into remote.toml "
                         "(default 127.0.0.1: this host only)")
    up.add_argument("--rpc-port", type=_port, default=None,
                    help="server i listens for RPC on PORT + i - 1 (default: ports of the kernel's choosing, "
                         "new at each start)")
    up.add_argument("--metrics-port", type=_port, default=None,
                    help="server i serves Prometheus metrics on 127.0.0.1:PORT + i - 1 (default: none)")
    up.add_argument("--resp-port", type=_port, default=None,
                    help="the first server speaks the Redis protocol on 127.0.0.1:PORT, serving namespace "
                         "'default' of pool 'default' without AUTH (its secId: DIR/resp.secid)")
    up.add_argument("--resp-host", default="127.0.0.1",
                    help="the address of that door (default 127.0.0.1; any but loopback requires AUTH)")

    down = sub.add_parser("down", help="stop the fabric `memfabric up` runs in a directory")
    down.add_argument("--dir", required=True, help="the directory given to memfabric up")
    down.add_argument("--timeout", type=_timeout, default=DOWN_TIMEOUT_S,
                      help=f"seconds to wait for it to stop (default {DOWN_TIMEOUT_S:g})")

    server = sub.add_parser("server", help="run one server from a TOML configuration")
    server.add_argument("--config", required=True)

    status = sub.add_parser("status", help="servers, pools and namespaces of a fabric")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="a fabric directory (as made by `memfabric up`)")
    where.add_argument("--config", help="a fabric.toml or a server's configuration")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    ls = sub.add_parser("ls", help="a namespace's objects: id, size, home server, age")
    ls.add_argument("--dir", required=True, help="the fabric's ockPath (a fabric directory, or a .toml)")
    ls.add_argument("--ns", required=True, help="the namespace")
    ls.add_argument("--sec", default=os.environ.get("MEMFABRIC_SEC_ID"),
                    help="its secId (default: $MEMFABRIC_SEC_ID, which other users' `ps` does not show)")
    ls.add_argument("--pool", default="default", help="its pool (default: default)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

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
    bench.add_argument("--kv", action="store_true",
                       help="MemKV: gets and puts (same host and remote) against redis-server, memcpy and a raw socket")
    bench.add_argument("--plog", action="store_true",
                       help="measure MemPlog's appends and reads beside write + fsync and a Python list")
    bench.add_argument("--resp", action="store_true",
                       help="the Redis-protocol door against redis-server, both driven by redis-benchmark")
    bench.add_argument("--scale-keys", type=_keys, default=1_000_000,
                       help="--kv: the keys of the large keyspace whose get latency is compared with 1,000 keys")
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


def _up_pools(args: argparse.Namespace) -> list[PoolSpec] | str:
    """The pools each server of `up` gives, or what is wrong with the options."""
    if args.servers < 1:
        return "--servers must be at least 1"
    for option, port in (("--rpc-port", args.rpc_port), ("--metrics-port", args.metrics_port)):
        if port is not None and port + args.servers - 1 > 65535:
            return f"{option} {port} with {args.servers} servers would go past port 65535"
    if args.rpc_port is not None and args.metrics_port is not None and \
            abs(args.rpc_port - args.metrics_port) < args.servers:
        return "--rpc-port and --metrics-port ranges overlap"
    names = [p.name for p in args.pool]
    for name in names:
        if names.count(name) > 1:
            return f"pool {name!r} is given twice"
    if "default" in names and args.capacity is not None:
        return ("--capacity sizes the DRAM pool 'default', which --pool default:... replaces: give one of them")
    for p in args.pool:
        if p.capacity_bytes < args.segment_size or p.capacity_bytes % PAGE_SIZE_BYTES:
            return (f"pool {p.name!r}: its size must be a multiple of {PAGE_SIZE_BYTES} bytes and at least the "
                    f"segment size ({format_size(args.segment_size)}), got {format_size(p.capacity_bytes)}")
    capacity = args.capacity or DEFAULT_CAPACITY_BYTES
    default = [] if "default" in names else [PoolSpec("default", "dram", capacity)]
    return default + args.pool


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        command = _command(args)         # imports what it runs: the client, ~0.3 s
        raise_if_interrupted()           # a Ctrl-C Python dropped in our imports, or in those
        return command if isinstance(command, int) else command()
    except KeyboardInterrupt:
        # Ctrl-C in a demo, a bench, a load: its `with` blocks stopped what it started on the
        # way up; a traceback would only hide that. (`up` and `server` stop on it themselves.)
        print(f"memfabric {args.command}: interrupted", file=sys.stderr)
        return 130           # the shell's status for a command SIGINT ended


def _command(args: argparse.Namespace) -> int | Callable[[], int]:
    """What runs the command, its modules imported; or its status, refused."""
    if args.command == "up":
        pools = _up_pools(args)
        if isinstance(pools, str):
            print(f"memfabric up: {pools}", file=sys.stderr)
            return 2
        from .up import run_up
        return functools.partial(run_up, args.dir, args.servers, args.capacity or DEFAULT_CAPACITY_BYTES,
                                 args.segment_size, args.liveness_timeout, args.busy_poll_us, pools=pools,
                                 rpc_host=args.rpc_host, rpc_port=args.rpc_port or 0,
                                 metrics_port=args.metrics_port, resp_port=args.resp_port,
                                 resp_host=args.resp_host)
    if args.command == "down":
        from .down import run_down

        def down() -> int:
            try:
                return run_down(args.dir, args.timeout)
            except OSError as exc:
                print(f"memfabric down: {exc}", file=sys.stderr)
                return 1
        return down
    if args.command == "server":
        from ..server.main import run_server
        return functools.partial(run_server, args.config)
    if args.command == "status":
        from .status import run_status
        return functools.partial(run_status, args.dir or args.config, as_json=args.json)
    if args.command == "ls":
        if args.sec is None:
            print("memfabric ls: give the namespace's secId with --sec or $MEMFABRIC_SEC_ID", file=sys.stderr)
            return 2
        from .ls import run_ls
        return functools.partial(run_ls, args.dir, args.ns, args.sec, args.pool, as_json=args.json)
    if args.command == "demo":
        from .demo import run_demo
        return functools.partial(run_demo, args.dir)
    if args.command == "bench":
        own = "--plog" if args.plog else "--resp" if args.resp else None
        if own and args.dir:
            print(f"memfabric bench {own} starts a fabric of its own (its pools, its baselines): --dir is for "
                  "the other benches", file=sys.stderr)
            return 2
        if args.plog:
            from ..plog.bench import run_plog_bench
            return functools.partial(run_plog_bench, args.json)
        if args.resp:
            from ..kv.resp.bench import run_resp_bench
            return functools.partial(run_resp_bench, args.json)
        if args.kv:
            from ..kv.bench import run_kv_bench
            return functools.partial(run_kv_bench, args.dir,
                                     [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None,
                                     args.repeat, args.json, args.busy_poll_us, args.scale_keys)
        from ..bench import run_bench
        sizes = args.sizes or ("4KiB,64KiB,1MiB,16MiB" if args.remote else "4KiB,64KiB,1MiB,16MiB,64MiB")
        return functools.partial(run_bench, args.dir, [parse_size(s) for s in sizes.split(",")], args.repeat,
                                 args.json, args.remote, args.busy_poll_us, args.shm_size)
    if args.command == "load":
        if args.clients < 1 or args.threads < 1 or not args.duration > 0 or args.servers < 1:
            print("memfabric load: --clients, --threads, --servers and --duration must be positive", file=sys.stderr)
            return 2
        from ..load import run_load
        return functools.partial(run_load, args.dir, args.clients, args.threads, args.duration, args.servers,
                                 args.capacity, args.json)
    return 2

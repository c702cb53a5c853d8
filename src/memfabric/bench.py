"""`memfabric bench`: the data and control paths, measured against baselines in the same run.

Every figure is a median or p99 over repeated operations; throughput is size / median.
A ratio is the baseline's median time over the operation's (1.0: as fast as the baseline):
numpy's memcpy on one host (and, for one large size, a copy into `multiprocessing.shared_memory`),
a raw Python socket that waits as the fabric does for RPC.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from . import compat
from .bench_batch import BATCH_ITEM_BYTES, BATCH_ITEMS, bench_batch_local, bench_batch_remote
from .bigmemory.client import CHUNK_BYTES
from .client.session import Session, init
from .errors import BmError, error_from_code
from .launcher import LocalFabric
from .limits import BUSY_POLL_US
from .transport.busy_poll import BusyPoll
from .units import format_size


@dataclass
class Result:
    name: str
    size_bytes: int
    median_us: float | None                # None: not measured (see note)
    p99_us: float | None
    throughput_gib_s: float | None
    ratio_to_baseline: float | None
    server_cpu_us: float | None = None     # CPU the fabric's servers spent per operation
    note: str | None = None                # why a row was not measured


class ServerCpu:
    """CPU time used by the server behind a link (its whole process, as it reports it):
    what an operation costs the server, polling included."""

    def __init__(self, link) -> None:
        self.link = link

    def used_us(self) -> float:
        return self.link.call("stats")["cpu_s"] * 1e6

    def per_call(self, fn: Callable[[], object]) -> tuple[Callable[[], object], Callable[[], float]]:
        """`fn` counted, and a function giving the server's CPU per call since this one."""
        calls = [0]
        start = self.used_us()

        def counted() -> object:
            calls[0] += 1
            return fn()
        return counted, lambda: (self.used_us() - start) / max(calls[0], 1)


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


# Each block warms up for at least this long, several polling windows: the previous
# block's pollers are asleep by the time this one is timed. (A pause between blocks would
# do that too, but it lets the machine go idle: the next calls then ran cold, 250 us.)
BLOCK_WARMUP_S = 0.001


def measure_interleaved(fns: dict[str, Callable[[], object]], repeat: int,
                        block: int | None = None) -> dict[str, list[float]]:
    """Like measure(), for several fns whose figures are compared: they take turns in
    blocks (`block` calls each; default up to 20), so slow stretches of a noisy machine fall
    on all of them alike. Each block starts with untimed calls (BLOCK_WARMUP_S), which bring
    this block's peers to steady state and outlast the previous block's polling."""
    block = block or max(1, min(20, repeat // 3))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    while len(samples[next(iter(fns))]) < repeat:
        for name, fn in fns.items():
            warm_until = time.perf_counter() + BLOCK_WARMUP_S
            calls = 0
            while calls < 3 or time.perf_counter() < warm_until:
                fn()
                calls += 1
            for _ in range(block):
                t0 = clock()
                fn()
                samples[name].append((clock() - t0) / 1000)
    return samples


def summarize(name: str, size: int, samples: list[float], memcpy_median_us: float | None) -> Result:
    samples.sort()
    median = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    throughput = size / (median / 1e6) / (1 << 30) if size else None
    ratio = memcpy_median_us / median if memcpy_median_us else None
    return Result(name, size, median, p99, throughput, ratio)


def default_repeat(size: int) -> int:
    return max(30, min(3000, (256 << 20) // max(size, 1) // 2))   # with only 10, one slow stretch of a VM moved a median


def _compat_ok(rc: int) -> None:
    if rc:
        raise error_from_code(rc, compat.BM_GetLastError())


def bench_data_path(session: Session, sizes: list[int], repeat: int, compat_session: bool = False) -> list[Result]:
    """Each size's memcpy and fabric copies take turns in blocks (measure_interleaved), so
    their ratios compare the same stretches of a noisy machine. With `compat_session` (the
    process's memfabric.compat session is open on the same fabric), the seed's
    BM_WriteSec/BM_ReadSec take their turns too, on the same object."""
    ns = session.create_namespace(f"bench-{time.monotonic_ns()}", sec_id="bench")
    results: list[Result] = []
    try:
        for size in sizes:
            n = repeat or default_repeat(size)
            src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            # Each read lands in its own buffer, faulted in first: memcpy's baseline must not
            # pay for page faults, and each check below proves its own path.
            into_copy, into_api, into_map, into_compat = (np.ones(size, dtype=np.uint8) for _ in range(4))
            got_bytes = [b""]
            bm = ns.alloc(size)
            info = compat.BmInfo(ns=ns.name, sec_id="bench", bm_id=bm.bm_id, size=bm.size)

            def read_new_bytes() -> None:
                got_bytes[0] = bm.read()
            with bm.map() as m:
                mapped = [np.frombuffer(m.view, dtype=np.uint8)]   # dropped before the unmap
                fns: dict[str, Callable[[], object]] = {
                    "memcpy (numpy)": lambda: np.copyto(into_copy, src),
                    "write (API)": lambda: bm.write(src),
                    "read into (API)": lambda: bm.read(0, into=into_api),
                    # What a user who does not bring a buffer gets: a new bytes each time.
                    "read, new bytes (API)": read_new_bytes,
                    "write (mapping)": lambda: np.copyto(mapped[0], src),
                    "read (mapping)": lambda: np.copyto(into_map, mapped[0]),
                }
                if compat_session:
                    fns["write (compat BM_WriteSec)"] = lambda: _compat_ok(compat.BM_WriteSec(info, 0, size, src, 0))
                    fns["read into (compat BM_ReadSec)"] = lambda: _compat_ok(
                        compat.BM_ReadSec(info, 0, size, into_compat, 0))
                samples = measure_interleaved(fns, n)
                mapped.clear()
            assert np.array_equal(into_api, src) and np.array_equal(into_map, src), \
                "read back differs from what was written"
            assert got_bytes[0] == memoryview(src), "read() returned other bytes than were written"
            assert not compat_session or np.array_equal(into_compat, src), "BM_ReadSec read other bytes"
            base = summarize("memcpy (numpy)", size, samples.pop("memcpy (numpy)"), None)
            results.append(base)
            for name, taken in samples.items():
                results.append(summarize(name, size, taken, base.median_us))
            bm.free()
    finally:
        ns.destroy()
    return results


def bench_vs_shared_memory(session: Session, size: int, repeat: int) -> list[Result]:
    """One large size: the fabric's copies against the same copies into and out of
    `multiprocessing.shared_memory` (a mapping of a /dev/shm file: the same kind of memory
    as the fabric's memfds), all in the same blocks. "in 4 MiB pieces" copies as the fabric
    does (an object's extents are segments of at most 4 MiB, and larger copies go in 4 MiB
    chunks, each followed by a generation check): the gap between the one-call copy and
    that one is what the piece size costs, whatever memory it lands in (README, "Large
    copies")."""
    n = repeat or default_repeat(size)
    ns = session.create_namespace(f"bench-shm-{time.monotonic_ns()}", sec_id="bench")
    shm = shared_memory.SharedMemory(create=True, size=size)
    shared: list[np.ndarray] = []
    results: list[Result] = []
    try:
        src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        into_copy, into_api, into_shm_out = (np.ones(size, dtype=np.uint8) for _ in range(3))
        shared.append(np.ndarray(size, dtype=np.uint8, buffer=shm.buf))     # dropped before the close
        shared[0][:] = 1                     # faulted in first, as the fabric's segments are
        bm = ns.alloc(size)

        def in_pieces(dst: np.ndarray, source: np.ndarray) -> None:
            for start in range(0, size, CHUNK_BYTES):
                np.copyto(dst[start:start + CHUNK_BYTES], source[start:start + CHUNK_BYTES])
        samples = measure_interleaved({
            "copy into shared_memory, one call": lambda: np.copyto(shared[0], src),
            "memcpy (numpy)": lambda: np.copyto(into_copy, src),
            "copy into shared_memory, in 4 MiB pieces": lambda: in_pieces(shared[0], src),
            "write (API)": lambda: bm.write(src),
            "copy out of shared_memory, one call": lambda: np.copyto(into_shm_out, shared[0]),
            "copy out of shared_memory, in 4 MiB pieces": lambda: in_pieces(into_shm_out, shared[0]),
            "read into (API)": lambda: bm.read(0, into=into_api),
        }, n)
        assert np.array_equal(into_api, src) and np.array_equal(into_shm_out, src), \
            "read back differs from what was written"
        base = summarize("copy into shared_memory, one call", size,
                         samples.pop("copy into shared_memory, one call"), None)
        results.append(base)
        for name, taken in samples.items():
            results.append(summarize(name, size, taken, base.median_us))
        bm.free()
    finally:
        shared.clear()
        shm.close()
        shm.unlink()
        ns.destroy()
    return results


def raw_modes(busy_poll_us: int) -> list[tuple[str, float]]:
    """How the raw baselines wait for a message: sleeping in the kernel, and, when the fabric
    polls, polling first exactly as it does. The last is the fair floor under the fabric."""
    return [("sleeps", 0.0)] + ([("polls", busy_poll_us / 1e6)] if busy_poll_us else [])


def _polled_recv(sock: socket.socket, view: memoryview, poll: BusyPoll) -> int:
    return poll.receive(lambda: sock.recv_into(view, 0, socket.MSG_DONTWAIT), lambda: sock.recv_into(view))


def _echo(sock: socket.socket, poll_s: float) -> None:
    poll = BusyPoll(poll_s)
    buf = memoryview(bytearray(65536))
    while True:
        n = _polled_recv(sock, buf, poll)
        if not n:
            return
        sock.send(buf[:n])


def raw_ipc_round_trip(n: int, busy_poll_us: int) -> list[Result]:
    """The floor under every control call: one request and reply over a raw Unix socket
    between two processes, the same kind of socket the fabric uses."""
    results = []
    for mode, poll_s in raw_modes(busy_poll_us):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = multiprocessing.get_context("fork").Process(target=_echo, args=(theirs, poll_s), daemon=True)
        child.start()
        theirs.close()
        message = bytes(128)
        reply = memoryview(bytearray(65536))
        poll = BusyPoll(poll_s)

        def ping() -> None:
            mine.send(message)
            _polled_recv(mine, reply, poll)
        try:
            results.append(summarize(f"raw Unix socket round trip, {mode} (baseline)", 0,
                                     measure(ping, max(n, 500)), None))
        finally:
            mine.close()
            child.join(5)
    return results


def bench_control_path(session: Session, repeat: int, cpu: ServerCpu | None = None) -> list[Result]:
    n = repeat or 500
    ns = session.create_namespace(f"bench-ctl-{time.monotonic_ns()}", sec_id="bench")
    results = raw_ipc_round_trip(n, round(session.busy_poll_s * 1e6))
    try:
        held = []
        results.append(summarize("alloc 4KiB", 4096, measure(lambda: held.append(ns.alloc(4096)), n), None))
        it = iter(held)
        results.append(summarize("free 4KiB", 4096, measure(lambda: next(it).free(), n, warmup=0), None))
        # Empty, a namespace gives its segments back after each free (so other namespaces may
        # have them) and maps them again on the next alloc: measured apart from the steady state.
        results.append(summarize("alloc+free 4KiB, namespace empty", 4096,
                                 measure(lambda: ns.alloc(4096).free(), min(n, 200)), None))
        bm = ns.alloc(1 << 20)       # a live object: the steady state of a cache
        alloc_free, cpu_per_call = cpu.per_call(lambda: ns.alloc(4096).free()) if cpu else (
            lambda: ns.alloc(4096).free(), None)
        results.append(summarize("alloc+free 4KiB", 4096, measure(alloc_free, n), None))
        results[-1].server_cpu_us = cpu_per_call() if cpu_per_call else None

        def map_unmap() -> None:
            with bm.map():
                pass
        results.append(summarize("map+unmap 1MiB", 1 << 20, measure(map_unmap, n), None))
        # What a mapping or a new object costs when it is used: first touches included.
        one_mib = np.ones(1 << 20, dtype=np.uint8)

        def map_write_unmap() -> None:
            with bm.map() as m:
                m.view[:] = one_mib.data
        results.append(summarize("map+write+unmap 1MiB", 1 << 20, measure(map_write_unmap, n), None))
        empty = session.create_namespace(f"bench-ctl-empty-{time.monotonic_ns()}", sec_id="bench")

        def alloc_write_free() -> None:
            fresh = empty.alloc(1 << 20)
            fresh.write(one_mib)
            fresh.free()
        try:
            # Each free empties the namespace, so each alloc maps its segment afresh: the
            # write lands on pages this process has not touched.
            results.append(summarize("alloc+write+free 1MiB, namespace empty", 1 << 20,
                                     measure(alloc_write_free, min(n, 200)), None))
        finally:
            empty.destroy()
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


# ---- remote mode: RPC over loopback, against a raw socket doing the same transfers ------------------

_RAW_HEADER = struct.Struct("!cQ")


def _raw_server(listener: socket.socket, poll_s: float) -> None:
    """The baseline peer: 'w' receives n bytes into a buffer and acks; 'r' sends n bytes."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(64 << 20))
    head = memoryview(bytearray(_RAW_HEADER.size))
    poll = BusyPoll(poll_s)
    while True:
        if not _recv_exact(conn, head, poll):
            return
        op, n = _RAW_HEADER.unpack(head)
        if op == b"w":
            _recv_exact(conn, buf[:n], poll)
            conn.sendall(b"k")
        else:
            conn.sendall(buf[:n])


def _recv_exact(sock: socket.socket, view: memoryview, poll: BusyPoll) -> bool:
    got = _polled_recv(sock, view, poll)
    while got and got < len(view):
        k = sock.recv_into(view[got:])
        if not k:
            return False
        got += k
    return bool(got)


class RawPeer:
    """The baseline: a raw TCP connection to a child process doing the same transfers."""

    def __init__(self, poll_s: float) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._child = multiprocessing.get_context("fork").Process(
            target=_raw_server, args=(self._listener, poll_s), daemon=True)
        self._child.start()
        self._sock = socket.create_connection(self._listener.getsockname())
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ack = memoryview(bytearray(1))
        self._poll = BusyPoll(poll_s)

    def write(self, data: memoryview) -> None:
        self._sock.sendall(_RAW_HEADER.pack(b"w", len(data)))
        self._sock.sendall(data)
        _recv_exact(self._sock, self._ack, self._poll)

    def read(self, into: memoryview) -> None:
        self._sock.sendall(_RAW_HEADER.pack(b"r", len(into)))
        _recv_exact(self._sock, into, self._poll)

    def close(self) -> None:
        self._sock.close()
        self._child.terminate()
        self._child.join(5)
        self._listener.close()


def bench_remote(session: Session, sizes: list[int], repeat: int, cpu: ServerCpu | None = None) -> list[Result]:
    """Each RPC transfer is timed in the same rounds as a raw socket doing it, sleeping and
    polling; its ratio is to the polling one, which waits for replies as the fabric does."""
    modes = raw_modes(round(session.busy_poll_s * 1e6))
    peers = {mode: RawPeer(poll_s) for mode, poll_s in modes}
    ns = session.create_namespace(f"bench-rpc-{time.monotonic_ns()}", sec_id="bench")
    results = []
    try:
        for size in sizes:
            n = repeat or default_repeat(size) // 4 + 10
            src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            dst = np.empty(size, dtype=np.uint8)
            # The raw reads land elsewhere: the check below must see what the RPC read.
            src_view, raw_dst = memoryview(src).cast("B"), memoryview(bytearray(size))
            bm = ns.alloc(size)
            for op in ("write", "read"):
                fns: dict[str, Callable[[], object]] = {}
                for mode, _ in modes:
                    peer = peers[mode]
                    fns[f"raw socket {op}, {mode}"] = ((lambda p=peer: p.write(src_view)) if op == "write"
                                                       else (lambda p=peer: p.read(raw_dst)))
                rpc_op = (lambda: bm.write(src)) if op == "write" else (lambda: bm.read(0, into=dst))
                # Only the RPC calls make the servers work: their CPU over the run, per call.
                fns[f"{op} (RPC)"], cpu_per_call = cpu.per_call(rpc_op) if cpu else (rpc_op, None)
                samples = measure_interleaved(fns, n)
                base = None
                for name, taken in samples.items():
                    results.append(summarize(name, size, taken, base.median_us if name.endswith("(RPC)") else None))
                    base = results[-1]
                results[-1].server_cpu_us = cpu_per_call() if cpu_per_call else None
            assert np.array_equal(dst, src), "read back differs from what was written"
            bm.free()
    finally:
        ns.destroy()
        for peer in peers.values():
            peer.close()
    return results


def batch_rows(samples: dict[str, list[float]], skipped: dict[str, str], baseline_of: Callable[[str], str]
               ) -> list[Result]:
    """Rows of a batch table: each with its ratio to the baseline `baseline_of(name)` names
    (none when that one was skipped); skipped baselines as rows that say so."""
    size = BATCH_ITEMS * BATCH_ITEM_BYTES
    rows = {name: summarize(name, size, taken, None) for name, taken in samples.items()}
    for name, row in rows.items():
        base = rows.get(baseline_of(name))
        if base is not None and not name.endswith("(baseline)"):
            row.ratio_to_baseline = base.median_us / row.median_us
    out = [Result(name, size, None, None, None, None, note=why) for name, why in skipped.items()]
    return out + list(rows.values())


def _batch_table(title: str, rows: list[Result]):
    from rich.table import Table
    table = Table(title=title)
    for column in ("operation", "median", "p99", "throughput", "vs baseline"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for r in rows:
        if r.median_us is None:
            table.add_row(r.name, r.note or "-", "-", "-", "-")
            continue
        table.add_row(r.name, f"{r.median_us:.0f} us", f"{r.p99_us:.0f} us", f"{r.throughput_gib_s:.2f} GiB/s",
                      "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}")
    return table


def time_to_notice_a_killed_server(directory: str) -> float:
    """SIGKILL the fabric's last server; seconds until the cluster says it is dead."""
    with LocalFabric(directory, servers=2, capacity="16MiB", liveness_timeout_s=2.0) as fab:
        with init(directory) as session:
            victim = max(fab.server_pids())
            os.kill(fab.server_pids()[victim], signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 30:
                if not next(s["alive"] for s in session.servers() if s["server_id"] == victim):
                    return time.monotonic() - killed
                time.sleep(0.02)
    return float("nan")


def _cpu_cell(r: Result) -> str:
    return "-" if r.server_cpu_us is None else f"{r.server_cpu_us:.1f} us"


def _open_compat(stack: ExitStack, directory: str, busy_poll_us: int) -> bool:
    """Opens the process's memfabric.compat session on the bench's fabric, closed with the
    stack. False when this process has one open already (perhaps on another fabric): then
    the compat rows are left out."""
    rc = compat.BM_InitWithExtAttr(directory, 0, {"busy_poll_us": busy_poll_us})
    if rc == BmError.ALREADY_INITIALIZED:
        return False
    _compat_ok(rc)
    stack.callback(compat.BM_Exit)
    return True


def run_bench(directory: str | None, sizes: list[int], repeat: int, as_json: bool, remote: bool = False,
              busy_poll_us: int = BUSY_POLL_US, shm_size: int = 256 << 20) -> int:
    """With `directory`, a running fabric: its servers poll as they were configured to;
    `busy_poll_us` sets this client's window and those of the fabric the bench starts.
    `shm_size`: the size compared with multiprocessing.shared_memory (0: none)."""
    if remote:
        return run_remote_bench(directory, sizes, repeat, as_json, busy_poll_us)
    with ExitStack() as stack:
        if directory is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-", dir="/tmp"))
            largest = max(sizes)
            capacity = max(256 << 20, 4 * largest, 2 * shm_size)
            stack.enter_context(LocalFabric(run_dir, servers=1, capacity=f"{capacity >> 20}MiB",
                                            busy_poll_us=busy_poll_us))
            directory = run_dir
        session = stack.enter_context(init(directory, busy_poll_us=busy_poll_us))
        with_compat = _open_compat(stack, directory, busy_poll_us)
        data = bench_data_path(session, sizes, repeat, compat_session=with_compat)
        vs_shm = bench_vs_shared_memory(session, shm_size, repeat) if shm_size else []
        control = bench_control_path(session, repeat, ServerCpu(session.local))
        batch = batch_rows(bench_batch_local(session, repeat), {},
                           lambda name: "1,000 memoryview copies of 4KiB (baseline)")
    if as_json:
        print(json.dumps({"data_path": [asdict(r) for r in data], "vs_shared_memory": [asdict(r) for r in vs_shm],
                          "control_path": [asdict(r) for r in control],
                          "batch": [asdict(r) for r in batch]}, indent=2))
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
                      "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}")
    console.print(table)
    if vs_shm:
        shm_table = Table(title=f"{format_size(shm_size)} copies against multiprocessing.shared_memory "
                                "(the ratio is to one copy into it), same run")
        for column in ("operation", "median", "p99", "throughput", "vs shared_memory"):
            shm_table.add_column(column, justify="right" if column != "operation" else "left")
        for r in vs_shm:
            shm_table.add_row(r.name, f"{r.median_us / 1000:.2f} ms", f"{r.p99_us / 1000:.2f} ms",
                              f"{r.throughput_gib_s:.2f} GiB/s",
                              "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}")
        console.print(shm_table)
    ctl = Table(title=f"control path (client and server poll {busy_poll_us} us)")
    for column in ("operation", "median", "p99", "server CPU"):
        ctl.add_column(column, justify="right" if column != "operation" else "left")
    for r in control:
        ctl.add_row(r.name, f"{r.median_us:.1f} us", f"{r.p99_us:.1f} us", _cpu_cell(r))
    console.print(ctl)
    console.print(_batch_table("batches across objects (same host): one call for 1,000 objects; the ratio is "
                               "to 1,000 memoryview copies", batch))
    return 0


def run_remote_bench(directory: str | None, sizes: list[int], repeat: int, as_json: bool,
                     busy_poll_us: int) -> int:
    with ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-", dir="/tmp"))
            capacity = max(256 << 20, 4 * max(sizes))
            stack.enter_context(LocalFabric(directory, servers=1, capacity=f"{capacity >> 20}MiB",
                                            busy_poll_us=busy_poll_us))
        session = stack.enter_context(init(os.path.join(directory, "remote.toml"), busy_poll_us=busy_poll_us))
        data = bench_remote(session, sizes, repeat, ServerCpu(session.local))
        batch_samples, skipped = bench_batch_remote(session, repeat)
        batch = batch_rows(batch_samples, skipped, lambda name: "Redis MSET 1,000 x 4KiB (baseline)"
                           if "write" in name else "Redis MGET 1,000 x 4KiB (baseline)")
    with tempfile.TemporaryDirectory(prefix="mf-kill-", dir="/tmp") as kill_dir:
        notice_s = time_to_notice_a_killed_server(kill_dir)
    if as_json:
        print(json.dumps({"remote": [asdict(r) for r in data], "batch": [asdict(r) for r in batch],
                          "killed_server_noticed_s": notice_s}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console(width=None if os.isatty(1) else 120)
    table = Table(title=f"remote data path (RPC over loopback TCP, polling {busy_poll_us} us) vs a raw "
                        "Python socket, same run; the ratio is to the raw socket that waits as the fabric does")
    for column in ("size", "operation", "median", "p99", "throughput", "vs raw", "server CPU"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for r in data:
        table.add_row(format_size(r.size_bytes), r.name, f"{r.median_us:.1f} us", f"{r.p99_us:.1f} us",
                      f"{r.throughput_gib_s:.2f} GiB/s", "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}",
                      _cpu_cell(r))
    console.print(table)
    console.print(_batch_table("batches across objects over RPC: one call for 1,000 objects; the ratio is to "
                               "Redis (a real redis-server on loopback, redis-py with hiredis), same run", batch))
    console.print(f"a killed server was seen dead by the cluster after {notice_s:.2f} s (liveness timeout 2 s)")
    return 0

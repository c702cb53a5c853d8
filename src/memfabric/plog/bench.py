"""`memfabric bench --plog`: MemPlog's appends and reads, beside their baselines, in one run.

Two servers with a ramdisk pool (files on tmpfs) and a pmem pool (files on the disk under
the bench's directory) each are started; a client on their host (IPC) and one over RPC (remote.toml) append
records of 64 B, 4 KiB and 1 MiB, one at a time and 100 at once, to a plog of one replica and
to one of two (its copy on the other server), and read records back by index. Baselines in the same run: `os.write` + `os.fsync` of the same records to a file on
the same disk as the pmem pool, and appends to a Python list (the floor). Then 8 processes
append 4 KiB records to one pmem plog at once (group commit) against one process doing
write + fsync, and beside them the machine's ceiling: as many threads in C appending the same
records to a file on that disk and sharing fdatasync, with no fabric (_ceiling.c), a baseline
rather than a target; the same 8 processes appending to a ramdisk plog, with nothing to flush
(the fabric's own rate, the most a shared flush could give them here, a baseline too); and 8 threads of the bench's own process appending through one handle (their
appends go together: combine.py). Medians and 99th percentiles in microseconds, and throughput one call
after another (calls and MB of records per second).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from ..client.session import init
from ..launcher import LocalFabric, PoolSpec
from .record import frame_bytes

try:    # the ceiling of group commit (_ceiling.c): ./dev builds it
    from .._records import group_commit_ceiling
except ImportError:      # pragma: no cover
    group_commit_ceiling = None

SIZES = (64, 4096, 1 << 20)
RAMDISK = PoolSpec("ramdisk", "ramdisk", 512 << 20)
TMPFS = "/dev/shm"
APPENDERS = 8
CONCURRENT_S = 3.0

_APPENDER = r"""
import sys, time
import memfabric
ock, pool, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with memfabric.init(ock) as s:
    log = s.namespace("bench", "bench-secret", pool=pool).plog("shared")
    record = b"r" * 4096
    log.append(record)
    print("ready", flush=True)
    sys.stdin.readline()
    n, began = 0, time.monotonic()
    end = began + seconds
    try:
        while time.monotonic() < end:
            log.append(record)
            n += 1
    except memfabric.OutOfSpace:      # a fast machine filled the plog first: the rate so far
        pass
    print(n, time.monotonic() - began, flush=True)
"""


@contextlib.contextmanager
def _ramdisk_files(directory: str, pool: PoolSpec, servers: int) -> Iterator[None]:
    """The ramdisk pool's files on tmpfs (/dev/shm), as a RAM disk's are: `up` puts every file
    pool under its directory, here on the disk, where a 4 KiB append's write into space
    fallocated but never written took about 20 us more here (ext4 marks each new block written).
    Each server's pool directory is a link to one on tmpfs, removed afterwards."""
    if not os.path.isdir(TMPFS):
        yield                            # no tmpfs here: the ramdisk's files stay on the disk
        return
    ram = tempfile.mkdtemp(prefix="mf-plogbench-", dir=TMPFS)
    try:
        for server in range(1, servers + 1):
            link = pool.path(directory, server)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(tempfile.mkdtemp(dir=ram), link)
        yield
    finally:
        shutil.rmtree(ram, ignore_errors=True)


def _times_us(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    total_s = sum(samples) / 1e6
    samples.sort()
    return {"median_us": statistics.median(samples), "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "n": repeat, "calls_per_s": repeat / total_s if total_s else None}


def _repeat(size: int) -> int:
    return 100 if size >= 1 << 20 else 2000


# The targets: (what, the rows it reads, the figure from them, the bound, <= or >=).
_SAME = "same host"
TARGETS = (
    ("same-host 4 KiB append median, ramdisk", ("append 4,096 B (ramdisk)",), lambda m: m[0], 20.0, "<=", "us"),
    ("append_many 100 x 4 KiB median, ramdisk", ("append_many 100 x 4 KiB (ramdisk)",), lambda m: m[0], 300.0, "<=",
     "us"),
    ("two replicas / one, 4 KiB append, ramdisk", ("append 4,096 B (ramdisk, 2 replicas)", "append 4,096 B (ramdisk)"),
     lambda m: m[0] / m[1], 2.5, "<=", "x"),
    ("two replicas / one, 1 MiB append, ramdisk",
     ("append 1,048,576 B (ramdisk, 2 replicas)", "append 1,048,576 B (ramdisk)"), lambda m: m[0] / m[1], 2.5, "<=",
     "x"),
    ("record(i) of 4 KiB median, same host", ("record(i) of 4 KiB (ramdisk)",), lambda m: m[0], 5.0, "<=", "us"),
)
GROUP_COMMIT_TARGET = 5.0        # 8 pmem appenders against one process's write + fsync, records/s


def targets(rows: list[dict[str, Any]], group_ratio: float | None) -> list[dict[str, Any]]:
    """Each target with its figure from this run's rows (same-host medians) and whether it was met."""
    medians = {r["what"]: r["median_us"] for r in rows if r["where"] == _SAME}
    out = []
    for name, whats, figure, bound, sense, unit in TARGETS:
        if all(w in medians for w in whats):
            value = figure([medians[w] for w in whats])
            out.append({"target": name, "value": value, "bound": bound, "sense": sense, "unit": unit,
                        "met": value <= bound if sense == "<=" else value >= bound})
    if group_ratio is not None:
        out.append({"target": f"{APPENDERS} pmem appenders / write + fsync, records per second", "value": group_ratio,
                    "bound": GROUP_COMMIT_TARGET, "sense": ">=", "unit": "x", "met": group_ratio >= GROUP_COMMIT_TARGET})
    return out


def _ceiling_rate(path: str) -> float | None:
    """Records per second of APPENDERS threads in C appending a 4 KiB record's frame each to a
    file at `path` and sharing fdatasync (group commit with nothing of the fabric's: what the disk
    and the kernel allow here); None when the compiled part is not built."""
    if group_commit_ceiling is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        records, _flushes = group_commit_ceiling(fd, APPENDERS, CONCURRENT_S, frame_bytes(4096))
    finally:
        os.close(fd)
        os.unlink(path)
    return records / CONCURRENT_S


def _appenders_rate(session: Any, directory: str, pool: str) -> float:
    """Records per second of APPENDERS processes appending 4 KiB records to one plog of `pool`
    at once, each through its own session (on pmem, their flushes are shared: group commit)."""
    shared = session.namespace("bench", "bench-secret", pool=pool).create_plog("shared", 400 << 20)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, directory, pool, str(CONCURRENT_S)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(APPENDERS)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=60)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    shared.delete()                       # (each pool holds one such plog)
    return sum(int(n) for n, _ in outs) / max(float(s) for _, s in outs)


def _threads_rate(log: Any) -> float:
    """Records per second of APPENDERS threads of this process appending 4 KiB records
    through one handle, `log` (their appends go together: combine.py)."""
    record, counts, start = b"r" * 4096, [0] * APPENDERS, threading.Event()

    def appender(i: int) -> None:
        start.wait()
        n, end = 0, time.monotonic() + CONCURRENT_S
        while time.monotonic() < end:
            log.append(record)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=appender, args=(i,), daemon=True) for i in range(APPENDERS)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(CONCURRENT_S + 60)
    return sum(counts) / CONCURRENT_S


def run_plog_bench(as_json: bool = False) -> int:
    rows: list[dict[str, Any]] = []

    def row(what: str, where: str, figures: dict[str, float], nbytes: int | None = None) -> None:
        """A row: median and p99 of one call; its throughput, one call after another (calls/s,
        and MB/s of records when `nbytes`, the record bytes of one call, is given)."""
        if nbytes is not None and figures["calls_per_s"]:
            figures = {**figures, "mb_per_s": figures["calls_per_s"] * nbytes / 1e6}
        rows.append({"what": what, "where": where, **figures})
        if not as_json:
            rate = f"{figures['calls_per_s']:>9,.0f}/s" if figures["calls_per_s"] else ""
            mb = f"{figures['mb_per_s']:>8,.1f} MB/s" if "mb_per_s" in figures else ""
            print(f"{what:<46} {where:<22} median {figures['median_us']:>10,.1f} us   "
                  f"p99 {figures['p99_us']:>10,.1f} us   {rate} {mb}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mf-plogbench-", dir="/tmp") as directory, \
            _ramdisk_files(directory, RAMDISK, servers=2):
        # `up` puts the pmem pool's files under `directory`: the write + fsync baseline's file
        # goes there too, on the same disk. The ramdisk pool's files are on a RAM disk.
        fab = LocalFabric(directory, servers=2, capacity="64MiB", segment_size="4MiB",
                          extra_args=["--pool", f"{RAMDISK.name}:ramdisk:512MiB", "--pool", "pmem:pmem:512MiB"])
        with fab:
            sessions = {"same host": init(directory), "remote (RPC)": init(os.path.join(directory, "remote.toml"))}
            try:
                for pool in ("ramdisk", "pmem"):
                    sessions["same host"].create_namespace("bench", sec_id="bench-secret", pool=pool)
                for where, session in sessions.items():
                    for pool in ("ramdisk", "pmem"):
                        ns = session.namespace("bench", "bench-secret", pool=pool)
                        for replicas in (1, 2):
                            copies = "" if replicas == 1 else ", 2 replicas"
                            log = ns.create_plog(f"lat-{where[:4]}", 400 << 20, replicas=replicas)
                            for size in SIZES:
                                record = b"r" * size
                                row(f"append {size:,} B ({pool}{copies})", where,
                                    _times_us(lambda: log.append(record), _repeat(size)), size)
                            batch = [b"b" * 4096] * 100
                            row(f"append_many 100 x 4 KiB ({pool}{copies})", where,
                                _times_us(lambda: log.append_many(batch), 200), 100 * 4096)
                            if replicas == 1:
                                row(f"record(i) of 4 KiB ({pool})", where, _times_us(lambda: log.record(2001), 2000),
                                    4096)
                            log.delete()
                pmem = sessions["same host"].namespace("bench", "bench-secret", pool="pmem")
                plog_rate = _appenders_rate(sessions["same host"], directory, "pmem")
                ramdisk_rate = _appenders_rate(sessions["same host"], directory, RAMDISK.name)
                threads_rate = _threads_rate(pmem.create_plog("threads", 400 << 20))
            finally:
                for session in sessions.values():
                    session.close()
        # Baselines, same records, same disk as the pmem pool's files.
        path = os.path.join(directory, "baseline.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in SIZES:
                record = b"r" * size
                row(f"os.write + os.fsync {size:,} B", "same disk as pmem",
                    _times_us(lambda: (os.write(fd, record), os.fsync(fd)), _repeat(size) // 4), size)
            n, end = 0, time.monotonic() + CONCURRENT_S
            record = b"r" * 4096
            while time.monotonic() < end:
                os.write(fd, record)
                os.fsync(fd)
                n += 1
            fsync_rate = n / CONCURRENT_S
        finally:
            os.close(fd)
            os.unlink(path)
        ceiling_rate = _ceiling_rate(os.path.join(directory, "ceiling.log"))
        floor: list[bytes] = []
        record = b"r" * 4096
        row("list.append 4 KiB (the floor)", "in process", _times_us(lambda: floor.append(record), 2000), 4096)
    summary = {"pmem_appenders": APPENDERS, "pmem_records_per_s": plog_rate,
               "ramdisk_records_per_s": ramdisk_rate,
               "ramdisk_ratio": ramdisk_rate / fsync_rate if fsync_rate else None,
               "pmem_threads_records_per_s": threads_rate,
               "threads_ratio": threads_rate / fsync_rate if fsync_rate else None,
               "write_fsync_records_per_s": fsync_rate, "ratio": plog_rate / fsync_rate if fsync_rate else None,
               "ceiling_records_per_s": ceiling_rate,
               "ceiling_ratio": ceiling_rate / fsync_rate if ceiling_rate is not None and fsync_rate else None}
    met = targets(rows, summary["ratio"])
    if as_json:
        print(json.dumps({"rows": rows, "group_commit": summary, "targets": met}, indent=2))
    else:
        print(f"{APPENDERS} processes appending 4 KiB to one pmem plog: {plog_rate:,.0f} records/s; "
              f"one process doing write + fsync: {fsync_rate:,.0f} records/s "
              f"({summary['ratio']:.1f}x)")
        print(f"{APPENDERS} processes appending 4 KiB to one ramdisk plog, nothing to flush (the fabric's own rate): "
              f"{ramdisk_rate:,.0f} records/s ({summary['ramdisk_ratio']:.1f}x)")
        print(f"{APPENDERS} threads of one process appending 4 KiB through one handle: {threads_rate:,.0f} records/s "
              f"({summary['threads_ratio']:.1f}x)")
        if ceiling_rate is None:
            print(f"{APPENDERS} threads in C sharing fdatasync, no fabric (the machine's ceiling): skipped, "
                  "memfabric._records is not built (./dev setup)")
        else:
            print(f"{APPENDERS} threads in C sharing fdatasync, no fabric (the machine's ceiling): "
                  f"{ceiling_rate:,.0f} records/s ({summary['ceiling_ratio']:.1f}x)")
        print("targets:")
        for t in met:
            print(f"  {t['target']:<58} {t['value']:>8.2f} {t['unit']:<2}  (target {t['sense']} {t['bound']:g}) "
                  f"{'met' if t['met'] else 'NOT met'}")
    return 0

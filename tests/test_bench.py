"""`memfabric bench` runs end to end and reports every figure it promises (never a timing
threshold: only that the figures are there and make sense)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

MF = [sys.executable, "-m", "memfabric"]


def bench(*args: str) -> dict:
    proc = subprocess.run(MF + ["bench", "--json", "--repeat", "20", *args], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("busy_poll_us, shm_size", [(200, "8MiB"), (0, "0")])
def test_local_bench_reports_data_and_control_paths(busy_poll_us, shm_size):
    out = bench("--sizes", "4KiB,1MiB", "--busy-poll-us", str(busy_poll_us), "--shm-size", shm_size)
    data = {(r["name"], r["size_bytes"]): r for r in out["data_path"]}
    for size in (4096, 1 << 20):
        assert data[("memcpy (numpy)", size)]["median_us"] > 0
        for name in ("write (API)", "read into (API)", "read, new bytes (API)", "write (mapping)",
                     "read (mapping)", "write (compat BM_WriteSec)", "read into (compat BM_ReadSec)"):
            row = data[(name, size)]
            assert row["ratio_to_baseline"] == pytest.approx(data[("memcpy (numpy)", size)]["median_us"]
                                                             / row["median_us"])
    shm = {r["name"]: r for r in out["vs_shared_memory"]}
    if shm_size == "0":
        assert not shm
    else:
        assert shm["copy into shared_memory, one call"]["ratio_to_baseline"] is None
        for name in ("memcpy (numpy)", "copy into shared_memory, in 4 MiB pieces", "write (API)",
                     "copy out of shared_memory, one call", "copy out of shared_memory, in 4 MiB pieces",
                     "read into (API)"):
            assert shm[name]["size_bytes"] == 8 << 20 and shm[name]["ratio_to_baseline"] > 0
    control = {r["name"]: r for r in out["control_path"]}
    baselines = [name for name in control if name.startswith("raw Unix socket")]
    assert len(baselines) == (2 if busy_poll_us else 1), "a polling baseline only when the fabric polls"
    for name in ("alloc 4KiB", "free 4KiB", "alloc+free 4KiB", "alloc+free 4KiB, namespace empty",
                 "map+unmap 1MiB", "map+write+unmap 1MiB", "alloc+write+free 1MiB, namespace empty",
                 "namespace create", "namespace destroy"):
        assert control[name]["median_us"] > 0
    assert control["alloc+free 4KiB"]["server_cpu_us"] > 0, "the servers' CPU per alloc+free is measured"
    batch = {r["name"]: r for r in out["batch"]}
    assert batch["1,000 memoryview copies of 4KiB (baseline)"]["median_us"] > 0
    for name in ("read_many 1,000 x 4KiB", "write_many 1,000 x 4KiB", "1,000 x read(into=) 4KiB, one by one"):
        assert batch[name]["ratio_to_baseline"] > 0


def test_remote_bench_compares_with_a_raw_socket_and_times_a_kill():
    out = bench("--remote", "--sizes", "4KiB")
    rows = {r["name"]: r for r in out["remote"]}
    for op in ("write", "read"):
        assert rows[f"raw socket {op}, sleeps"]["median_us"] > 0
        assert rows[f"raw socket {op}, polls"]["median_us"] > 0
        rpc = rows[f"{op} (RPC)"]
        assert rpc["ratio_to_baseline"] == pytest.approx(rows[f"raw socket {op}, polls"]["median_us"] / rpc["median_us"])
        assert rpc["server_cpu_us"] > 0
    assert math.isfinite(out["killed_server_noticed_s"]) and out["killed_server_noticed_s"] > 0
    batch = {r["name"]: r for r in out["batch"]}
    for name in ("read_many 1,000 x 4KiB (RPC)", "write_many 1,000 x 4KiB (RPC)",
                 "1,000 x read(into=) 4KiB (RPC), one by one"):
        assert batch[name]["median_us"] > 0
    for name in ("Redis MGET 1,000 x 4KiB (baseline)", "Redis MSET 1,000 x 4KiB (baseline)"):
        if shutil.which("redis-server"):      # ./dev test installs it, as CI does
            assert batch[name]["median_us"] > 0
            assert batch[name.replace("Redis MGET", "read_many").replace("Redis MSET", "write_many")
                         .replace(" (baseline)", " (RPC)")]["ratio_to_baseline"] > 0
        else:
            assert batch[name]["median_us"] is None and "skipped" in batch[name]["note"]


def test_remote_bench_without_redis_says_its_rows_were_skipped(tmp_path):
    """No redis-server on the PATH: the bench still runs, and its Redis rows say so."""
    python_dir = os.path.dirname(sys.executable)
    proc = subprocess.run(MF + ["bench", "--json", "--repeat", "3", "--remote", "--sizes", "4KiB"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PATH": f"{python_dir}:{tmp_path}"})
    assert proc.returncode == 0, proc.stderr
    batch = {r["name"]: r for r in json.loads(proc.stdout)["batch"]}
    row = batch["Redis MGET 1,000 x 4KiB (baseline)"]
    assert row["median_us"] is None and "no redis-server" in row["note"]
    assert batch["read_many 1,000 x 4KiB (RPC)"]["median_us"] > 0
    assert batch["read_many 1,000 x 4KiB (RPC)"]["ratio_to_baseline"] is None


@pytest.mark.parametrize("which", ["--plog", "--resp"])
def test_a_bench_that_starts_its_own_fabric_refuses_dir_rather_than_ignore_it(which, tmp_path):
    """`--dir` says "use a running fabric"; --plog and --resp start their own (pools and
    redis-server of their own), so a --dir given them was silently not used."""
    proc = subprocess.run(MF + ["bench", which, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--dir" in proc.stderr and which in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_bad_busy_poll_window_is_refused():
    for command in (["up", "--dir", "/tmp/never-made"], ["bench"]):
        proc = subprocess.run(MF + command + ["--busy-poll-us", "-5"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "--busy-poll-us" in proc.stderr


def test_the_plog_bench_says_which_targets_its_figures_meet():
    from memfabric.plog.bench import targets
    same = "same host"
    rows = [{"what": "append 4,096 B (ramdisk)", "where": same, "median_us": 19.0},
            {"what": "append 4,096 B (ramdisk)", "where": "remote (RPC)", "median_us": 90.0},
            {"what": "append_many 100 x 4 KiB (ramdisk)", "where": same, "median_us": 310.0},
            {"what": "append 4,096 B (ramdisk, 2 replicas)", "where": same, "median_us": 47.5},
            {"what": "record(i) of 4 KiB (ramdisk)", "where": same, "median_us": 5.0},
            {"what": "append 1,048,576 B (ramdisk)", "where": same, "median_us": 700.0},
            {"what": "append 1,048,576 B (ramdisk, 2 replicas)", "where": same, "median_us": 1820.0}]
    got = {t["target"].rsplit(",", 1)[0]: (round(t["value"], 2), t["met"]) for t in targets(rows, 4.9)}
    assert got == {"same-host 4 KiB append median": (19.0, True), "append_many 100 x 4 KiB median": (310.0, False),
                   "two replicas / one, 4 KiB append": (2.5, True), "record(i) of 4 KiB median": (5.0, True),
                   "two replicas / one, 1 MiB append": (2.6, False),
                   "8 pmem appenders / write + fsync": (4.9, False)}


def _ceiling():
    records = pytest.importorskip("memfabric._records", reason="the compiled part is not built (./dev setup)")
    return records.group_commit_ceiling


def test_the_group_commit_ceiling_refuses_bad_arguments_with_an_error(tmp_path):
    """Bad types and out-of-range values are a TypeError or ValueError before any thread starts
    or any byte is written, never a crash or a run without bounds."""
    ceiling = _ceiling()
    path = tmp_path / "ceiling"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    read_only = os.open(path, os.O_RDONLY)
    appending = os.open(path, os.O_WRONLY | os.O_APPEND)
    pipe_r, pipe_w = os.pipe()
    try:
        for args in [("3", 2, 0.1, 64), (fd, 2.5, 0.1, 64), (fd, 2, "0.1", 64), (fd, 2, 0.1, b"64"), (fd, 2, 0.1),
                     (fd, 2, 0.1, 64, 1), (None, 2, 0.1, 64)]:
            with pytest.raises(TypeError):
                ceiling(*args)
        for args in [(fd, 0, 0.1, 64), (fd, -1, 0.1, 64), (fd, 65, 0.1, 64), (fd, 2, 0, 64), (fd, 2, -1.0, 64),
                     (fd, 2, 60.5, 64), (fd, 2, math.nan, 64), (fd, 2, math.inf, 64), (fd, 2, 0.1, 0),
                     (fd, 2, 0.1, -4096), (fd, 2, 0.1, (1 << 20) + 1), (-1, 2, 0.1, 64), (pipe_w, 2, 0.1, 64),
                     (read_only, 2, 0.1, 64), (appending, 2, 0.1, 64)]:
            with pytest.raises(ValueError):
                ceiling(*args)
        assert os.fstat(fd).st_size == 0, "nothing was written"
        os.close(pipe_w)
        with pytest.raises(ValueError):        # closed
            ceiling(pipe_w, 2, 0.1, 64)
    finally:
        for f in (fd, read_only, appending, pipe_r):
            os.close(f)


def test_the_group_commit_ceiling_writes_records_each_covered_by_a_flush(tmp_path):
    """A short run of two threads: records were appended (the file's first place holds one) and
    flushed, every flush led by one of them (no timing is judged)."""
    ceiling = _ceiling()
    fd = os.open(tmp_path / "ceiling", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        records, flushes = ceiling(fd, 2, 0.2, 4120)
        assert records >= flushes > 0
        assert os.pread(fd, 4120, 0) == b"r" * 4120
        assert os.fstat(fd).st_size == 64 << 20, "the records wrap within the range written first"
    finally:
        os.close(fd)


def test_the_plog_bench_runs_and_reports_every_case_with_its_baselines():
    """`memfabric bench --plog --json` end to end: every record size, one and two replicas, on
    both pools, from this host and over RPC, beside write + fsync and the floor; each target
    with its figure and verdict, and the group commit's rates (processes, and threads through one
    handle) beside the machine's ceiling and the same appenders to a ramdisk plog (no figure is
    judged here)."""
    proc = subprocess.run(MF + ["bench", "--plog", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    rows = {(r["what"], r["where"]): r for r in out["rows"]}
    for where in ("same host", "remote (RPC)"):
        for pool in ("ramdisk", "pmem"):
            for copies in ("", ", 2 replicas"):
                for size in ("64", "4,096", "1,048,576"):
                    row = rows[(f"append {size} B ({pool}{copies})", where)]
                    assert row["median_us"] > 0 and row["p99_us"] >= row["median_us"] and row["mb_per_s"] > 0
                assert rows[(f"append_many 100 x 4 KiB ({pool}{copies})", where)]["median_us"] > 0
            assert rows[(f"record(i) of 4 KiB ({pool})", where)]["median_us"] > 0
    for size in ("64", "4,096", "1,048,576"):
        assert rows[(f"os.write + os.fsync {size} B", "same disk as pmem")]["median_us"] > 0
    assert rows[("list.append 4 KiB (the floor)", "in process")]["median_us"] > 0
    assert len(out["targets"]) == 6 and all(type(t["met"]) is bool and t["value"] > 0 for t in out["targets"])
    group = out["group_commit"]
    assert group["pmem_records_per_s"] > 0 and group["write_fsync_records_per_s"] > 0 and group["ratio"] > 0
    assert group["pmem_threads_records_per_s"] > 0
    # the same appenders to a ramdisk plog, nothing to flush: the fabric's own rate, a baseline
    assert group["ramdisk_records_per_s"] > 0
    assert group["ramdisk_ratio"] == pytest.approx(group["ramdisk_records_per_s"] / group["write_fsync_records_per_s"])
    assert group["threads_ratio"] == pytest.approx(group["pmem_threads_records_per_s"] / group["write_fsync_records_per_s"])
    try:    # the machine's ceiling, a baseline beside the group commit (not a target): when built
        from memfabric._records import group_commit_ceiling  # noqa: F401
    except ImportError:
        assert group["ceiling_records_per_s"] is None and group["ceiling_ratio"] is None
    else:
        assert group["ceiling_records_per_s"] > 0
        assert group["ceiling_ratio"] == pytest.approx(group["ceiling_records_per_s"]
                                                       / group["write_fsync_records_per_s"])

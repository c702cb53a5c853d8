"""Operating a fabric for a day: status, up and down, logs, ports that outlive a restart, pools
given on the command line, as an operator runs them (real processes, real files, real sockets)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import memfabric
from memfabric import Affinity
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import CHILD_WAIT_S, free_ports, stop_process, wait_until

MF = [sys.executable, "-m", "memfabric"]


def mf(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(MF + list(args), capture_output=True, text=True, timeout=timeout_s)


def status(*args: str) -> tuple[int, dict]:
    proc = mf("status", *args, "--json")
    assert proc.stderr == "" or proc.returncode != 0, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---- memfabric status (item 11) ------------------------------------------------------------


def test_status_counts_objects_and_bytes_and_ages_and_a_dead_server_exits_3():
    fab = LocalFabric(short_tmp_dir("mf-st-"), servers=2, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0).start()
    remote_toml = os.path.join(fab.directory, "remote.toml")
    try:
        with memfabric.init(fab.directory) as session:
            ns = session.create_namespace("counted", sec_id="k")
            for server, size in ((1, 10000), (1, 5), (2, 70000)):
                ns.alloc(size, Affinity("server", server))
            session.create_namespace("empty", sec_id="k")
        for where in (["--dir", fab.directory], ["--config", os.path.join(fab.directory, "fabric.toml")],
                      ["--config", remote_toml]):
            code, state = status(*where)
            assert code == 0, where
            rows = {n["ns"]: n for n in state["namespaces"]}
            assert (rows["counted"]["object_count"], rows["counted"]["used_bytes"]) == (3, 80005), where
            assert (rows["empty"]["object_count"], rows["empty"]["used_bytes"]) == (0, 0)
            assert [s["server_id"] for s in state["servers"]] == [1, 2]
            for s in state["servers"]:
                assert "last_seen_s" not in s                    # no epoch timestamp
                assert s["alive"] and 0 <= s["seen_s_ago"] < 2.0  # within the liveness timeout
        table = mf("status", "--config", remote_toml)
        assert table.returncode == 0 and "counted" in table.stdout and "78.13KiB" in table.stdout, table.stdout

        os.kill(fab.server_pids()[2], signal.SIGKILL)
        code, state = wait_until(lambda: (r := status("--dir", fab.directory))[0] == 3 and r,
                                 "status to see server 2 dead")
        dead = next(s for s in state["servers"] if s["server_id"] == 2)
        assert not dead["alive"] and dead["seen_s_ago"] >= 2.0
        assert next(s for s in state["servers"] if s["server_id"] == 1)["alive"]
        later = next(s for s in status("--config", remote_toml)[1]["servers"] if s["server_id"] == 2)
        assert later["seen_s_ago"] > dead["seen_s_ago"]          # an age, growing
        table = mf("status", "--dir", fab.directory)
        assert table.returncode == 3 and "dead" in table.stdout and "exit status 3" in table.stdout
    finally:
        assert fab.stop() == 0

    # Nothing runs: the cluster service still knows the servers and namespaces (exit 3), a
    # remote.toml, which names no cluster service, has nobody to ask (exit 1, one line).
    code, state = status("--dir", fab.directory)
    assert code == 3 and not any(s["alive"] for s in state["servers"])
    assert "cluster service" in state["asked"]
    assert {n["ns"]: n["object_count"] for n in state["namespaces"]} == {"counted": None, "empty": None}
    proc = mf("status", "--config", remote_toml)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no server" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_of_a_stopped_server_does_not_hang():
    """A server stopped with SIGSTOP answers nothing: status asks another, within its timeout."""
    fab = LocalFabric(short_tmp_dir("mf-st-"), servers=2, capacity="8MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0).start()
    pid = fab.server_pids()[1]
    try:
        stop_process(pid)
        started = time.monotonic()
        code, state = status("--dir", fab.directory)
        assert time.monotonic() - started < 30
        assert state["asked"] == "server 2"
        assert code in (0, 3)          # 3 once the cluster has noticed
    finally:
        os.kill(pid, signal.SIGCONT)
        assert fab.stop() == 0


# ---- memfabric up / down (item 12) ---------------------------------------------------------


def test_version():
    proc = mf("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"memfabric {memfabric.__version__}"


def up(directory: str, *extra: str, servers: int = 2, capacity: str | None = "8MiB") -> LocalFabric:
    return LocalFabric(directory, servers=servers, capacity=capacity, segment_size="1MiB",
                       extra_args=list(extra)).start()


def down(fab: LocalFabric) -> subprocess.CompletedProcess:
    proc = mf("down", "--dir", fab.directory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fab.proc.wait(CHILD_WAIT_S) == 0
    fab.proc = None
    return proc


def test_down_stops_up_and_a_restart_keeps_ports_and_remote_toml():
    directory = short_tmp_dir("mf-life-")
    rpc_port, metrics_port = free_ports(2), free_ports(2)
    args = ["--rpc-port", str(rpc_port), "--metrics-port", str(metrics_port)]
    fab = up(directory, *args)
    remote_toml = os.path.join(directory, "remote.toml")
    try:
        pids = fab.server_pids()
        with open(os.path.join(directory, "up.pid")) as f:
            assert int(f.read()) == fab.proc.pid
        with open(remote_toml) as f:
            first_remote = f.read()
        assert f"127.0.0.1:{rpc_port}" in first_remote and f"127.0.0.1:{rpc_port + 1}" in first_remote
        proc = down(fab)
    finally:
        fab.stop()
    assert f"pid {fab_pid(proc)}" in proc.stdout and "stopped" in proc.stdout
    assert all(pid_gone(pid) for pid in pids.values())
    assert not os.path.exists(os.path.join(directory, "up.pid"))
    with open(os.path.join(directory, "up.log")) as f:
        log = f.read()
    for line in ("memfabric server 1 ready", "memfabric server 2 ready", "memfabric fabric ready",
                 "memfabric server 2 stopped", "memfabric fabric stopped"):
        assert line in log, log

    # Again, on the same ports: the remote.toml clients hold is the same file and still works,
    # also as a copy somewhere else with the token beside it (as on another host).
    fab = up(directory, *args)
    try:
        with open(remote_toml) as f:
            assert f.read() == first_remote
        elsewhere = short_tmp_dir("mf-client-")
        shutil.copy(remote_toml, elsewhere)
        shutil.copy(os.path.join(directory, "token"), elsewhere)
        for i, path in enumerate((remote_toml, os.path.join(elsewhere, "remote.toml"))):
            with memfabric.init(path) as remote:
                assert not remote.local.is_local
                ns = remote.create_namespace("again", sec_id="k") if i == 0 else remote.namespace("again", sec_id="k")
                bm = ns.alloc(4096)
                bm.write(b"over rpc")
                assert bm.read(0, 8) == b"over rpc"
        assert mf("status", "--config", os.path.join(elsewhere, "remote.toml")).returncode == 0
        down(fab)
    finally:
        fab.stop()
    with open(os.path.join(directory, "up.log")) as f:
        assert f.read().count("memfabric fabric ready") == 2       # appended, run after run


def fab_pid(proc: subprocess.CompletedProcess) -> int:
    return int(proc.stdout.split("(pid ")[1].split(")")[0])


@pytest.mark.parametrize("pools, capacity, persistent", [
    (["default:pmem:4MiB"], None, "default"),                # replaces the DRAM pool
    (["cache:ramdisk:4MiB", "logs:pmem:2MiB"], "8MiB", "logs"),  # beside it
])
def test_pools_from_the_command_line_and_a_restart_keeps_pmem_objects(pools, capacity, persistent):
    directory = short_tmp_dir("mf-pool-")
    args = [a for p in pools for a in ("--pool", p)]
    fab = up(directory, *args, capacity=capacity)
    try:
        _, state = status("--dir", directory)
        given = {name: p["medium"] for name, p in state["servers"][0]["pools"].items()}
        expected = {p.split(":")[0]: p.split(":")[1] for p in pools}
        if capacity is not None:
            expected["default"] = "dram"
        assert given == expected
        for spec in pools:
            name, medium, _ = spec.split(":")
            if medium != "dram":
                for i in (1, 2):
                    assert os.path.isdir(os.path.join(directory, "pools", f"{name}-server-{i}"))
        with memfabric.init(directory) as session:
            ns = session.create_namespace("kept", sec_id="k", pool=persistent)
            bm = ns.alloc(100_000, Affinity("server", 2))
            bm.write(b"survives" * 100)
            info = bm.info()
        down(fab)
    finally:
        fab.stop()
    fab = up(directory, *args, capacity=capacity)
    try:
        with memfabric.init(directory) as session:
            again = session.namespace("kept", sec_id="k", pool=persistent).open(info["bm_id"])
            assert again.size == 100_000 and again.read(0, 800) == b"survives" * 100
        down(fab)
    finally:
        fab.stop()


@pytest.mark.parametrize("args, message", [
    (["--pool", "x:tape:4MiB"], "medium is one of"),
    (["--pool", "x:pmem"], "NAME:MEDIUM:SIZE"),
    (["--pool", "bad name:pmem:4MiB"], "pool name"),
    (["--pool", "x:pmem:lots"], "lots"),
    (["--pool", "x:pmem:4MiB", "--pool", "x:ramdisk:4MiB"], "given twice"),
    (["--pool", "default:pmem:4MiB", "--capacity", "8MiB"], "give one of them"),
    (["--pool", "x:pmem:512KiB"], "at least the segment size"),
    (["--rpc-port", "0"], "from 1 to 65535"),
    (["--rpc-port", "65535", "--servers", "2"], "past port 65535"),
    (["--rpc-port", "30000", "--metrics-port", "30001", "--servers", "2"], "overlap"),
])
def test_up_refuses_bad_options_before_writing_anything(args, message):
    directory = os.path.join(short_tmp_dir("mf-opt-"), "fabric")
    proc = mf("up", "--dir", directory, "--segment-size", "1MiB", *args, timeout_s=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(directory)


def test_down_where_nothing_runs_and_a_stale_pid_file_naming_a_live_process():
    directory = short_tmp_dir("mf-stale-")
    proc = mf("down", "--dir", os.path.join(directory, "never"))
    assert proc.returncode == 1 and "no fabric directory" in proc.stderr
    proc = mf("down", "--dir", directory)
    assert proc.returncode == 0 and "no fabric is running" in proc.stdout
    # A pid file left by a dead up, naming a pid some other live process has now: this one.
    with open(os.path.join(directory, "up.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    proc = mf("down", "--dir", directory)
    assert proc.returncode == 0 and "stale" in proc.stdout and str(os.getpid()) in proc.stdout, proc.stdout
    assert not os.path.exists(os.path.join(directory, "up.pid"))     # and we are alive to see it


# `up` started while this is on PYTHONPATH pauses 3 s just before it takes its directory's lock
# (its imports on a slow machine), and says so.
SLOW_BEFORE_THE_LOCK = """
import fcntl, os, time
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"up" in _args and b"memfabric" in _args:
    _flock = fcntl.flock

    def _flock_later(fd, operation):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("up.lock") and not _flock_later.paused:
            _flock_later.paused = True
            print("up is about to lock", flush=True)
            time.sleep(3)
        return _flock(fd, operation)
    _flock_later.paused = False
    fcntl.flock = _flock_later
"""


def test_down_while_up_is_still_starting_stops_it(tmp_path, monkeypatch):
    """`memfabric up --dir D &` then `memfabric down --dir D`: a down that came before up held
    its lock said "no fabric is running" and left, and the fabric then started and ran. down
    now finds an up of D that is starting, waits for its lock, and stops it."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_BEFORE_THE_LOCK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    directory = short_tmp_dir("mf-early-down-")
    proc = subprocess.Popen(MF + ["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "up is about to lock"
        done = mf("down", "--dir", directory)
        assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        assert proc.wait(CHILD_WAIT_S) in (0, 1), proc.stdout.read()
        assert "ready" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_down_after_up_was_killed_and_up_again():
    directory = short_tmp_dir("mf-kill-")
    fab = up(directory, servers=1)
    try:
        pids = fab.server_pids()
        fab.proc.kill()                 # no chance to tidy up: up.pid stays
        fab.proc.wait(CHILD_WAIT_S)
        wait_until(lambda: all(pid_gone(p) for p in pids.values()), "its server to stop with it")
        assert os.path.exists(os.path.join(directory, "up.pid"))
        proc = mf("down", "--dir", directory)
        assert proc.returncode == 0 and "stale" in proc.stdout, proc.stdout + proc.stderr
    finally:
        fab.stop()
    fab = up(directory, servers=1)
    try:
        down(fab)
    finally:
        fab.stop()


def test_down_names_a_server_left_running_without_its_up():
    directory = short_tmp_dir("mf-left-")
    fab = up(directory, servers=1)
    try:
        down(fab)
    finally:
        fab.stop()
    server = subprocess.Popen(MF + ["server", "--config", os.path.join(directory, "server-1", "server.toml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(os.path.join(directory, "server-1", "ipc.sock")), "the server")
        proc = mf("down", "--dir", directory)
        assert proc.returncode == 1 and "server-1" in proc.stderr and "SIGTERM" in proc.stderr, proc.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(CHILD_WAIT_S) == 0

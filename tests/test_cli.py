"""The command line as an operator uses it: up, server, status, demo; bad configuration."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import memfabric
from memfabric.config import load_server_config
from memfabric.launcher import LocalFabric, wait_for_line

from .conftest import short_tmp_dir
from .helpers import wait_until

MF = [sys.executable, "-m", "memfabric"]


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def server_toml(directory: str, pool: str, extra_server: str = "") -> str:
    return (f'[server]\ndata_dir = "{directory}/data"\nipc_socket = "{directory}/s.sock"\n'
            f'segment_size = "1MiB"\n{extra_server}\n'
            f'[cluster]\nbackend = "embedded"\npath = "{directory}/cluster.db"\n\n{pool}')


DRAM_POOL = '[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "8MiB"\n'


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen):
    """`proc` killed (and reaped) if it still runs when the block ends, however it ends."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _site_customized(tmp_path, monkeypatch, code: str) -> None:
    """Python processes started from now on (servers, `up`) run `code` first (sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("pool, server_extra, key", [
    ('[[pool]]\nname = "default"\nmedium = "tape"\ncapacity = "8MiB"\n', "", "pool[0].medium"),
    ('[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "3000"\n', "", "pool[0].capacity"),
    ('[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "lots"\n', "", "pool[0].capacity"),
    ('[[pool]]\nname = "default"\nmedium = "ramdisk"\ncapacity = "8MiB"\n', "", "pool[0].path"),
    (DRAM_POOL, 'colour = "blue"', "server.colour"),
    (DRAM_POOL, 'rpc_listen = "nowhere"', "server.rpc_listen"),
    (DRAM_POOL, 'max_clients = 0', "server.max_clients"),
    (DRAM_POOL, 'busy_poll_us = -1', "server.busy_poll_us"),
    (DRAM_POOL, 'busy_poll_us = 0.5', "server.busy_poll_us"),
    (DRAM_POOL + DRAM_POOL, "", "pool[1].name"),
    (DRAM_POOL, 'ipc_socket_mode = "0999"', "server.ipc_socket_mode"),
    (DRAM_POOL, 'ipc_socket_mode = "0066"', "server.ipc_socket_mode"),      # the owner could not connect
    (DRAM_POOL, 'ipc_socket_mode = "4660"', "server.ipc_socket_mode"),
    (DRAM_POOL, 'ipc_socket_mode = 432', "server.ipc_socket_mode"),         # 0o660 as a decimal: ambiguous
    (DRAM_POOL, 'ipc_socket_group = "no-such-group-here"', "server.ipc_socket_group"),
    (DRAM_POOL, 'ipc_socket_group = 4000000000', "server.ipc_socket_group"),
    (DRAM_POOL, 'ipc_socket_group = -5', "server.ipc_socket_group"),
    (DRAM_POOL, 'ipc_socket_group = 99999999999999999', "server.ipc_socket_group"),
    (DRAM_POOL, 'ipc_socket_group = ["a"]', "server.ipc_socket_group"),
    (DRAM_POOL, 'max_namespaces_per_client = 0', "server.max_namespaces_per_client"),
    (DRAM_POOL, 'max_namespaces_per_client = 100000', "server.max_namespaces_per_client"),
    (DRAM_POOL, 'max_namespaces_per_client = "many"', "server.max_namespaces_per_client"),
    (DRAM_POOL, 'metrics_listen = "9400"', "server.metrics_listen"),
    (DRAM_POOL, 'metrics_listen = 9400', "server.metrics_listen"),
    (DRAM_POOL, 'metrics_listen = "127.0.0.1:http"', "server.metrics_listen"),
    # One late beat would have the server taken for dead (the default timeout is 3 s).
    (DRAM_POOL, 'heartbeat_interval_s = 1.0', "server.heartbeat_interval_s"),
])
def test_bad_server_config_names_the_key_and_exits_2(pool, server_extra, key):
    directory = short_tmp_dir("mf-cfg-")
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, pool, server_extra))
    proc = subprocess.run(MF + ["server", "--config", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert proc.stderr.count("\n") == 1, "one clear message, not a traceback"


def test_the_heartbeat_interval_follows_a_short_liveness_timeout():
    """With a liveness timeout of 1 s, the default interval (0.5 s) let one late heartbeat
    have the server taken for dead (and MemKV forget its keys): it is derived instead."""
    directory = short_tmp_dir("mf-cfg-")
    text = server_toml(directory, DRAM_POOL).replace("[cluster]\n", "[cluster]\nliveness_timeout_s = 1.0\n")
    cfg = load_server_config(write(os.path.join(directory, "server.toml"), text))
    assert cfg.cluster.liveness_timeout_s == 1.0 and cfg.heartbeat_interval_s == 0.25
    cfg = load_server_config(write(os.path.join(directory, "server.toml"), server_toml(directory, DRAM_POOL)))
    assert cfg.heartbeat_interval_s == 0.5


def test_unparseable_and_missing_config_exit_2():
    directory = short_tmp_dir("mf-cfg-")
    bad = write(os.path.join(directory, "bad.toml"), "[server\n")
    for path in (bad, os.path.join(directory, "missing.toml")):
        proc = subprocess.run(MF + ["server", "--config", path], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert path in proc.stderr


@pytest.mark.parametrize("medium", ["ramdisk", "pmem"])
def test_server_from_config_with_file_media(medium):
    directory = short_tmp_dir("mf-srv-")
    pool = (f'[[pool]]\nname = "files"\nmedium = "{medium}"\ncapacity = "4MiB"\n'
            f'path = "{directory}/{medium}"\n')
    # A server that never polls (every wait sleeps) serves the same.
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, pool, "busy_poll_us = 0"))
    proc = subprocess.Popen(MF + ["server", "--config", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, " ready ", 30, [])
        assert {"objects.journal", "reserve.mem"} <= set(os.listdir(f"{directory}/{medium}"))
        with memfabric.init(path) as session:
            ns = session.create_namespace("n", sec_id="k", pool="files")
            bm = ns.alloc(3 << 20)
            bm.write(b"x" * (3 << 20))
            assert bm.read(1 << 20, 3) == b"xxx"
            with pytest.raises(memfabric.OutOfMemory):
                ns.alloc(2 << 20)
            with pytest.raises(memfabric.NoSuchPool):
                session.create_namespace("n2", sec_id="k", pool="nope")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert not os.path.exists(f"{directory}/s.sock"), "socket left behind"
    # Stopped, the pool keeps just the journal and the files of segments with objects in them.
    left = sorted(os.listdir(f"{directory}/{medium}"))
    assert left[0] == "objects.journal" and len(left) == 4
    assert sum(os.path.getsize(f"{directory}/{medium}/{name}") for name in left[1:]) == 3 << 20


def test_up_status_and_clean_stop():
    directory = short_tmp_dir("mf-up-")
    fab = LocalFabric(directory, servers=3, capacity="8MiB", segment_size="1MiB").start()
    try:
        pids = fab.server_pids()
        assert sorted(pids) == [1, 2, 3]
        with memfabric.init(directory) as session:
            session.create_namespace("shown", sec_id="k", attribute=7)
        proc = subprocess.run(MF + ["status", "--dir", directory, "--json"], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        state = json.loads(proc.stdout)
        assert [s["server_id"] for s in state["servers"]] == [1, 2, 3]
        assert all(s["alive"] for s in state["servers"])
        assert all(s["pools"]["default"]["capacity_bytes"] == 8 << 20 for s in state["servers"])
        assert state["namespaces"] == [{"pool": "default", "ns": "shown", "attribute": 7, "object_count": 0,
                                        "used_bytes": 0, "kv_keys": 0, "kv_bytes": 0, "kv_hits": 0,
                                        "kv_misses": 0, "kv_evictions": 0, "kv_expired": 0, "plogs": 0,
                                        "plogs_sealed": 0, "plog_records": 0, "plog_bytes": 0}]
        table = subprocess.run(MF + ["status", "--dir", directory], capture_output=True, text=True, timeout=30)
        assert table.returncode == 0 and "shown" in table.stdout and "alive" in table.stdout
    finally:
        assert fab.stop() == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)   # no server left behind
    assert not any(os.path.exists(f"{directory}/server-{i}/ipc.sock") for i in (1, 2, 3))
    state = json.loads(subprocess.run(MF + ["status", "--dir", directory, "--json"], capture_output=True,
                                      text=True, timeout=30).stdout)
    assert not any(s["alive"] for s in state["servers"]), "servers deregistered on stop"


# Servers started while this is on PYTHONPATH ignore SIGTERM, as a hung one does.
DEAF_SERVER = """
import signal
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"server" in _args and b"memfabric" in _args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _install = signal.signal
    signal.signal = lambda sig, handler: None if sig == signal.SIGTERM else _install(sig, handler)
"""


def test_a_server_deaf_to_sigterm_is_killed_not_left_behind(tmp_path, monkeypatch):
    """`up` kills a server still running a while after its SIGTERM. Whoever stops `up` must
    wait longer than that, or it kills `up` first and orphans the server (seen: a hung server
    left running after a test, its `up` long gone). And it says so: it said "fabric stopped" and
    nothing else, in up.log too, and an operator never learnt a server had been killed."""
    _site_customized(tmp_path, monkeypatch, DEAF_SERVER)
    directory = short_tmp_dir("mf-deaf-")
    fab = LocalFabric(directory, servers=1, capacity="4MiB", segment_size="1MiB").start()
    (pid,) = fab.server_pids().values()
    try:
        fab.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with open(os.path.join(directory, "up.log")) as f:
            said = [line for line in f if str(pid) in line and "killed" in line]
        assert said, "up did not say it killed the server"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Servers started while this is on PYTHONPATH take a second SIGTERM at every line their handler of
# the first one runs, as a storm of signals (Ctrl-C, then `up`'s own SIGTERM) may land it.
NESTED_SIGTERM_SERVER = """
import signal, sys
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"server" in _args and b"memfabric" in _args:
    _install = signal.signal

    def _nesting(sig, handler):
        if sig != signal.SIGTERM or not callable(handler):
            return _install(sig, handler)

        def first(*args):
            def tracer(frame, event, arg):
                if event == "line":
                    handler(*args)
                return tracer
            sys.settrace(tracer)
            try:
                handler(*args)
            finally:
                sys.settrace(None)
        return _install(sig, first)
    signal.signal = _nesting
"""


def test_a_signal_landing_in_the_servers_handler_of_another_does_not_hang_it(tmp_path, monkeypatch):
    """A burst of SIGTERMs hung a server (about 1 in 8 of 30 sent at once): its handler set a
    threading.Event (the server start's, then), and a signal landing while that set() held the
    Event's lock ran the handler again, in the same thread, which waited for that lock forever."""
    _site_customized(tmp_path, monkeypatch, NESTED_SIGTERM_SERVER)
    directory = short_tmp_dir("mf-nest-")
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, DRAM_POOL))
    proc = subprocess.Popen(MF + ["server", "--config", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    code = None
    with _killed_at_exit(proc):
        wait_for_line(proc, " ready ", 30, lines)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    assert code == 0, f"the server did not stop on SIGTERM (status {code}):\n" + "".join(lines[-20:])
    wait_until(lambda: any(" stopped" in line for line in lines), "the server to say it stopped")
    assert not os.path.exists(f"{directory}/s.sock"), "socket left behind"


def test_restarted_server_keeps_its_id():
    directory = short_tmp_dir("mf-id-")
    for _ in range(2):
        with LocalFabric(directory, servers=2, capacity="4MiB", segment_size="1MiB") as fab:
            assert sorted(fab.server_pids()) == [1, 2]


# A server started while this is on PYTHONPATH says so, then takes its time to import
# memfabric.server.main (as one still starting does, before it handles any signal).
SLOW_SERVER = """
import os, sys, time
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"server" in _args and b"memfabric" in _args:
    class _Slow:
        def find_spec(self, name, path=None, target=None):
            if name == "memfabric.server.main":
                sys.meta_path.remove(self)
                print(f"slow server pid={os.getpid()} starting", flush=True)
                time.sleep(60)
            return None
    sys.meta_path.insert(0, _Slow())
"""


def test_ctrl_c_while_up_starts_a_server_stops_it_without_a_traceback(tmp_path, monkeypatch):
    """A terminal's Ctrl-C goes to `up`'s whole process group. Its servers were in it: one
    still starting took the SIGINT as a KeyboardInterrupt, and `up` printed its traceback (seen
    in 12 of 15 Ctrl-Cs at random moments of a 3-server start). `up` stops its servers itself."""
    _site_customized(tmp_path, monkeypatch, SLOW_SERVER)
    directory = short_tmp_dir("mf-ctrlc-")
    proc = subprocess.Popen(MF + ["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)       # its group: the one a terminal signals
    lines: list[str] = []
    pid = None
    try:
        wait_for_line(proc, "slow server pid=", 30, lines)
        pid = int(next(line for line in lines if "slow server pid=" in line).split("pid=")[1].split()[0])
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)
            except (ProcessLookupError, ChildProcessError):
                pass
    # The reader thread may still be taking the last lines off the pipe.
    wait_until(lambda: any("stopped while starting" in line or "before it was ready" in line for line in lines),
               "up to say why it stopped")
    text = "".join(lines)
    assert code == 1 and "stopped while starting" in text and "Traceback" not in text, text


# A command started while this is on PYTHONPATH gets a Ctrl-C while it imports `{module}`,
# and the KeyboardInterrupt lands where Python prints it and goes on ("Exception ignored in
# ..."), as it did within importlib's module locks (a weakref callback).
CTRL_C_LOST_IN_AN_IMPORT = """
import os, signal, sys
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"{command}" in _args and b"memfabric" in _args:
    class _Swallows:
        def __del__(self):                 # an exception here is printed and dropped
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):          # the handler runs on one of these lines
                pass

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "{module}":
                sys.meta_path.remove(self)
                _Swallows()                # (dropped at once: __del__ runs here)
                print("(a Ctrl-C dropped)", flush=True)
            return None
    sys.meta_path.insert(0, _Finder())
"""


@pytest.mark.parametrize("command, module, extra", [
    ("up", "memfabric.launcher", ["--capacity", "4MiB", "--segment-size", "1MiB"]),
    ("demo", "memfabric.cli.demo", []),          # the client is imported when the command runs
    ("status", "memfabric.cli.status", []),
])
def test_a_ctrl_c_lost_in_an_import_still_stops_the_command_before_it_starts(tmp_path, monkeypatch, command,
                                                                            module, extra):
    """A Ctrl-C in the first 0.4 s of `up` (its imports) gave a traceback, or in 1 of 12 tries
    none: Python dropped the KeyboardInterrupt inside an import ("Exception ignored in
    _get_module_lock") and the fabric started anyway; one dropped in the imports a command
    makes as it runs let the demo start its fabric and run to the end. The command's own
    handler is in place before its imports and remembers the Ctrl-C, which is looked for once
    they are done: the command says it was interrupted, starts nothing, and prints no
    traceback of the one Python dropped (its "Exception ignored" report)."""
    _site_customized(tmp_path, monkeypatch, CTRL_C_LOST_IN_AN_IMPORT.format(command=command, module=module))
    directory = short_tmp_dir("mf-ctrlc-import-")
    proc = subprocess.Popen(MF + [command, "--dir", directory, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with _killed_at_exit(proc):
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    assert "(a Ctrl-C dropped)" in out, out       # the Ctrl-C was dropped where it landed
    assert "Exception ignored" not in out and "Traceback" not in out, out
    assert proc.returncode == 130 and "interrupted" in out and "ready" not in out, out
    assert os.listdir(directory) == [], "the command went on after the Ctrl-C"


# `up` started while this is on PYTHONPATH pauses once its up.pid is in place (as writing the
# fabric's files on a slow disk may), and says so.
SLOW_AFTER_PID_FILE = """
import os, sys, time
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"up" in _args and b"memfabric" in _args:
    _replace = os.replace

    def _replace_then_pause(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if str(dst).endswith("up.pid"):
            print("up.pid written", flush=True)
            time.sleep(3)
    os.replace = _replace_then_pause
"""


def test_a_sigterm_as_soon_as_up_pid_names_up_stops_it_cleanly(tmp_path, monkeypatch):
    """`memfabric down` signals the pid in up.pid. `up` wrote it before it handled SIGTERM, so a
    `down` right after `up` started killed it outright (status -15, up.pid left; 15 of 15 tries
    that signalled as soon as the file appeared)."""
    _site_customized(tmp_path, monkeypatch, SLOW_AFTER_PID_FILE)
    directory = short_tmp_dir("mf-early-")
    proc = subprocess.Popen(MF + ["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    with _killed_at_exit(proc):
        wait_for_line(proc, "up.pid written", 30, lines)
        with open(os.path.join(directory, "up.pid")) as f:
            os.kill(int(f.read()), signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, f"up exited with status {code}:\n" + "".join(lines)
    assert not os.path.exists(os.path.join(directory, "up.pid"))


def _hangup_as_in_a_terminal() -> None:
    """SIGHUP's default action, as a shell in a terminal starts a command with (the tests may
    run under nohup, which ignores it, and an ignored SIGHUP is inherited)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _hangup_ignored() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_a_closed_terminal_stops_up_as_a_ctrl_c_does():
    """Closing the terminal sends SIGHUP to its foreground process group: `up` died of it (status
    -1, up.pid left, nothing in up.log); its servers, in that group then, died too, their
    sockets left behind."""
    directory = short_tmp_dir("mf-hup-")
    proc = subprocess.Popen(MF + ["up", "--dir", directory, "--servers", "2", "--capacity", "4MiB",
                                  "--segment-size", "1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,       # its group: the one a terminal signals
                            preexec_fn=_hangup_as_in_a_terminal)
    lines: list[str] = []
    with _killed_at_exit(proc):
        wait_for_line(proc, "fabric ready", 30, lines)
        os.killpg(proc.pid, signal.SIGHUP)
        code = proc.wait(30)
    assert code == 0
    assert not os.path.exists(os.path.join(directory, "up.pid"))
    for i in (1, 2):
        assert not os.path.exists(os.path.join(directory, f"server-{i}", "ipc.sock")), "socket left behind"
    with open(os.path.join(directory, "up.log")) as f:
        assert "memfabric fabric stopped" in f.read()


def test_up_under_nohup_outlives_its_terminal():
    """Under nohup (SIGHUP ignored when `up` starts) a closed terminal stops nothing: the fabric
    goes on serving, and SIGTERM stops it as ever."""
    directory = short_tmp_dir("mf-nohup-")
    proc = subprocess.Popen(MF + ["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_hangup_ignored)
    lines: list[str] = []
    with _killed_at_exit(proc):
        wait_for_line(proc, "fabric ready", 30, lines)
        os.killpg(proc.pid, signal.SIGHUP)
        status = subprocess.run(MF + ["status", "--dir", directory, "--json"], capture_output=True, text=True,
                                timeout=30)
        assert status.returncode == 0 and all(s["alive"] for s in json.loads(status.stdout)["servers"])
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0


def test_up_stops_on_sigint_and_twice_in_a_row():
    directory = short_tmp_dir("mf-int-")
    for _ in range(2):
        proc = subprocess.Popen(MF + ["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        wait_for_line(proc, "fabric ready", 30, lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while "fabric stopped" not in "".join(lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "fabric stopped" in "".join(lines)


@pytest.mark.parametrize("command", ["up", "server"])
def test_signals_that_keep_coming_until_it_exits_leave_a_clean_stop_clean(command):
    """Ctrl-C twice, or `down` and a Ctrl-C: the second signal may land as the interpreter
    exits, when Python has put the default action back; it killed a process that had stopped
    cleanly (status -15 or -2 after "stopped", in each of 10 runs of a storm 0-20 ms apart)."""
    directory = short_tmp_dir("mf-again-")
    if command == "up":
        args, ready, stopped = (["up", "--dir", directory, "--capacity", "4MiB", "--segment-size", "1MiB"],
                                "fabric ready", "fabric stopped")
    else:
        path = write(os.path.join(directory, "server.toml"), server_toml(directory, DRAM_POOL))
        args, ready, stopped = ["server", "--config", path], " ready ", " stopped"
    proc = subprocess.Popen(MF + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        wait_for_line(proc, ready, 30, lines)
        deadline = time.monotonic() + 60
        sent = 0
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal((signal.SIGTERM, signal.SIGINT)[sent % 2])
            sent += 1
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
    wait_until(lambda: any(stopped in line for line in lines), f"memfabric {command} to say it stopped")
    assert code == 0, f"memfabric {command} stopped, then exited with status {code} ({sent} signals)"


def _processes_with(env_mark: str) -> list[int]:
    """The pids of the processes whose environment holds `env_mark` (inherited by children)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if env_mark.encode() in f.read().split(b"\0"):
                    pids.append(int(name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.parametrize("when", ["starting a local fabric", "fabric ready"])
def test_ctrl_c_in_the_demo_says_interrupted_and_leaves_nothing_running(when):
    """Ctrl-C while the demo starts its fabric, or while it runs its steps: status 130 and one
    line saying so, not a KeyboardInterrupt traceback (seen), and no process of its fabric left
    (a fabric whose start raised was left to its parent-death signal)."""
    mark = f"MF_TEST_DEMO_MARK={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1]}
    proc = subprocess.Popen(MF + ["demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    with _killed_at_exit(proc):
        wait_for_line(proc, when, 60, lines)
        directory = lines[0].split(" in ")[1].split()[0]
        # Past the start of `up` (a SIGINT landing in Popen's fork may be lost, in Python).
        time.sleep(0.3 if when.startswith("starting") else 0)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    wait_until(lambda: any("memfabric demo: interrupted" in line for line in lines), "the demo to say why it stopped")
    text = "".join(lines)
    assert code == 130 and "Traceback" not in text, text
    wait_until(lambda: not _processes_with(mark), "the demo's fabric to be gone", timeout_s=30)
    assert not os.path.exists(directory)


# A command started while this is on PYTHONPATH gets a Ctrl-C as it reads its arguments.
CTRL_C_IN_THE_ARGUMENTS = """
import argparse, os, signal
with open("/proc/self/cmdline", "rb") as _f:
    _args = _f.read().split(b"\\0")
if b"status" in _args and b"memfabric" in _args:
    _parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):              # the handler runs on one of these lines
            pass
        return _parse_args(self, *args, **kwargs)
    argparse.ArgumentParser.parse_args = parse_args
"""


def test_a_ctrl_c_while_a_command_reads_its_arguments_says_interrupted(tmp_path, monkeypatch):
    """A Ctrl-C 0.1 s into `memfabric status` (seen) landed in main()'s argument parsing, before
    its `try`, and the KeyboardInterrupt came out as a traceback."""
    _site_customized(tmp_path, monkeypatch, CTRL_C_IN_THE_ARGUMENTS)
    proc = subprocess.run(MF + ["status", "--dir", short_tmp_dir("mf-ctrlc-args-")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """A shell script's `memfabric demo &` runs with SIGINT ignored, so that a Ctrl-C meant
    for the script leaves it be; Python keeps that, and so did memfabric until its own Ctrl-C
    handler, put in place at the command's first line, replaced it: the demo was interrupted."""
    directory = short_tmp_dir("mf-ign-")
    proc = subprocess.Popen(MF + ["demo", "--dir", directory], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    with _killed_at_exit(proc):
        wait_for_line(proc, "fabric ready", 60, lines)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    wait_until(lambda: any("stopped cleanly" in line or "interrupted" in line for line in lines),
               "the demo's last line")
    text = "".join(lines)
    assert code == 0 and "every step gave the expected result" in text and "interrupted" not in text, text


def test_a_fabric_whose_start_is_interrupted_is_stopped_by_it(monkeypatch):
    """A Ctrl-C (or any error) in LocalFabric.start, after `up` started: no `with` stops a
    fabric whose __enter__ raised, so start itself stops `up` (which stops its servers)."""
    import memfabric.launcher as launcher
    real, started = launcher.wait_for_line, []

    def ready_then_interrupted(proc, needle, timeout_s, lines, *args, **kwargs):
        started.append(proc)
        real(proc, needle, timeout_s, lines, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "wait_for_line", ready_then_interrupted)
    fab = LocalFabric(short_tmp_dir("mf-intr-"), servers=1, capacity="4MiB", segment_size="1MiB")
    with pytest.raises(KeyboardInterrupt):
        fab.start()
    (up,) = started
    assert up.poll() == 0 and fab.proc is None       # stopped cleanly, and by start


def test_demo_runs_every_operation():
    proc = subprocess.run(MF + ["demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for call in ("BM_Init", "BM_CreateNSSec", "BM_AllocSec", "BM_WriteSec", "BM_ReadSec", "BM_MapSec",
                 "BM_Unmap", "BM_CopySec", "BM_ExpandSec", "BM_GatherSec", "BM_QueryNSCache",
                 "BM_BatchFreeSec", "BM_FreeSec", "BM_DestroyNSSec", "BM_Exit"):
        assert call in proc.stdout
    assert "every step gave the expected result" in proc.stdout


def test_sigterm_while_reserving_memory_stops_the_server_promptly():
    """A large pool takes seconds to reserve; SIGTERM meanwhile must stop it, not wait for the
    whole reservation (nor ignore it), and leave no process or reserve behind."""
    directory = short_tmp_dir("mf-term-")
    pool = '[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "6GiB"\n'
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, pool))
    proc = subprocess.Popen(MF + ["server", "--config", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        wait_for_line(proc, "reserving", 30, lines)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0
    # The reader thread may still be taking the last lines off the pipe.
    wait_until(lambda: any("stopped while reserving memory" in line for line in lines),
               "the server to say why it stopped")
    assert not any(" ready " in line for line in lines)


# ---- capacity beyond the machine, and a fabric already running (issue 7, item 14) -----------------


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))


def gib_above(n: int) -> int:
    return (n // (1 << 30) + 1) << 30


def test_up_refuses_more_dram_than_the_host_has_before_writing_anything():
    parent = short_tmp_dir("mf-cap-")
    directory = os.path.join(parent, "fabric")
    too_much = gib_above(2 * mem_available_bytes())
    proc = subprocess.run(MF + ["up", "--dir", directory, "--capacity", f"{too_much >> 30}GiB"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MemAvailable" in proc.stderr and f"{too_much >> 30}GiB" in proc.stderr
    assert proc.stderr.count("\n") == 1, "one clear message, not a traceback"
    assert not os.path.exists(directory), "nothing written"
    # Each server fits, all of them together do not.
    each = gib_above(mem_available_bytes() // 2)
    proc = subprocess.run(MF + ["up", "--dir", directory, "--servers", "3", "--capacity", f"{each >> 30}GiB"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "3 servers x" in proc.stderr, proc.stderr
    assert not os.path.exists(directory)


def test_server_refuses_more_dram_than_the_host_has_before_writing_anything():
    directory = short_tmp_dir("mf-cap-")
    too_much = gib_above(2 * mem_available_bytes())
    pool = f'[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "{too_much >> 30}GiB"\n'
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, pool))
    proc = subprocess.run(MF + ["server", "--config", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "MemAvailable" in proc.stderr and "pool[0] 'default' (dram)" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert sorted(os.listdir(directory)) == ["server.toml"], "no data directory, no cluster database"


@pytest.mark.parametrize("medium", ["pmem", "ramdisk"])
def test_server_refuses_a_file_pool_larger_than_its_file_systems_free_space(medium):
    directory = short_tmp_dir("mf-cap-")
    st = os.statvfs(directory)
    too_much = gib_above(2 * st.f_bavail * st.f_frsize)
    pool = (f'[[pool]]\nname = "files"\nmedium = "{medium}"\ncapacity = "{too_much >> 30}GiB"\n'
            f'path = "{directory}/{medium}"\n')
    path = write(os.path.join(directory, "server.toml"), server_toml(directory, pool))
    proc = subprocess.run(MF + ["server", "--config", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "free" in proc.stderr and f"{too_much >> 30}GiB" in proc.stderr
    assert sorted(os.listdir(directory)) == ["server.toml"], "no pool files, nothing else"


@pytest.fixture
def small_file_system():
    """A 64 MiB tmpfs of our own: free space no other process moves."""
    directory = short_tmp_dir("mf-fs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", directory],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", directory], check=True)


def test_files_a_pool_already_holds_count_as_its_own(small_file_system):
    """A restarted server reuses its files: only what they lack must be free."""
    from memfabric.capacity import NotEnoughCapacity, check_pools
    from memfabric.config import PoolConfig
    MiB = 1 << 20
    pool_dir = os.path.join(small_file_system, "pool")
    os.mkdir(pool_dir)
    with open(os.path.join(pool_dir, "segment-00000.mem"), "wb") as f:
        f.write(b"\1" * (16 * MiB))                                       # 48 MiB left free
    check_pools([PoolConfig("p", "pmem", 60 * MiB, pool_dir)], "test")     # 16 held + 44 more
    with pytest.raises(NotEnoughCapacity) as err:
        check_pools([PoolConfig("p", "pmem", 68 * MiB, pool_dir)], "test")  # 16 held + 52 more
    assert "52MiB" in str(err.value) and "48MiB free" in str(err.value) and "tmpfs" in str(err.value)
    check_pools([PoolConfig("a", "ramdisk", 30 * MiB, os.path.join(small_file_system, "a"))], "test")
    with pytest.raises(NotEnoughCapacity):     # two pools on one file system add up
        check_pools([PoolConfig("a", "ramdisk", 30 * MiB, os.path.join(small_file_system, "a")),
                     PoolConfig("b", "pmem", 30 * MiB, os.path.join(small_file_system, "b"))], "test")


def test_a_ramdisk_pool_on_a_disk_is_allowed_with_a_note(small_file_system):
    """A ramdisk pool's files on a disk work, but are not what the medium says: the server
    warns (check_pools' notes); on tmpfs, no note."""
    from memfabric.capacity import check_pools
    from memfabric.config import PoolConfig
    on_tmpfs = check_pools([PoolConfig("r", "ramdisk", 1 << 20, os.path.join(small_file_system, "r"))], "test")
    assert on_tmpfs == []
    from memfabric.capacity import MEMORY_FILE_SYSTEMS, mount_of
    here = os.path.dirname(os.path.abspath(__file__))            # the checkout: on a disk, most likely
    if mount_of(here)[1] in MEMORY_FILE_SYSTEMS:
        pytest.skip("the checkout is on tmpfs here: no disk to try")
    disk = tempfile.mkdtemp(prefix="mf-disk-", dir=here)
    try:
        notes = check_pools([PoolConfig("r", "ramdisk", 1 << 20, os.path.join(disk, "r")),
                             PoolConfig("p", "pmem", 1 << 20, os.path.join(disk, "p"))], "test")
    finally:
        os.rmdir(disk)
    assert len(notes) == 1 and "'r' (ramdisk" in notes[0] and "tmpfs" in notes[0], notes


def snapshot(paths: list[str]) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in paths:
        st = os.stat(p)
        with open(p, "rb") as f:
            out[p] = (st.st_ino, st.st_mtime_ns, f.read())
    return out


def test_up_on_a_running_fabrics_directory_is_refused_and_rewrites_nothing():
    directory = short_tmp_dir("mf-twice-")
    with LocalFabric(directory, servers=2, capacity="4MiB", segment_size="1MiB") as fab:
        files = [os.path.join(directory, p) for p in ("fabric.toml", "remote.toml", "server-1/server.toml",
                                                      "server-2/server.toml", "token")]
        before = snapshot(files)
        proc = subprocess.run(MF + ["up", "--dir", directory, "--servers", "3", "--capacity", "8MiB"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "already running" in proc.stderr and f"pid {fab.proc.pid}" in proc.stderr
        assert proc.stderr.count("\n") == 1
        assert snapshot(files) == before
        assert not os.path.exists(os.path.join(directory, "server-3"))
        with memfabric.init(directory) as session:           # the running fabric is unharmed
            session.create_namespace("still", sec_id="k").alloc(4096).write(b"fine")
    # Stopped: the directory is free again.
    with LocalFabric(directory, servers=2, capacity="4MiB", segment_size="1MiB"):
        pass


def test_up_is_refused_where_a_server_runs_without_its_up():
    directory = short_tmp_dir("mf-hand-")
    with LocalFabric(directory, servers=1, capacity="4MiB", segment_size="1MiB"):
        pass
    config = os.path.join(directory, "server-1", "server.toml")
    server = subprocess.Popen(MF + ["server", "--config", config], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(server, " ready ", 30, [])
        before = snapshot([config, os.path.join(directory, "fabric.toml")])
        proc = subprocess.run(MF + ["up", "--dir", directory, "--capacity", "8MiB"], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2 and "server-1" in proc.stderr and "running" in proc.stderr, proc.stderr
        assert snapshot([config, os.path.join(directory, "fabric.toml")]) == before
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0


def test_a_child_that_exits_early_is_reported_as_such():
    directory = short_tmp_dir("mf-early-")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=directory)
    with pytest.raises(RuntimeError) as err:
        wait_for_line(proc, " ready ", 60, [])
    assert "exited with status 3 before it was ready" in str(err.value) and "no luck" in str(err.value)


@pytest.mark.parametrize("keys", ["0", "-5", "many"])
def test_bench_refuses_a_scale_of_no_keys_in_one_line(keys):
    """Before: --scale-keys 0 ran the bench and died in numpy (a ValueError's traceback)."""
    proc = subprocess.run(MF + ["bench", "--kv", "--scale-keys", keys], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--scale-keys" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

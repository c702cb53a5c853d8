"""Who on one host can reach a server's namespaces: the kernel's answer, tested for real.

A same-user process must not read a server's memory through /proc; files with secrets are
the owner's alone from the moment they exist; the IPC socket's mode and group say who may be
a client. The tests run as root, which the kernel lets through everything, so the processes
whose access is in question run as an unprivileged user (tests/unprivileged.py).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

import memfabric
from memfabric.launcher import die_with_parent, wait_for_line

from .. import unprivileged
from ..helpers import CHILD_WAIT_S, MiB

MF = [sys.executable, "-m", "memfabric"]


@contextlib.contextmanager
def scratch_dir(owner: tuple[int, int] | None = None, mode: int = 0o755):
    directory = tempfile.mkdtemp(prefix="mf-trust-", dir="/tmp")
    try:
        os.chmod(directory, mode)
        if owner is not None:
            os.chown(directory, *owner)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def server_config(directory: str, pool: str = "", server_extra: str = "") -> str:
    path = os.path.join(directory, "server.toml")
    pool = pool or '[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "8MiB"\n'
    with open(path, "w") as f:
        f.write(f'[server]\ndata_dir = "{directory}/data"\nipc_socket = "{directory}/data/s.sock"\n'
                f'segment_size = "1MiB"\n{server_extra}\n'
                f'[cluster]\nbackend = "embedded"\npath = "{directory}/cluster.db"\n\n{pool}')
    os.chmod(path, 0o644)
    return path


@contextlib.contextmanager
def running(argv: list[str], **popen):
    """A server process until the block ends (SIGTERM, bounded wait, then SIGKILL)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines: list[str] = []
    try:
        wait_for_line(proc, " ready ", 60, lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(CHILD_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_pid(lines: list[str]) -> int:
    line = next(l for l in lines if " ready " in l)
    return int(dict(p.split("=", 1) for p in line.split() if "=" in p)["pid"])


# ---- servers are undumpable -------------------------------------------------------------------

ATTACKER = r"""
import errno, json, os, stat, sys
pid, marker = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
out = {"fd_dir": "listed", "fds": {}, "found": False, "mem": "opened"}
try:
    names = os.listdir(f"/proc/{pid}/fd")
except OSError as exc:
    out["fd_dir"] = errno.errorcode[exc.errno]
    names = [str(n) for n in range(64)]      # guess the numbers: open them by path
for name in names:
    try:
        fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        out["fds"][name] = errno.errorcode[exc.errno]
        continue
    out["fds"][name] = "opened"
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):          # memfds and files: read them whole
            pos = 0
            while pos < st.st_size:
                chunk = os.pread(fd, 1 << 20, pos)
                if not chunk:
                    break
                out["found"] |= marker in chunk
                pos += len(chunk)
    finally:
        os.close(fd)
try:
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
except OSError as exc:
    out["mem"] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""

WITHOUT_PRCTL = ("import sys, memfabric.server.main as m; m.make_undumpable = lambda: None; "
                 "sys.exit(m.run_server(sys.argv[1]))")


@pytest.mark.parametrize("undumpable", [True, False], ids=["server", "server-without-prctl"])
def test_a_same_user_process_cannot_read_the_servers_fds_or_memory(undumpable):
    """The server and the attacker both run as `nobody`. Without PR_SET_DUMPABLE 0 the same
    attacker reads a namespace's bytes straight out of the server's memfds: the control."""
    uid, gid = unprivileged.ids()
    python, env = unprivileged.python()
    with scratch_dir(owner=(uid, gid)) as directory:
        config = server_config(directory)
        argv = [python, "-m", "memfabric", "server", "--config", config] if undumpable else \
            [python, "-c", WITHOUT_PRCTL, config]
        with running(argv, env=env, cwd=directory, preexec_fn=unprivileged.become(uid, gid)) as (_, lines):
            pid = server_pid(lines)
            marker = secrets.token_bytes(32)
            with memfabric.init(config) as session:       # a client of namespace "private" (root)
                bm = session.create_namespace("private", sec_id="only-for-us").alloc(MiB)
                bm.write(marker * (MiB // 32))
                attack = subprocess.run([python, "-c", ATTACKER, str(pid), marker.hex()], env=env, cwd="/",
                                        preexec_fn=unprivileged.become(uid, gid), capture_output=True,
                                        text=True, timeout=CHILD_WAIT_S * 4)
            assert attack.returncode == 0, attack.stderr
            seen = json.loads(attack.stdout)
    if undumpable:
        assert seen["fd_dir"] in ("EACCES", "EPERM"), seen
        assert seen["fds"] and set(seen["fds"].values()) <= {"EACCES", "EPERM"}, seen
        assert seen["mem"] in ("EACCES", "EPERM"), seen
        assert not seen["found"]
    else:
        assert seen["found"], f"the control attack should have read the namespace's bytes: {seen}"


# ---- files with secrets are the owner's alone ---------------------------------------------------


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_fabric_files_with_secrets_are_0600_whatever_the_umask():
    """`memfabric up` under umask 000: a file created with the default mode would be 0666."""
    with scratch_dir() as directory:
        def loose() -> None:
            os.umask(0)
            die_with_parent()
        proc = subprocess.Popen(MF + ["up", "--dir", directory, "--servers", "2", "--capacity", "4MiB",
                                      "--segment-size", "1MiB"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=loose)
        try:
            wait_for_line(proc, "fabric ready", 60, [])
            with memfabric.init(directory) as session:    # a catalog write: -wal and -shm exist
                session.create_namespace("n", sec_id="k")
                secret_files = ["cluster.db", "cluster.db-wal", "cluster.db-shm", "token",
                                "server-1/server.lock", "server-2/server.lock"]
                for name in secret_files:
                    assert mode_of(os.path.join(directory, name)) == 0o600, name
                liveness = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
                            if "liveness" in root]
                assert liveness, "heartbeat files exist"
                assert {mode_of(p) for p in liveness} == {0o600}
                assert mode_of(os.path.join(directory, "server-1", "ipc.sock")) & 0o077 == 0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(CHILD_WAIT_S)


def test_an_old_world_readable_cluster_database_is_narrowed():
    """A catalog made before these modes (0644) is the owner's alone once a server opens it."""
    from memfabric.cluster import open_cluster
    with scratch_dir() as directory:
        path = os.path.join(directory, "cluster.db")
        open(path, "wb").close()
        os.chmod(path, 0o644)
        cluster = open_cluster("embedded", path=path)
        try:
            cluster.create_namespace("default", "n", 0, "aa", "bb")
            assert {mode_of(p) for p in (path, path + "-wal", path + "-shm")} == {0o600}
        finally:
            cluster.close()


def test_journal_is_0600_whatever_the_umask():
    with scratch_dir() as directory:
        config = server_config(directory, f'[[pool]]\nname = "default"\nmedium = "pmem"\ncapacity = "4MiB"\n'
                                          f'path = "{directory}/pmem"\n')

        def loose() -> None:
            os.umask(0)
            die_with_parent()
        for _ in range(2):     # the first start makes the journal, the second rewrites it
            with running(MF + ["server", "--config", config], preexec_fn=loose):
                with memfabric.init(config) as session:
                    session.create_namespace(f"n{_}", sec_id="k").alloc(4096).write(b"x")
                assert mode_of(f"{directory}/pmem/objects.journal") == 0o600
                assert mode_of(f"{directory}/cluster.db") == 0o600


# ---- the IPC socket: who may connect is who may be a client --------------------------------------

CONNECT = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def connect_as(path: str, uid: int, gid: int, groups: tuple[int, ...]) -> str:
    python, env = unprivileged.python()
    out = subprocess.run([python, "-c", CONNECT, path], env=env, cwd="/", capture_output=True, text=True,
                         preexec_fn=unprivileged.become(uid, gid, groups), timeout=CHILD_WAIT_S * 4)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_ipc_socket_is_owner_only_by_default():
    uid, gid = unprivileged.ids()
    with scratch_dir() as directory:
        config = server_config(directory)
        os.makedirs(f"{directory}/data", mode=0o755)
        with running(MF + ["server", "--config", config]):
            sock = f"{directory}/data/s.sock"
            assert mode_of(sock) & 0o077 == 0
            assert connect_as(sock, uid, gid, (os.stat(sock).st_gid,)) == "EACCES"


def test_ipc_socket_mode_and_group_open_it_to_a_group():
    uid, gid = unprivileged.ids()
    group = grp.getgrgid(gid).gr_name          # the clients' group: nobody's own
    with scratch_dir() as directory:
        config = server_config(directory, server_extra=f'ipc_socket_mode = "0660"\nipc_socket_group = "{group}"')
        os.makedirs(f"{directory}/data", mode=0o755)
        with running(MF + ["server", "--config", config]):
            sock = f"{directory}/data/s.sock"
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
            assert connect_as(sock, uid, gid, (gid,)) == "connected"       # a member of the group
            outsider = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, gid))
            assert connect_as(sock, uid, outsider, ()) == "EACCES"          # the same user, not in it
            # A client in the group is a client like any other: it needs the secId for a namespace.
            python, env = unprivileged.python()
            code = ("import sys, memfabric\n"
                    "with memfabric.init(sys.argv[1]) as s:\n"
                    "    s.create_namespace('shared', sec_id='k').alloc(4096).write(b'hi')\n"
                    "    print(s.namespace('shared', 'k').alloc(4096).read(0, 2) == bytes(2))\n")
            out = subprocess.run([python, "-c", code, config], env=env, cwd="/", capture_output=True, text=True,
                                 preexec_fn=unprivileged.become(uid, gid, (gid,)), timeout=CHILD_WAIT_S * 4)
            assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_a_socket_group_the_servers_user_is_not_in_is_refused_at_start():
    uid, gid = unprivileged.ids()
    python, env = unprivileged.python()
    with scratch_dir(owner=(uid, gid)) as directory:
        config = server_config(directory, server_extra='ipc_socket_group = "root"')
        proc = subprocess.run([python, "-m", "memfabric", "server", "--config", config], env=env, cwd=directory,
                              preexec_fn=unprivileged.become(uid, gid), capture_output=True, text=True,
                              timeout=CHILD_WAIT_S * 4)
        assert proc.returncode == 1
        assert "cannot start" in proc.stderr and "not a member" in proc.stderr, proc.stderr
        assert not os.path.exists(f"{directory}/data/s.sock")

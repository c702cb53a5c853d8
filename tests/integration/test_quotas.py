"""Namespaces per client: no one client can take the cluster's whole catalog (issue 7, item 13).

A client is what the kernel or the transport says it is: its uid over IPC (SO_PEERCRED), its
address over RPC. The clients here are root and `nobody` over IPC, and root over loopback RPC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import memfabric
from memfabric.errors import LimitExceeded
from memfabric.launcher import wait_for_line, write_token

from .. import unprivileged
from ..helpers import CHILD_WAIT_S

MF = [sys.executable, "-m", "memfabric"]
LIMIT = 3


@contextlib.contextmanager
def quota_server():
    """One server, at most LIMIT namespaces per client, its socket open to nobody's group, and
    RPC on loopback; yields (server config, RPC client config, run again)."""
    uid, gid = unprivileged.ids()
    directory = tempfile.mkdtemp(prefix="mf-quota-", dir="/tmp")
    os.chmod(directory, 0o755)
    config = os.path.join(directory, "server.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = "{directory}/data"\nipc_socket = "{directory}/s.sock"\n'
                f'segment_size = "1MiB"\nrpc_listen = "127.0.0.1:0"\nmax_namespaces_per_client = {LIMIT}\n'
                f'ipc_socket_mode = "0660"\nipc_socket_group = {gid}\n'
                f'[cluster]\nbackend = "embedded"\npath = "{directory}/cluster.db"\n'
                f'token_file = "{write_token(directory)}"\n'
                f'[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "8MiB"\n')
    procs: list[subprocess.Popen] = []

    def start() -> str:
        """Start (again); the RPC client file for this run."""
        proc = subprocess.Popen(MF + ["server", "--config", config], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        lines: list[str] = []
        wait_for_line(proc, " ready ", 60, lines)
        address = next(p for l in lines if " ready " in l for p in l.split() if p.startswith("rpc="))[4:]
        remote = os.path.join(directory, "remote.toml")
        with open(remote, "w") as f:
            f.write(f'[cluster]\ntoken_file = "{directory}/token"\n[[servers]]\nrpc_address = "{address}"\n')
        return remote

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(CHILD_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    try:
        yield config, start, stop
    finally:
        stop()
        shutil.rmtree(directory, ignore_errors=True)


CREATE_AS_NOBODY = r"""
import sys, memfabric
from memfabric.errors import LimitExceeded
with memfabric.init(sys.argv[1]) as s:
    made = 0
    try:
        for i in range(int(sys.argv[2])):
            s.create_namespace(f"nobody-{i}", sec_id="k")
            made += 1
    except LimitExceeded as exc:
        print(made, exc)
    else:
        print(made, "-")
"""


def test_each_client_may_create_only_so_many_namespaces():
    uid, gid = unprivileged.ids()
    python, env = unprivileged.python()
    with quota_server() as (config, start, stop):
        remote = start()
        with memfabric.init(config) as root:
            for i in range(LIMIT):
                root.create_namespace(f"root-{i}", sec_id="k")
            with pytest.raises(LimitExceeded) as err:
                root.create_namespace("root-too-many", sec_id="k")
            message = str(err.value)
            assert "uid 0" in message and f"({LIMIT})" in message and "max_namespaces_per_client" in message
            # What a client says of itself counts for nothing: the kernel named it.
            with pytest.raises(LimitExceeded):
                root.home().call("ns_create", pool="default", ns="claims", sec=b"k", attribute=0,
                                 creator="uid 12345", client="uid 12345")

            # Another uid on the same socket is another client.
            out = subprocess.run([python, "-c", CREATE_AS_NOBODY, config, str(LIMIT + 1)], env=env, cwd="/",
                                 preexec_fn=unprivileged.become(uid, gid, (gid,)), capture_output=True,
                                 text=True, timeout=CHILD_WAIT_S * 4)
            assert out.returncode == 0, out.stderr
            made, message = out.stdout.strip().split(" ", 1)
            assert int(made) == LIMIT and f"uid {uid}" in message

            # Over RPC, a client is its address.
            with memfabric.init(remote) as far:
                far.create_namespace("far-0", sec_id="k")
                assert any(n.ns == "far-0" for n in far.namespaces())

            # Room comes back when one goes.
            root.destroy_namespace("root-0", "k")
            root.create_namespace("root-again", sec_id="k")
            with pytest.raises(LimitExceeded):
                root.create_namespace("root-too-many", sec_id="k")

        # The count is the catalog's: it outlives the server.
        stop()
        start()
        with memfabric.init(config) as root:
            with pytest.raises(LimitExceeded):
                root.create_namespace("root-after-restart", sec_id="k")
            assert len(root.namespaces()) == 2 * LIMIT + 1

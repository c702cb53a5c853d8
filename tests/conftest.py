"""Shared fixtures: real `memfabric up` fabrics in child processes, stopped after use."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from memfabric.launcher import LocalFabric

# A run started in the background of a shell (`./dev test &`, nohup) has SIGINT ignored, and
# every child process inherits that: the tests that interrupt a child with a real SIGINT
# (Ctrl-C) then saw it carry on. They need SIGINT as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


_made: list[str] = []


def short_tmp_dir(prefix: str) -> str:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be long.
    directory = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    _made.append(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def _remove_short_tmp_dirs():
    """Every directory short_tmp_dir made goes when the session ends, after every fabric
    in it has stopped."""
    yield
    for directory in _made:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def fabric():
    """Two servers of 64 MiB each (1 MiB segments), shared by a test module."""
    directory = short_tmp_dir("mf-")
    fab = LocalFabric(directory, servers=2, capacity="64MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.fixture
def fresh_fabric():
    """A fabric of its own, for tests that kill servers or fill the pool."""
    fabs = []

    def make(servers: int = 2, capacity: str = "16MiB", segment_size: str = "1MiB") -> LocalFabric:
        fab = LocalFabric(short_tmp_dir("mf-"), servers=servers, capacity=capacity,
                          segment_size=segment_size, liveness_timeout_s=2.0).start()
        fabs.append(fab)
        return fab

    yield make
    for fab in fabs:
        fab.stop()


def run_client(code: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Run Python code in a separate client process; args arrive as sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="session")
def etcd():
    """One real etcd for the whole run (tests keep apart by key prefix)."""
    from .etcd_server import EtcdServer
    server = EtcdServer().start()
    yield server
    server.cleanup()

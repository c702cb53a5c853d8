"""The door's fixtures: a real redis-server (the reference) and a fabric whose first server
opens the door (two servers: half the keys live on the one without it)."""

from __future__ import annotations

import shutil

import pytest

from memfabric.kv.bench import RedisServer
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import free_ports


@pytest.fixture(scope="module")
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: ./dev test installs it")
    server = RedisServer()
    yield server
    server.close()


def door_fabric_of(servers: int):
    """A fabric of `servers` whose first server opens the door (its port: fab.resp_port),
    stopped cleanly after use."""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-"), servers=servers, capacity="64MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--resp-port", str(port)]).start()
    fab.resp_port = port
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.fixture(scope="module")
def door_fabric():
    yield from door_fabric_of(2)


@pytest.fixture(scope="module")
def door_port(door_fabric):
    return door_fabric.resp_port

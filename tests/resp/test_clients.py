"""Stock Redis clients through the door (redis-cli, redis-benchmark, redis-py), the door and
the library seeing the same keys on both servers, and AUTH where the door requires it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import redis

import memfabric
from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import free_ports
from .wire import Raw

CLI_S = 60.0


def cli(port: int, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], input=stdin, capture_output=True, text=True,
                          timeout=CLI_S, check=True).stdout


def test_redis_cli_answers_as_with_redis(redis_server, door_port):
    """redis-cli's output, command by command and from a piped script, is Redis's."""
    for port in (redis_server.port, door_port):
        cli(port, "FLUSHALL")
    script = "SET a 1\nINCR a\nGET a\nMSET b 2 c 3\nMGET a b c nope\nEXPIRE a 100\nTTL a\nNOSUCH x\nGET\n" \
             "SET s \"with space\"\nGET s\nAPPEND s !\nGETRANGE s 0 3\nDEL a b\nEXISTS a b c\nTYPE c\nDBSIZE\n"
    assert cli(door_port, stdin=script) == cli(redis_server.port, stdin=script)
    for args in (["PING"], ["ECHO", "hi"], ["SET", "k", "v", "EX", "10", "GET"], ["GET", "k"], ["TTL", "k"],
                 ["INCRBYFLOAT", "f", "1.5"], ["KEYS", "k*"], ["CONFIG", "GET", "appendonly"], ["FOO"]):
        assert cli(door_port, *args) == cli(redis_server.port, *args), args
    assert sorted(cli(door_port, "--scan").split()) == sorted(cli(redis_server.port, "--scan").split())


def test_redis_benchmark_runs_against_the_door(door_port):
    if shutil.which("redis-benchmark") is None:
        pytest.fail("redis-benchmark is not installed (Debian redis-tools): ./dev test installs it")
    out = subprocess.run(["redis-benchmark", "-p", str(door_port), "-t", "set,get,incr,mset", "-n", "2000",
                          "-c", "8", "-P", "4", "-d", "100", "-q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for test in ("SET", "GET", "INCR", "MSET"):
        assert f"{test}" in out.stdout and "requests per second" in out.stdout, out.stdout
    assert cli(door_port, "GET", "counter:__rand_int__").strip() == "2000"


def test_redis_py_through_the_door(door_port):
    r = redis.Redis(host="127.0.0.1", port=door_port, socket_timeout=30)
    try:
        r.flushdb()
        assert r.set("a", b"\x00bin\xff") and r.get("a") == b"\x00bin\xff"
        assert r.set("a", "x", nx=True) is None and r.set("b", "2", ex=100, get=True) is None
        assert 99 <= r.ttl("b") <= 100 and r.incrby("b", 5) == 7 and r.incrbyfloat("b", 0.5) == 7.5
        pipe = r.pipeline(transaction=False)
        for i in range(1000):
            pipe.set(f"p{i}", i)
        for i in range(1000):
            pipe.get(f"p{i}")
        results = pipe.execute()
        assert results[:1000] == [True] * 1000 and results[1000:] == [str(i).encode() for i in range(1000)]
        assert sorted(r.scan_iter(match="p1?", count=50)) == [f"p1{i}".encode() for i in range(10)]
        assert r.mget(["p1", "nope", "p2"]) == [b"1", None, b"2"]
        assert r.delete("p1", "p2", "nope") == 2 and r.exists("p1", "p3") == 1
        assert r.rename("p3", "q3") and r.get("q3") == b"3" and r.copy("q3", "c3") and r.get("c3") == b"3"
        assert r.dbsize() == 2 + 1000 - 2 + 1 and r.type("q3") == b"string"
        assert r.client_setname("py") and r.client_getname() == "py"
        with pytest.raises(redis.ResponseError, match="unknown command"):
            r.lpush("list", 1)
        assert r.ping()
    finally:
        r.close()


def test_keys_on_both_servers_seen_by_the_library_and_the_door(door_fabric, door_port):
    """A key homed on the server without the door is written there (server to server): the
    library reads what the door wrote and the door reads what the library wrote."""
    sec = open(os.path.join(door_fabric.directory, "resp.secid")).read().strip()
    keys = [f"both:{i}" for i in range(40)]
    assert {homes(k.encode(), [1, 2], 1)[0] for k in keys} == {1, 2}
    r = redis.Redis(host="127.0.0.1", port=door_port, socket_timeout=30)
    try:
        with memfabric.init(door_fabric.directory, server=0) as session:
            kv = session.namespace("default", sec).kv()
            for k in keys:
                assert r.set(k, f"door-{k}")
            assert kv.get_many(keys) == [f"door-{k}".encode() for k in keys]
            for k in keys:
                kv.put(k, f"lib-{k}".encode(), ttl_s=500)
            assert r.mget(keys) == [f"lib-{k}".encode() for k in keys]
            assert all(400 < r.ttl(k) <= 500 for k in keys)
            big = os.urandom(600_000)
            assert r.set("both:big", big) and kv.get("both:big") == big
            kv.put("both:big2", big)
            assert r.get("both:big2") == big
            assert r.rename("both:0", "both:moved") and kv.get("both:moved") == b"lib-both:0"
            assert kv.get("both:0") is None
    finally:
        r.close()


@pytest.fixture(scope="module")
def remote_door():
    """A door on a non-loopback address: AUTH required."""
    host = _non_loopback_address()
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-auth-"), servers=1, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--resp-port", str(port), "--resp-host", host]).start()
    fab.resp_address = (host, port)
    yield fab
    assert fab.stop() == 0


def _non_loopback_address() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    pytest.fail("this host has no non-loopback IPv4 address to bind the door to")


def test_a_door_off_loopback_requires_auth_and_reveals_nothing(remote_door):
    host, port = remote_door.resp_address
    sec = open(os.path.join(remote_door.directory, "resp.secid")).read().strip()
    raw = Raw(port, host)
    try:
        assert raw.run(["PING", "GET a", "SET a 1", "CLIENT ID"]) == [b"-NOAUTH Authentication required.\r\n"] * 4
        wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        # A wrong secId, a namespace that does not exist, a name that cannot be one: the same answer.
        assert raw.run(["AUTH wrong", "AUTH default wrong", "AUTH nosuchns x", "AUTH \"bad name!\" x",
                        "AUTH \"\""]) == [wrongpass] * 5
        assert raw.run(["HELLO 2 AUTH default wrong"]) == [wrongpass]
        assert raw.run(["AUTH a b c"]) == [b"-ERR syntax error\r\n"]
        # Before AUTH, a long request is refused as Redis refuses it (the unauthenticated bounds).
        raw.send(b"*11\r\n")
        assert raw.until_closed() == (b"-ERR Protocol error: unauthenticated multibulk length\r\n", True)
    finally:
        raw.close()
    raw = Raw(port, host)
    try:
        raw.send(b"*2\r\n$4\r\nECHO\r\n$16385\r\n")
        assert raw.until_closed() == (b"-ERR Protocol error: unauthenticated bulk length\r\n", True)
    finally:
        raw.close()
    raw = Raw(port, host)
    try:
        assert raw.run([f"AUTH {sec}", "SET a 1", "GET a"]) == [b"+OK\r\n", b"+OK\r\n", b"$1\r\n1\r\n"]
    finally:
        raw.close()
    with memfabric.init(remote_door.directory, server=0) as session:
        session.create_namespace("other", "other-sec")
        session.namespace("other", "other-sec").kv().put("o", b"other's")
    raw = Raw(port, host)
    try:
        assert raw.run(["AUTH other other-sec", "GET o", "GET a", "AUTH default " + sec, "GET a", "GET o"]) == [
            b"+OK\r\n", b"$7\r\nother's\r\n", b"$-1\r\n", b"+OK\r\n", b"$1\r\n1\r\n", b"$-1\r\n"]
        helloed = raw.run(["HELLO 2 AUTH other other-sec SETNAME n"])[0]
        assert helloed.startswith(b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
        assert raw.run(["GET o", "CLIENT GETNAME"]) == [b"$7\r\nother's\r\n", b"$1\r\nn\r\n"]
    finally:
        raw.close()


"""Found by attacking the streamed large values (test_large_values.py): a value the door
gave up on stayed held at its home for good, and a namespace destroyed while a value was
streamed completed the reply with zeros."""

from __future__ import annotations

import os
import signal
import socket
import threading

import memfabric
import pytest
import redis

from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric
from memfabric.limits import KV_INLINE_BYTES, MAX_KV_HOLDS_PER_CLIENT, PEER_TIMEOUT_S

from ..conftest import short_tmp_dir
from ..helpers import free_ports, stop_process, wait_until
from .one_door import one_door
from .wire import READ_S, Raw, encode, stall_reply_budget

MiB = 1 << 20
WARM_BYTES = 300_000          # a value that makes the keyspace's first pages, once


def _key_on(server_id: int, prefix: str) -> str:
    return next(k for k in (f"{prefix}:{i}" for i in range(1000)) if homes(k.encode(), [1, 2], 1) == [server_id])


@pytest.fixture(scope="module")
def patient_door():
    """Two servers, the first with the door, that wait long before calling a stopped one
    dead: a peer stopped for longer than the door waits for it keeps its link."""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-held-"), servers=2, capacity="96MiB", segment_size="1MiB",
                      liveness_timeout_s=8 * PEER_TIMEOUT_S, extra_args=["--resp-port", str(port)]).start()
    fab.resp_port = port
    fab.sec_id = open(os.path.join(fab.directory, "resp.secid")).read().strip()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def _used(r: redis.Redis) -> int:
    return r.info("memory")["used_memory"]


def test_a_value_handed_back_to_a_door_that_gave_up_is_let_go(patient_door):
    """The key's home is stopped for longer than the door waits: GETDEL, GETEX, GETSET and
    SET ... GET answer TIMEOUT, and the home carries them out once it goes on, handing the
    large value back as a hold no one reads. Before: only kv_get's late hold was let go (the
    link's late_replies.py), so these held the value's record for the life of the link
    between the servers: deleted, its 4 MiB never came back."""
    r = redis.Redis(port=patient_door.resp_port, socket_timeout=READ_S * 3)
    home = patient_door.server_pids()[2]
    key = _key_on(2, "late")
    r.set(key, b"w" * WARM_BYTES)
    r.delete(key)
    before = _used(r)
    commands = {"getdel": lambda: r.getdel(key), "getex": lambda: r.getex(key, ex=100),
                "getset": lambda: r.getset(key, b"new"), "set get": lambda: r.set(key, b"new", get=True)}
    for name, command in commands.items():
        r.set(key, b"v" * (4 * MiB))
        stop_process(home)
        try:
            with pytest.raises(redis.ResponseError, match="TIMEOUT"):
                command()
        finally:
            os.kill(home, signal.SIGCONT)
        r.delete(key)
        wait_until(lambda: _used(r) - before < WARM_BYTES, f"the memory of the value {name} took to come back")
    r.close()


def _read_until_closed_or(sock: socket.socket, got: bytearray, total: int) -> None:
    while len(got) < total:
        data = sock.recv(1 << 20)
        if not data:
            return
        got += data


def test_a_value_streamed_while_its_namespace_is_destroyed_is_never_answered_wrong(patient_door):
    """A slow reader's large GET, and the door's namespace destroyed meanwhile: the reply is
    the value whole, or the connection closes before the reply is complete; never a whole
    reply of other bytes. Before: from the other server (its memory mapped by the door's
    server, which had never served that namespace itself and so kept the mapping), the rest
    of the value came as zeros in a complete reply; from the door's own server, the reply
    failed on a KeyError, logged as a bug with its traceback."""
    fab = patient_door
    log = os.path.join(fab.directory, "up.log")
    log_before = os.path.getsize(log)
    r = redis.Redis(port=fab.resp_port, socket_timeout=READ_S * 3)
    value = bytes(range(256)) * (12 * MiB // 256)
    expected = b"$%d\r\n%s\r\n" % (len(value), value)
    for server_id in (2, 1):
        with memfabric.init(fab.directory) as session:
            session.create_namespace("default", fab.sec_id, exist_ok=True)
            key = _key_on(server_id, "gone")
            r.set(key, value)
            slow = Raw(fab.resp_port)
            slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            slow.send(encode("GET", key))
            got = bytearray(slow.sock.recv(64))          # the reply has begun
            session.destroy_namespace("default", fab.sec_id)
        _read_until_closed_or(slow.sock, got, len(expected))
        slow.close()
        wrong = len(got) == len(expected) and got != expected
        assert not wrong, f"from server {server_id}, a complete reply that is not the value: first " \
                          f"difference at byte {next(i for i in range(len(got)) if got[i] != expected[i])}"
    with memfabric.init(fab.directory) as session:
        session.create_namespace("default", fab.sec_id, exist_ok=True)
    assert r.set("after", "1") and r.get("after") == b"1"
    r.close()
    with open(log, errors="replace") as f:
        f.seek(log_before)
        written = f.read()
    assert "Traceback" not in written, written[-3000:]


def test_holds_of_a_destroyed_namespace_leave_the_connection(patient_door):
    """A connection's hold on a large value, its namespace destroyed before it was let go:
    kv_let_go names a namespace that is no more, and was refused with the hold kept. Before:
    kept for the connection's life, so after MAX_KV_HOLDS_PER_CLIENT of them the connection
    could read no large value of any namespace (a server's link to a peer, which carries its
    door's streamed values, after MAX_KV_HOLDS_PER_PEER)."""
    with memfabric.init(patient_door.directory) as session:
        link = session.link(1)
        creds = {"pool": "default", "ns": "held-then-gone", "sec": b"k"}
        key = _key_on(1, "held").encode()
        for _ in range(MAX_KV_HOLDS_PER_CLIENT + 1):
            session.create_namespace(creds["ns"], "k").kv().put(key, b"x" * (KV_INLINE_BYTES + 1))
            hold = link.call("kv_get", **creds, key=key)["hold"]
            session.destroy_namespace(creds["ns"], "k")
            with pytest.raises(memfabric.NoSuchNamespace):
                link.call("kv_let_go", **creds, hold=hold)
        ns = session.create_namespace(creds["ns"], "k")
        ns.kv().put(key, b"y" * (KV_INLINE_BYTES + 1))
        assert ns.kv().get(key) == b"y" * (KV_INLINE_BYTES + 1)
        link.call("kv_let_go", **creds, hold=link.call("kv_get", **creds, key=key)["hold"])
        session.destroy_namespace(creds["ns"], "k")


def _drain(raw: Raw, until: bytes) -> bytes:
    """Read until `until` ends what was read, or the door closes the connection."""
    got = bytearray()
    while not got.endswith(until):
        data = raw.sock.recv(1 << 20)
        if not data:
            break
        got += data
    return bytes(got)


def test_holds_a_stopped_home_could_not_be_told_to_let_go_are_let_go_once_it_goes_on(patient_door):
    """Four slow readers of large values of the other server, which is stopped before they
    finish: each reply's let-go waits for it on the one link between the servers, one at a
    time, and gives up (TIMEOUT). Before: only the first had been sent, so once the home went
    on it let that one go and kept the others for the life of the link: deleted, 8 to 12 MiB
    of them never came back."""
    fab = patient_door
    r = redis.Redis(port=fab.resp_port, socket_timeout=READ_S * 3)
    keys = [k for k in (f"stuck:{i}" for i in range(200)) if homes(k.encode(), [1, 2], 1) == [2]][:4]
    r.set(keys[0], b"w" * WARM_BYTES)
    r.delete(keys[0])
    before = _used(r)
    for k in keys:
        r.set(k, b"v" * (4 * MiB))
    readers = []
    for k in keys:
        raw = Raw(fab.resp_port)
        raw.sock.settimeout(READ_S * 3)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        raw.send(encode("GET", k) + encode("PING"))      # PONG: the GET's reply let its hold go
        assert raw.sock.recv(64).startswith(b"$%d\r\n" % (4 * MiB))
        readers.append(raw)
    home = fab.server_pids()[2]
    stop_process(home)
    try:
        threads = [threading.Thread(target=_drain, args=(raw, b"+PONG\r\n")) for raw in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(READ_S * 4)
        assert not any(t.is_alive() for t in threads), "a reader of a stopped home's value hung"
    finally:
        os.kill(home, signal.SIGCONT)
    for raw in readers:
        raw.close()
    for k in keys:
        r.delete(k)
    wait_until(lambda: _used(r) - before < WARM_BYTES, "the deleted values' memory to come back")
    r.close()


def test_a_getex_without_options_refused_for_reply_memory_names_getex():
    """GETEX with no option reads as GET does, and was answered as one: refused for want of
    reply memory, it said "get: ..." (and a reply of it cut half-way was counted as a GET's
    error, memfabric_resp_errors{command="get"}, while the command was counted as GETEX)."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="96MiB", resp_reply_budget="16MiB") as door:
        r = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
        r.set("big", b"b" * (4 * MiB))
        stalled = stall_reply_budget(door.port, r)       # two readers hold 8 MiB each: the whole budget
        with pytest.raises(redis.ResponseError, match="^LIMIT_EXCEEDED getex: "):
            r.getex("big")
        for raw in stalled:
            raw.close()
        r.close()

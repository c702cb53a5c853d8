"""Same-host MemKV puts answered in the server's IPC loop in compiled code (_kvput.c,
kv/put_grants.py), with real servers, processes and sockets: that they are; that what they
write is what the Python path writes (values, versions, counts, bytes, expiry, the memory
limit, replicas); and attacks on them (a wrong secId on a granted connection, garbage
packets, several processes writing one key, readers racing overwrites, threads sharing a
session, a namespace destroyed or flushed under a stream of puts, a client killed mid-stream,
a stopped server, Ctrl-C).

Every wait is bounded; no test asserts how fast anything was.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import time

import pytest

import memfabric
from memfabric.errors import BmError, NoSuchNamespace, OutOfMemory, PermissionDenied, Timeout
from memfabric.kv import put_grants
from memfabric.kv.heap import CLASSES, RecordHeap
from memfabric.limits import KV_PUT_STOCK_BYTES, REUSE_GRACE_S
from memfabric.transport import wire
from memfabric.transport.ipc import IpcChannel

from ..helpers import CHILD_WAIT_S, WAIT_S, Child, ns_name, stop_process, wait_until
from ..transport.paths import interrupted_after
from .test_interrupted_calls import again, sweep

KiB = 1 << 10
pytestmark = pytest.mark.skipif(not put_grants.compiled_puts(), reason="the compiled part is not built")


def compiled_puts(session: memfabric.Session) -> int:
    """Puts the servers answered in compiled code so far."""
    return sum(session.link(s["server_id"]).call("stats")["compiled_puts"] for s in session.servers())


def local(fabric) -> memfabric.Session:
    return memfabric.init(fabric.directory, server=0)


def settled_bytes(kv, expected: int) -> None:
    """The keyspace's bytes come to `expected` (records compiled puts replaced are freed by
    the server's keeper, a tick later)."""
    wait_until(lambda: kv.stats()["bytes"] == expected, f"the keyspace to hold {expected} bytes")


def test_puts_are_answered_in_compiled_code_and_read_back_everywhere(fabric, request):
    """After a connection's first put of a size, its next puts of that size are answered by
    the server's loop; same-host and remote readers get exactly what was put."""
    name = ns_name(request)
    with local(fabric) as s, memfabric.init(os.path.join(fabric.directory, "remote.toml")) as far:
        kv = s.create_namespace(name, sec_id="k").kv()
        remote_kv = far.namespace(name, "k").kv()
        kv.put(b"warm", os.urandom(4 * KiB))
        before = compiled_puts(s)
        values = {f"key-{i}".encode(): os.urandom(4 * KiB - 6) for i in range(300)}
        for key, value in values.items():
            assert kv.put(key, value) is True
        assert compiled_puts(s) - before >= 250      # a refill now and then is Python's
        for key, value in values.items():
            assert kv.get(key) == value
            assert remote_kv.get(key) == value
        assert len(kv) == 301
        assert sorted(kv.scan()) == sorted([*values, b"warm"])
        assert kv.stats()["keys"] == 301


def test_overwrites_free_what_they_replace(fabric, request):
    """A key put again and again through the compiled path leaves one record's bytes (the
    replaced ones go back to the heap), and the last value."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"k", b"0" * 4000)
        one = kv.stats()["bytes"]
        for i in range(2000):
            kv.put(b"k", str(i % 10).encode() * 4000)
        assert kv.get(b"k") == b"9" * 4000
        settled_bytes(kv, one)
        assert kv.stats()["keys"] == 1 and len(kv) == 1


@pytest.mark.parametrize("value_bytes", [4 * KiB - 1, 64 * KiB])
def test_a_stream_of_overwrites_reuses_what_it_replaced(fresh_fabric, request, value_bytes):
    """The records a connection's compiled puts replaced serve its later puts once they have
    rested the heap's grace: a steady stream of overwrites needs no refill from Python. Before,
    every stock's worth of puts (64, or 12 of 64 KiB) sent one to Python; then a grace's worth
    of 64 KiB records lay in more segments than a grant reached."""
    fab = fresh_fabric(servers=1, capacity="128MiB")
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = os.urandom(value_bytes)
        kv.put(b"k", value)
        one = kv.stats()["bytes"]
        for _attempt in range(3):       # a stall past REPLACED_IDLE_S lets the keeper free them
            for _ in range(300):
                kv.put(b"k", value)
            time.sleep(3 * REUSE_GRACE_S)
            before = compiled_puts(s)
            for _ in range(300):
                kv.put(b"k", value)
            in_python = 300 - (compiled_puts(s) - before)
            if in_python == 0:
                break
        assert in_python == 0
        assert kv.get(b"k") == value
        settled_bytes(kv, one)        # what was replaced and rests in the grant counts no more
    assert 3 * REUSE_GRACE_S < put_grants.REPLACED_IDLE_S


OVERWRITER = r"""
import os, sys, memfabric
from memfabric.errors import OutOfMemory
with memfabric.init(sys.argv[1], server=0) as s:
    kv = s.namespace(sys.argv[2], "k").kv()
    value, refused = os.urandom(64 << 10), 0
    for i in range(3000):
        try:
            kv.put(b"k%d" % (i % 4), value)
        except OutOfMemory:
            refused += 1
    print(refused, kv.get(b"k3") == value)
"""


def test_overwrites_faster_than_a_grace_frees_memory_are_not_refused(fresh_fabric, request):
    """A stream of overwrites keeps rate x grace of replaced records resting, which in a small
    pool is most of it. Before, a write that found the pool full was refused OUT_OF_MEMORY with
    that memory about to come back: 830 of 3000 overwrites of 4 keys of 64 KiB in a 16 MiB pool
    (4 keys hold 512 KiB). It now waits for the first record of its class that rests."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    name = ns_name(request)
    with local(fab) as s:
        s.create_namespace(name, sec_id="k")
        got = subprocess.run([sys.executable, "-c", OVERWRITER, fab.directory, name], capture_output=True,
                             text=True, timeout=CHILD_WAIT_S * 8)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split() == ["0", "True"]


def fill(kv, value: bytes) -> int:
    """Keys b"0", b"1"... of `value` until the pool refuses one (bounded): how many fit."""
    count = 0
    with pytest.raises(OutOfMemory):
        while count < 1000:
            kv.put(b"%d" % count, value)
            count += 1
    return count


def test_a_grace_of_64_KiB_overwrites_stays_compiled(fresh_fabric, request, tmp_path, monkeypatch):
    """What a grace of overwrites replaces rests in the grant (or in Python's heap: the same
    memory) until it serves again: 1500 overwrites of 64 KiB within one grace (3 s here, so
    the machine's speed does not matter) are all compiled but for the stock's refills. Before,
    the grant held 64 MiB of them at most (1012) and sent every put past that to Python until the
    oldest had rested: the door's 64 KiB SETs fell there by the thousand."""
    (tmp_path / "sitecustomize.py").write_text(
        "import memfabric.kv.space, memfabric.kv.put_grants\n"
        "memfabric.kv.space.REUSE_GRACE_S = 3.0\n"
        "memfabric.kv.put_grants.REPLACED_IDLE_S = 30.0\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    fab = fresh_fabric(servers=1, capacity="256MiB", segment_size="4MiB")
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = os.urandom(64 * KiB)
        kv.put(b"k", value)
        before, began = compiled_puts(s), time.monotonic()
        for _ in range(1500):
            kv.put(b"k", value)
        took_s = time.monotonic() - began
        compiled = compiled_puts(s) - before
    if took_s >= 3.0:
        pytest.skip(f"1500 puts took {took_s:.1f} s, past the grace: records served again meanwhile")
    # A stock holds 15 chunks of this class (KV_PUT_STOCK_BYTES): one put in 16 refills it.
    stock = KV_PUT_STOCK_BYTES // CLASSES[RecordHeap.class_of(64 * KiB + 1)]
    assert compiled >= 1500 * stock // (stock + 1) - 5, f"{1500 - compiled} of 1500 puts went to Python"


def test_many_new_keys_grow_the_table(fabric, request):
    """New keys through the compiled path fill the table; Python grows it (the loop never
    fills past the table's load), and every key stays readable."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        keys = [f"grow-{i}".encode() for i in range(3000)]
        for key in keys:
            kv.put(key, key * 10)
        assert len(kv) == 3000
        for key in keys:
            assert kv.get(key) == key * 10
        assert compiled_puts(s) > 0


def test_options_and_other_shapes_stay_python_and_right(fabric, request):
    """TTLs, NX/XX, explicit replicas, str and numpy values: each put means what it says,
    whichever path answered it."""
    import numpy as np

    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"a", b"x" * 100)
        kv.put(b"a", b"y" * 100)                    # compiled
        assert kv.put(b"a", b"z" * 100, nx=True) is False
        assert kv.get(b"a") == b"y" * 100
        assert kv.put(b"b", b"z" * 100, xx=True) is False
        assert kv.get(b"b") is None
        kv.put(b"t", b"t" * 100, ttl_s=0.3)
        assert 0 < kv.ttl(b"t") <= 0.3
        wait_until(lambda: kv.get(b"t") is None, "the key to expire")
        kv.put(b"s", "é" * 50)
        assert kv.get(b"s") == "é".encode() * 50
        kv.put(b"n", np.arange(25, dtype=np.int32))
        assert kv.get(b"n") == np.arange(25, dtype=np.int32).tobytes()
        kv.put(b"a", bytearray(b"w" * 100))
        assert kv.get(b"a") == b"w" * 100
        assert kv.ttl(b"a") == -1.0


def test_the_memory_limit_holds_with_compiled_puts(fabric, request):
    """With a memory limit, puts past it evict (counted) or are refused, as in Python."""
    with local(fabric) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        kv = ns.kv()
        kv.configure(memory_limit=512 * KiB, eviction="lru")
        for i in range(600):
            kv.put(f"e{i}".encode(), b"e" * 4000)
        stats = kv.stats()
        assert stats["evictions"] > 0
        assert stats["bytes"] <= 512 * KiB
        assert kv.get(b"e599") == b"e" * 4000
        kv.flush()
        kv.configure(eviction="refuse")
        with pytest.raises(OutOfMemory):
            for i in range(600):
                kv.put(f"r{i}".encode(), b"r" * 4000)
        assert kv.stats()["bytes"] <= 512 * KiB


def test_replicated_keyspaces_stay_python(fabric, request):
    """With two replicas, puts go to Python, which passes them on: both servers hold the key."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"r0", b"v" * 1000)
        kv.put(b"r0", b"w" * 1000)
        kv.configure(replicas=2)
        before = compiled_puts(s)
        for i in range(50):
            kv.put(f"r{i}".encode(), b"v" * 1000)
        assert compiled_puts(s) == before
        held = [s.link(x["server_id"]).call("kv_stats", **kv._wire)["stats"]["held_keys"]
                for x in s.servers()]
        assert held == [50, 50]


def test_a_wrong_sec_id_on_a_granted_connection_changes_nothing(fabric, request):
    """On a connection granted a keyspace, a put with another secId is refused
    (PERMISSION_DENIED) and the key keeps its value."""
    name = ns_name(request)
    with local(fabric) as s:
        kv = s.create_namespace(name, sec_id="right").kv()
        kv.put(b"k", b"1" * 4000)
        kv.put(b"k", b"2" * 4000)
        wrong = s.namespace(name, "wrong").kv()
        with pytest.raises(PermissionDenied):
            wrong.put(b"k", b"3" * 4000)
        with pytest.raises(PermissionDenied):
            wrong.put(b"new", b"3" * 4000)
        assert kv.get(b"k") == b"2" * 4000
        assert kv.get(b"new") is None
        # And on a raw connection its loop answers puts on (a client asks the server nothing
        # else first, such as the replica count a KV object asks for with its own secId).
        channel, put = _granted_channel(fabric, name, sec=b"right")
        try:
            for key in (b"raw", b"fresh"):
                channel.send({**put, "id": 3, "key": key, "sec": b"wrong", "value": b"w" * 4000})
                answer = channel.recv()[0]
                assert answer["error"] == BmError.PERMISSION_DENIED, answer
        finally:
            channel.close()
        assert kv.get(b"raw") == b"v" * 4000 and kv.get(b"fresh") is None


def _granted_channel(fabric, name: str, sec: bytes = b"k") -> tuple[IpcChannel, dict]:
    """A raw same-host connection to server 1 that has put once into `name` (so it is
    granted), and that put's request."""
    path = os.path.join(fabric.directory, "server-1", "ipc.sock")
    channel = IpcChannel.connect(path)
    channel.set_deadline(WAIT_S)
    channel.send({"op": "hello", "id": 1, "role": "client", "pid": os.getpid()})
    channel.recv()
    request = {"op": "kv_put", "id": 2, "pool": "default", "ns": name, "sec": sec, "key": b"raw",
               "value": b"v" * 4000, "budget_s": 5.0}
    channel.send(request)
    assert channel.recv()[0] == {"stored": True, "id": 2}
    return channel, request


def test_garbage_packets_on_a_granted_connection(fabric, request):
    """Mangled puts on a granted connection (every byte flipped in turn, cut short, grown,
    odd types) get Python's answer or a closed connection: the server stays up, and the
    keyspace holds exactly what was stored."""
    name = ns_name(request)
    with local(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"keep", b"k" * 4000)
        channel, put = _granted_channel(fabric, name)
        packet = wire.encode(put)
        variants = [packet[:n] for n in range(0, len(packet) - 4000, 3)]
        variants += [packet[:i] + bytes([packet[i] ^ 0xff]) + packet[i + 1:] for i in range(0, 120)]
        variants += [packet + b"\x00", wire.encode({**put, "nx": 1}), wire.encode({**put, "replicas": 2}),
                     wire.encode({**put, "ttl_ms": -5}), wire.encode({**put, "ttl_ms": 0}),
                     wire.encode({**put, "budget_s": -1.0}), wire.encode({**put, "key": "str"}),
                     wire.encode({**put, "value": "str"}), wire.encode({**put, "extra": 1}),
                     wire.encode({**put, "key": b""}), wire.encode({**put, "key": b"k" * 70000})]
        answered = 0
        for i, data in enumerate(variants):
            try:
                channel.send_encoded(data)
                channel.recv()
                answered += 1
            except Exception:
                channel.close()
                channel, _ = _granted_channel(fabric, name)
        channel.close()
        assert answered > 0
        assert kv.get(b"keep") == b"k" * 4000
        values = {kv.get(b"raw")} | {kv.get(k) for k in kv.scan() if k not in (b"keep", b"raw")}
        for value in values:               # whatever stored, stored whole
            assert value is None or set(value) <= {ord("v")} or len(set(value)) == 1
        kv.put(b"after", b"a" * 4000)
        assert kv.get(b"after") == b"a" * 4000


_WRITER = r"""
import sys, memfabric
directory, name, mark, rounds = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
with memfabric.init(directory, server=0) as s:
    kv = s.namespace(name, "k").kv()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(rounds):
        kv.put(b"shared", mark * 4000)
        kv.put(b"own-" + mark, mark * (1000 + i % 3000))
    print("done", flush=True)
"""


def test_writers_of_one_key_in_several_processes_never_tear_it(fabric, request):
    """Four processes put one key (and one each of their own) over and over while this one
    reads: every read is one writer's value whole, never a mix, never another key's bytes."""
    name = ns_name(request)
    with local(fabric) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"shared", b"0" * 4000)
        writers = [Child(_WRITER, fabric.directory, name, mark, "1500") for mark in "ABCD"]
        try:
            for w in writers:
                assert w.expect() == "ready"
            for w in writers:
                w.send("go")
            seen = set()
            done = 0
            while done < len(writers):
                value = kv.get(b"shared")
                assert value is not None and len(value) == 4000 and len(set(value)) == 1, value[:40]
                seen.add(value[:1])
                for mark in "ABCD":
                    own = kv.get(b"own-" + mark.encode())
                    assert own is None or set(own) == {ord(mark)}
                done = sum(1 for w in writers if w.proc.poll() is not None or _said_done(w))
            assert len(seen - {b"0"}) >= 1
        finally:
            for w in writers:
                w.close()
        assert compiled_puts(s) > 0


def _said_done(w: Child) -> bool:
    import select

    if getattr(w, "finished", False):
        return True
    if select.select([w.proc.stdout], [], [], 0)[0] or b"\n" in w._buf:
        w.finished = w.expect() == "done"
        return w.finished
    return False


def test_threads_sharing_a_session_put_and_read_right(fabric, request):
    """Eight threads put into one session (one link per server) at once: every key holds
    its own thread's last value."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        failures: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(300):
                    kv.put(f"t{t}-{i % 20}".encode(), f"{t}:{i}".encode() * 200)
            except BaseException as exc:      # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 4)
        assert not failures and not any(t.is_alive() for t in threads)
        for t in range(8):
            for k in range(20):
                last = max(i for i in range(300) if i % 20 == k)
                assert kv.get(f"t{t}-{k}".encode()) == f"{t}:{last}".encode() * 200


def test_destroy_and_flush_under_a_stream_of_puts(fabric, request):
    """A namespace flushed, then destroyed, while another thread puts into it: the puts
    succeed or fail with NO_SUCH_NAMESPACE, the server stays up, and a namespace made again
    with that name starts empty."""
    name = ns_name(request)
    with local(fabric) as s:
        ns = s.create_namespace(name, sec_id="k")
        kv = ns.kv()
        kv.put(b"x", b"x" * 4000)
        errors: list[BaseException] = []
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                try:
                    kv.put(f"s{i % 200}".encode(), b"s" * 4000)
                except (NoSuchNamespace, PermissionDenied):    # destroyed; made again with another secId
                    pass
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                i += 1

        t = threading.Thread(target=stream)
        t.start()
        try:
            wait_until(lambda: len(kv) > 50, "puts to land")
            kv.flush()
            wait_until(lambda: len(kv) > 20, "puts to land after the flush")
            ns.destroy()
            ns2 = s.create_namespace(name, sec_id="other")
            kv2 = ns2.kv()
            assert kv2.get(b"s1") is None
            kv2.put(b"y", b"y" * 4000)
            kv2.put(b"y", b"z" * 4000)
            assert kv2.get(b"y") == b"z" * 4000
            wait_until(lambda: kv2.put(b"y", b"z" * 4000) and len(kv2) == 1, "a few puts into the new namespace")
        finally:
            stop.set()
            t.join(WAIT_S)
        assert not errors, errors
        assert list(kv2.scan()) == [b"y"]       # the old secId's stream never landed in it


_KILLED = r"""
import sys, memfabric
directory, name = sys.argv[1], sys.argv[2]
with memfabric.init(directory, server=0) as s:
    kv = s.namespace(name, "k").kv()
    i = 0
    while True:
        kv.put(b"doomed-%d" % (i % 50), b"d" * 4000)
        i += 1
        if i == 500:
            print("streaming", flush=True)
"""


def test_a_client_killed_mid_stream_gives_its_stock_back(fresh_fabric, request):
    """A client killed while its puts stream leaves the keyspace whole: its keys readable,
    and the chunks its connection held in stock given back (the bytes are the keys' only)."""
    fab = fresh_fabric(servers=1)
    name = ns_name(request)
    with local(fab) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        child = Child(_KILLED, fab.directory, name)
        try:
            assert child.expect() == "streaming"
        finally:
            child.kill()
        wait_until(lambda: s.link(s.servers()[0]["server_id"]).call("kv_stats", **kv._wire)["stats"]["keys"] == 50,
                   "the keys to be there")
        for i in range(50):
            assert kv.get(b"doomed-%d" % i) == b"d" * 4000
        kv.put(b"mine", b"m" * 4000)           # this connection's own grant and stock
        s.close()
    with local(fab) as s:
        kv = s.namespace(name, "k").kv()
        one = kv.stats()["bytes"] // 51
        settled_bytes(kv, 51 * one)
        wait_until(lambda: kv.stats()["put_stock_bytes"] == 0, "the connections' stock to be given back")


def test_an_idle_connection_gives_its_stock_back(fabric, request):
    """A connection's stock grows with its puts; once it puts nothing for a while, the
    keeper takes the stock back (a connection that stopped putting holds no memory for it),
    and its next puts start a small one."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        for i in range(300):
            kv.put(b"k%d" % (i % 7), b"x" * 4000)
        assert kv.stats()["put_stock_bytes"] > 0
        wait_until(lambda: kv.stats()["put_stock_bytes"] == 0, "the idle stock to be given back")
        before = compiled_puts(s)
        for i in range(100):
            kv.put(b"k%d" % (i % 7), b"y" * 4000)
        assert compiled_puts(s) - before >= 80
        assert all(kv.get(b"k%d" % i) == b"y" * 4000 for i in range(7))


def test_a_stopped_server_times_compiled_puts_out(fresh_fabric, request):
    """A server stopped (SIGSTOP) under a stream of puts: the put waiting then times out, and
    once it goes on, puts work again."""
    fab = fresh_fabric(servers=1)
    with memfabric.init(fab.directory, server=0, timeout_s=1.0) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"a", b"1" * 4000)
        kv.put(b"a", b"2" * 4000)
        pid = fab.server_pids()[1]
        stop_process(pid)
        try:
            with pytest.raises((Timeout, memfabric.ServerUnavailable)):
                kv.put(b"a", b"3" * 4000)
        finally:
            os.kill(pid, 18)            # SIGCONT
        wait_until(lambda: _put_works(kv), "puts to work again")
        assert kv.get(b"a") == b"4" * 4000


def _put_works(kv) -> bool:
    try:
        kv.put(b"a", b"4" * 4000)
        return True
    except (Timeout, memfabric.MemfabricError):
        return False


def test_ctrl_c_in_a_stream_of_puts_leaves_the_session_usable(fabric, request):
    """Ctrl-C lands somewhere in a stream of compiled puts: the session's next calls work,
    and every key holds a value that was put whole."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"c", b"0" * 4000)
        for delay in (0.001, 0.003, 0.007, 0.02):
            with pytest.raises(KeyboardInterrupt):
                with interrupted_after(delay, KeyboardInterrupt):
                    for i in range(100000):
                        kv.put(b"c", str(i % 10).encode() * 4000)
            wait_until(lambda: _put_c_works(kv), "puts to work again after Ctrl-C")
            value = kv.get(b"c")
            assert len(value) == 4000 and len(set(value)) == 1


def test_ctrl_c_anywhere_in_a_compiled_put(fabric, request):
    """Interrupted at each bytecode of call_compiled and what it runs (the client's put on an
    idle link): the link goes on (or is replaced), the key holds a value put whole, and the
    next puts and gets are right."""
    with local(fabric) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"c", b"0" * 4000)
        link = s.link(kv._homes(b"c")[0])
        calls = link.compiled_calls
        kv.put(b"c", b"1" * 4000)
        assert link.compiled_calls == calls + 1, "the put did not go through call_compiled"
        checks = []

        def check(hook, _buffer) -> None:
            value = kv.get(b"c")
            assert value in (b"1" * 4000, b"2" * 4000, b"3" * 4000), (hook, value[:8])
            again(lambda: kv.put(b"c", b"3" * 4000))
            assert kv.get(b"c") == b"3" * 4000
            checks.append(hook)
        points = sweep(lambda _buffer: kv.put(b"c", b"2" * 4000), 16, check, after="call_compiled")
        assert points > 10
        assert kv.put(b"c", b"4" * 4000) and kv.get(b"c") == b"4" * 4000


def _put_c_works(kv) -> bool:
    try:
        kv.put(b"c", b"7" * 4000)
        return kv.get(b"c") == b"7" * 4000
    except memfabric.MemfabricError:
        return False


def test_a_compiled_put_waits_for_a_write_of_its_key_under_way(fresh_fabric, request):
    """A write of a key holds the key's stripe until it is passed on to the key's other homes
    (and an INCR or APPEND from its read to its write). A compiled put of that key meanwhile
    wrote at once (it took only the keyspace's lock): a write in the middle of another's. Now
    it waits its turn: it returns only after the write under way is done."""
    fab = fresh_fabric(servers=2)
    name = ns_name(request)
    with memfabric.init(fab.directory, server=0, timeout_s=30.0) as a, \
            memfabric.init(fab.directory, server=0, timeout_s=30.0) as b:
        kv_a = a.create_namespace(name, sec_id="k").kv()
        kv_b = b.namespace(name, "k").kv()
        key = next(k for k in (b"k%d" % i for i in range(1000)) if kv_a._homes(k)[0] == 1)
        kv_a.put(key, b"0" * 4000)
        kv_a.put(key, b"1" * 4000)               # granted: the next is answered in compiled code
        before = compiled_puts(a)
        stop_process(fab.server_pids()[2])      # the key's other home, for the replicated write
        slow_done, fast_done = threading.Event(), threading.Event()

        def slow() -> None:
            try:
                kv_b.put(key, b"s" * 4000, replicas=2)
            except memfabric.MemfabricError:
                pass
            finally:
                slow_done.set()

        def fast() -> None:
            kv_a.put(key, b"f" * 4000)
            fast_done.set()
        threads = [threading.Thread(target=slow), threading.Thread(target=fast)]
        try:
            threads[0].start()
            wait_until(lambda: kv_a.get(key) == b"s" * 4000, "the replicated write to land here")
            if not slow_done.is_set():             # still passing it on to the stopped server
                threads[1].start()
                # It waits for the write under way: done, so is that write (whose answer went
                # first), not seconds later (answered at once, it was in the middle of it).
                assert not fast_done.wait(0.5) or slow_done.wait(1.0)
        finally:
            os.kill(fab.server_pids()[2], 18)    # SIGCONT
            for t in threads:
                if t.ident is not None:
                    t.join(WAIT_S * 4)
        assert slow_done.is_set() and fast_done.is_set()
        assert kv_a.get(key) == b"f" * 4000
        assert compiled_puts(a) >= before


def test_a_full_namespace_takes_the_stock_back_before_refusing_a_write(fresh_fabric, request):
    """Chunks stocked for one connection's compiled puts are nobody's keys yet: when the
    memory runs out, a write takes them back before it is refused OUT_OF_MEMORY."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    name = ns_name(request)
    with local(fab) as a, local(fab) as b:
        kv_a = a.create_namespace(name, sec_id="k").kv()
        kv_b = b.namespace(name, "k").kv()
        for i in range(300):
            kv_a.put(b"a%d" % (i % 3), b"a" * 4000)      # a stock grows
        assert kv_a.stats()["put_stock_bytes"] > 0
        with pytest.raises(OutOfMemory):
            for i in range(10_000):
                kv_b.put(b"b%d" % i, b"b" * 4000, ttl_s=3600)   # Python's puts (a TTL), until full
                kv_a.put(b"a0", b"a" * 4000)                    # and the stock kept in use
        assert kv_a.stats()["put_stock_bytes"] == 0


def test_a_full_pool_takes_what_rested_in_a_grant_at_once(fresh_fabric, request):
    """The records a stream of overwrites left resting in its grant have rested their grace
    there: when the pool is full and a write takes them back (reclaim), they serve it at once,
    not after a second grace. Before, every one of them rested again: a full pool refused
    writes for the memory of records that had rested already."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    value = b"v" * (64 * KiB)             # a record a page: the pool holds about 120
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        filled = 0
        with pytest.raises(OutOfMemory):
            for filled in range(1000):
                kv.put(b"fill-%d" % filled, value, nx=True)     # Python's puts (NX)
        freed = 20
        for i in range(freed):
            assert kv.delete(b"fill-%d" % i)
        time.sleep(3 * REUSE_GRACE_S)     # their memory has rested
        for _ in range(freed - 2):        # within what was freed: the replaced rest in the grant
            kv.put(b"a", value)
        time.sleep(3 * REUSE_GRACE_S)     # ... and have rested their grace there
        stored = 0
        for i in range(freed - 1):        # what "a" does not hold
            try:
                kv.put(b"new-%d" % i, value, nx=True)
            except OutOfMemory:
                break
            stored += 1
        assert stored == freed - 1
        assert kv.get(b"a") == value and kv.get(b"new-%d" % (freed - 2)) == value


_INCREMENTER = r"""
import sys, memfabric
directory, name = sys.argv[1], sys.argv[2]
with memfabric.init(directory, server=0) as s:
    kv = s.namespace(name, "k").kv()
    print("ready", flush=True)
    sys.stdin.readline()
    while True:
        kv._at_first_home(b"counter", "kv_incr_float", retry=False, by=b"1")
"""


def _switching_often(tmp_path, monkeypatch) -> None:
    """Servers started from here switch threads every microsecond (sitecustomize), as a busy
    server's threads do now and then: a window of a few bytecodes between two of a thread's
    steps is met in seconds rather than in days."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.setswitchinterval(1e-6)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


def test_a_compiled_put_is_never_lost_to_a_read_modify_write(fresh_fabric, request, tmp_path, monkeypatch):
    """INCRBYFLOAT (like INCR, APPEND, SETRANGE, GETDEL, RENAME) reads the key and writes it
    back under the key's stripe lock, the lock every write of the key takes: a compiled put
    of the key never lands between the read and the write (where the write would undo it).
    So a value read back after a put is that value or one incremented from it, never an
    increment of what was there before."""
    _switching_often(tmp_path, monkeypatch)
    fab = fresh_fabric(servers=1)
    name = ns_name(request)
    with local(fab) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        kv.put(b"counter", b"0")
        incrementers = [Child(_INCREMENTER, fab.directory, name) for _ in range(2)]
        try:
            for incrementer in incrementers:
                assert incrementer.expect() == "ready"
            for incrementer in incrementers:
                incrementer.send("go")
            before = compiled_puts(s)
            for round_ in range(1, 5001):
                base = round_ * 10 ** 9
                kv.put(b"counter", str(base).encode())
                got = float(kv.get(b"counter"))
                assert got >= base, f"round {round_}: the put of {base} was undone by an increment ({got})"
            assert compiled_puts(s) - before > 1000
        finally:
            for incrementer in incrementers:
                incrementer.kill()


def test_overwrites_leave_room_for_new_keys_under_the_limit(fresh_fabric, request):
    """With the memory limit's eviction "refuse" and room for one more key, a stream of
    compiled overwrites of another key (each record it replaces freed) leaves that room: the
    new key is stored, and the keyspace's bytes say what its keys hold, at once."""
    fab = fresh_fabric(servers=1)
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.configure(memory_limit=256 * KiB, eviction="refuse")
        keys = 0
        with pytest.raises(OutOfMemory):
            for keys in range(1000):
                kv.put(b"fill-%d" % keys, b"f" * 4000)
        assert kv.delete(b"fill-0")             # room for one key now
        full = kv.stats()["bytes"]
        for attempt in range(5):
            for i in range(40):
                kv.put(b"fill-1", str(i % 10).encode() * 4000)
            assert kv.stats()["bytes"] == full, f"attempt {attempt}"
            kv.put(b"new", b"n" * 4000)         # OUT_OF_MEMORY here: replaced records counted
            assert kv.delete(b"new")
        assert kv.get(b"fill-1") == b"9" * 4000 and len(kv) == keys - 1


@pytest.mark.parametrize("eviction", ["refuse", "lru"])
def test_new_keys_in_reused_chunks_stay_within_the_limit(fresh_fabric, request, eviction):
    """A full keyspace's overwrites leave the records they replaced resting in the grant; once
    rested, a new key's compiled put reuses one. That chunk was counted all along, but as no
    key's: the new key still needs room under the memory limit (refused, or another evicted).
    Before, a new key in a reused chunk skipped the limit: 100 new keys were stored in a full
    keyspace with eviction "refuse", and none was evicted with "lru"."""
    fab = fresh_fabric(servers=1)
    limit = 256 * KiB
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.configure(memory_limit=limit, eviction="refuse")
        with pytest.raises(OutOfMemory):
            for keys in range(1000):
                kv.put(b"fill-%d" % keys, b"f" * 4000)
        kv.configure(eviction=eviction)
        stored = 0
        for i in range(300):           # replaced records rest in the grant (stats() would free them)
            kv.put(b"fill-1", str(i % 10).encode() * 4000)
        time.sleep(3 * REUSE_GRACE_S)  # ... and have rested: the next puts may reuse them
        for i in range(100):
            try:
                kv.put(b"new-%d" % i, b"n" * 4000)
            except OutOfMemory:
                break
            stored += 1
        stats = kv.stats()
        assert stats["bytes"] <= limit
        if eviction == "refuse":
            assert stored == 0
        else:
            assert stored == 100 and stats["evictions"] >= 100
            assert kv.get(b"new-99") == b"n" * 4000


def test_stock_idle_connections_hold_goes_back_to_the_pool(fresh_fabric, request):
    """Connections that put once and then stay idle do not keep their stock of chunks from
    the pool: another tenant's put that needs that memory is stored (within a bounded wait)."""
    fab = fresh_fabric(servers=1, capacity="4MiB")
    name = ns_name(request)
    value = b"v" * (100 * KiB)
    with local(fab) as s:
        s.create_namespace(name, sec_id="k")
        idle = [local(fab) for _ in range(6)]
        try:
            for i, session in enumerate(idle):
                session.namespace(name, "k").kv().put(b"idle-%d" % i, value)
            other = s.create_namespace(name + "-other", sec_id="k").kv()
            wait_until(lambda: _stored(other, b"mine", value), "the idle connections' stock to go back")
            for i in range(6):
                assert s.namespace(name, "k").kv().get(b"idle-%d" % i) == value
        finally:
            for session in idle:
                session.close()


def _stored(kv, key: bytes, value: bytes) -> bool:
    try:
        return kv.put(key, value)
    except OutOfMemory:
        return False


_DESTROYED_WRITER = r"""
import collections, select, sys, memfabric
directory, name = sys.argv[1], sys.argv[2]
errors = collections.Counter()
with memfabric.init(directory, server=0) as s:
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        try:
            kv = s.namespace(name, "k").kv()
            for j in range(100):
                kv.put(b"w%d" % (j % 50), b"w" * (4000 if j % 3 else 100))
        except memfabric.MemfabricError as exc:
            errors[type(exc).__name__ if type(exc).__name__ != "NoSuchObject" else str(exc)] += 1
print(dict(errors), flush=True)
"""


def test_puts_racing_destroys_hear_no_such_namespace(fresh_fabric, request, tmp_path, monkeypatch):
    """Puts (compiled, and Python's granting the connection) into a namespace destroyed and
    made again and again: each is stored or fails NO_SUCH_NAMESPACE, never NO_SUCH_OBJECT
    for one of the destroyed namespace's segments."""
    _switching_often(tmp_path, monkeypatch)
    fab = fresh_fabric(servers=1)
    name = ns_name(request)
    with local(fab) as s:
        s.create_namespace(name, sec_id="k")
        writers = [Child(_DESTROYED_WRITER, fab.directory, name) for _ in range(3)]
        try:
            for w in writers:
                assert w.expect() == "ready"
            for _ in range(60):
                wait_until(lambda: compiled_puts(s) > 0, "puts to be answered")
                s.namespace(name, "k").destroy()
                s.create_namespace(name, sec_id="k")
            said = []
            for w in writers:
                w.send("stop")
                said.append(w.expect())
        finally:
            for w in writers:
                w.kill()
        for errors in said:
            assert set(ast.literal_eval(errors)) <= {"NoSuchNamespace", "PermissionDenied"}, errors


_OVERWRITER = r"""
import sys, memfabric
directory, name, me = sys.argv[1], sys.argv[2], sys.argv[3].encode()
refused = 0
with memfabric.init(directory, server=0) as s:
    kv = s.namespace(name, "k").kv()
    print("ready", flush=True)
    sys.stdin.readline()
    for j in range(300):
        try:
            kv.put(b"%s-%d" % (me, j % 4), me * 100000)
        except memfabric.OutOfMemory:
            refused += 1
print(refused, flush=True)
"""


def test_connections_stocking_chunks_do_not_starve_each_others_puts(fresh_fabric, request):
    """Six connections overwrite four 100 KiB keys each (24 records, 3 MiB of an 8 MiB pool):
    the chunks each connection holds in stock are taken back when the pool is full, so no
    put is refused (as none is when Python answers them all)."""
    fab = fresh_fabric(servers=1, capacity="8MiB")
    name = ns_name(request)
    with local(fab) as s:
        kv = s.create_namespace(name, sec_id="k").kv()
        writers = [Child(_OVERWRITER, fab.directory, name, str(i)) for i in range(6)]
        try:
            for w in writers:
                assert w.expect() == "ready"
            for w in writers:
                w.send("go")
            refused = [int(w.expect()) for w in writers]
        finally:
            for w in writers:
                w.kill()
        assert refused == [0] * 6
        for i in range(6):
            for j in range(4):
                assert kv.get(b"%d-%d" % (i, j)) == str(i).encode() * 100000
        assert compiled_puts(s) > 0


def test_a_keyspace_emptied_leaves_the_pool_to_another_namespace(fresh_fabric, request):
    """A keyspace keeps some of its emptied heap pages for its next writes (kv/heap.py), but an
    emptied keyspace only a few: another namespace can write in the pool at once. 80 values of
    64 KiB (a page each) written and deleted in one namespace, then written in another, in a
    16 MiB pool: none refused."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    with local(fab) as s:
        first = s.create_namespace(ns_name(request) + "-a", sec_id="k").kv()
        second = s.create_namespace(ns_name(request) + "-b", sec_id="k").kv()
        value = os.urandom(64 * KiB)
        for i in range(80):
            first.put(b"%d" % i, value)
        for i in range(80):
            first.delete(b"%d" % i)
        time.sleep(3 * REUSE_GRACE_S)       # the records rest, then their pages are empty
        first.put(b"x", b"y")               # a write of the keyspace looks for empty pages
        for i in range(80):
            second.put(b"%d" % i, value)
        assert all(second.get(b"%d" % i) == value for i in range(80))


def test_a_full_pool_takes_back_the_empty_pages_another_keyspace_keeps(fresh_fabric, request):
    """A keyspace keeps empty heap pages (and its compiled puts chunks in stock) for its next
    writes, each in a segment no other namespace can have: a pool short of memory takes them
    back first. One namespace fills a 16 MiB pool with 64 KiB values (a page each), deletes all
    but one and writes that one again; another then writes as many: all but those two segments'
    worth fit (before, 4 spare pages and the stock kept a segment each: a fifth refused)."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    with local(fab) as s:
        first = s.create_namespace(ns_name(request) + "-a", sec_id="k").kv()
        second = s.create_namespace(ns_name(request) + "-b", sec_id="k").kv()
        value = os.urandom(64 * KiB)
        count = fill(first, value)
        for i in range(1, count):
            first.delete(b"%d" % i)
        time.sleep(6 * REUSE_GRACE_S)       # the records rest, then their pages are empty
        first.put(b"0", value)              # its free keeps empty pages aside
        time.sleep(6 * REUSE_GRACE_S)
        written = 0
        with pytest.raises(OutOfMemory):
            while written < count:
                second.put(b"%d" % written, value)
                written += 1
        # The key and the record it replaced hold two of the pool's 1 MiB segments at most.
        assert written >= count - 2 * (1 << 20) // (128 * KiB), f"{written} of {count} fit"
        assert all(second.get(b"%d" % i) == value for i in range(written))


def test_a_large_value_is_not_refused_for_chunks_in_stock(fresh_fabric, request):
    """Chunks stocked for compiled puts are no key's yet: a record's write takes them back
    before it is refused (Store.chunk), and so does a large value's reservation. A 16 MiB pool
    filled with 64 KiB values, half of them deleted and one written again (its stock refilled
    from the emptied pages), then large values of 1 MiB until refused: none is refused with
    chunks left in stock (before, 7 of 64 KiB stayed there)."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = os.urandom(64 * KiB)
        count = fill(kv, value)
        for i in range(0, count, 2):
            kv.delete(b"%d" % i)
        time.sleep(6 * REUSE_GRACE_S)       # the records rest, then their pages are empty
        kv.put(b"1", value)
        large = 0
        with pytest.raises(OutOfMemory):
            while large < 64:
                kv.put(b"large%d" % large, os.urandom(1 << 20))
                large += 1
        assert kv.stats()["put_stock_bytes"] == 0
        assert all(kv.get(b"%d" % i) == value for i in range(1, count, 2))


def test_a_write_waits_for_a_page_of_another_class_about_to_empty(fresh_fabric, request):
    """A write that finds the pool full waits for memory about to come back rather than be
    refused (Store.chunk): a record of its class that rests, and now a page whose records all
    rest, which then serves any class. 64 KiB values fill a 16 MiB pool, ten are deleted, and
    ten small keys are written at once: before, all ten were refused (no small record rested)."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = os.urandom(64 * KiB)
        count = fill(kv, value)
        for i in range(10):
            kv.delete(b"%d" % i)
        for i in range(10):
            kv.put(b"small%d" % i, b"x" * 100)
        assert all(kv.get(b"small%d" % i) == b"x" * 100 for i in range(10))
        assert all(kv.get(b"%d" % i) == value for i in range(10, count))


def test_a_keyspace_no_one_writes_gives_its_empty_pages_back(fresh_fabric, request):
    """The pages a keyspace keeps empty for its next writes go back to the pool after
    SPARE_IDLE_S unused, with no write to ask (the server's keeper looks); before, an emptied
    keyspace kept them until its next write."""
    from memfabric.kv.heap import SPARE_IDLE_S
    fab = fresh_fabric(servers=1, capacity="64MiB")
    with local(fab) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = os.urandom(64 * KiB)
        for i in range(40):
            kv.put(b"%d" % i, value)
        for i in range(40):
            kv.delete(b"%d" % i)
        assert kv.stats()["pages"] > 0
        time.sleep(SPARE_IDLE_S)
        wait_until(lambda: kv.stats()["pages"] == 0, "the keyspace's empty pages to go back to the pool")

"""The compiled same-host append (plog/fast_append.py, _plogserve.c append_one) against the
Python path it stands in for, with real servers: the same offsets, records and frames;
every case it must not serve (sealed, deleted, full, wrong secId, a frame across extents,
garbage and near-miss packets) answered by Python as before; threads and processes at once.
A server's Prometheus counter memfabric_plog_compiled_appends says which path served."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading

import pytest

import memfabric
from memfabric.errors import NoSuchNamespace, NoSuchObject, OutOfSpace, PermissionDenied, Sealed
from memfabric.launcher import LocalFabric
from memfabric.plog import record as rec
from memfabric.transport import wire
from memfabric.transport.ipc import IpcChannel

from ..conftest import short_tmp_dir
from ..helpers import CHILD_WAIT_S, free_ports, ns_name, stopped
from ..transport.paths import interrupted_after
from .test_interrupted_calls import again, sweep
from .test_metrics import ops, scrape, value
from .test_persistence import PersistentServer
from .test_plog_durability import acknowledged_are_whole

MiB = 1 << 20


def plog_fabric(prefix: str) -> LocalFabric:
    """One server with a ramdisk pool "ram" and a pmem pool "disk", its metrics at .metrics."""
    port = free_ports(1)
    fabric = LocalFabric(short_tmp_dir(prefix), servers=1, capacity="16MiB", segment_size="1MiB",
                         extra_args=["--pool", "ram:ramdisk:48MiB", "--pool", "disk:pmem:48MiB",
                                     "--metrics-port", str(port)]).start()
    fabric.metrics = f"127.0.0.1:{port}"
    return fabric


@pytest.fixture(scope="module")
def fab():
    fabric = plog_fabric("mf-plogfast-")
    yield fabric
    assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


def compiled(fab) -> int:
    return int(value(scrape(fab.metrics), "memfabric_plog_compiled_appends_total"))


def run_writers(script: str, args_of, writers: int) -> list[str]:
    """`writers` processes running `script` side by side (`args_of(tag)`: the arguments of
    each): the output of each once all have ended, each with exit status 0. Any still running
    when this fails are killed."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *args_of(t)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for t in range(writers)]
    try:
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=CHILD_WAIT_S * 8)
            assert proc.returncode == 0, err
            outs.append(out)
        return outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(CHILD_WAIT_S)


@pytest.fixture(params=["ram", "disk"])
def pool(request):
    return request.param


def records_of(n: int, seed: int = 0) -> list[bytes]:
    """Records of many lengths: 0, odd ones (padding), a few KiB."""
    return [bytes([(seed + i) % 251]) * ((i * 37 + seed) % 5000) for i in range(n)]


def frames_check(log, link, payloads: list[bytes]) -> None:
    """The log's raw bytes are exactly the frames record.encode makes (Python's framing)."""
    nonce = link.call("plog_info", **log._wire, layout=True)["nonce"]
    expected = b"".join(rec.encode(nonce, i, p) for i, p in enumerate(payloads))
    assert log.read(0, len(expected)) == expected


def test_compiled_appends_are_the_python_paths_to_the_byte(fab, pool, request):
    name = ns_name(request)
    payloads = records_of(60)
    with memfabric.init(fab.directory) as s, memfabric.init(os.path.join(fab.directory, "remote.toml")) as r:
        ns = s.create_namespace(name, sec_id="k", pool=pool)
        fast, slow = ns.create_plog("fast", 2 * MiB), ns.create_plog("slow", 2 * MiB)
        remote_slow = r.namespace(name, "k", pool=pool).plog("slow")     # RPC: always Python
        before = compiled(fab)
        fast_offsets = [fast.append(p) for p in payloads]
        slow_offsets = [remote_slow.append(p) for p in payloads]
        # The first append of a connection is Python's (it grants the rest).
        assert compiled(fab) - before == len(payloads) - 1
        assert fast_offsets == slow_offsets
        assert list(fast.records()) == list(slow.records()) == payloads
        assert [fast.record(i) for i in (0, 17, 59)] == [payloads[i] for i in (0, 17, 59)]
        info_fast, info_slow = fast.info(), slow.info()
        for key in ("length", "records", "state", "capacity"):
            assert info_fast[key] == info_slow[key]
        link = s.link(fast.home)
        frames_check(fast, link, payloads)
        frames_check(slow, link, payloads)


def test_an_append_is_answered_in_the_receive_loop_and_counted(fab, pool, request):
    """The connection's receive loop answers a granted append without handing the request to
    Python (_frames.c serve_packets): Python's operation histogram does not see it, the plog
    counters do. On ramdisk nothing is to flush; on pmem the loop waits for a flush (its own
    here, the only appender: one per append), made by Python's _flush_to with the GIL taken
    once (_commitgroup.c), and answers then."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("wal", 2 * MiB)
        log.append(b"granted")            # Python's: it grants the rest
        before = scrape(fab.metrics)
        payloads = records_of(40)
        offsets = [log.append(p) for p in payloads]
        after = scrape(fab.metrics)
        assert value(after, "memfabric_plog_compiled_appends_total") - value(
            before, "memfabric_plog_compiled_appends_total") == len(payloads)
        assert value(after, "memfabric_plog_appends_total") - value(before, "memfabric_plog_appends_total") == len(
            payloads)
        assert value(after, "memfabric_plog_appended_bytes_total") - value(
            before, "memfabric_plog_appended_bytes_total") == sum(map(len, payloads))
        assert ops(after, "plog_append") - ops(before, "plog_append") == 0
        flushes = value(after, "memfabric_plog_flushes_total") - value(before, "memfabric_plog_flushes_total")
        assert flushes == (0 if pool == "ram" else len(payloads))
        assert list(log.records(1)) == payloads
        assert [log.read(o, len(p)) for o, p in zip(offsets, payloads)] == payloads


def test_puts_and_appends_answered_in_one_loop_interleave(fab, pool, request):
    """A connection whose loop answers MemKV puts and plog appends: each goes where it belongs,
    in order, whatever the mix."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("wal", 2 * MiB)
        kv = s.create_namespace(name, sec_id="k").kv()           # the default (dram) pool's
        log.append(b"granted")
        expected = [b"granted"]
        for i in range(300):
            if i % 3 == 0:
                kv.put(f"k{i}".encode(), b"v%d" % i)
            record = b"r%d" % i * (i % 7)
            log.append(record)
            expected.append(record)
        assert list(log.records()) == expected
        assert all(kv.get(f"k{i}".encode()) == b"v%d" % i for i in range(0, 300, 3))


def test_a_plog_refuses_through_the_compiled_path_as_through_python(fab, pool, request):
    name = ns_name(request)
    with memfabric.init(fab.directory) as s, memfabric.init(fab.directory) as other:
        ns = s.create_namespace(name, sec_id="k", pool=pool)
        log = ns.create_plog("wal", 64 << 10)
        log.append(b"granted")
        before = compiled(fab)
        log.append(b"compiled")
        assert compiled(fab) == before + 1
        # Full: nothing written, and OUT_OF_SPACE as Python says it.
        big = b"f" * 20_000
        while True:
            try:
                log.append(big)
            except OutOfSpace:
                break
        length = log.info()["length"]
        with pytest.raises(OutOfSpace):
            log.append(big)
        assert log.info()["length"] == length
        log.append(b"small still fits")
        # Sealed by another process's session: no append after it.
        other.namespace(name, "k", pool=pool).plog("wal").seal()
        with pytest.raises(Sealed):
            log.append(b"after seal")
        assert log.info()["state"] == "sealed" and log.record(0) == b"granted"
        # Deleted: NO_SUCH_OBJECT, on the granted connection too.
        second = ns.create_plog("second", 64 << 10)
        second.append(b"a")
        second.append(b"b")
        other.namespace(name, "k", pool=pool).plog("second").delete()
        with pytest.raises(NoSuchObject):
            second.append(b"after delete")
        # The namespace destroyed: its plogs go, and the grant with them.
        third = ns.create_plog("third", 64 << 10)
        third.append(b"a")
        third.append(b"b")
        other.namespace(name, "k", pool=pool).destroy()
        with pytest.raises((NoSuchNamespace, NoSuchObject)):
            third.append(b"after destroy")


def test_records_across_extents_and_segments(fab, request):
    """A plog larger than a segment lies over several extents: a frame that would cross from
    one to the next is Python's; every record still reads back whole."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 3 * MiB)
        link = s.link(log.home)
        extents = link.call("plog_info", **log._wire, layout=True)["extents"]
        assert len(extents) > 1
        payloads = [bytes([i % 256]) * (3000 + i % 2000) for i in range(700)]
        before = compiled(fab)
        for p in payloads:
            log.append(p)
        served = compiled(fab) - before
        assert len(payloads) - 1 - len(extents) <= served < len(payloads) - 1
        assert list(log.records()) == payloads
        frames_check(log, link, payloads)


class RawClient:
    """A connection of our own to the server's IPC socket, sending any bytes."""

    def __init__(self, fab, path: str) -> None:
        self.channel = IpcChannel.connect(path)
        self.channel.set_deadline(10)
        self.next_id = 1
        assert "server_id" in self.call({"op": "hello", "role": "client", "pid": os.getpid()})

    def call(self, message: dict) -> dict:
        message = {**message, "id": self.next_id}
        self.next_id += 1
        self.channel.send(message)
        reply, fds = self.channel.recv()
        assert not fds and reply["id"] == message["id"]
        return reply

    def send_raw(self, data: bytes) -> dict | None:
        """A packet as it is; the reply, or None when the server closed the connection."""
        self.channel.send_encoded(data)
        try:
            reply, _ = self.channel.recv()
        except Exception:       # noqa: BLE001 - closed: what the server does with garbage
            return None
        return reply


def test_garbage_and_near_miss_packets_append_nothing_and_break_nothing(fab, pool, request):
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("wal", MiB)
        path = s.link(log.home).ipc_socket
        args = {**log._wire, "op": "plog_append"}
        good = {**args, "records": [b"good"]}
        client = RawClient(fab, path)
        assert client.call(good)["offsets"] == [rec.HEADER_BYTES]       # Python: granted
        expected = [b"good"]
        before = compiled(fab)
        reply = client.call({**good, "records": [b"fast"]})
        expected.append(b"fast")
        assert compiled(fab) == before + 1 and "offsets" in reply
        # The same map with msgpack's 16-bit map header (as another encoder may write it): compiled too.
        packet = wire.encode({**good, "records": [b"map16"], "id": 10**6 - 1})
        assert packet[0] & 0xF0 == 0x80
        reply = client.send_raw(b"\xde" + (packet[0] & 0x0F).to_bytes(2, "big") + packet[1:])
        expected.append(b"map16")
        assert compiled(fab) == before + 2 and "offsets" in reply, reply
        # Near misses: each is Python's, answered as it always was (an error, or appended).
        cases = [
            ({**args, "sec": b"wrong"}, "error"),                         # wrong secId
            ({**args, "records": [b"x"], "sec": b"k" * 3}, "error"),
            ({**args, "records": [b"x"], "plog_id": args["plog_id"] + 1}, "error"),   # another plog's id
            ({**args, "records": [b"x"], "name": "other"}, "error"),     # not granted, not there
            ({**args, "records": [b"two", b"recs"]}, "ok"),               # two records: Python's
            ({**args, "records": []}, "error"),
            ({**args, "records": ["str"]}, "error"),
            ({**args, "records": [b"x"], "extra": 1}, "ok"),              # a key it does not know
            ({**args, "records": [b"x"], "op": "plog_read", "offset": 0, "length": 4}, "ok"),
            ({**{k: v for k, v in args.items() if k != "plog_id"}, "records": [b"no id"]}, "ok"),
        ]
        for message, outcome in cases:
            reply = client.call(message)
            if outcome == "error":
                assert "error" in reply, message
            else:
                assert "error" not in reply, (message, reply)
                if message.get("op") == "plog_append":
                    expected.extend(message["records"])
        assert client.call({**args, "records": [b"x"], "sec": b"wrong"})["error"] == PermissionDenied.code
        # Every prefix of a packet the compiled path would serve, and a few byte flips: each
        # is answered or closes the connection, and none appends a torn record.
        packet = wire.encode({**good, "records": [b"prefix"], "id": 10**6})
        for cut in range(1, len(packet)):
            client = client if client is not None else RawClient(fab, path)
            if client.send_raw(packet[:cut]) is None:
                client = None
        client = RawClient(fab, path)
        client.call(good)
        expected.append(b"good")
        for at in range(0, len(packet), 3):
            flipped = bytearray(packet)
            flipped[at] ^= 0x5A
            reply = client.send_raw(bytes(flipped))
            if reply is None:
                client = RawClient(fab, path)
                client.call(good)
                expected.append(b"good")
            elif "offsets" in reply:
                expected.append(None)      # a flip that still made a valid append (of what it said)
        records = list(log.records())
        assert len(records) == len(expected)
        assert all(e is None or r == e for r, e in zip(records, expected))
        frames_check(log, s.link(log.home), records)
        assert log.append(b"still fine") == log.info()["length"] - rec.frame_bytes(10) + rec.HEADER_BYTES


def test_threads_sharing_a_session_append_at_once(fab, pool, request):
    name = ns_name(request)
    threads, each = 6, 150
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("wal", 4 * MiB)
        before = compiled(fab)
        offsets: dict[int, list[int]] = {}

        def work(tag: int) -> None:
            offsets[tag] = [log.append(struct.pack("<II", tag, i) * (1 + i % 40)) for i in range(each)]
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(CHILD_WAIT_S * 4)
        assert all(not w.is_alive() for w in workers) and len(offsets) == threads
        assert 0 < compiled(fab) - before <= threads * each - 1    # one link: its first is Python's
        seen = {t: 0 for t in range(threads)}
        for payload in log.records():
            tag, i = struct.unpack_from("<II", payload)
            assert payload == struct.pack("<II", tag, i) * (1 + i % 40) and i == seen[tag]
            seen[tag] += 1
        assert seen == {t: each for t in range(threads)}
        all_offsets = sorted(o for v in offsets.values() for o in v)
        assert len(set(all_offsets)) == threads * each


APPENDER = r"""
import struct, sys
import memfabric
ock, ns_name, pool, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with memfabric.init(ock) as s:
    log = s.namespace(ns_name, "k", pool=pool).plog("shared")
    for seq in range(count):
        print(log.append(struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 200)), flush=True)
"""


def test_appenders_in_several_processes_on_pmem_and_ramdisk(fab, pool, request):
    """Group commit on pmem: appends of several processes share flushes; none is lost or torn."""
    name = ns_name(request)
    writers, count = 5, 120
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("shared", 8 * MiB)
        before = compiled(fab)
        acked = {}
        for tag, out in enumerate(run_writers(APPENDER, lambda t: [fab.directory, name, pool, str(t), str(count)],
                                              writers)):
            acked[tag] = [int(x) for x in out.split()]
            assert acked[tag] == sorted(acked[tag])
        # Each process's first append is Python's; the rest are compiled, those that found the
        # plog's lock held (another's append, or a flush taking its target) too: they wait for
        # it (before, they went to Python, which held the lock longer: on pmem, a fifth did).
        assert compiled(fab) - before == writers * (count - 1)
        seen = {t: 0 for t in range(writers)}
        at = 0
        for payload in log.records():
            tag, seq = struct.unpack_from("<II", payload)
            assert payload == struct.pack("<II", tag, seq) * (1 + (seq * 7 + tag) % 200)
            assert seq == seen[tag] and acked[tag][seq] == at + rec.HEADER_BYTES
            seen[tag] += 1
            at += rec.frame_bytes(len(payload))
        assert seen == {t: count for t in range(writers)}


# ---- the client's side: one record sent and answered in one compiled call (call_append) ----

def _stream(log) -> list[bytes]:
    return list(log.records())


def test_the_client_appends_in_one_compiled_call(fab, pool, request):
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool=pool).create_plog("wal", MiB)
        link = s.link(log.home)
        before = link.compiled_calls
        offsets = [log.append(p) for p in (b"a", b"", b"x" * 5000, bytearray(b"ba"), memoryview(b"mv"))]
        assert link.compiled_calls - before == 5
        assert offsets == [16, 16 + 24, 16 + 24 + 16, 16 + 24 + 16 + 5016, 16 + 24 + 16 + 5016 + 24]
        assert _stream(log) == [b"a", b"", b"x" * 5000, b"ba", b"mv"]
        # Errors come back as the Python path raises them, the link stays.
        log.seal()
        with pytest.raises(Sealed):
            log.append(b"sealed")
        assert s.link(log.home) is link and link.compiled_calls - before == 6
        # What it does not take goes the Python way: too large for one message, not a buffer.
        with pytest.raises(memfabric.InvalidArgument):
            log.append(12)


def test_a_compiled_append_that_times_out_leaves_the_link_working(fab, request):
    """Its server stopped (SIGSTOP), the append gives up (TIMEOUT); once the server goes on,
    it appends what it was sent, and the late reply is dropped by the next call."""
    name = ns_name(request)
    with memfabric.init(fab.directory, timeout_s=1.0) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", MiB)
        log.append(b"first")
        link = s.link(log.home)
        pid = fab.server_pids()[log.home]
        with stopped(pid):
            with pytest.raises(memfabric.Timeout):
                log.append(b"given up")
        assert log.append(b"next") == log.info()["length"] - rec.frame_bytes(4) + rec.HEADER_BYTES
        assert s.link(log.home) is link
        assert _stream(log) == [b"first", b"given up", b"next"]
        calls = link.compiled_calls
        log.append(b"compiled again")
        assert link.compiled_calls == calls + 1


def test_ctrl_c_while_a_compiled_append_waits_for_a_stopped_server(fab, request):
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", MiB)
        log.append(b"first")
        link = s.link(log.home)
        pid = fab.server_pids()[log.home]
        calls = link.compiled_calls
        with stopped(pid):
            with interrupted_after(0.3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
                log.append(b"interrupted")
        assert link.compiled_calls == calls + 1, "the append did not wait in call_append"
        log.append(b"next")
        assert _stream(log) == [b"first", b"interrupted", b"next"]


def test_ctrl_c_anywhere_in_a_compiled_append(fab, request):
    """Interrupted at each bytecode of call_compiled and what it runs: the link goes on (or
    is replaced), and the log holds whole records only, each interrupted one at most once."""
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        log = s.create_namespace(name, sec_id="k", pool="ram").create_plog("wal", 4 * MiB)
        log.append(b"first")
        checks = []

        def check(hook, _buffer) -> None:
            again(lambda: log.append(b"after %d" % len(checks)))
            checks.append(hook)
        points = sweep(lambda _buffer: log.append(b"tried"), 16, check, after="call_compiled")
        assert points > 10
        records = _stream(log)
        assert records[0] == b"first"
        assert [r for r in records if r.startswith(b"after")] == [b"after %d" % i for i in range(len(checks))]
        assert set(records[1:]) <= {b"tried"} | {b"after %d" % i for i in range(len(checks))}


@pytest.fixture(params=["ramdisk", "pmem"])
def persistent(request):
    """A server whose pool survives it, with its metrics served (to see which path served)."""
    srv = PersistentServer(request.param)
    port = free_ports(1)
    with open(srv.config) as f:
        text = f.read().replace("[server]\n", f'[server]\nmetrics_listen = "127.0.0.1:{port}"\n', 1)
    with open(srv.config, "w") as f:
        f.write(text)
    srv.metrics = f"127.0.0.1:{port}"
    yield srv.start()
    srv.cleanup()


KILLED_APPENDER = r"""
import struct, sys
import memfabric
ock, name = sys.argv[1], sys.argv[2]
with memfabric.init(ock) as s:
    log = s.namespace(name, "k", pool="keep").plog("wal")
    link = s.link(log.home)
    for seq in range(1_000_000):
        offset = log.append(struct.pack("<I", seq) * (1 + seq % 300))
        print("ack", seq, offset, link.compiled_calls, flush=True)
"""


def test_sigkill_mid_stream_of_compiled_appends_keeps_every_acknowledged_one(persistent, request):
    name = ns_name(request)
    with memfabric.init(persistent.config) as s:
        s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 6 * MiB)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_APPENDER, persistent.config, name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = []
    try:
        while len(acked) < 300:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            acked.append(tuple(int(x) for x in line.split()[1:]))
        served = compiled(persistent)
        persistent.kill()                 # SIGKILL while the appender goes on
        stop = threading.Timer(CHILD_WAIT_S * 4, proc.kill)
        stop.start()
        try:
            out = proc.stdout.read()
            proc.wait(CHILD_WAIT_S)
        finally:
            stop.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(CHILD_WAIT_S)
    acked += [tuple(int(x) for x in line.split()[1:]) for line in out.splitlines() if line.startswith("ack")]
    # Both compiled paths served them: every one the client's (its link's count), and the
    # server's, all but the first (Python's, which granted the connection).
    assert [a[2] for a in acked] == list(range(1, len(acked) + 1))
    assert served >= 299
    persistent.start()
    with memfabric.init(persistent.config) as s:
        log = s.namespace(name, "k", pool="keep").plog("wal")
        records = list(log.records())
        at = acknowledged_are_whole(records, acked,
                                    lambda seq, payload: payload == struct.pack("<I", seq) * (1 + seq % 300))
        assert log.info()["length"] == at
        assert log.append(b"after") == at + rec.HEADER_BYTES

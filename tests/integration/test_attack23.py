"""Attacks on today's compiled MemPlog paths (_plogserve.c append_batch, replica_packet,
_framing.c read_frame; fast_append.send_forward): lying lengths, zero-length and 4,096-record batches,
replies near the loop's 8 KiB room, one connection mixing everything, exact counters."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import memfabric
from memfabric.datapath.deadline import serving_until
from memfabric.errors import InvalidArgument, MemfabricError
from memfabric.limits import MAX_PLOG_RECORD_BYTES
from memfabric.plog import record as rec
from memfabric.plog.client import _stage_holder

from ..helpers import CHILD_WAIT_S, ns_name, stopped, wait_until
from ..transport.paths import interrupted_after
from .test_attack22 import seal_a_copy_under
from .test_metrics import ops, scrape, value
from .test_persistence import PersistentServer
from .test_plog_compiled import plog_fabric
from .test_plog_durability import acks_around_a_kill
from .test_plog_replicas import _metrics

MiB = 1 << 20
WAIT_S = 60
BATCH = [bytes([i]) * 4096 for i in range(100)]


@pytest.fixture(scope="module")
def fab():
    fabric = plog_fabric("mf-atk23-")
    yield fabric
    assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


def counters(fab):
    got = scrape(fab.metrics)
    return (ops(got, "plog_append"), value(got, "memfabric_plog_appends_total"),
            value(got, "memfabric_plog_appended_bytes_total"), value(got, "memfabric_plog_compiled_appends_total"))


def delta(after, before):
    return tuple(a - b for a, b in zip(after, before))


def scan_all(log, link):
    info = link.call("plog_info", **log._wire, layout=True)
    length = log.info()["length"]
    raw = log.read(0, length)
    found = list(rec.scan(lambda at, n: raw[at:at + n], length, info["nonce"], MAX_PLOG_RECORD_BYTES))
    assert (found[-1][0] + rec.frame_bytes(found[-1][1]) if found else 0) == length
    return found


def test_odd_batches_on_the_stage(fab, request):
    """Zero-length records, 4,096 records, replies around 8 KiB, exact stage fills: the
    offsets are where the records are, every frame checks, every record counted once."""
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="ram")
        log = ns.create_plog("wal", 40 * MiB)
        log.append_many(BATCH)
        link = s.link(log.home)
        expect = list(BATCH)
        batches = [
            [b""] * 50 + [b"x" * 300000],                         # staged, zeros first
            [b"z" * 200000] + [b""] * 4095,                       # 4,096 records, reply > 8 KiB
            [b"q" * 200000] + [b"a"] * 1200,                      # reply near 8 KiB
            [b"q" * 200000] + [b"a"] * 1600,
            [np.arange(50000, dtype=np.int64)] * 4 + [np.int64(7)],
            [b"w" * 196600] + [b""] * 1,
        ]
        for batch in batches:
            before = counters(fab)
            offsets = log.append_many(batch)
            payloads = [memoryview(b).tobytes() for b in batch]
            d = delta(counters(fab), before)
            assert d[1:3] == (len(batch), sum(map(len, payloads))), (d, len(batch))
            assert len(offsets) == len(batch)
            for off, p in zip(offsets, payloads):
                assert log.read(off, len(p)) == p
            expect += payloads
        assert len(scan_all(log, link)) == len(expect)
        assert list(log.records()) == expect
        for i in (0, 100, 150, len(expect) - 1):
            assert log.record(i) == expect[i]
        ns.destroy()


RACER = r"""
import struct, sys
import memfabric
from memfabric.errors import MemfabricError
ock, ns_name, tag = sys.argv[1], sys.argv[2], int(sys.argv[3])
with memfabric.init(ock) as s:
    try:
        log = s.namespace(ns_name, "k", pool="ram").plog("race")
    except MemfabricError as exc:       # (gone before this one started)
        print("END", type(exc).__name__, flush=True)
        sys.exit(0)
    seq = 0
    while True:
        try:
            if seq % 3 == 2:
                offs = [log.append(struct.pack("<II", tag, seq) * 7)]
                n = 1
            else:
                n = 40 + seq % 30
                offs = log.append_many([struct.pack("<III", tag, seq, i) * (900 + i) for i in range(n)])
        except MemfabricError as exc:
            print("END", type(exc).__name__, flush=True)
            break
        print(seq, n, " ".join(map(str, offs)), flush=True)
        seq += 1
"""


def _racers(fab, name, n):
    return [subprocess.Popen([sys.executable, "-c", RACER, fab.directory, name, str(t)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for t in range(n)]


def _acked(procs):
    acked = {}
    for tag, proc in enumerate(procs):
        out, err = proc.communicate(timeout=CHILD_WAIT_S * 4)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert lines and lines[-1].startswith("END"), lines[-3:]
        acked[tag] = [(int(x.split()[0]), int(x.split()[1]), [int(o) for o in x.split()[2:]]) for x in lines[:-1]]
    return acked, [p for p in procs]


def _expect(tag, seq, n):
    if n == 1 and seq % 3 == 2:
        return [struct.pack("<II", tag, seq) * 7]
    return [struct.pack("<III", tag, seq, i) * (900 + i) for i in range(n)]


@pytest.mark.parametrize("how", ["fill", "seal"])
def test_processes_racing_batches_and_singles_until_full_or_sealed(fab, request, how):
    """Four processes append batches and single records to one plog until it is full (each
    then gets OUT_OF_SPACE... and stops) or sealed: every acknowledged record is where its
    offset says, the log is exactly the acknowledged records (frames that check, nothing else),
    and the counters count each once."""
    name = ns_name(request) + how
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("race", 3 * MiB if how == "fill" else 30 * MiB)
        link = s.link(log.home)
        before = counters(fab)
        procs = _racers(fab, name, 4)
        if how == "seal":
            wait_until(lambda: log.info()["records"] > 2000, WAIT_S)
            log.seal()
        acked, _ = _acked(procs)
        d = delta(counters(fab), before)
        records = list(log.records())
        found = scan_all(log, link)
        assert len(found) == len(records)
        got = {}
        total = 0
        for tag, rows in acked.items():
            for seq, n, offs in rows:
                want = _expect(tag, seq, n)
                assert len(offs) == len(want)
                for off, payload in zip(offs, want):
                    assert log.read(off, len(payload)) == payload
                    got[off] = payload
                total += len(want)
        assert len(records) == total == len(got), (len(records), total)
        assert [p for _, p in sorted(got.items())] == records
        assert d[1] == total and d[2] == sum(map(len, records))
        ns.destroy()


BATCHER = r"""
import struct, sys
import memfabric
ock, ns_name = sys.argv[1], sys.argv[2]
with memfabric.init(ock) as s:
    log = s.namespace(ns_name, "k", pool="keep").plog("wal")
    for seq in range(1000000):
        batch = [struct.pack("<II", seq, i) * (500 + (seq + i) % 200) for i in range(50)]
        print("ack", seq, " ".join(map(str, log.append_many(batch))), flush=True)
"""


def test_sigkill_mid_batches_keeps_every_acknowledged_batch(request):
    """A ramdisk server SIGKILLed while a process appends compiled batches: after the restart
    every acknowledged batch is there, whole, at its offsets; what follows is whole records of
    the next batch, in order, and the log goes on."""
    server = PersistentServer("ramdisk").start()
    try:
        name = ns_name(request)
        with memfabric.init(server.config) as s:
            s.create_namespace(name, sec_id="k", pool="keep").create_plog("wal", 7 * MiB)
        proc = subprocess.Popen([sys.executable, "-c", BATCHER, server.config, name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        acked = acks_around_a_kill(server, proc, 12, lambda line: [int(x) for x in line.split()[2:]], WAIT_S)
        server.start()
        with memfabric.init(server.config) as s:
            log = s.namespace(name, "k", pool="keep").plog("wal")
            records = list(log.records())
            assert len(records) >= 50 * len(acked)
            at = 0
            for k, payload in enumerate(records):
                seq, i = divmod(k, 50)
                assert payload == struct.pack("<II", seq, i) * (500 + (seq + i) % 200)
                if seq < len(acked):
                    assert acked[seq][i] == at + rec.HEADER_BYTES
                at += rec.frame_bytes(len(payload))
            assert log.info()["length"] == at
            assert log.append(b"after") == at + rec.HEADER_BYTES
    finally:
        server.cleanup()


def test_ctrl_c_and_a_timeout_mid_batch_then_the_next_batch(fab, request):
    """The server stopped while granted batches wait: one interrupted (Ctrl-C), one timed out.
    Resumed, the server serves them in order (each from its own stage: the client asked for a
    new one, never writing one it gave up on), and the next batch gets its own reply: every
    record is the bytes its batch held, at the offsets the replies said."""
    with memfabric.init(fab.directory, timeout_s=30.0) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="ram")
        log = ns.create_plog("wal", 8 * MiB)
        log.append_many(BATCH)
        log.append_many(BATCH)
        pid = fab.server_pids()[log.home]

        def batch(tag: int) -> list[bytes]:
            return [bytes([tag, i]) * 1500 for i in range(100)]

        with stopped(pid):
            with interrupted_after(0.3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
                log.append_many(batch(1))
            with serving_until(time.monotonic() + 0.5), pytest.raises(memfabric.Timeout):
                log.append_many(batch(2))
        offsets = log.append_many(batch(3))
        offsets4 = log.append_many(batch(4))
        got = list(log.records())
        # (The timed-out one may not have been sent: its new stage was asked for behind the
        # interrupted batch. Whole or absent.)
        expected = BATCH * 2 + batch(1) + (batch(2) if len(got) == 600 else []) + batch(3) + batch(4)
        assert got == expected
        assert offsets == [log.read(0, 0) or o for o in offsets]
        for off, payload in zip(offsets + offsets4, batch(3) + batch(4)):
            assert log.read(off, len(payload)) == payload
        assert len(scan_all(log, s.link(log.home))) == len(expected)
        ns.destroy()


def test_one_session_mixing_puts_single_appends_batches_and_reads_from_threads(fab, request):
    """Threads of one session share its link: KV puts, single appends, staged batches (to two
    plogs) and record(i) reads at once, compiled calls and Python's interleaved on one
    connection. Every reply is its own request's: each acknowledged record is at its offset,
    every read record is the one appended there, every put reads back."""
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="ram")
        logs = [ns.create_plog("a", 12 * MiB), ns.create_plog("b", 12 * MiB)]
        kv = s.create_namespace(ns_name(request) + "kv", sec_id="k").kv()
        failures: list[BaseException] = []
        acked: dict[tuple[int, int], bytes] = {}
        lock = threading.Lock()

        def appender(t: int) -> None:
            log = logs[t % 2]
            try:
                for seq in range(40):
                    if t < 2:
                        body = struct.pack("<III", t, seq, 0) * (1 + seq % 50)
                        off = log.append(body)
                        with lock:
                            acked[(t % 2, off)] = body
                    elif seq < 20:
                        batch = [struct.pack("<III", t, seq, i) * (200 + i) for i in range(80)]
                        for off, body in zip(log.append_many(batch), batch):
                            with lock:
                                acked[(t % 2, off)] = body
            except BaseException as exc:        # noqa: BLE001 - reported below
                failures.append(exc)

        def putter() -> None:
            try:
                for i in range(300):
                    kv.put(f"k{i}", struct.pack("<I", i) * 10)
                    assert kv.get(f"k{i}") == struct.pack("<I", i) * 10
            except BaseException as exc:        # noqa: BLE001
                failures.append(exc)

        def reader() -> None:
            try:
                for _ in range(300):
                    for log in logs:
                        n = log.info()["records"]
                        if n:
                            log.record(n - 1)
                            log.record(n // 2)
            except BaseException as exc:        # noqa: BLE001
                failures.append(exc)

        threads = [threading.Thread(target=appender, args=(t,)) for t in range(4)]
        threads += [threading.Thread(target=putter), threading.Thread(target=reader)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT_S * 2)
            assert not th.is_alive()
        assert not failures, failures
        for k, log in enumerate(logs):
            mine = sorted((off, body) for (which, off), body in acked.items() if which == k)
            assert [b for _, b in mine] == list(log.records())
            for i, (off, body) in enumerate(mine):
                assert log.record(i) == body
        ns.destroy()


def raw_call(link, op: str, **args):
    """One request as given (its budget_s too: call() puts its own): the reply, errors in it."""
    args["op"] = op
    assert link._lock.acquire(timeout=WAIT_S)
    try:
        reply, fds = link._exchange(op, args, float(WAIT_S), None)
    finally:
        link._lock.release()
    assert not fds
    return reply


@pytest.mark.parametrize("pool", ["ram", "disk"])
@pytest.mark.parametrize("budget_s", [0, -1, 0.0, -0.5, float("nan")])
def test_a_budget_python_refuses_is_refused_by_the_loop_too(fab, request, budget_s, pool):
    """A request whose budget_s is not a positive number is INVALID_ARGUMENT in Python
    (deadline_for): nothing is appended. The receive loop's appends (single and staged batch)
    must not serve it instead."""
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool=pool)
        log = ns.create_plog("wal", 4 * MiB)
        log.append(b"grant")
        log.append_many(BATCH)
        link = s.link(log.home)
        token = _stage_holder(link).token
        length = log.info()["length"]
        replies = [raw_call(link, "plog_append", **log._wire, **args, budget_s=budget_s)
                   for args in ({"records": [b"one"]}, {"shared": token, "lengths": [4096] * 3})]
        assert [r.get("error") for r in replies] == [InvalidArgument.code] * 2, replies
        assert log.info()["length"] == length
        assert log.append(b"after") == length + rec.HEADER_BYTES
        ns.destroy()


@pytest.mark.parametrize("how", ["delete", "destroy"])
def test_processes_racing_batches_and_singles_until_deleted_or_destroyed(fab, request, how):
    """As above, the plog deleted (or its namespace destroyed) under the racers: each stops on
    NO_SUCH_OBJECT / NO_SUCH_NAMESPACE, and the counters count exactly the records that were
    acknowledged (none appended that no one was told of, none told of twice)."""
    name = ns_name(request) + how
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        log = ns.create_plog("race", 30 * MiB)
        before = counters(fab)
        procs = _racers(fab, name, 4)
        wait_until(lambda: log.info()["records"] > 2000, WAIT_S)
        if how == "delete":
            log.delete()
        else:
            ns.destroy()
        acked, _ = _acked(procs)
        d = delta(counters(fab), before)
        told = [p for tag, rows in acked.items() for seq, n, _ in rows for p in _expect(tag, seq, n)]
        total, size = len(told), sum(map(len, told))
        assert d[1:3] == (total, size)
        if how == "delete":
            ns.destroy()


class _Batcher(threading.Thread):
    """Appends batches (inline and staged) and single records until refused."""

    def __init__(self, log, tag: int) -> None:
        super().__init__(daemon=True)
        self.log, self.tag = log, tag
        self.acked: list[tuple[int, bytes]] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for seq in range(100000):
                if seq % 4 == 3:
                    body = struct.pack("<III", self.tag, seq, 0) * 5
                    self.acked.append((self.log.append(body), body))
                    continue
                batch = [struct.pack("<III", self.tag, seq, i) * (1 + (i * 7 + seq) % (40 if seq % 4 else 2000))
                         for i in range(30)]
                self.acked += list(zip(self.log.append_many(batch), batch))
        except MemfabricError as exc:
            self.error = exc


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_copy_sealed_under_batches_forwarded_to_compiled_copies(request, replicas):
    """Batches and single records from four sessions to a replicated ramdisk plog (each forward
    of many records taken by the copies' receive loops), a copy sealed by a client mid-stream:
    every appender is fenced (SEALED), every copy is sealed and holds exactly the acknowledged
    records, at their offsets, byte for byte the home's; the home's counts are exact."""
    fab, acked, home = seal_a_copy_under(_Batcher, request, "ramdisk", replicas, 12 * MiB, 300, metrics=True)
    try:
        got = scrape(_metrics(fab, home))
        assert value(got, "memfabric_plog_appends_total") == len(acked)
        assert value(got, "memfabric_plog_appended_bytes_total") == sum(map(len, acked.values()))
        assert value(got, "memfabric_plog_compiled_forwards_total") > 0
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_a_forked_child_scribbling_the_parents_stage_and_appending_itself(fab, request):
    """A child forked with the parent's stage mapped writes it all the time (it shares the
    memory) and appends batches of its own on its own link; the parent's batches go on: every
    frame in the log checks, the child's records are whole, and a restart-style scan finds
    exactly the records the two were told of."""
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k", pool="ram")
        log = ns.create_plog("wal", 30 * MiB)
        log.append_many(BATCH)
        link = s.link(log.home)
        view = _stage_holder(link).mapped.view
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                           # the child: never returns into pytest
            code = 1
            try:
                os.close(r)
                child_batch = [b"C" * 3000] * 80
                n = 0
                for k in range(2000):
                    view[:len(view)] = bytes([k % 251]) * len(view)
                    if k % 200 == 0:
                        log.append_many(child_batch)
                        n += len(child_batch)
                os.write(w, str(n).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        told = len(BATCH)
        for _ in range(20):
            told += len(log.append_many(BATCH))
        _, status = os.waitpid(pid, 0)
        child_told = int(os.read(r, 64) or b"0")
        os.close(r)
        assert os.waitstatus_to_exitcode(status) == 0
        records = list(log.records())
        assert len(scan_all(log, link)) == len(records) == told + child_told
        assert sum(p == b"C" * 3000 for p in records) == child_told
        ns.destroy()


SEND_FORWARD_THREADS = r"""
import sys, threading
sys.setswitchinterval(1e-6)
import msgpack
assert "fallback" in msgpack.Packer.__module__, msgpack.Packer.__module__
from memfabric.plog import fast_append


class Records:              # call_append's stand-in: the request as it would be sent
    def __init__(self):
        self.sent = {}

    def call_append(self, fd, request, data, timeout_s, request_id, buffer, poll_s):
        self.sent[threading.get_ident(), request_id] = request
        return (0, 0, 0.0)


class Link:
    def call_compiled(self, op, args, call):
        return call(3, bytearray(64), 0.0, threading.get_ident(), 1.0)


fast_append._records = fake = Records()
args = {"pool": "p", "ns": "n", "sec": b"k", "name": "wal", "plog_id": 7}
head = fast_append.forward_head(args)
bad = []


def run(base):
    for i in range(3000):
        at = base + i * 977
        fast_append.send_forward(Link(), head, len(args) + 1, args, at, b"x", True)
        request = fake.sent.pop((threading.get_ident(), threading.get_ident()))
        body = request + msgpack.packb(b"x") + msgpack.packb("budget_s") + msgpack.packb(1.0) \
            + msgpack.packb("id") + msgpack.packb(1)
        try:
            m = msgpack.unpackb(body)
        except Exception as exc:
            bad.append(repr(exc))
            return
        if m.get("at") != at or m.get("last") is not True or m.get("data") != b"x":
            bad.append((at, m.get("at")))
            return


threads = [threading.Thread(target=run, args=(k << 32,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("BAD", bad[:3])
sys.exit(1 if bad else 0)
"""


def test_forwards_sent_from_threads_at_once_each_carry_their_own_offset():
    """Flushers of different plogs forward at once, each from its own thread: every request
    send_forward builds must say its own `at`. Its msgpack Packer was one module-wide object,
    safe only while msgpack's C extension packs (msgpack's own Python packer, which it falls
    back to, writes a buffer the Packer keeps between calls; wire.py keeps one Packer per
    thread for that reason)."""
    env = {**os.environ, "MSGPACK_PUREPYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", SEND_FORWARD_THREADS], env=env, capture_output=True, text=True,
                          timeout=CHILD_WAIT_S * 4)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-1500:]

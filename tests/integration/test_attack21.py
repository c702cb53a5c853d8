"""Attack round 21 on appends answered in the connection's receive loop (_frames.c
serve_packets, _plogserve.c serve_append): several processes, each opening and closing sessions
(connections) over and over, append to a ramdisk or pmem plog, mixing single records (the
loop's), small batches (Python's) and MemKV puts (the loop's too) on one connection, while
another client seals a second plog under them. Every acknowledged record is there and whole
at its offset, nothing is appended after the seal, and the server's plog counters count
exactly what was acknowledged, connections gone or not."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import memfabric
from memfabric.plog import record as rec

from ..helpers import CHILD_WAIT_S, ns_name, wait_until
from .test_metrics import scrape, value
from .test_plog_compiled import MiB, plog_fabric


@pytest.fixture(scope="module")
def fab():
    fabric = plog_fabric("mf-atk21-")
    yield fabric
    assert fabric.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fabric.output[-30:])


CHURNING_APPENDER = r"""
import struct, sys
import memfabric
from memfabric.errors import Sealed
ock, name, pool, tag = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sealed = False
for session in range(4):
    with memfabric.init(ock) as s:                  # a new connection each time
        ns = s.namespace(name, "k", pool=pool)
        steady, victim, kv = ns.plog("steady"), ns.plog("victim"), s.namespace(name + "-kv", "k").kv()
        for i in range(40):
            payload = struct.pack("<III", tag, session, i) * (1 + (i * 7 + tag) % 90)
            log = victim if i % 2 and not sealed else steady
            try:
                if i % 10 == 9:
                    batch = [payload, payload[:5], b""]
                    for offset, p in zip(log.append_many(batch), batch):
                        print("ack", log.name, offset, p.hex(), flush=True)
                else:
                    print("ack", log.name, log.append(payload), payload.hex(), flush=True)
            except Sealed:
                assert log is victim
                sealed = True
                print("sealed", flush=True)
            if i % 4 == 0:
                kv.put(b"%d-%d-%d" % (tag, session, i), payload[:40])
        # Done before the seal came: on appending to the victim (a bounded spin) until it comes.
        for i in range(0 if sealed or session < 3 else 50_000):
            payload = struct.pack("<III", tag, 9, i)
            try:
                print("ack victim", victim.append(payload), payload.hex(), flush=True)
            except Sealed:
                sealed = True
                print("sealed", flush=True)
                break
"""


@pytest.mark.parametrize("pool", ["ram", "disk"])
def test_churning_connections_and_a_seal_under_loop_served_appends(fab, pool, request):
    name = ns_name(request)
    writers = 3
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool=pool)
        s.create_namespace(name + "-kv", sec_id="k")
        steady, victim = ns.create_plog("steady", 4 * MiB), ns.create_plog("victim", 4 * MiB)
        before = scrape(fab.metrics)
        procs = [subprocess.Popen([sys.executable, "-c", CHURNING_APPENDER, fab.directory, name, pool, str(t)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for t in range(writers)]
        lines: list[list[str]] = [[] for _ in procs]

        def read(proc, into) -> None:
            for line in proc.stdout:
                into.append(line.split())
        readers = [threading.Thread(target=read, args=(p, out)) for p, out in zip(procs, lines)]
        for t in readers:
            t.start()
        try:
            # The seal comes once each writer has appended to the victim a while.
            wait_until(lambda: all(sum(1 for x in out if x[:2] == ["ack", "victim"]) >= 10 for out in lines),
                       "the writers' first appends", CHILD_WAIT_S * 2)
            victim.seal()
            sealed_length = victim.info()["length"]
            for p in procs:
                assert p.wait(CHILD_WAIT_S * 4) == 0, p.stderr.read()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(CHILD_WAIT_S)
            for t in readers:
                t.join(CHILD_WAIT_S)
        after = scrape(fab.metrics)
        acked = [x for out in lines for x in out if x[0] == "ack"]
        assert all(any(x == ["sealed"] for x in out) for out in lines)
        for log in (steady, victim):
            mine = sorted((int(x[2]), bytes.fromhex(x[3]) if len(x) > 3 else b"") for x in acked if x[1] == log.name)
            # Every acknowledged record whole at its offset, and nothing else in the log.
            assert [log.read(o, len(p)) for o, p in mine] == [p for _, p in mine]
            assert list(log.records()) == [p for _, p in mine]
            at = mine[-1][0] + rec.frame_bytes(len(mine[-1][1])) - rec.HEADER_BYTES
            assert log.info()["length"] == at
        assert victim.info()["length"] == sealed_length and victim.info()["state"] == "sealed"
        payload_bytes = sum(len(x[3]) // 2 if len(x) > 3 else 0 for x in acked)
        assert value(after, "memfabric_plog_appends_total") - value(before, "memfabric_plog_appends_total") \
            == len(acked)
        assert value(after, "memfabric_plog_appended_bytes_total") - value(
            before, "memfabric_plog_appended_bytes_total") == payload_bytes
        # Most were the loop's (each connection's first append of each plog is Python's, which
        # grants the rest; batches are Python's).
        served = value(after, "memfabric_plog_compiled_appends_total") - value(
            before, "memfabric_plog_compiled_appends_total")
        assert len(acked) / 2 < served < len(acked)

"""Attacks on a same-host copy's pull of a forward from its home's segment files
(PlogService._forward_by_pull, op_plog_replica_append with `source`, _pull)."""

from __future__ import annotations

import os
import threading
import time

import pytest

import memfabric
from memfabric.datapath.connect import connect_to
from memfabric.errors import InvalidArgument

from ..helpers import ns_name
from .test_metrics import scrape, value
from .test_plog_replicas import WAIT_S, MiB, _copy, _fabric, _metrics

# In a server: PlogService._pull waits MF_TEST_PULL_DELAY_S before reading (so that two
# servers' copies are both in a pull at once).
_DELAY_PULL = r"""
import os, time
_delay = os.environ.get("MF_TEST_PULL_DELAY_S")
if _delay:
    from memfabric.plog import service as _service
    _real = _service.PlogService._pull

    def _delayed(self, plog, m, source):
        time.sleep(float(_delay))
        return _real(self, plog, m, source)

    _service.PlogService._pull = _delayed
"""


def test_two_homes_each_the_other_s_copy_pull_at_once_without_waiting_on_each_other(tmp_path, monkeypatch,
                                                                                   request):
    """Server 1 homes plog a with its copy on server 2, server 2 homes plog b with its copy on
    server 1, and both append a record past one piece at once. Each home forwards over its
    link to the other and waits for the answer; each copy, to pull, needs the fds of its home's
    segments the first time, asked over its own server's link to the home: the link its own
    home's forward holds, waiting for the other copy, which waits the same way. Before the fix
    both appends stalled until the link's wait gave up (2.8 s; about one in three such pairs
    of appends without the delay here), and each home then sent that copy pieces for good."""
    (tmp_path / "sitecustomize.py").write_text(_DELAY_PULL)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MF_TEST_PULL_DELAY_S", "0.3")
    fab = _fabric(2, metrics=True)
    try:
        with memfabric.init(fab.directory, server=0) as s1, memfabric.init(fab.directory, server=1) as s2:
            name = ns_name(request)
            a = s1.create_namespace(name, sec_id="k", pool="logs").create_plog("a", 4 * MiB, replicas=2)
            b = s2.namespace(name, sec_id="k", pool="logs").create_plog("b", 4 * MiB, replicas=2)
            assert (a.info()["home"], a.info()["replica_servers"]) == (1, [2])
            assert (b.info()["home"], b.info()["replica_servers"]) == (2, [1])
            record = os.urandom(300 << 10)          # past one piece (240 KiB): pulled
            took: dict[str, float] = {}
            barrier = threading.Barrier(2)

            def append(log, key):
                barrier.wait(WAIT_S)
                started = time.monotonic()
                log.append(record)
                took[key] = time.monotonic() - started

            threads = [threading.Thread(target=append, args=(log, key), daemon=True) for log, key in ((a, "a"), (b, "b"))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            assert set(took) == {"a", "b"}
            assert max(took.values()) < 1.5, f"the appends waited on each other's pulls: {took}"
            # Each copy still pulls: one message per further such append, not pieces.
            for log, server_id in ((a, 1), (b, 2)):
                before = scrape(_metrics(fab, server_id))
                log.append(record)
                after = scrape(_metrics(fab, server_id))
                sent = value(after, "memfabric_plog_forwards_total") - value(before, "memfabric_plog_forwards_total")
                assert sent == 1, f"plog {log.name}: {sent} messages for one record pulled"
            for log, other in ((a, 2), (b, 1)):
                assert log.info()["dead_replicas"] == []
                assert list(_copy(log, other).records()) == [record, record]
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_a_source_past_the_largest_file_offset_is_refused_not_an_internal_error(request):
    """A peer's source may name an offset up to 2**64 - 1 (the wire carries it); the copy read
    it with os.preadv, which takes an off_t: an offset of 2**63 or more raised OverflowError,
    answered INTERNAL_ERROR. It is a malformed source (INVALID_ARGUMENT), and nothing of it is
    kept."""
    fab = _fabric(2)
    try:
        with memfabric.init(os.path.join(fab.directory, "remote.toml")) as s:
            ns = s.create_namespace(ns_name(request), sec_id="k", pool="logs")
            log = ns.create_plog("wal", MiB, replicas=2)
            log.append(b"one")
            (server_id,) = log.info()["replica_servers"]
            (segment, _, _), *_ = log._call("plog_info", layout=True)["extents"]
            where = next(x for x in s.servers() if x["server_id"] == server_id)
            peer = connect_to(server_id, where["host"], "", where["rpc_address"], local_host=None,
                              token=s._token, tls=None, timeout_s=10, role="peer")
            try:
                args = {**ns.wire_creds, "name": "wal", "plog_id": log.plog_id}
                end = log.info()["length"]
                for offset in (1 << 63, (1 << 64) - 1):
                    with pytest.raises(InvalidArgument, match="source must be"):
                        peer.call("plog_replica_append", **args, at=end, source=[[segment, offset, 16]], last=True)
            finally:
                peer.close()
            log.append(b"two")
            assert log.info()["dead_replicas"] == []
            assert list(_copy(log, server_id).records()) == [b"one", b"two"]
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])

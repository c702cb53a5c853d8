"""A keyspace's index growing on a real server (kv/index.py, kv/store.py): same-host readers
keep finding every key while tables drain into larger ones, scans miss none, and the index's
lease is CLOCK_MONOTONIC."""

from __future__ import annotations

import time

import memfabric
from memfabric.kv import index as ix
from memfabric.kv.client import _MISS
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import ns_name

VALUE = b"0123456789abcdef"


def _local_index(kv, session, key=b"k"):
    server_id = kv._homes(key)[0]          # on this host: every server of the fabrics here is
    link = session.link(server_id)
    return link, kv._index(link)


def test_readers_find_every_key_while_the_index_grows_and_drains(request):
    """Keys written in rounds on one server, from 0 to 40,000 (tables of 1,024 slots to 131,072):
    after each round every key is read lock-free (the compiled batch and the Python path) and
    scanned; the client met tables draining into others and read through them."""
    fab = LocalFabric(short_tmp_dir("mf-grow-"), servers=1, capacity="256MiB", segment_size="4MiB",
                      liveness_timeout_s=2.0).start()
    try:
        with memfabric.init(fab.directory) as session:
            kv = session.create_namespace(ns_name(request), sec_id="s").kv()
            model: dict[bytes, bytes] = {}
            generations, drained_reads, made = set(), 0, 0
            for round_keys in (300, 300, 600, 1200, 2400, 4800, 10_000, 20_400):
                fresh = [b"g:%d" % (made + i) for i in range(round_keys)]
                made += round_keys
                kv.put_many({k: VALUE for k in fresh})
                model.update({k: VALUE for k in fresh})
                keys = list(model)
                gone, over = keys[len(keys) // 3], keys[len(keys) // 2]      # deletes and overwrites
                assert kv.delete(gone)                                      # mixed with growth
                del model[gone]
                kv.put(over, b"over")
                model[over] = b"over"
                link, idx = _local_index(kv, session)
                generations.add(idx.words[ix.H_GENERATION])
                drained_reads += idx.old is not None
                got = kv.get_many(list(model))
                assert [k for k, v in zip(model, got) if v != model[k]] == []
                for key in list(model)[::97] + [over]:
                    assert kv._local_get_python(link, key, None) == model[key]
                assert kv._local_get_python(link, gone, None) is _MISS
                assert set(kv.scan(b"g:")) == set(model)
            assert len(generations) >= 5, generations
            assert drained_reads >= 1, "no read met a draining table: the test tested nothing new"
            assert kv.stats()["keys"] == len(model)
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def test_the_index_lease_is_clock_monotonic(fabric, request):
    """The lease a server writes in its index (H_LEASE) is CLOCK_MONOTONIC ms, ahead of this
    process's time.monotonic() by at most the trusted share of the liveness timeout: the clock
    every process of the host shares, and that no setting of the wall clock moves."""
    with memfabric.init(fabric.directory, server=0) as session:
        kv = session.create_namespace(ns_name(request), sec_id="s").kv()
        kv.put(b"k", b"v")
        _, idx = _local_index(kv, session)
        lease = idx.words[ix.H_LEASE]
        now = time.monotonic() * 1000
        assert now < lease <= now + 2.0 * 1000          # liveness_timeout_s of the fixture
        assert abs(lease - time.time() * 1000) > 3600_000   # not the wall clock

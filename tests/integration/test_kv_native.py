"""The compiled same-host lookup (src/memfabric/_native.c) against the Python one it stands in
for: ./dev builds it, and both give the same answers for the same keys."""

from __future__ import annotations

import time

import numpy as np
import pytest

import memfabric
from memfabric.errors import InvalidArgument
from memfabric.kv import client as kv_client
from memfabric.kv import index as ix
from memfabric.kv.rules import key_hash
from memfabric.launcher import LocalFabric
from memfabric.limits import KV_INLINE_BYTES

from ..conftest import short_tmp_dir


def test_dev_builds_the_compiled_part():
    from memfabric import _native       # ./dev installs with it; a machine with gcc must have it

    assert _native.ASK < 0 and _native.TOO_SMALL < 0 and _native.AWAY < 0
    assert len({_native.ASK, _native.TOO_SMALL, _native.AWAY}) == 3
    assert kv_client._native is _native


class _Segment:
    def __init__(self, data: bytearray) -> None:
        self.view = memoryview(data)


def test_a_table_whose_lease_ran_out_is_not_read():
    """The compiled lookup read a table whatever its lease (index.py's H_LEASE): a server
    stopped past its liveness timeout had its old values read by same-host clients."""
    from memfabric import _native

    slots = ix.MIN_SLOTS
    words = memoryview(bytearray(ix.words_for(slots) * 8)).cast("Q")
    writer = ix.IndexWriter(words, slots, generation=1)
    key, value = b"a key", b"its value"
    record = bytearray(4096)
    record[64:64 + len(key) + len(value)] = key + value
    h = key_hash(key)
    writer.write(writer.place(h, lambda slot: False)[0], h, (3, 64, len(key), len(value), 0, 0, 1), new=True)
    refs, segments = bytearray(slots), {("p", 3): _Segment(record)}

    def probe(k: bytes, into=None):
        return _native.probe(words.cast("B"), refs, key_hash(k), "p", segments, k, into)

    def probe_many(ks: list[bytes]):
        return _native.probe_many(words.cast("B"), refs, [key_hash(k) for k in ks], ks, "p", segments, None)

    now_ms = time.monotonic_ns() // 1_000_000         # leases are CLOCK_MONOTONIC ms (index.py)
    writer.set_lease(now_ms + 60_000)
    assert probe(key) == value and probe(b"another") is None
    assert probe_many([key, b"another"]) == [value, None]
    for lease in (now_ms - 1, 0):
        writer.set_lease(lease)
        assert probe(key) == probe(b"another") == probe(key, bytearray(64)) == _native.AWAY
        assert probe_many([key, b"another"]) == [_native.AWAY, _native.AWAY]


def test_a_lease_is_read_against_clock_monotonic_not_the_wall_clock():
    """A lease was wall-clock ms: setting the clock back a minute made readers trust a table
    a minute past its lease, and forward, distrust a live one. Now it is CLOCK_MONOTONIC, which
    the processes of a host share: a lease in the wall clock's future but the monotonic
    clock's past is out, one in the monotonic clock's future is trusted, whatever the wall
    clock says."""
    from memfabric import _native

    slots = ix.MIN_SLOTS
    words = memoryview(bytearray(ix.words_for(slots) * 8)).cast("Q")
    writer = ix.IndexWriter(words, slots, generation=1)
    refs = bytearray(slots)
    wall_ms, mono_ms = time.time_ns() // 1_000_000, time.monotonic_ns() // 1_000_000
    assert wall_ms - mono_ms > 120_000          # the clocks differ (boot was long after 1970)
    writer.set_lease(wall_ms - 60_000)          # a minute ago by the wall clock, long after now by CLOCK_MONOTONIC
    assert _native.probe(words.cast("B"), refs, key_hash(b"k"), "p", {}, b"k", None) is None
    writer.set_lease(mono_ms - 1)               # just past by CLOCK_MONOTONIC (1970 by the wall clock)
    assert _native.probe(words.cast("B"), refs, key_hash(b"k"), "p", {}, b"k", None) == _native.AWAY


def _values() -> dict[bytes, bytes]:
    rng = np.random.default_rng(7)
    sizes = [0, 1, 7, 4096, 60_000, KV_INLINE_BYTES - 1, KV_INLINE_BYTES + 1, 300_000, 3 << 20]
    out = {}
    for i in range(400):
        size = sizes[i % len(sizes)] if i < 60 else int(rng.integers(0, 9000))
        out[f"key-{i}".encode() * (1 + i % 5)] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return out


@pytest.fixture(scope="module")
def filled():
    fab = LocalFabric(short_tmp_dir("mf-native-"), servers=1, capacity="256MiB", segment_size="4MiB").start()
    try:
        with memfabric.init(fab.directory) as s:
            ns = s.create_namespace("n", sec_id="n-secret")
            kv = ns.kv()
            values = _values()
            kv.put_many(values)
            kv.put("gone-soon", b"x" * 100, ttl_s=0.05)
            for k in list(values)[::7]:
                kv.delete(k)
                del values[k]
            time.sleep(0.1)
            yield kv, values
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])


def _both(monkeypatch, run):
    native = run()
    with monkeypatch.context() as m:
        m.setattr(kv_client, "_native", None)
        python = run()
    return native, python


def test_get_and_get_many_agree_with_the_python_lookup(filled, monkeypatch):
    kv, values = filled
    keys = list(values) + [b"never-put", b"gone-soon", b"key-7key-7x"]
    native, python = _both(monkeypatch, lambda: ([kv.get(k) for k in keys], kv.get_many(keys)))
    assert native == python
    assert native[0] == native[1] == [values.get(k) for k in keys]


def test_get_into_agrees_with_the_python_lookup(filled, monkeypatch):
    kv, values = filled
    keys = list(values)[:80] + [b"never-put"]

    def run():
        bufs = [bytearray(4 << 20) for _ in keys]
        one = [kv.get_into(k, b) for k, b in zip(keys, bufs)]
        many_bufs = [bytearray(4 << 20) for _ in keys]
        many = kv.get_many_into(keys, many_bufs)
        return one, many, [bytes(b[:n or 0]) for b, n in zip(bufs, one)], \
            [bytes(b[:n or 0]) for b, n in zip(many_bufs, many)]

    native, python = _both(monkeypatch, run)
    assert native == python
    assert native[2] == [values.get(k, b"") for k in keys]


def test_a_buffer_too_small_is_refused_untouched_either_way(filled, monkeypatch):
    kv, values = filled
    key = next(k for k, v in values.items() if 10 < len(v) < KV_INLINE_BYTES)

    def run():
        buf = bytearray(b"\x55" * (len(values[key]) - 1))
        with pytest.raises(InvalidArgument):
            kv.get_into(key, buf)
        return bytes(buf)

    native, python = _both(monkeypatch, run)
    assert native == python == b"\x55" * (len(values[key]) - 1)

"""wire.encode's per-thread msgpack Packer: threads encoding at once, and a message that
fails part way (a value msgpack cannot encode), never leave bytes in the next message."""

from __future__ import annotations

import threading

import msgpack
import pytest

from memfabric.transport import wire

WAIT_S = 10.0


def test_threads_encoding_at_once_each_get_their_own_message():
    bad: list[str] = []

    def encode_many(t: int) -> None:
        for i in range(2000):
            message = {"id": i, "op": f"t{t}", "data": bytes([t]) * (i % 300)}
            if i % 50 == 0:
                with pytest.raises((TypeError, OverflowError, ValueError)):
                    wire.encode({"id": i, "ok": b"x" * 100, "bad": object() if t % 2 else 2 ** 70})
            data = wire.encode(message)
            if data != msgpack.packb(message, use_bin_type=True) or wire.decode(data) != message:
                bad.append(f"thread {t} message {i}")
    threads = [threading.Thread(target=encode_many, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert not bad, bad[:5]


def test_a_message_that_fails_part_way_leaves_nothing_for_the_next():
    for unencodable in (object(), 2 ** 70, {1j: 1}):
        with pytest.raises((TypeError, OverflowError, ValueError)):
            wire.encode({"id": 1, "first": b"y" * 1000, "then": unencodable})
        assert wire.encode({"id": 2}) == msgpack.packb({"id": 2}, use_bin_type=True)

"""Found by attacking the door: one small MGET naming a large value many times made the
server hold every copy of it (and two more while it encoded the reply)."""

from __future__ import annotations

import redis

from memfabric.limits import RESP_MGET_REPLY_MAX_BYTES


def test_an_mget_answering_more_than_its_bound_is_refused_before_it_copies(door_port):
    """Before the fix: MGET of an 8 MiB key 65 times (a 600-byte request) answered 520 MiB,
    the server's resident memory growing by three times that; 4,096 times would be 32 GiB."""
    client = redis.Redis(port=door_port, socket_timeout=60)
    try:
        value = b"v" * (8 << 20)
        client.set("attack3:big", value)
        times = RESP_MGET_REPLY_MAX_BYTES // len(value) + 1
        try:
            client.mget(["attack3:big"] * times)
        except redis.ResponseError as exc:
            assert "LIMIT_EXCEEDED" in str(exc) and "MGET" in str(exc)
        else:
            raise AssertionError("an MGET past the bound was answered")
        # Under the bound it answers, the same value as often as asked; the connection goes on.
        assert client.mget(["attack3:big", "attack3:none", "attack3:big"]) == [value, None, value]
        assert client.ping()
    finally:
        client.delete("attack3:big")
        client.close()

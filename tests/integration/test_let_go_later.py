"""A let-go that cannot be sent in time (its link busy with another thread's request past the
link's timeout) still reaches the server, with the link's next request: else the record it
held stayed held (and its memory taken) for as long as the link lived, forever for a server's
link to a peer. Real server, real link; the link is kept busy by holding its lock."""

from __future__ import annotations

import threading

import memfabric
from memfabric.kv.transfer import read_held
from memfabric.limits import KV_INLINE_BYTES

from ..helpers import ns_name, wait_until


def test_a_let_go_that_timed_out_is_sent_with_the_next_request(fresh_fabric, request):
    fab = fresh_fabric(servers=1)
    with memfabric.init(fab.directory, server=0, timeout_s=0.5) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        value = b"v" * (KV_INLINE_BYTES + 4096)          # handed back as a hold, not inline
        kv.put(b"big", value)
        link = s.link(1)
        reply = link.call("kv_get", **kv._wire, key=b"big")
        assert "hold" in reply
        into = memoryview(bytearray(len(value)))
        busy, release = threading.Event(), threading.Event()

        def keep_busy() -> None:             # another thread's request, as far as the link knows
            with link._lock:
                busy.set()
                release.wait(10)
        t = threading.Thread(target=keep_busy)
        t.start()
        try:
            busy.wait(10)
            read_held(link, kv._creds, reply, into)      # its let-go times out: the link is busy
        finally:
            release.set()
            t.join(10)
        assert bytes(into) == value
        kv.delete(b"big")                    # the next request: the let-go goes with it
        wait_until(lambda: kv.stats()["bytes"] == 0, "the held record to be let go and freed")

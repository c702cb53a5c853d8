"""MGET's reply is sent as its values are fetched, every byte it holds taken from the door's
reply budget (server.resp_reply_budget): many clients' large MGETs at once never make the
server hold more than the budget, and each client gets its whole reply, byte for byte as
Redis's, or an error."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading

import pytest
import redis

from memfabric.config import ConfigError, load_server_config

from memfabric.kv.rules import homes
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, free_ports, stop_process, wait_until
from .one_door import one_door
from .wire import READ_S, Raw, encode

MiB = 1 << 20
BUDGET = 24 * MiB
SLACK = 48 * MiB          # the server's own churn besides the values: threads, buffers, allocator
VALUES = 40               # of 1 MiB each: one MGET of them all is 40 MiB, more than the budget
CLIENTS = 6
ROUNDS = 2


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) * 1024
    return out


class PeakResident:
    """The process's peak resident memory from now on: the kernel's own high-water mark, reset
    (clear_refs 5); where that cannot be reset, VmRSS sampled until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stop = threading.Event()
        self.sampled = 0
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.sampler = None
        except OSError:
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        self.start = _status(pid)["VmRSS"]

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.sampled = max(self.sampled, _status(self.pid)["VmRSS"])

    def growth(self) -> int:
        if self.sampler is None:
            return _status(self.pid)["VmHWM"] - self.start
        self.stop.set()
        self.sampler.join(WAIT_S)
        return self.sampled - self.start


def test_concurrent_large_mgets_hold_no_more_than_the_budget():
    """Before: each 40 MiB MGET held its values about three times over while it built its
    reply, and six at once grew the server by hundreds of MiB past any bound."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="96MiB", resp_reply_budget="24MiB") as door:
        setup = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
        keys = [f"big:{i}" for i in range(VALUES)]
        values = {k: bytes([65 + i % 26]) * MiB for i, k in enumerate(keys)}
        for k, v in values.items():
            setup.set(k, v)
        asked = keys + ["big:none"] + keys[:3]              # a missing key, and keys named twice
        expected = [values[k] for k in keys] + [None] + [values[k] for k in keys[:3]]
        outcomes: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            r = redis.Redis(port=door.port, socket_timeout=READ_S * 6)
            for _ in range(ROUNDS):
                try:
                    got = r.mget(asked)
                    outcome = "whole" if got == expected else "WRONG"
                except redis.ResponseError as exc:
                    outcome = f"error {exc}"
                except redis.ConnectionError as exc:       # cut half-way: the connection closed
                    outcome = f"closed {exc}"
                with lock:
                    outcomes.append(outcome)
            r.close()

        peak = PeakResident(door.pid)
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 12)
            assert not t.is_alive(), "an MGET client hung"
        growth = peak.growth()
        assert len(outcomes) == CLIENTS * ROUNDS and "WRONG" not in outcomes, outcomes
        assert outcomes.count("whole") >= 1, outcomes
        assert growth <= BUDGET + SLACK, f"the server grew by {growth / MiB:.0f} MiB during the MGETs " \
                                         f"(budget {BUDGET / MiB:.0f} MiB + {SLACK / MiB:.0f} MiB slack): {outcomes}"
        assert setup.mget(asked) == expected and setup.ping()     # the server is up and answers whole
        memory = setup.info("memory")
        assert memory["mem_clients_normal"] == 0, memory                 # every reply gave its bytes back
        assert 0 < memory["reply_budget_peak"] <= BUDGET, memory
        setup.close()


def test_a_streamed_mget_is_byte_for_byte_redis(redis_server, door_port):
    """Values of every size (none, empty, small, past a batch's inline room, past a batch's
    payload) on both servers, keys named twice and missing, pipelined between other commands,
    in RESP2 and RESP3: the door's bytes are Redis's."""
    rng = random.Random(7)
    sizes = [0, 1, 100, 300 << 10, 9 * MiB] + [rng.randrange(0, 40 << 10) for _ in range(200)]
    keys = [f"s:{i}".encode() for i in range(len(sizes))]
    values = [rng.randbytes(n) if n < MiB else b"z" * n for n in sizes]
    for port in (redis_server.port, door_port):
        setup = Raw(port)
        setup.send(encode("FLUSHALL") + b"".join(encode("SET", k, v) for k, v in zip(keys, values)))
        assert setup.reply() == b"+OK\r\n"
        for _ in keys:
            assert setup.reply() == b"+OK\r\n"
        setup.close()
    asked = keys + [b"s:none", keys[4], keys[3]] + keys[::-7]
    requests = [encode("SET", "before", "1"), encode("MGET", *asked), encode("GET", "before"),
                encode("MGET", keys[0], b"s:none"), encode("HELLO", "3"), encode("MGET", *asked),
                encode("MGET", b"s:none")]
    answers = []
    for port in (redis_server.port, door_port):
        raw = Raw(port)
        raw.send(b"".join(requests))
        got = [raw.reply() for _ in requests]
        raw.close()
        answers.append(got[:4] + got[5:])       # HELLO's reply names the server: not compared
    assert answers[0] == answers[1]


def test_readers_that_stall_hold_only_the_budget_and_others_hear_so():
    """Clients that ask for large MGETs and read nothing hold at most the budget between them
    (the rest of their replies is not fetched); another client's MGET is refused with an error
    after a bounded wait, not held up for ever; once they go, their bytes are back and it is
    served whole."""
    with one_door("127.0.0.1", "127.0.0.1", capacity="96MiB", resp_reply_budget="24MiB") as door:
        r = redis.Redis(port=door.port, socket_timeout=READ_S * 3)
        keys = [f"big:{i}" for i in range(VALUES)]
        for k in keys:
            r.set(k, b"v" * MiB)
        r.set("small", b"s" * 100)
        stalled = []
        for _ in range(BUDGET // (8 * MiB)):       # each holds one batch of values being sent
            raw = Raw(door.port)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.send(encode("MGET", *keys))
            stalled.append(raw)
        wait_until(lambda: r.info("memory")["mem_clients_normal"] == BUDGET, "the stalled replies to hold the budget")
        try:
            r.mget(keys)
            raise AssertionError("an MGET was answered with the whole budget held by others")
        except redis.ResponseError as exc:
            assert "LIMIT_EXCEEDED" in str(exc) and "resp_reply_budget" in str(exc), exc
        # Small values are served meanwhile (a large one's reply takes budget too: held.py).
        assert r.get("small") == b"s" * 100 and r.ping()
        for raw in stalled:
            raw.close()
        wait_until(lambda: r.info("memory")["mem_clients_normal"] == 0, "the stalled replies to give back their bytes")
        assert r.mget(keys) == [b"v" * MiB] * VALUES
        r.close()


def test_a_budget_too_small_for_two_batches_is_refused_in_one_line(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}/d"\nresp_listen = "127.0.0.1:0"\nresp_reply_budget = "1MiB"\n'
                      f'[cluster]\nbackend = "embedded"\npath = "{tmp_path}/c.db"\n'
                      '[[pool]]\nname = "default"\nmedium = "dram"\ncapacity = "8MiB"\n')
    with pytest.raises(ConfigError, match=r"resp_reply_budget: must be at least 16777216 bytes .* got 1048576"):
        load_server_config(str(config))


def test_a_server_stopping_half_way_through_a_streamed_mget_closes_that_connection_only(fresh_fabric):
    """SIGSTOP the server without the door: an MGET whose first values (on the door's server)
    are sent before it reaches a key of the stopped one is cut (the connection closes: a reply
    half sent cannot become an error), its bytes go back, and the door serves on. An MGET that
    meets the stopped server before it sends anything gets the error instead."""
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-resp-cut-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=30.0, extra_args=["--resp-port", str(port)]).start()
    pid = fab.server_pids()[2]
    try:
        ours = [k for k in (f"cut:{i}" for i in range(200)) if homes(k.encode(), [1, 2], 1) == [1]][:8]
        theirs = next(k for k in (f"cut:t{i}" for i in range(200)) if homes(k.encode(), [1, 2], 1) == [2])
        r = redis.Redis(port=port, socket_timeout=READ_S * 3)
        for k in ours + [theirs]:
            r.set(k, b"o" * (256 << 10))
        stop_process(pid)
        cut = Raw(port)
        cut.sock.settimeout(READ_S * 3)
        cut.send(encode("MGET", *ours, theirs))
        said, closed = cut.until_closed()
        assert closed and said.startswith(b"*9\r\n$262144\r\n") and len(said) < 9 * (256 << 10), len(said)
        cut.close()
        with pytest.raises(redis.ResponseError, match="TIMEOUT"):
            r.mget([theirs] + ours)
        assert r.mget(ours) == [b"o" * (256 << 10)] * len(ours)
        assert r.info("memory")["mem_clients_normal"] == 0
    finally:
        os.kill(pid, signal.SIGCONT)
        fab.stop()

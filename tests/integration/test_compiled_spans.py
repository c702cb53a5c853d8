"""Remote span reads and writes served and called in compiled code (_spans.c, span_grants.py),
with real servers and real sockets: that they are, that they give exactly what the Python path
gives, and attacks on them (a free, a destroy and an expand racing transfers, threads sharing a
session, garbage frames on a granted connection, a client killed mid-payload, a stopped server).

Every wait is bounded; no test asserts how fast anything was.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric.transport import rpc, wire

from ..helpers import CHILD_WAIT_S, MiB, WAIT_S, alloc_when_possible, ns_name, random_bytes, stop_process, wait_until
from .test_rpc_review import (closed_by_peer, raw_client, recv_exactly, recv_frame_header, remote, remote_config,
                              rpc_address, send_frame, send_head, server_unread_bytes, span_request,
                              take_what_the_pool_gives, unique)

KiB = 1 << 10


def compiled_served(session: memfabric.Session, server_id: int) -> int:
    """Span reads and writes the server served in compiled code so far."""
    return session.link(server_id).call("stats")["compiled_spans"]


def audit_is_clean(session: memfabric.Session, server_id: int, pool: str = "default") -> bool:
    """Every byte the server's allocator counts as live is accounted for, none waits on a transfer."""
    report = session.link(server_id).call("audit")["pools"][pool]
    return report["live_bytes"] == report["accounted_bytes"] and not any(
        row["deferred_bytes"] for row in report["namespaces"])


def reply(sock: socket.socket) -> tuple[dict, bytes]:
    header, n = recv_frame_header(sock)
    return header, recv_exactly(sock, n)


def test_remote_reads_and_writes_are_served_in_compiled_code(fabric, request):
    """After its first request for an object, a connection's span reads and writes of it are
    served without Python on the server, and a lone caller's go without Python's request
    machinery on the client; every byte as written."""
    with remote(fabric) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        home = s.local.server_id
        bm = ns.alloc(256 * KiB, Affinity("server", home))
        link = s.link(home)
        served_before, called_before = compiled_served(s, home), link.compiled_spans
        data = random_bytes(bm.size, seed=3)
        out = np.empty(64 * KiB, dtype=np.uint8)
        for i in range(50):
            at = (i * 4096) % (bm.size - 64 * KiB)
            bm.write(data[at:at + 64 * KiB], at)
            bm.read(at, into=out)
            assert np.array_equal(out, data[at:at + 64 * KiB])
        assert link.compiled_spans - called_before == 100
        # The first write and the first read of the connection passed Python's checks, and
        # granted the object to the connection: the rest did not need Python.
        assert compiled_served(s, home) - served_before >= 98
        ns.destroy()


def test_an_expanded_object_is_granted_its_new_extents(fabric, request):
    with remote(fabric) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        home = s.local.server_id
        bm = ns.alloc(4 * KiB, Affinity("server", home))
        bm.write(b"a" * 4096)
        assert bm.read(0, 4096) == b"a" * 4096
        bm.expand(3 * MiB)            # past its extent: new extents, which the grant does not cover
        tail = random_bytes(MiB, seed=5).tobytes()
        before = compiled_served(s, home)
        for _ in range(3):
            bm.write(tail, 2 * MiB)
            assert bm.read(2 * MiB, MiB) == tail
        assert bm.read(0, 4096) == b"a" * 4096
        assert compiled_served(s, home) > before     # granted again, with the new extents
        ns.destroy()


def test_a_free_racing_compiled_reads_never_returns_the_next_objects_bytes(fabric, request):
    """A reader on its own connection reads an object while another session frees it and
    allocates and fills another in the same namespace (its memory may be the freed one's):
    every read gets the first object's bytes or NO_SUCH_OBJECT, never the next one's."""
    name = ns_name(request)
    with remote(fabric) as owner, remote(fabric) as reader_session:
        ns = owner.create_namespace(name, sec_id="k")
        home = owner.local.server_id
        ns_r = reader_session.namespace(name, "k")
        seen_wrong: list[int] = []
        for round_ in range(15):
            x = ns.alloc(64 * KiB, Affinity("server", home))
            x.write(b"X" * x.size)
            rx = ns_r.open(x.bm_id)
            freed = threading.Event()
            outcome: list[str] = []

            def read_until_gone() -> None:
                buf = bytearray(64 * KiB)
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    try:
                        rx.read(0, into=buf)
                    except memfabric.NoSuchObject:
                        outcome.append("gone")
                        return
                    if buf.count(b"X") != len(buf):
                        seen_wrong.append(round_)
                        outcome.append("wrong")
                        return
                outcome.append("never gone" if freed.is_set() else "never freed")

            reader = threading.Thread(target=read_until_gone)
            reader.start()
            time.sleep(0.002 * (round_ % 5))
            x.free()
            freed.set()
            y = alloc_when_possible(ns, 64 * KiB, Affinity("server", home))
            y.write(b"Y" * y.size)
            reader.join(WAIT_S + 5)
            assert not reader.is_alive()
            assert outcome == ["gone"], outcome
            y.free()
        assert not seen_wrong, f"rounds {seen_wrong} read bytes of an object allocated after the free"
        assert compiled_served(owner, home) > 0
        wait_until(lambda: audit_is_clean(owner, home), "every freed byte to be accounted for")
        ns.destroy()


def _granted_raw_connection(sock: socket.socket, ns, bm, segment: int, offset: int) -> None:
    """A span request on a raw connection: Python serves it and grants the object."""
    send_frame(sock, span_request("seg_read", ns, bm, segment, offset, 4096, request_id=100))
    header, _ = reply(sock)
    assert header == {"id": 100}, header


def test_a_stalled_compiled_write_never_lands_in_the_next_namespace(fresh_fabric):
    """test_rpc_review's stalled write, on a connection granted the object: the write is under
    way in compiled code when the object is freed and its namespace destroyed; the segment it
    holds must not reach the next namespace, and comes back once the write is over."""
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    _, token, addresses = remote_config(fab)
    with remote(fab) as s:
        a = s.create_namespace(unique("cw-a"), sec_id="secret-a")
        x = a.alloc(4 * MiB)                     # the whole pool
        _, segment, offset, length = x._call("describe")["extents"][0]
        half = length // 2
        with raw_client(addresses[0], token) as sock:
            _granted_raw_connection(sock, a, x, segment, offset)
            before = compiled_served(s, 1)
            send_frame(sock, span_request("seg_read", a, x, segment, offset, 4096, request_id=101))
            assert reply(sock)[0] == {"id": 101}
            assert compiled_served(s, 1) == before + 1        # this connection's requests are compiled's now
            send_head(sock, span_request("seg_write", a, x, segment, offset, length, request_id=102), length)
            sock.sendall(b"A" * half)
            wait_until(lambda: server_unread_bytes(sock) == 0, "the server to read the first half")

            x.free()
            a.destroy()
            b = s.create_namespace(unique("cw-b"), sec_id="secret-b")
            mine = take_what_the_pool_gives(b, MiB, count=4)
            assert mine, "the new namespace got no memory at all"
            assert len(mine) < 4, "the segment under a compiled write was lent to another namespace"
            secrets = [random_bytes(MiB, seed=100 + i) for i in range(len(mine))]
            for bm, secret in zip(mine, secrets):
                bm.write(secret)

            sock.sendall(b"Z" * (length - half))     # the stalled write resumes
            assert reply(sock)[0] == {"id": 102}     # and is answered: it was under way

        for bm, secret in zip(mine, secrets):
            got = np.frombuffer(bm.read(), dtype=np.uint8)
            assert np.array_equal(got, secret), f"namespace B's object {bm.bm_id} was overwritten"
        # The segment the write held comes back once it is over, zeroed.
        assert alloc_when_possible(b, MiB).read() == bytes(MiB), "the stalled write reached a new object"
        b.destroy()


def test_a_stalled_compiled_read_never_sends_the_next_namespaces_bytes(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="64MiB", segment_size="16MiB")
    _, token, addresses = remote_config(fab)
    segment_bytes = 16 * MiB
    with remote(fab) as s:
        a = s.create_namespace(unique("cr-a"), sec_id="secret-a")
        x = a.alloc(4 * segment_bytes)
        x.write(b"a" * x.size)
        _, segment, offset, length = x._call("describe")["extents"][0]
        with raw_client(addresses[0], token, rcvbuf=4096) as sock:
            _granted_raw_connection(sock, a, x, segment, offset)
            before = compiled_served(s, 1)
            send_frame(sock, span_request("seg_read", a, x, segment, offset, length))
            header, n = recv_frame_header(sock)
            assert "error" not in header and n == length, header
            assert compiled_served(s, 1) == before + 1    # the compiled loop took it
            got = recv_exactly(sock, 64 << 10)

            x.free()
            a.destroy()
            b = s.create_namespace(unique("cr-b"), sec_id="secret-b")
            mine = take_what_the_pool_gives(b, segment_bytes, count=4)
            assert mine and len(mine) < 4, "the segment under a compiled read was lent to another namespace"
            for bm in mine:
                bm.write(b"S" * segment_bytes)
            got += recv_exactly(sock, n - len(got))      # the read goes on from the segment it holds
            send_frame(sock, {"op": "hello", "id": 7})
            assert reply(sock)[0]["id"] == 7
        assert got.count(b"a") == len(got), "a read begun on a freed object returned bytes not its own"
        alloc_when_possible(b, segment_bytes)      # the held segment came back once the read was over
        b.destroy()


def test_garbage_on_a_granted_connection_gets_what_python_gives(fabric, request):
    """Each frame is sent on a connection granted the object (the compiled loop sees it first)
    and on a fresh one (Python sees it first): the answers must be the same."""
    _, token, _ = remote_config(fabric)
    with remote(fabric) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        other = s.create_namespace(ns_name(request) + "-2", sec_id="k2")
        home = s.local.server_id
        bm = ns.alloc(64 * KiB, Affinity("server", home))
        bm.write(random_bytes(bm.size, seed=9))
        stranger = other.alloc(4 * KiB, Affinity("server", home))
        _, segment, offset, length = bm._call("describe")["extents"][0]
        good = span_request("seg_read", ns, bm, segment, offset, 4096)
        packer_frames = {
            "valid": (good, b""),
            "valid, keys in another order": (dict(reversed(good.items())), b""),
            "wrong secId": ({**good, "sec": b"not-k"}, b""),
            "secId as str": ({**good, "sec": "k"}, b""),
            "another namespace's secId": ({**good, "sec": b"k2"}, b""),
            "another namespace's object": ({**good, "bm_id": stranger.bm_id}, b""),
            "a freed-looking id": ({**good, "bm_id": f"{home}-999-999"}, b""),
            "a malformed id": ({**good, "bm_id": "1-0-01"}, b""),
            "past the extent": ({**good, "offset": offset + length - 100}, b""),
            "another segment": ({**good, "segment": segment + 1}, b""),
            "length 0": ({**good, "length": 0}, b""),
            "negative offset": ({**good, "offset": -4096}, b""),
            "offset near 2**64": ({**good, "offset": 2 ** 64 - 10}, b""),
            "an extra key": ({**good, "budget_s": 5.0}, b""),
            "a negative id": ({**good, "id": -5}, b""),
            "a read with a payload": (good, b"p" * 10),
            "a write of the wrong length": ({**good, "op": "seg_write"}, b"w" * 100),
            "a write": ({**good, "op": "seg_write", "offset": offset + 8192}, b"w" * 4096),
        }
        for what, (header, payload) in packer_frames.items():
            answers = []
            for granted in (True, False):
                with raw_client(rpc_address(s, home), token) as sock:
                    if granted:
                        _granted_raw_connection(sock, ns, bm, segment, offset)
                    send_frame(sock, header, payload)
                    try:
                        answers.append(reply(sock))
                    except (OSError, ConnectionError):
                        answers.append("closed")
            assert answers[0] == answers[1], f"{what}: granted {answers[0]!r:.300} / fresh {answers[1]!r:.300}"
        # Frames that are no request at all close the connection either way.
        for what, block in (("garbage", bytes(range(256))), ("trailing bytes", None)):
            for granted in (True, False):
                with raw_client(rpc_address(s, home), token) as sock:
                    if granted:
                        _granted_raw_connection(sock, ns, bm, segment, offset)
                    if block is None:
                        head = wire.encode(good) + b"\x00"
                        block = rpc.PREFIX.pack(len(head), 0) + head
                        block += bytes(rpc.FIRST_BLOCK - len(block))
                    sock.sendall(block)
                    assert closed_by_peer(sock, time.monotonic() + WAIT_S), what
        assert bm.read(8192, 4096) == b"w" * 4096        # the valid write landed
        ns.destroy()
        other.destroy()


def test_threads_sharing_a_session_write_and_read_their_own_spans(fabric, request):
    threads, rounds, span = 8, 150, 32 * KiB
    with remote(fabric) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        home = s.local.server_id
        bm = ns.alloc(threads * span, Affinity("server", home))
        errors: list[str] = []

        def work(t: int) -> None:
            out = bytearray(span)
            for i in range(rounds):
                data = bytes([(t * 31 + i) % 256]) * span
                try:
                    bm.write(data, t * span)
                    bm.read(t * span, into=out)
                except memfabric.MemfabricError as exc:
                    errors.append(f"{exc.__class__.__name__}: {exc}")
                    return
                if out != data:
                    errors.append(f"thread {t} round {i} read other bytes")
                    return

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(CHILD_WAIT_S * 4)
        assert not any(w.is_alive() for w in workers)
        assert not errors, errors[:5]
        assert s.link(home).compiled_spans > 0
        ns.destroy()


_KILLED_WRITER = r"""
import sys
import numpy as np
import memfabric
with memfabric.init(sys.argv[1]) as s:
    ns = s.namespace(sys.argv[2], "k")
    bm = ns.open(sys.argv[3])
    data = np.full(bm.size, 7, dtype=np.uint8)
    out = np.empty(bm.size, dtype=np.uint8)
    bm.write(data)
    print("writing", flush=True)
    while True:
        bm.write(data)
        bm.read(0, into=out)
"""


def test_a_client_killed_mid_payload_costs_the_server_nothing(fresh_fabric, request):
    """Clients writing and reading 8 MiB spans (compiled on both sides) are killed part way,
    again and again: the server keeps serving, and once the object is freed every byte of it
    is accounted for (no hold, no deferred extent left behind)."""
    fab = fresh_fabric(servers=1, capacity="64MiB", segment_size="16MiB")
    remote_toml = os.path.join(fab.directory, "remote.toml")
    name = ns_name(request)
    with remote(fab) as s:
        ns = s.create_namespace(name, sec_id="k")
        bm = ns.alloc(8 * MiB)
        for i in range(4):
            child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, remote_toml, name, bm.bm_id],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert child.stdout.readline() == "writing\n", child.stderr.read()
                time.sleep(0.05 + 0.03 * i)
            finally:
                child.kill()
                child.wait(CHILD_WAIT_S)
            bm.write(b"alive" * 1000, 4096)
            assert bm.read(4096, 5000) == b"alive" * 1000
        assert compiled_served(s, 1) > 0
        bm.free()
        wait_until(lambda: audit_is_clean(s, 1), "the killed clients' transfers to be let go")
        # The whole pool comes back: nothing holds a segment of it.
        ns.destroy()
        again = s.create_namespace(name + "-2", sec_id="k")
        alloc_when_possible(again, 48 * MiB)
        again.destroy()


def test_a_compiled_call_to_a_stopped_server_times_out_and_the_link_goes_on(fresh_fabric, request):
    fab = fresh_fabric(servers=1, capacity="16MiB")
    pid = fab.server_pids()[1]
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=1.0) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        bm = ns.alloc(64 * KiB)
        data = random_bytes(bm.size, seed=11)
        bm.write(data)
        link = s.link(1)
        calls = link.compiled_spans
        stop_process(pid)
        try:
            with pytest.raises(memfabric.Timeout):
                bm.read(0, into=bytearray(bm.size))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert link.compiled_spans == calls + 1
        out = bytearray(bm.size)
        wait_until(lambda: bm.read(0, into=out) is None and out == data.tobytes(), "a read after the stop")
        assert not link.closed, "a timeout with the stream whole closed the link"
        ns.destroy()


def test_a_namespace_destroyed_under_compiled_readers_ends_them_cleanly(fresh_fabric, request):
    fab = fresh_fabric(servers=1, capacity="16MiB")
    name = ns_name(request)
    with remote(fab) as owner, remote(fab) as reader_session:
        ns = owner.create_namespace(name, sec_id="k")
        objects = [ns.alloc(256 * KiB) for _ in range(4)]
        for i, bm in enumerate(objects):
            bm.write(bytes([65 + i]) * bm.size)
        handles = [reader_session.namespace(name, "k").open(bm.bm_id) for bm in objects]
        outcomes: list[str] = []

        def read_all() -> None:
            buf = bytearray(256 * KiB)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                for i, h in enumerate(handles):
                    try:
                        h.read(0, into=buf)
                    except (memfabric.NoSuchNamespace, memfabric.NoSuchObject) as exc:
                        outcomes.append(type(exc).__name__)
                        return
                    if buf.count(bytes([65 + i])) != len(buf):
                        outcomes.append("wrong bytes")
                        return
            outcomes.append("never ended")

        reader = threading.Thread(target=read_all)
        reader.start()
        time.sleep(0.05)
        ns.destroy()
        reader.join(WAIT_S + 5)
        assert outcomes and outcomes[0] in ("NoSuchNamespace", "NoSuchObject"), outcomes
        again = owner.create_namespace(name + "-2", sec_id="k")
        alloc_when_possible(again, 16 * MiB)       # every segment came back
        again.destroy()

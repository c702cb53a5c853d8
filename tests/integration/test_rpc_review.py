"""Regression tests for the review of the multi-host (RPC) path: each finding, as it must now hold.

A token holder may speak raw frames; none of it may reach another namespace's bytes, drop a
live object's extents, lock other clients out, or hold a server thread or a client call past
its deadline. Every wait is bounded; no test asserts how fast something was, only that it
ended within a bound several times the deadline it guards.

Raw frames are read and written here on the plain socket (Python socket timeouts), not with
FrameSocket's receive calls: only the token handshake goes through memfabric.transport.rpc.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OutOfMemory
from memfabric.datapath.rpc_link import RpcLink
from memfabric.limits import DEFAULT_REQUEST_TIMEOUT_S, MAX_CLIENTS_PER_SERVER
from memfabric.transport import rpc, wire

from ..conftest import short_tmp_dir
from ..helpers import MiB, WAIT_S, alloc_when_possible, random_bytes, stop_process, wait_until
from .test_rpc import _openssl_cert

CLOSE_BOUND_S = 3 * DEFAULT_REQUEST_TIMEOUT_S   # a stalled frame must be cut off well before this
CALL_BOUND_S = 10.0                             # a call with a 2 s deadline must end well before this


# ---- helpers -------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def remote_config(fab) -> tuple[str, bytes, list[str]]:
    """(remote.toml path, the cluster token, the servers' RPC addresses) of a LocalFabric."""
    path = os.path.join(fab.directory, "remote.toml")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    # Relative to the file, as the client reads it.
    with open(os.path.join(os.path.dirname(path), cfg["cluster"]["token_file"]), "rb") as f:
        token = f.read().strip()
    return path, token, [s["rpc_address"] for s in cfg["servers"]]


def remote(fab, **kwargs) -> memfabric.Session:
    return memfabric.init(remote_config(fab)[0], **kwargs)


def rpc_address(session: memfabric.Session, server_id: int) -> str:
    return next(s["rpc_address"] for s in session.servers() if s["server_id"] == server_id)


def recv_exactly(sock: socket.socket, n: int, timeout_s: float = WAIT_S) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    deadline = time.monotonic() + timeout_s
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{got} of {n} bytes within {timeout_s}s")
        sock.settimeout(left)
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the other end closed the connection")
        got += k
    return bytes(buf)


def recv_frame_header(sock: socket.socket, timeout_s: float = WAIT_S) -> tuple[dict[str, Any], int]:
    """The next frame's header and its payload length (the payload is still to be read)."""
    block = recv_exactly(sock, rpc.FIRST_BLOCK, timeout_s)
    head_len, payload_len = rpc.PREFIX.unpack_from(block)
    head = block[rpc.PREFIX.size:rpc.PREFIX.size + head_len]
    if rpc.PREFIX.size + head_len > rpc.FIRST_BLOCK:
        head += recv_exactly(sock, rpc.PREFIX.size + head_len - rpc.FIRST_BLOCK, timeout_s)
    return wire.decode(head), payload_len


def send_head(sock: socket.socket, header: dict[str, Any], payload_len: int) -> None:
    """A frame's first block (prefix and header) announcing `payload_len` bytes; none of them yet."""
    head = wire.encode(header)
    first = rpc.PREFIX.pack(len(head), payload_len) + head
    sock.sendall(first + bytes(max(0, rpc.FIRST_BLOCK - len(first))))


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    send_head(sock, header, len(payload))
    sock.sendall(payload)


@contextmanager
def raw_client(address: str, token: bytes, role: str = "client",
               rcvbuf: int | None = None) -> Iterator[socket.socket]:
    """A token holder's connection, handshake and hello done, for raw frames."""
    host, port = rpc.parse_address(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: the window
        sock.settimeout(WAIT_S)
        sock.connect((host, port))
        rpc.client_handshake(rpc.FrameSocket(sock), token)
        send_frame(sock, {"op": "hello", "id": 1, "role": role})
        hello, _ = recv_frame_header(sock)
        assert "error" not in hello, hello
        yield sock
    finally:
        sock.close()


def reply_or_closed(sock: socket.socket) -> dict[str, Any] | None:
    """The next reply header (its payload dropped), or None if the server closed instead."""
    try:
        header, n = recv_frame_header(sock)
        recv_exactly(sock, n)
        return header
    except OSError:          # ConnectionError, TimeoutError
        return None


def span_request(op: str, ns: memfabric.Namespace, bm: memfabric.BigMemory, segment: int,
                 offset: int, length: int, request_id: int = 2) -> dict[str, Any]:
    sec = ns.sec_id.encode() if isinstance(ns.sec_id, str) else ns.sec_id
    return {"op": op, "id": request_id, "pool": ns.pool, "ns": ns.name, "sec": sec, "bm_id": bm.bm_id,
            "segment": segment, "offset": offset, "length": length}


def server_unread_bytes(sock: socket.socket) -> int | None:
    """Bytes we sent that the server process has not read yet: the receive queue of the
    server's end of this loopback connection (Linux /proc/net/tcp); None if not listed."""
    mine, theirs = sock.getsockname()[1], sock.getpeername()[1]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == theirs
                    and int(fields[2].rsplit(":", 1)[1], 16) == mine):
                return int(fields[4].split(":")[1], 16)
    return None


def take_what_the_pool_gives(ns: memfabric.Namespace, size: int, count: int,
                             settle_s: float = 2.0) -> list[memfabric.BigMemory]:
    """Up to `count` objects of `size` bytes, retrying OUT_OF_MEMORY for at most `settle_s`
    (freed memory rests a moment before reuse)."""
    objs: list[memfabric.BigMemory] = []
    deadline = time.monotonic() + settle_s
    while len(objs) < count:
        try:
            objs.append(ns.alloc(size))
        except OutOfMemory:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return objs


def published_after(session: memfabric.Session, server_id: int, after: float) -> dict[str, Any]:
    """The server's cluster record, once it published a heartbeat later than `after` (time.time())."""
    def fresh():
        rec = next(s for s in session.servers() if s["server_id"] == server_id)
        return rec if rec["last_seen_s"] > after else None
    return wait_until(fresh, f"a heartbeat of server {server_id}")


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Read (and drop) until the other end closes; False if it has not by `deadline`."""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:          # reset: closed too
        return True


# ---- 1. (uaf_write, uaf_read) a stalled span transfer vs. a free, a destroy and a new namespace -----


def test_stalled_seg_write_never_lands_in_the_next_namespace(fresh_fabric):
    # One server, four 1 MiB segments: a new namespace must reuse what another gave back.
    fab = fresh_fabric(servers=1, capacity="4MiB", segment_size="1MiB")
    _, token, addresses = remote_config(fab)
    with remote(fab) as s:
        a = s.create_namespace(unique("uaf-w-a"), sec_id="secret-a")
        x = a.alloc(4 * MiB)                     # the whole pool
        _, segment, offset, length = x._call("describe")["extents"][0]
        half = length // 2
        with raw_client(addresses[0], token) as sock:
            send_head(sock, span_request("seg_write", a, x, segment, offset, length), length)
            sock.sendall(b"A" * half)
            # The server took it all in: the write passed its checks and is half done.
            wait_until(lambda: server_unread_bytes(sock) == 0, "the server to read the first half")

            x.free()
            a.destroy()
            b = s.create_namespace(unique("uaf-w-b"), sec_id="secret-b")
            mine = take_what_the_pool_gives(b, MiB, count=4)
            assert mine, "the new namespace got no memory at all"
            secrets = [random_bytes(MiB, seed=100 + i) for i in range(len(mine))]
            for bm, secret in zip(mine, secrets):
                bm.write(secret)

            sock.sendall(b"Z" * (length - half))     # the stalled write resumes
            reply_or_closed(sock)                    # it ends: answered, or cut off

        for bm, secret in zip(mine, secrets):
            got = np.frombuffer(bm.read(), dtype=np.uint8)
            assert np.array_equal(got, secret), (
                f"{np.count_nonzero(got != secret)} bytes of namespace B's object {bm.bm_id} were "
                "overwritten by a write begun on a freed object of a destroyed namespace")
        if len(mine) < 4:      # the segment the write held comes back once it is over: zeroed
            assert alloc_when_possible(b, MiB).read() == bytes(MiB), "the stalled write reached a new object"
        b.destroy()


def test_stalled_seg_read_never_sends_the_next_namespaces_bytes(fresh_fabric):
    # Four 16 MiB segments: a span far larger than any socket buffer (tcp_wmem tops out at a
    # few MiB), so most of it is still to be sent from the segment when the object is freed.
    fab = fresh_fabric(servers=1, capacity="64MiB", segment_size="16MiB")
    _, token, addresses = remote_config(fab)
    segment_bytes = 16 * MiB
    with remote(fab) as s:
        a = s.create_namespace(unique("uaf-r-a"), sec_id="secret-a")
        x = a.alloc(4 * segment_bytes)
        x.write(b"a" * x.size)
        _, segment, offset, length = x._call("describe")["extents"][0]
        # A tiny receive window: the server's send of the span stalls early and stays stalled.
        with raw_client(addresses[0], token, rcvbuf=4096) as sock:
            send_frame(sock, span_request("seg_read", a, x, segment, offset, length))
            header, n = recv_frame_header(sock)
            assert "error" not in header and n == length, header
            got = recv_exactly(sock, 64 << 10)

            x.free()
            a.destroy()
            b = s.create_namespace(unique("uaf-r-b"), sec_id="secret-b")
            mine = take_what_the_pool_gives(b, segment_bytes, count=4)
            assert mine, "the new namespace got no memory at all"
            for bm in mine:
                bm.write(b"S" * segment_bytes)

            try:       # the server sends from the span it holds, or cuts the connection: both fine
                got += recv_exactly(sock, n - len(got))
            except OSError:
                pass
        assert got.count(b"S") == 0, (
            f"a read begun on a freed object returned {got.count(b'S')} bytes of another namespace's secret")
        assert got.count(b"a") == len(got), "a read begun on a freed object returned bytes that were never its own"
        b.destroy()


# ---- 2. (stall) a begun frame must finish within the request timeout -------------------------------


def test_a_client_stalled_mid_frame_is_cut_off_and_others_are_served(fabric):
    _, token, _ = remote_config(fabric)
    with remote(fabric) as s:
        ns = s.create_namespace(unique("stall"), sec_id="k")
        home = s.local.server_id
        bm = ns.alloc(MiB, Affinity("server", home))
        _, segment, offset, _ = bm._call("describe")["extents"][0]
        address = rpc_address(s, home)
        with raw_client(address, token) as half_header, \
                raw_client(address, token) as refused_write, \
                raw_client(address, token) as live_write:
            # Part of a frame's first block only.
            half_header.sendall(rpc.PREFIX.pack(30, 0) + b"\x00" * 50)
            # A whole header (for a namespace that does not exist) and part of its payload.
            send_head(refused_write, {"op": "seg_write", "id": 2, "pool": "default", "ns": unique("nope"),
                                      "sec": b"k", "bm_id": "1-0-1", "segment": 0, "offset": 0,
                                      "length": 4096}, 4096)
            refused_write.sendall(b"x" * 100)
            # A valid write into a live object, stalled after 100 bytes.
            send_head(live_write, span_request("seg_write", ns, bm, segment, offset, 4096), 4096)
            live_write.sendall(b"x" * 100)

            # Meanwhile the server serves everyone else, this very object included.
            bm.write(b"served", 8192)
            assert bm.read(8192, 6) == b"served"

            deadline = time.monotonic() + CLOSE_BOUND_S
            for name, sock in (("a half header", half_header), ("a refused write's payload", refused_write),
                               ("a write's payload", live_write)):
                assert closed_by_peer(sock, deadline), (
                    f"the server still waits for the rest of {name} after {CLOSE_BOUND_S:.0f}s")

        bm.write(b"still fine", 0)
        assert bm.read(0, 10) == b"still fine"
        ns.destroy()


# ---- 3. (home_restarted) a token holder cannot make a server drop a live object's extents -------------


def test_home_restarted_from_a_token_holder_drops_nothing_live(fabric):
    _, token, _ = remote_config(fabric)
    with remote(fabric) as s:
        ns = s.create_namespace(unique("victim"), sec_id="only-the-owner-knows")
        home = s.local.server_id
        other = next(r["server_id"] for r in s.servers() if r["server_id"] != home)
        x = ns.alloc(8 * MiB, Affinity("spread"))
        assert {sid for sid, _ in x.extents} == {home, other}
        data = random_bytes(x.size, seed=7)
        x.write(data)
        before = published_after(s, other, time.time())["pools"]["default"]["used_bytes"]

        # A plain client's call is refused; a token holder's peer hello is accepted, but the
        # server asks the home which objects live rather than believing the caller.
        for role in ("client", "peer"):
            link = RpcLink(rpc_address(s, other), token, role=role)
            try:
                reply = link.call("home_restarted", home=home, live=[])
                assert role == "peer", "a client called a peer operation"
                assert reply.get("released_extents", 0) == 0, reply
            except memfabric.PermissionDenied:
                assert role == "client"
            finally:
                link.close()

        assert x.read() == data.tobytes(), "a live object lost its bytes on the peer"
        after = published_after(s, other, time.time())["pools"]["default"]["used_bytes"]
        assert after == before, f"server {other} gave back {before - after} bytes of a live object"
        ns.destroy()


# ---- 4, 5. (trickle, tls_silent) a call's deadline bounds the whole reply -----------------------------


class FakeServer:
    """One connection: the token handshake and a hello answer, then `behave(server, sock,
    request)` with the next request (plain or TLS). stop() ends it and closes everything."""

    TOKEN = b"t" * 32

    def __init__(self, behave: Callable[[FakeServer, socket.socket, dict], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.listener = rpc.listen("127.0.0.1:0", 8)
        self.listener.settimeout(WAIT_S)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self._behave, self._tls = behave, tls
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            self._conn = sock
            sock.settimeout(WAIT_S)
            if self._tls is not None:
                sock = self._conn = self._tls.wrap_socket(sock, server_side=True)
            rpc.server_handshake(rpc.FrameSocket(sock), self.TOKEN, 7)
            hello, _ = recv_frame_header(sock)
            send_frame(sock, {"id": hello["id"], "host": "fake", "server_id": 7})
            request, _ = recv_frame_header(sock)
            self._behave(self, sock, request)
        except (OSError, memfabric.MemfabricError):
            pass

    def stop(self) -> None:
        self.stopped.set()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)      # a client still reading sees the end
            except OSError:
                pass
        self._thread.join(WAIT_S)
        if self._conn is not None:
            self._conn.close()
        self.listener.close()


TRICKLED_PAYLOAD = 40


def trickle_header(server: FakeServer, sock: socket.socket, request: dict) -> None:
    """The whole reply frame, one byte every 0.5 s."""
    head = wire.encode({"id": request["id"], "host": "fake"})
    frame = rpc.PREFIX.pack(len(head), 0) + head
    frame += bytes(rpc.FIRST_BLOCK - len(frame))
    for i in range(len(frame)):
        if server.stopped.wait(0.5):
            return
        sock.sendall(frame[i:i + 1])


def trickle_payload(server: FakeServer, sock: socket.socket, request: dict) -> None:
    """The reply header at once, then its payload one byte every 0.5 s."""
    send_head(sock, {"id": request["id"]}, TRICKLED_PAYLOAD)
    for _ in range(TRICKLED_PAYLOAD):
        if server.stopped.wait(0.5):
            return
        sock.sendall(b"x")


def silent(server: FakeServer, sock: socket.socket, request: dict) -> None:
    """Never answers; keeps the connection open until stopped."""
    server.stopped.wait(120)


def bounded_call(server: FakeServer, tls: ssl.SSLContext | None, read_into: int = 0) -> dict[str, Any]:
    """Connect an RpcLink (timeout_s=2) to `server` and make one call, in a thread given
    CALL_BOUND_S; returns what happened ("error", "value", "link", "took", "hung")."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            link = out["link"] = RpcLink(server.address, FakeServer.TOKEN, tls, timeout_s=2.0)
            if read_into:
                rid, pending = link.submit("seg_read", {}, into=memoryview(bytearray(read_into)))
                out["value"] = link.wait(rid, pending, "seg_read")
            else:
                out["value"] = link.call("describe")
        except BaseException as exc:     # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(CALL_BOUND_S)
    out["took"] = time.monotonic() - started
    out["hung"] = thread.is_alive()
    server.stop()                        # unblocks a call that still waits: it sees the end
    thread.join(WAIT_S)
    if "link" in out:
        out["link"].close()
    return out


@pytest.mark.parametrize("behave", [trickle_header, trickle_payload], ids=["header", "payload"])
def test_a_trickled_reply_costs_timeout_at_the_deadline(behave):
    server = FakeServer(behave)
    try:
        out = bounded_call(server, None, read_into=TRICKLED_PAYLOAD if behave is trickle_payload else 0)
    finally:
        server.stop()
    assert not out["hung"], f"a call with a 2 s deadline still waited after {out['took']:.0f}s"
    assert isinstance(out.get("error"), memfabric.Timeout), out


def test_a_silent_tls_server_costs_timeout_at_the_deadline():
    cert, key = _openssl_cert(short_tmp_dir("mf-tls-silent-"))
    server = FakeServer(silent, tls=rpc.server_tls(cert, key))
    try:
        out = bounded_call(server, rpc.client_tls(cert))
    finally:
        server.stop()
    assert not out["hung"], f"a TLS call with a 2 s deadline still waited after {out['took']:.0f}s"
    assert isinstance(out.get("error"), memfabric.Timeout), out


# ---- 6. (flood) strangers that never handshake do not lock clients out -------------------------------


@pytest.mark.parametrize("strangers", [100, MAX_CLIENTS_PER_SERVER + 4])
def test_idle_strangers_on_the_rpc_port_do_not_lock_clients_out(fabric, strangers):
    path, _, addresses = remote_config(fabric)
    idle: list[socket.socket] = []
    try:
        for address in addresses:
            host, port = rpc.parse_address(address)
            for _ in range(strangers):
                idle.append(socket.create_connection((host, port), timeout=WAIT_S))
        for sock in idle:       # until each server has taken every stranger in: greeted or closed it
            try:
                sock.recv(1, socket.MSG_PEEK)
            except OSError:
                pass
        with memfabric.init(path) as s:
            ns = s.create_namespace(unique("flood"), sec_id="k")
            bm = ns.alloc(2 * MiB, Affinity("spread"))      # links to every server
            data = random_bytes(bm.size, seed=5)
            bm.write(data)
            assert bm.read() == data.tobytes()
            ns.destroy()
    finally:
        for sock in idle:
            sock.close()
        # Once the strangers are gone, clients get in again (and the next test has its servers).
        wait_until(lambda: client_gets_in(path), "the servers to take clients again")


def client_gets_in(path: str) -> bool:
    try:
        memfabric.init(path).close()
        return True
    except memfabric.ServerUnavailable:
        return False


# ---- 7. (stale_home) a timeout closes the home link; control calls rebind it -------------------------


def test_control_calls_rebind_a_home_link_a_timeout_closed(fabric):
    with remote(fabric, timeout_s=1.0) as s:
        ns = s.create_namespace(unique("stale-home"), sec_id="k")
        other = next(r["server_id"] for r in s.servers() if r["server_id"] != s.local.server_id)
        bm = ns.alloc(MiB, Affinity("server", other))
        bm.write(b"copied")
        pid = fabric.server_pids()[other]
        stop_process(pid)
        try:
            with pytest.raises(memfabric.Timeout):
                bm.copy_to(bm, dst_offset=8192, length=6)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: all(r["alive"] for r in s.servers()), f"server {other} to be alive again")

        # No read first (a read rebinds through its own check): the control calls must.
        bm.copy_to(bm, dst_offset=4096, length=6)
        bm.expand(2 * MiB)
        assert bm.size == 2 * MiB
        assert bm.read(4096, 6) == b"copied"
        bm.free()
        with pytest.raises(memfabric.NoSuchObject):
            ns.open(bm.bm_id)
        ns.destroy()


# ---- 8. (slack) bytes past an object's size are zero once expand makes them visible ------------------


@pytest.mark.parametrize("placement", ["home", "peer"])
def test_slack_written_over_rpc_reads_as_zeros_after_expand(fabric, placement):
    _, token, _ = remote_config(fabric)
    with remote(fabric) as s:
        ns = s.create_namespace(unique("slack"), sec_id="k")
        home = s.local.server_id
        if placement == "home":
            x = ns.alloc(5000, Affinity("server", home))
        else:       # spread: the last extent lies on the peer; the home zeroes its slack by RPC
            x = ns.alloc(MiB + 5000, Affinity("spread"))
        x.write(b"o" * x.size)
        extents = x._call("describe")["extents"]
        server_id, segment, offset, length = extents[-1]
        used = x.size - sum(e[3] for e in extents[:-1])      # bytes of the last extent in use
        slack = length - used
        assert slack > 0 and (placement == "home") == (server_id == home), extents
        with raw_client(rpc_address(s, server_id), token) as sock:
            send_frame(sock, span_request("seg_write", ns, x, segment, offset + used, slack), b"S" * slack)
            reply_or_closed(sock)       # accepted (it is inside the extent) or refused: both fine

        old_size = x.size
        x.expand(old_size + slack)
        assert x.read(old_size, slack) == bytes(slack), "expand showed bytes the object never held"
        assert x.read(0, old_size) == b"o" * old_size
        ns.destroy()

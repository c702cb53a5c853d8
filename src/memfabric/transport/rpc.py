"""Between hosts: TCP (optionally TLS) carrying frames of a msgpack header and a raw payload.

    frame = u32 header length | u64 payload length | header (msgpack map) [| padding] | payload

The first FIRST_BLOCK bytes of a frame are always read at once: when the header fits, it is
padded to fill that block, so a receiver gets prefix and header in one syscall.

Payload bytes are received straight into pool memory (recv_into a segment view) and sent
straight from it (sendmsg with the segment view); only payloads of at most SMALL_PAYLOAD
bytes are copied next to their header first, because one contiguous send of a small
frame is measurably faster on loopback than a two-piece sendmsg.

A server answers a connection's requests in the order they came (rpc_front.py): a client
that knows its request is the oldest unanswered one knows the next frame is its reply.

Plain sockets receive through the compiled _frames.c (a wait polls and sleeps without the
GIL and raises nothing per empty poll; a reply's payload can land with its header in one
call); TLS sockets, and a build without the extension, take the Python path below. On plain
sockets a server connection may also wait in _spans.c, which serves granted span requests by
itself (serve_spans) and leaves every other frame's first block here (header_in_block).

A connection starts with a mutual challenge: each side proves it holds the cluster token
by an HMAC over both sides' fresh nonces; the token itself never crosses the wire. A peer
that fails is refused before it can send a single request.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading
import time
from typing import Any

from ..errors import PermissionDenied, ProtocolError, ServerUnavailable, Timeout
from ..limits import HANDSHAKE_TIMEOUT_S, MAX_MESSAGE_BYTES, MAX_RPC_PAYLOAD_BYTES
from . import wire
from .busy_poll import BusyPoll
from .sockets import HangUpWatch, timeval

try:    # the compiled receive path (_frames.c); without it, the Python one below
    from .. import _frames
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = None

PREFIX = struct.Struct("!IQ")
PROTOCOL = "memfabric-rpc/1"
FIRST_BLOCK = 256
SMALL_PAYLOAD = 16 << 10
_SCRATCH_BYTES = 1 << 20
_PADDING = memoryview(bytes(FIRST_BLOCK))
# sendmsg and recvmsg_into take at most this many buffers at once (the kernel's IOV_MAX).
MAX_IOV = 1024
# A receive may outlast its deadline by at most this, plus the kernel timer's own lateness
# (a few ms): the price of not resetting the kernel's bound before every receive.
DEADLINE_SLACK_S = 0.01
# An idle wait (no deadline) keeps a bound left by an earlier receive if it is at least this
# long, waking at most this often to wait again; a shorter one it drops.
IDLE_BOUND_MIN_S = 1.0


class MidFrameTimeout(socket.timeout):
    """A deadline ran out with a frame partly sent or received: the stream cannot go on.
    (A plain socket.timeout from a FrameSocket means no byte of the frame moved.)"""


class FrameSocket:
    """Whole frames over a stream socket (plain or TLS), every wait bounded by a deadline.

    Deadlines are absolute (time.monotonic()) and checked before each receive, so a peer
    that trickles a frame byte by byte cannot stretch a wait past its deadline. The kernel's
    own bound (SO_RCVTIMEO) is reset only when it would overshoot the deadline by more than
    DEADLINE_SLACK_S: a receive does not pay a setsockopt call. A bound that runs out
    before the deadline just re-checks it and waits again.

    Waiting for a frame to begin polls first (busy_poll.py), on plain sockets only: an SSL
    socket takes no MSG_DONTWAIT.
    """

    def __init__(self, sock: socket.socket, busy_poll_s: float = 0.0, send_timeout_s: float = 10.0) -> None:
        """A send fails after `send_timeout_s` when the peer stops reading."""
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._busy_poll = BusyPoll(0.0 if self._tls else busy_poll_s)
        # Plain sockets receive through _frames.c: a wait holds no GIL, a poll raises nothing.
        self.compiled = _frames is not None and not self._tls
        # Compiled receives use the fd number without the GIL: close() must not free that
        # number (for another connection to take) while one runs. The last one out closes.
        self._fd_users = 0
        self._fd_lock = threading.Lock()
        self._closing = False
        self._hang_up = HangUpWatch(sock)
        self._block = memoryview(bytearray(FIRST_BLOCK))
        self._send_timeout_s = send_timeout_s
        if self._tls:
            self._timeout: float | None = sock.gettimeout()   # left from the TLS handshake
        else:
            sock.settimeout(None)
            self._timeout = None      # the kernel's bound on one receive (None: none)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send_timeout_s))

    def _bound(self, timeout_s: float | None) -> None:
        """Each receive may block at most `timeout_s` (None: for as long as it takes)."""
        if timeout_s == self._timeout:
            return
        self._timeout = timeout_s
        if self._tls:
            # SO_RCVTIMEO does not work under CPython's SSL reads (EAGAIN means "retry"),
            # so TLS sockets use the Python-level timeout (it bounds their sends too).
            self.sock.settimeout(timeout_s)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout_s or 0.0))

    def _bound_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the frame did not arrive in time")
        bound = self._timeout
        if bound is None or bound > remaining + DEADLINE_SLACK_S or bound < remaining / 2:
            self._bound(max(remaining, 0.001))

    def send(self, header: dict[str, Any], payload: memoryview | bytes | list | None = None,
             deadline: float | None = None) -> None:
        """One whole frame. socket.timeout: nothing was sent; MidFrameTimeout: part was.
        A list payload is sent as its parts back to back (a gather: no copy). A `deadline`
        (time.monotonic()) sooner than the send timeout bounds the send of a payload past the
        first block: a peer that stops reading it holds the sender until then, not longer."""
        head = wire.encode(header)
        if payload is None:
            n = 0
        elif type(payload) is list:
            n = sum(p.nbytes if type(p) is memoryview else len(p) for p in payload)
        else:
            n = payload.nbytes if type(payload) is memoryview else len(payload)
        if n > MAX_RPC_PAYLOAD_BYTES:
            raise ProtocolError(f"payload of {n} bytes exceeds {MAX_RPC_PAYLOAD_BYTES}")
        pad = FIRST_BLOCK - PREFIX.size - len(head)
        # One join, one copy: prefix, header, padding and a small payload go as one buffer.
        if n and n <= SMALL_PAYLOAD:
            small = payload if type(payload) is list else [payload]
            first = b"".join([PREFIX.pack(len(head), n), head, _PADDING[:pad] if pad > 0 else b"", *small])
            rest: list = []
        else:
            first = b"".join((PREFIX.pack(len(head), n), head, _PADDING[:pad] if pad > 0 else b""))
            rest = [] if not n else [p for p in payload if len(p)] if type(payload) is list else [payload]
        bounded = bool(rest) and deadline is not None and deadline - time.monotonic() < self._send_timeout_s
        if self._tls:
            self._bound(min(self._send_timeout_s, max(deadline - time.monotonic(), 0.001))
                        if bounded else self._send_timeout_s)
            try:
                self.sock.sendall(first)
                for part in rest:
                    self.sock.sendall(part)
            except socket.timeout:       # how much went out, SSL does not say
                raise MidFrameTimeout("send timed out") from None
            return
        if not rest:
            _sendmsg_all(self.sock, [first], len(first))
        elif not bounded:
            _sendmsg_all(self.sock, [first, *rest], len(first) + n)
        else:
            try:
                _sendmsg_all(self.sock, [first, *rest], len(first) + n, lambda: self._send_bound(deadline))
            finally:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self._send_timeout_s))

    def _send_bound(self, deadline: float) -> None:
        """The next sendmsg may block until `deadline`; BlockingIOError (as when the kernel's
        bound runs out) once it has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BlockingIOError("the deadline passed")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(max(remaining, 0.001)))

    def recv_header(self, deadline: float | None = None,
                    frame_timeout_s: float | None = None) -> tuple[dict[str, Any], int]:
        """The next frame's header and its payload length; the payload is still to be read.

        `deadline` bounds the wait for the frame to begin (None: an idle connection may wait
        for as long as it takes); socket.timeout then means no byte of it came. With
        `frame_timeout_s`, once its first byte is in, the rest must come within that time
        (else within `deadline`); running out then raises MidFrameTimeout.
        """
        header, payload_len, _ = self.recv_frame(deadline, frame_timeout_s)
        return header, payload_len

    def recv_frame(self, deadline: float | None = None, frame_timeout_s: float | None = None,
                   into: memoryview | None = None) -> tuple[dict[str, Any], int, bool]:
        """recv_header(), and with `into`, perhaps the payload too: when the frame's payload
        is exactly len(into) bytes, it lands there in the same call (the third result says
        whether it did). Only a caller that knows the next frame is the one `into` is for
        may pass it: its bytes land before the header is decoded."""
        if self.compiled:
            landed = self._recv_block_compiled(deadline, frame_timeout_s, into)
            frame_deadline = deadline if frame_timeout_s is None else time.monotonic() + frame_timeout_s
        else:
            frame_deadline, landed = self._recv_block_python(deadline, frame_timeout_s), False
        header, payload_len = self._header_in_block(frame_deadline)
        return header, payload_len, landed

    def header_in_block(self, frame_timeout_s: float | None, block: memoryview | None = None
                        ) -> tuple[dict[str, Any], int]:
        """The header of the frame whose first block a compiled call left in our block
        (serve_spans) or in `block` (a link's call_span), and its payload's length; the
        payload is still to be read."""
        return self._header_in_block(None if frame_timeout_s is None else time.monotonic() + frame_timeout_s, block)

    def serve_spans(self, grants: Any, frame_timeout_s: float, kv_grants: Any = None) -> tuple[int, str | None]:
        """Serve span requests that `grants` cover in _spans.c (and gets that `kv_grants`
        cover, _kvget.c) until one needs Python: returns
        (FALLBACK, None) with a frame's first block in (header_in_block() reads it), (OWED,
        None) when a revoked grant's transfer is over, (TRANSFER_FAILED, what) when a
        transfer broke the stream. A frame that stalls raises MidFrameTimeout."""
        poll = self._busy_poll
        fd = self._take_fd()
        try:
            status, poll.polling, info = _frames.serve_spans(fd, self._block, grants, poll.window_s,
                                                             poll.polling, frame_timeout_s, MAX_RPC_PAYLOAD_BYTES,
                                                             kv_grants)
        finally:
            self._give_fd()
        if status == _frames.STALLED:
            raise MidFrameTimeout("the frame stalled part way")
        return status, info

    def _recv_block_compiled(self, deadline: float | None, frame_timeout_s: float | None,
                             into: memoryview | None) -> bool:
        """The frame's first block (and perhaps its payload: the result says) through _frames.c."""
        poll = self._busy_poll
        start = time.perf_counter()
        fd = self._take_fd()
        try:
            outcome = _frames.recv_frame(fd, self._block, poll.window(),
                                         None if deadline is None else deadline - time.monotonic(),
                                         frame_timeout_s, into)
        finally:
            self._give_fd()
        poll.waited(time.perf_counter() - start)
        if outcome == _frames.NOTHING:
            raise socket.timeout("the frame did not arrive in time")
        if outcome == _frames.STALLED:
            raise MidFrameTimeout("the frame stalled part way")
        return outcome == _frames.LANDED

    def _recv_block_python(self, deadline: float | None, frame_timeout_s: float | None) -> float | None:
        """The frame's first block; returns the deadline the rest of the frame must meet."""
        block = self._block
        got = self._busy_poll.receive(self._recv_now, self._recv_some, block, deadline)
        if frame_timeout_s is not None:
            deadline = time.monotonic() + frame_timeout_s
        if got < FIRST_BLOCK:
            try:
                self.recv_into_exact(block[got:], deadline)
            except MidFrameTimeout:
                raise
            except socket.timeout:
                raise MidFrameTimeout("the frame stalled part way") from None
        return deadline

    def _header_in_block(self, frame_deadline: float | None,
                         block: memoryview | None = None) -> tuple[dict[str, Any], int]:
        """The header of the frame whose first block is in (in our block, or `block`), read
        on past the block if it is longer, and the payload's length."""
        if block is None:
            block = self._block
        head_len, payload_len = PREFIX.unpack_from(block)
        if head_len > MAX_MESSAGE_BYTES or payload_len > MAX_RPC_PAYLOAD_BYTES:
            raise ProtocolError(f"frame of {head_len}+{payload_len} bytes is over the limits")
        if PREFIX.size + head_len <= FIRST_BLOCK:
            head = block[PREFIX.size:PREFIX.size + head_len]    # decoded at once: no copy needed
        else:
            try:
                head = bytes(block[PREFIX.size:]) + self.recv_exact(PREFIX.size + head_len - FIRST_BLOCK,
                                                                    frame_deadline)
            except MidFrameTimeout:
                raise
            except socket.timeout:
                raise MidFrameTimeout("the frame stalled part way") from None
        return wire.decode(head), payload_len

    def recv_exact(self, n: int, deadline: float | None = None) -> bytes:
        buf = bytearray(n)
        self.recv_into_exact(memoryview(buf), deadline)
        return bytes(buf)

    def _recv_now(self, view: memoryview, deadline: float | None = None) -> int:
        """What has arrived, without waiting (BlockingIOError: nothing yet); `deadline` is
        not needed here: it is taken for the sake of BusyPoll.receive."""
        k = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        return k

    def _recv_some(self, view: memoryview | list, deadline: float | None, scatter: bool = False) -> int:
        """At least one byte, waiting until `deadline` (None: for as long as it takes).
        With `scatter`, `view` is a list of buffers, filled in order (plain sockets only)."""
        while True:
            if deadline is not None:
                self._bound_until(deadline)
            elif self._timeout is not None and self._timeout < IDLE_BOUND_MIN_S:
                self._bound(None)        # an idle wait must not wake up often for nothing
            try:
                k = self.sock.recvmsg_into(view)[0] if scatter else self.sock.recv_into(view)
            except BlockingIOError:
                continue                 # SO_RCVTIMEO ran out: check the deadline again
            except socket.timeout:
                if self._tls:
                    continue             # the TLS socket's timeout ran out: likewise
                # On a plain socket this is ETIMEDOUT: TCP gave up on the peer.
                raise ConnectionError("the connection timed out") from None
            if k == 0:
                raise ConnectionError("peer closed the connection")
            return k

    def recv_into_exact(self, view: memoryview, deadline: float | None = None) -> None:
        if self.compiled:
            fd = self._take_fd()
            try:
                outcome = _frames.recv_exact(fd, view, self._busy_poll.window(),
                                             None if deadline is None else deadline - time.monotonic())
            finally:
                self._give_fd()
            if outcome == _frames.NOTHING:
                raise socket.timeout("the bytes did not arrive in time")
            if outcome == _frames.STALLED:
                raise MidFrameTimeout("the bytes stalled part way")
            return
        got, n = 0, len(view)
        if n and not self._tls:
            # A payload mostly follows its header at once: take what is there without waiting
            # (and without setting a bound), then wait for the rest as below.
            try:
                got = self.sock.recv_into(view, n, socket.MSG_DONTWAIT)
            except BlockingIOError:
                got = 0
            else:
                if not got:
                    raise ConnectionError("peer closed the connection")
        while got < n:
            got += self._recv_some(view[got:] if got else view, deadline)

    def recv_into_views(self, views: list, deadline: float | None = None) -> None:
        """Fill every buffer of `views`, in order, from the stream (a scatter: no copy).
        Plain sockets take up to MAX_IOV buffers per receive (recvmsg_into); TLS sockets
        take one buffer at a time."""
        if self._tls:
            for view in views:
                self.recv_into_exact(view, deadline)
            return
        views = [v for v in views if len(v)]
        first = 0                       # views[first:] are still to fill
        while first < len(views):
            got = self._recv_some(views[first:first + MAX_IOV], deadline, scatter=True)
            while got:
                head = views[first]
                if got >= len(head):
                    got -= len(head)
                    first += 1
                else:
                    views[first] = head[got:]
                    got = 0

    def discard(self, n: int, deadline: float | None = None) -> None:
        scratch = memoryview(bytearray(min(n, _SCRATCH_BYTES)))
        while n:
            take = min(n, len(scratch))
            self.recv_into_exact(scratch[:take], deadline)
            n -= take

    def peer_gone(self) -> bool:
        """The peer hung up (one non-blocking poll; see sockets.py)."""
        return self._hang_up.peer_gone()

    def _take_fd(self) -> int:
        """The fd, for a compiled receive; _give_fd() after it. Closed: EBADF."""
        with self._fd_lock:
            if self._closing:
                raise OSError(errno.EBADF, "the connection is closed")
            self._fd_users += 1
        return self.sock.fileno()

    def _give_fd(self) -> None:
        with self._fd_lock:
            self._fd_users -= 1
            last = self._closing and not self._fd_users
        if last:
            self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def forget(self) -> None:
        """In a forked child: this process's copy of the fd closed, the connection left as
        it is (the parent's; a shutdown would end it for both)."""
        self._hang_up.forked()
        self._fd_lock = threading.Lock()
        self._closing = True
        self._fd_users = 0
        self.sock.close()

    def close(self) -> None:
        """Shuts the connection down at once (a receive waiting in another thread sees its
        end); the fd is closed now, or by the last compiled receive still using it."""
        self._hang_up.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._fd_lock:
            self._closing = True
            busy = self._fd_users
        if not busy:
            self.sock.close()


def _sendmsg_all(sock: socket.socket, parts: list, total: int, bound: Any = None) -> None:
    """Every byte of `parts` (`total` bytes), in order. When SO_SNDTIMEO runs out:
    socket.timeout if none went out, MidFrameTimeout if some did. `bound`, if given, is
    called before each sendmsg (it may raise BlockingIOError)."""
    if len(parts) <= MAX_IOV:
        try:
            if bound is not None:
                bound()
            sent = sock.sendmsg(parts)
        except BlockingIOError:          # SO_SNDTIMEO ran out: the peer stopped reading
            raise socket.timeout("send timed out") from None
        if sent == total:                # the common case: all of it at once
            return
    else:
        sent = 0
    views = [p if type(p) is memoryview and p.format == "B" and p.ndim == 1 else memoryview(p).cast("B")
             for p in parts]
    left = total - sent
    while sent and views:                # drop what went out already
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0] = views[0][sent:]
            sent = 0
    first = 0                            # views[first:] are still to go
    while first < len(views):
        try:
            if bound is not None:
                bound()
            sent = sock.sendmsg(views[first:first + MAX_IOV])
        except BlockingIOError:
            if left == total:
                raise socket.timeout("send timed out") from None
            raise MidFrameTimeout(f"send timed out after {total - left} of {total} bytes") from None
        left -= sent
        while sent and first < len(views):
            if sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0


# ---- the handshake ---------------------------------------------------------------------------

def _proof(token: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, role + b"|" + first + second, hashlib.sha256).digest()


def server_handshake(frames: FrameSocket, token: bytes, server_id: int) -> None:
    """Raises PermissionDenied (after telling the peer) when it does not hold the token."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    server_nonce = os.urandom(32)
    frames.send({"id": 0, "hello": PROTOCOL, "nonce": server_nonce, "server_id": server_id})
    answer, payload_len = frames.recv_header(deadline)
    client_nonce = answer.get("nonce")
    proof = answer.get("proof")
    if payload_len or not isinstance(client_nonce, bytes) or len(client_nonce) != 32 \
            or not isinstance(proof, bytes) \
            or not hmac.compare_digest(proof, _proof(token, b"client", server_nonce, client_nonce)):
        frames.send({"id": 0, "error": int(PermissionDenied.code), "msg": "wrong cluster token"})
        raise PermissionDenied("peer failed the token challenge")
    frames.send({"id": 0, "proof": _proof(token, b"server", client_nonce, server_nonce)})


def client_handshake(frames: FrameSocket, token: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> int:
    """Proves the token and checks the server's proof; returns the server's id. Bounded by
    `timeout_s` as well as HANDSHAKE_TIMEOUT_S: a caller with less time waits less."""
    timeout_s = min(timeout_s, HANDSHAKE_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    try:
        hello, _ = frames.recv_header(deadline)
        if hello.get("hello") != PROTOCOL or not isinstance(hello.get("nonce"), bytes):
            raise ProtocolError(f"not a memfabric server (greeting {hello.get('hello')!r})")
        client_nonce = os.urandom(32)
        frames.send({"id": 0, "nonce": client_nonce,
                     "proof": _proof(token, b"client", hello["nonce"], client_nonce)})
        verdict, _ = frames.recv_header(deadline)
    except socket.timeout:
        raise Timeout(f"no handshake within {timeout_s:.3g}s") from None
    except ConnectionError:
        # Gone mid-challenge (a wrong token is told in a verdict, below): unavailable, which a
        # session fails over from, not a refusal.
        raise ServerUnavailable("the server closed the connection during the token challenge") from None
    if "error" in verdict:
        raise PermissionDenied(f"the server refused us: {verdict.get('msg')}")
    expected = _proof(token, b"server", client_nonce, hello["nonce"])
    if not isinstance(verdict.get("proof"), bytes) or not hmac.compare_digest(verdict["proof"], expected):
        raise PermissionDenied("the server could not prove it holds the cluster token")
    return int(hello["server_id"])


# ---- connecting and listening -------------------------------------------------------------------

def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ProtocolError(f"an RPC address is HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def connect(address: str, tls: ssl.SSLContext | None, timeout_s: float,
            busy_poll_s: float = 0.0) -> FrameSocket:
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.timeout:
        raise Timeout(f"connecting to {address} took longer than {timeout_s}s") from None
    except OSError as exc:
        raise ServerUnavailable(f"cannot reach {address}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise PermissionDenied(f"TLS with {address} failed: {exc}") from None
    return FrameSocket(sock, busy_poll_s, send_timeout_s=timeout_s)


def listen(address: str, backlog: int) -> socket.socket:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def client_tls(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    return context


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context

"""Same-host transport: Unix SOCK_SEQPACKET sockets carrying one message per packet.

SEQPACKET keeps message boundaries and lets SCM_RIGHTS fds ride with the message they
belong to, so a reply that hands over segment memory is one atomic packet. A packet
larger than the limit arrives truncated (MSG_TRUNC) and closes that connection.
"""

from __future__ import annotations

import array
import os
import socket
import stat
import time
from typing import Any, Callable

from ..errors import ProtocolError, ServerUnavailable, Timeout
from ..limits import CONNECT_TIMEOUT_S, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES
from . import wire
from .busy_poll import BusyPoll
from .sockets import HangUpWatch, timeval

try:    # the compiled receive (_frames.c): a wait holds no GIL, a poll raises nothing
    from .. import _frames, _records
except ImportError:      # pragma: no cover - ./dev builds it
    _frames = _records = None

_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
# Received fds are close-on-exec from the moment they exist: a program this process execs
# must not inherit pool memory.
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
# Plain ints, made once: an enum's `|` costs microseconds on every message.
_RECV_NOW_FLAGS = int(socket.MSG_DONTWAIT | _CLOEXEC)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_APPEND_PENDING = -4          # serve_packets: an append Python commits (_frames.c APPEND_PENDING)


class PeerClosed(Exception):
    """The other end closed the connection (EOF)."""


class SendTimeout(socket.timeout):
    """A request could not be sent within the socket's bound: nothing of it went."""


class IpcChannel:
    """One connected SEQPACKET socket: send and receive whole messages with fds."""

    def __init__(self, sock: socket.socket, busy_poll_s: float = 0.0) -> None:
        self.sock = sock
        self._busy_poll = BusyPoll(busy_poll_s)
        self._buffer = bytearray(MAX_MESSAGE_BYTES)    # received into: no allocation per message
        self._hang_up = HangUpWatch(sock)
        self.compiled = _frames is not None
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, MAX_MESSAGE_BYTES * 2)

    def set_deadline(self, timeout_s: float) -> None:
        """Bound each send and receive in the kernel (SO_SNDTIMEO/SO_RCVTIMEO) on a blocking
        socket: no poll() before every call, as a Python socket timeout would add."""
        self.sock.settimeout(None)
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, timeval(timeout_s))

    @classmethod
    def connect(cls, path: str, timeout_s: float = CONNECT_TIMEOUT_S,
                busy_poll_s: float = 0.0) -> "IpcChannel":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ServerUnavailable(f"no server listening on {path}: {exc.strerror}") from None
        except socket.timeout:
            sock.close()
            raise Timeout(f"connecting to {path} took longer than {timeout_s}s") from None
        return cls(sock, busy_poll_s)

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        self.send_encoded(wire.encode(message), fds)

    def send_encoded(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise ProtocolError(f"{len(fds)} fds in one message, at most {MAX_FDS_PER_MESSAGE}")
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except BlockingIOError:          # SO_SNDTIMEO ran out
            raise socket.timeout("send timed out") from None

    def recv(self, puts: list | None = None) -> tuple[dict[str, Any], list[int]]:
        """One whole message and the fds that came with it. Raises PeerClosed on EOF.
        `puts`: a server's grants for MemKV puts (kv/put_grants.py), which the compiled
        receive answers itself until a message comes that is not one of them."""
        return self.decode(*self.recv_packet(puts))

    def decode(self, packet: memoryview, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A packet of recv_packet() decoded (its fds closed if it does not decode)."""
        try:
            return wire.decode(packet), fds
        except ProtocolError:
            _close_all(fds)
            raise

    def recv_packet(self, puts: list | None = None, plogs: dict | None = None,
                    conn: Any = None) -> tuple[memoryview | None, Any]:
        """recv(), the message not decoded: a view of this channel's buffer, valid until the
        next receive (a server's compiled paths read it as it came, plog/fast_append.py), and
        its fds. A server's connection passes what its loop may answer meanwhile (_frames.c
        serve_packets): MemKV puts (`puts`), MemPlog appends (`plogs`, of `conn`). (None,
        got): an append was written that Python must commit; `got` is append_one's tuple."""
        if self.compiled and self.sock.gettimeout() is None:
            poll = self._busy_poll
            if puts is not None or plogs is not None:
                n, fds, flags, waited_s = _frames.serve_packets(self.sock.fileno(), self._buffer, MAX_FDS_PER_MESSAGE,
                                                                poll.window(), poll.window_s, puts, plogs, conn)
                if n == -2:          # an answer could not be sent: the peer is gone or stuck
                    raise PeerClosed()
                if n == _APPEND_PENDING:
                    poll.waited(waited_s)
                    return None, fds
            else:
                start = time.perf_counter()
                n, fds, flags = _frames.recv_packet(self.sock.fileno(), self._buffer, MAX_FDS_PER_MESSAGE,
                                                    poll.window())
                waited_s = time.perf_counter() - start
            poll.waited(waited_s)
            if n < 0:
                raise socket.timeout("receive timed out")
        else:
            n, ancillary, flags, _ = self._busy_poll.receive(self._recv_now, self._recv_blocking)
            fds = _take_fds(ancillary)
        return self._packet(n, fds, flags)

    @property
    def compiled_calls(self) -> bool:
        """Whether calls are compiled here: built, and no Python-level timeout on the socket."""
        return self.compiled and self.sock.gettimeout() is None

    def call(self, data: bytes) -> tuple[dict[str, Any], list[int]]:
        """send_encoded(data), then recv(): one compiled call where it can be (no Python
        between the request going and the wait for its reply). SendTimeout: nothing was sent."""
        if not self.compiled_calls:
            try:
                self.send_encoded(data)
            except socket.timeout:
                raise SendTimeout("send timed out") from None
            return self.recv()
        poll = self._busy_poll
        n, fds, flags, waited_s = _frames.call_packet(self.sock.fileno(), data, self._buffer, MAX_FDS_PER_MESSAGE,
                                                      poll.window())
        if n == -3:
            raise SendTimeout("send timed out")
        poll.waited(waited_s)
        if n < 0:
            raise socket.timeout("receive timed out")
        return self._message(n, fds, flags)

    def call_put(self, head: bytes, entries: int, key: bytes, value: bytes, request_id: int,
                 budget_s: float) -> tuple[dict[str, Any], list[int]]:
        """call() of a kv_put (`head`: its op, pool, ns and sec pairs, encoded, `entries` of
        them), built, sent and answered in one compiled call (_kvput.c call_put): a plain
        "stored" reply is not even decoded. Only where `compiled_calls`."""
        poll = self._busy_poll
        n, fds, flags, waited_s = _frames.call_put(self.sock.fileno(), head, entries, key, value, request_id,
                                                   budget_s, self._buffer, MAX_FDS_PER_MESSAGE, poll.window())
        if n == -3:
            raise SendTimeout("send timed out")
        poll.waited(waited_s)
        if n == _frames.PUT_STORED:
            return {"stored": True, "id": request_id}, fds
        if n < 0:
            raise socket.timeout("receive timed out")
        return self._message(n, fds, flags)

    @staticmethod
    def put_call(head: bytes, entries: int, key: bytes, value: Any) -> Callable[..., tuple[int, int, float]]:
        """call_put() as ServerLink.call_compiled takes a compiled call: `(fd, buffer, poll_s,
        request_id, timeout_s) -> (status, value, waited_s)` in _records' CALL_* terms (a plain
        "stored" reply: CALL_OK; another: CALL_REPLY, its length)."""
        def call(fd: int, buffer: bytearray, poll_s: float, request_id: int, timeout_s: float) -> tuple[int, int, float]:
            n, fds, flags, waited_s = _frames.call_put(fd, head, entries, key, value, request_id, timeout_s, buffer,
                                                       MAX_FDS_PER_MESSAGE, poll_s)
            if n == _frames.PUT_STORED:
                return _records.CALL_OK, 1, waited_s
            if fds or (n > 0 and flags & _TRUNCATED):
                _close_all(fds)
                return _records.CALL_BAD, 0, waited_s
            if n > 0:
                return _records.CALL_REPLY, n, waited_s
            if n == -3:
                return _records.CALL_UNSENT, 0, waited_s
            return (_records.CALL_CLOSED if n == 0 else _records.CALL_TIMEOUT), 0, waited_s
        return call

    def _message(self, n: int, fds: list[int], flags: int) -> tuple[dict[str, Any], list[int]]:
        return self.decode(*self._packet(n, fds, flags))

    def _packet(self, n: int, fds: list[int], flags: int) -> tuple[memoryview, list[int]]:
        if flags & _TRUNCATED:
            _close_all(fds)
            raise ProtocolError(f"message over {MAX_MESSAGE_BYTES} bytes or {MAX_FDS_PER_MESSAGE} fds")
        if not n:
            _close_all(fds)
            raise PeerClosed()
        return memoryview(self._buffer)[:n], fds

    def compiled_call_args(self) -> tuple[int, bytearray, float] | None:
        """What a compiled send-and-receive on this channel needs (the fd, the buffer replies
        are received into, how long to poll), or None when it cannot take one (no compiled
        module, or a Python-level timeout on the socket)."""
        if not self.compiled_calls:
            return None
        return self.sock.fileno(), self._buffer, self._busy_poll.window()

    def waited(self, taken_s: float) -> None:
        """A compiled call's wait for its reply took `taken_s` (BusyPoll's rule)."""
        self._busy_poll.waited(taken_s)

    def _recv_now(self) -> tuple[int, list, int, Any]:
        # The socket must have no Python-level timeout (set_deadline bounds waits in the
        # kernel instead): under one, CPython waits out the timeout even with MSG_DONTWAIT.
        return self.sock.recvmsg_into([self._buffer], _ANCILLARY_BYTES, _RECV_NOW_FLAGS)

    def _recv_blocking(self) -> tuple[int, list, int, Any]:
        try:
            return self.sock.recvmsg_into([self._buffer], _ANCILLARY_BYTES, _CLOEXEC)
        except BlockingIOError:          # SO_RCVTIMEO ran out
            raise socket.timeout("receive timed out") from None

    def peer_gone(self) -> bool:
        """The peer hung up (one non-blocking poll; see sockets.py)."""
        return self._hang_up.peer_gone()

    def close(self) -> None:
        self._hang_up.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def forget(self) -> None:
        """In a forked child: this process's copy of the fd closed (the connection is the
        parent's, and ends when the parent closes it)."""
        self._hang_up.forked()
        self.sock.close()


def listen(path: str, backlog: int, mode: int = 0o600, gid: int | None = None) -> socket.socket:
    """Who may connect is who may write the socket file. It is made the owner's alone, given
    to `gid`, then opened to `mode`, all before it listens (nobody can connect to a socket
    that does not listen), so it is never wider than asked."""
    if os.path.exists(path):
        os.unlink(path)   # a stale socket of a dead server; the cluster said the id is ours
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    bound = False
    try:
        old_umask = os.umask(0o077)   # only this user's processes may connect
        try:
            sock.bind(path)
            bound = True
        finally:
            os.umask(old_umask)
        _set_access(path, mode, gid)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        if bound:
            os.unlink(path)
        raise
    return sock


def _set_access(path: str, mode: int, gid: int | None) -> None:
    """chown and chmod the socket we bound, pinned by an O_PATH fd: were the path swapped
    meanwhile for a link to another file, that file would not be touched."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise PermissionError(f"{path} was replaced while the server bound it")
        pinned = f"/proc/self/fd/{fd}"
        if gid is not None:
            try:
                os.chown(pinned, -1, gid)
            except PermissionError:
                raise PermissionError(f"cannot give the socket {path} to group {gid}: the server's user is "
                                      "not a member of it") from None
        os.chmod(pinned, mode)
    finally:
        os.close(fd)


def _take_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

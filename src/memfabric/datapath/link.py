"""A connection to one server on this host, and the memory it has handed over.

Calls are synchronous request/reply over one IPC channel (a lock keeps them whole when
threads share a link; waiting for it counts against the call's timeout). A call that times
out leaves the link in use; only a broken stream closes it. Segment fds and namespace
generation tables arrive once, are mapped once (revocably, see mapping.py) and kept until
the server says a segment is gone (a reply's "gone" list), its namespace goes, or the link
closes. Safety does not depend on this side letting go: a segment belongs to one namespace
for its whole life, and the server destroys a gone segment's memory, so a mapping kept too
long reads zeros, never another tenant's bytes. Whenever this side lets go it revokes
first, so stale views read zeros here too.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable

from ..errors import (BmError, LimitExceeded, MemfabricError, NoSuchNamespace, NoSuchObject, ProtocolError,
                      ServerUnavailable, Timeout, error_from_code)
from ..limits import BUSY_POLL_US, DEFAULT_REQUEST_TIMEOUT_S, MAX_FDS_PER_MESSAGE, MAX_UNANSWERED_REQUESTS, SETTLE_S
from ..transport import wire
from ..transport.ipc import IpcChannel, PeerClosed, SendTimeout
from .deadline import call_timeout_s, serving_until
from .late_replies import undo_of
from ..media.files import FileSegment
from . import forks
from .reentry import methods_code, refuse_reentry
from .mapping import SharedRange

try:    # a plog append's compiled call (_plogcall.c call_append): ./dev builds it
    from .. import _records
except ImportError:      # pragma: no cover
    _records = None

log = logging.getLogger("memfabric.link")

# A same-host client reads memory without asking the server; how often it checks that
# the server is still there (one non-blocking poll).
LIVENESS_CHECK_EVERY_S = 0.002

Creds = tuple[str, str, bytes]   # (pool, ns, secId)


class _Mapped:
    """One fd the server handed over, mapped once (revocably), kept for the link's life."""

    __slots__ = ("fd", "_file", "range", "view", "size", "ns")

    def __init__(self, fd: int, size: int, readonly: bool, pool: str, ns: str) -> None:
        self.fd = fd
        self.size = size
        self.ns = ns
        try:
            # Closes the fd once, in one step, however often close() is called: a close cut
            # short (Ctrl-C) is done again, and by then the number may name another file.
            self._file = io.FileIO(fd, "r", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        try:
            self.range = SharedRange([(fd, 0, size)], writable=not readonly, tag=(pool, ns, None))
        except BaseException:
            self._file.close()
            raise
        self.view = self.range.view()

    def close(self) -> None:
        self.range.revoke()          # first: from here on nothing in this process reaches it
        self.range.close_or_revoke()
        self._file.close()


class _FileSegment(FileSegment):
    """A peer's file segment, as a server reaches it: through the fd, never mapped (a client
    of that namespace could truncate the file, and a mapping of the lost part would kill this
    server with SIGBUS). Answers like a layout piece on another host."""

    def __init__(self, fd: int, size: int, ns: str) -> None:
        super().__init__(-1, fd, size, path="")
        self.ns = ns
        self.view = self          # what segment_view() hands out

    def destroy(self) -> None:   # never ours to destroy: a peer's segment
        self.close()


class _Broken(Exception):
    """The stream is broken: the link closes, and the caller gets `error`."""

    def __init__(self, error: MemfabricError) -> None:
        self.error = error


class ServerLink:
    is_local = True

    def __init__(self, ipc_socket: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 role: str = "client", busy_poll_s: float = BUSY_POLL_US / 1e6) -> None:
        self.ipc_socket = ipc_socket
        self.role = role             # "peer": a server's own link, which never maps a peer's files
        self.busy_poll_s = busy_poll_s
        self.timeout_s = timeout_s
        # One request at a time on the channel. An RLock for its _is_owned(): a Ctrl-C right
        # after the acquire, before the try that releases it, must not leave it taken for ever.
        self._lock = threading.RLock()
        self._map_lock = threading.RLock()     # one mapping decision at a time
        self._next_id = 1
        self._segments: dict[tuple[str, int], _Mapped] = {}
        self._gen_tables: dict[tuple[str, str, int], tuple[_Mapped, memoryview]] = {}
        # What a semantic mapped through this link for a namespace ((pool, ns, what) -> an
        # object with close()): MemKV's index, say. Closed with the namespace or the link.
        self.attached: dict[tuple[str, str, str], Any] = {}
        # Users' object mappings made from this link's fds: revoked with it.
        self._ranges: weakref.WeakSet[SharedRange] = weakref.WeakSet()
        self._checked_at = 0.0
        self._closed = False
        # Requests given up on (id -> (op, args)): their replies are dropped when they come.
        self._abandoned: dict[int, tuple[str, dict[str, Any]]] = {}
        self._undos: list[dict[str, Any]] = []
        self._late_gone: list = []       # "gone" lists of replies dropped as late
        self.compiled_calls = 0          # requests sent by call_compiled (plog appends, kv puts)
        self._channel = IpcChannel.connect(ipc_socket, timeout_s, busy_poll_s)
        self._bound_s = 0.0
        self._bound_waits(timeout_s)
        try:
            hello = self.call("hello", role=role, pid=os.getpid())
        except BaseException:
            self._channel.close()
            raise
        self.server_id: int = hello["server_id"]
        self.host: str = hello["host"]
        forks.track(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def forked(self) -> None:
        """In a forked child: the parent's connection, never used here (forks.py); this
        process's copy of its fd is closed, its own maps stay until close()."""
        self._lock = threading.RLock()         # a thread of the parent's may have held them:
        self._map_lock = threading.RLock()     # none is here to let go
        self._closed = True
        self._abandoned.clear()                # the parent's to settle, on its connection
        self._undos.clear()
        self._channel.forget()
        # Users' mappings stay as the parent's do: the parent still holds them (and what the
        # server lets go of later reads zeros), so this close must not revoke them here.
        self._ranges = weakref.WeakSet()

    # ---- requests ---------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        reply, fds = self.call_with_fds(op, **args)
        for fd in fds:
            os.close(fd)
        self._forget_segments(reply.pop("gone", None))
        return reply

    def call_put(self, head: bytes, entries: int, key: bytes, value: Any, creds: dict[str, Any]) -> dict[str, Any]:
        """call("kv_put", key=key, value=value, **creds) with its request built, sent and its
        plain reply read in one compiled call (ipc.py call_put): `head` the request's op and
        creds pairs, encoded (`entries` of them)."""
        if not self._channel.compiled_calls:
            return self.call("kv_put", key=key, value=bytes(value), **creds)
        # An idle link's put in the fewest steps (call_compiled); a busy one's waits its turn.
        got = self.call_compiled("kv_put", creds, self._channel.put_call(head, entries, key, value))
        if got == 1:
            return {"stored": True}
        if got is not None:
            return got
        reply, fds = self._call_with_fds("kv_put", {}, (head, entries, key, value))
        for fd in fds:
            os.close(fd)
        self._forget_segments(reply.pop("gone", None))
        return reply

    def call_with_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        """One request and its reply. A TIMEOUT leaves the link in use: the late reply is
        dropped when it comes (late_replies.py). Only a broken stream closes the link."""
        return self._call_with_fds(op, args)

    def _call_with_fds(self, op: str, args: dict[str, Any],
                       put: tuple[bytes, int, bytes, bytes] | None = None) -> tuple[dict[str, Any], list[int]]:
        timeout_s = call_timeout_s(self.timeout_s)
        if timeout_s <= 0:
            raise Timeout(f"no time was left to ask server at {self.ipc_socket} for {op!r}")
        # Re-entered from a signal's handler while this thread's own request is under way
        # here: another request now would read the first one's reply as its own (BUSY).
        self._refuse_reentry(op)
        args["op"] = op
        args["budget_s"] = timeout_s
        try:
            if not self._lock.acquire(timeout=timeout_s):
                raise Timeout(f"server at {self.ipc_socket}: other requests of this process held the "
                              f"connection for {timeout_s:.3g}s ({op!r})")
            reply, fds = self._exchange(op, args, timeout_s, put)
        except _Broken as broken:
            failure: MemfabricError | None = broken.error
        else:
            failure = None
        finally:
            try:
                self._lock.release()     # no call (where a signal's handler runs) before it
            except RuntimeError:
                pass                     # not ours: the wait for it timed out or was interrupted
        if failure is not None:
            # The stream's position is unknown now: this link is done (the session reconnects).
            self._fail()
            raise failure
        if self._late_gone:    # outside the channel's lock: the map lock is taken before it
            late_gone, self._late_gone = self._late_gone, []
            self._forget_segments(late_gone)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            if reply["error"] == BmError.NO_SUCH_NAMESPACE:
                self.release_namespace(str(args.get("pool")), str(args.get("ns")))
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        return reply, fds

    def _refuse_reentry(self, op: str) -> None:
        """BUSY when re-entered from a signal's handler part way through a request of this
        thread here; a lock a Ctrl-C left held is let go (reentry.py). For callers that must
        know before they start (a plog append joining other threads' batch)."""
        if self._lock._is_owned():          # (else nothing to tell: every request asks)
            refuse_reentry(self, (self._lock,), _SERVER_LINK_CODES, f"the connection to {self.ipc_socket} ({op!r})")

    def call_compiled(self, op: str, args: dict[str, Any], call: Callable[..., tuple[int, int, float]]) -> Any:
        """One request sent and answered by a compiled call (_plogcall.c call_append:
        `call(fd, buffer, poll_s, request_id, timeout_s)` -> (status, value, waited_s)) when
        this link is idle (no other request under way, none given up on): `value` when the
        reply was the common one (CALL_OK), else the reply as call() returns it (raising its
        error); None when not taken (nothing was sent: call() it). The rules of _exchange
        hold: a TIMEOUT or a Ctrl-C leaves the request given up on, its late reply dropped;
        a broken stream closes the link."""
        if self._closed or self._abandoned or self._undos or self._late_gone or self._lock._is_owned():
            return None              # (owned: re-entered from a signal's handler)
        timeout_s = call_timeout_s(self.timeout_s)
        if timeout_s <= 0:
            return None
        failure: MemfabricError | None = None
        got: Any = None
        try:
            if not self._lock.acquire(False):
                return None          # busy: call() waits its turn
            channel_args = self._channel.compiled_call_args()
            if self._closed or self._abandoned or self._undos or channel_args is None:
                return None
            fd, buffer, poll_s = channel_args
            request_id = self._next_id
            self._next_id += 1
            if timeout_s != self._bound_s:     # (as _bound_waits: the common case costs no call)
                self._bound_waits(timeout_s)
            # Given up on until its reply is read: a Ctrl-C in the call leaves its reply to be dropped.
            self._abandoned[request_id] = (op, args)
            self.compiled_calls += 1
            try:
                status, value, waited_s = call(fd, buffer, poll_s, request_id, timeout_s)
            except OSError as exc:
                raise _Broken(self._gone(op, exc)) from None
            done, got = self._compiled_reply(op, args, request_id, timeout_s, buffer, status, value, waited_s)
            if done:
                return got
        except _Broken as broken:
            failure = broken.error
        finally:
            try:
                self._lock.release()     # no call (where a signal's handler runs) before it
            except RuntimeError:
                pass                     # not ours: not taken, or interrupted before it was
        return self._compiled_error(op, args, got, failure)

    def end_compiled(self, op: str, args: dict[str, Any], request_id: int, timeout_s: float, buffer: bytearray,
                     status: int, value: int, waited_s: float) -> Any:
        """call_compiled's rules for a call a compiled caller made itself (_plogforward.c's forward
        in a home's receive loop), having taken this link as call_compiled does: its lock (held
        by this thread, released here), the request's id and its entry in _abandoned. Returns
        or raises as call_compiled."""
        failure: MemfabricError | None = None
        got: Any = None
        try:
            done, got = self._compiled_reply(op, args, request_id, timeout_s, buffer, status, value, waited_s)
            if done:
                return got
        except _Broken as broken:
            failure = broken.error
        finally:
            try:
                self._lock.release()
            except RuntimeError:
                pass
        return self._compiled_error(op, args, got, failure)

    def _compiled_reply(self, op: str, args: dict[str, Any], request_id: int, timeout_s: float, buffer: bytearray,
                        status: int, value: int, waited_s: float) -> tuple[bool, Any]:
        """Under the lock, a compiled call's outcome: (True, value) for the common reply, or
        (False, the reply decoded); raises Timeout, or _Broken when the link must close."""
        if status < 0:        # the call failed with errno `value` (as an OSError from call_compiled's call)
            raise _Broken(self._gone(op, OSError(value, os.strerror(value))))
        self._channel.waited(waited_s)
        if status == _records.CALL_OK:
            del self._abandoned[request_id]
            return True, value
        if status == _records.CALL_UNSENT:
            del self._abandoned[request_id]          # a SEQPACKET message goes whole or not at all
            raise Timeout(f"server at {self.ipc_socket} took no request for {timeout_s:.3g}s ({op!r})")
        if status == _records.CALL_TIMEOUT:
            self._abandon(request_id, op, args)
            raise Timeout(f"server at {self.ipc_socket} did not answer {op!r} within {timeout_s:.3g}s")
        if status == _records.CALL_CLOSED:
            raise _Broken(self._gone(op, PeerClosed()))
        if status != _records.CALL_REPLY:
            raise _Broken(ProtocolError(f"the reply to {op!r} was over {len(buffer)} bytes or carried fds"))
        try:
            reply = wire.decode(memoryview(buffer)[:value])
        except ProtocolError as exc:
            raise _Broken(exc) from None
        if reply["id"] != request_id:        # nothing was given up on: no late reply can come
            raise _Broken(ProtocolError(f"reply to request {request_id} carried id {reply['id']!r}"))
        del self._abandoned[request_id]
        return False, reply

    def _compiled_error(self, op: str, args: dict[str, Any], reply: Any, failure: MemfabricError | None) -> Any:
        """After the lock: a broken link closed, an error reply raised, else the reply."""
        if failure is not None:
            self._fail()
            raise failure
        if "error" in reply:
            if reply["error"] == BmError.NO_SUCH_NAMESPACE:
                self.release_namespace(str(args.get("pool")), str(args.get("ns")))
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        self._forget_segments(reply.pop("gone", None))
        return reply

    def _exchange(self, op: str, args: dict[str, Any], timeout_s: float,
                  put: tuple[bytes, int, bytes, bytes] | None = None) -> tuple[dict[str, Any], list[int]]:
        """Under the lock: send the request, then receive until its reply, dropping late
        replies to requests given up on before. Raises _Broken when the link must close.
        `put`: a kv_put built by the compiled call (call_put), `args` its stand-in."""
        if self._closed:
            raise ServerUnavailable(f"the connection to {self.ipc_socket} is closed")
        deadline = time.monotonic() + timeout_s
        request_id = self._next_id
        self._next_id += 1
        args["id"] = request_id
        try:
            data = b"" if put is not None else wire.encode(args)     # too large: refused here, the link stays up
        except ProtocolError as exc:
            raise LimitExceeded(f"request {op!r} is too large: {exc}") from None
        self._bound_waits(timeout_s)
        # Marked given up on until its reply is read: a Ctrl-C anywhere from here on (even
        # between two lines) leaves its late reply to be dropped, not read as another's.
        self._abandoned[request_id] = (op, args)
        sending = True
        while True:
            try:
                # The request goes and the first reply comes in one call (ipc.py).
                if not sending:
                    reply, fds = self._channel.recv()
                elif put is None:
                    reply, fds = self._channel.call(data)
                else:
                    reply, fds = self._channel.call_put(*put, request_id, args["budget_s"])
            except SendTimeout:
                # A SEQPACKET message goes whole or not at all: nothing was sent.
                self._abandoned.pop(request_id, None)
                raise Timeout(f"server at {self.ipc_socket} took no request for {timeout_s:.3g}s ({op!r})") from None
            except socket.timeout:
                self._abandon(request_id, op, args)
                raise Timeout(f"server at {self.ipc_socket} did not answer {op!r} within {timeout_s:.3g}s") from None
            except (PeerClosed, ConnectionError, OSError) as exc:
                raise _Broken(self._gone(op, exc)) from None
            except ProtocolError as exc:
                raise _Broken(exc) from None
            except BaseException:
                self._abandon(request_id, op, args, interrupted=True)   # perhaps sent: drop its reply
                raise
            try:
                sending = False
                reply_id = reply.get("id")
                # The server answers one connection's requests in order: those before this reply
                # that are still unanswered were never sent whole.
                if len(self._abandoned) > 1:
                    for earlier in [r for r in self._abandoned if type(reply_id) is int and r < reply_id]:
                        del self._abandoned[earlier]
                if reply_id == request_id:
                    self._abandoned.pop(request_id, None)
                    if self._undos:
                        self._send_undos()
                    return reply, fds
                self._drop_late(reply_id, reply, fds, request_id)
            except BaseException:
                # Interrupted (Ctrl-C) with our reply read but not taken: it comes no more, so
                # it is dropped here as a late one would be, its work undone.
                if request_id in self._abandoned and reply.get("id") == request_id:
                    self._drop_late(request_id, reply, fds, request_id)
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abandon(request_id, op, args)
                raise Timeout(f"server at {self.ipc_socket} did not answer {op!r} within {timeout_s:.3g}s")
            self._bound_waits(remaining)

    def _bound_waits(self, timeout_s: float) -> None:
        """Each send and receive waits at most `timeout_s` (set only when it changes)."""
        timeout_s = max(timeout_s, 0.001)      # 0 would mean "no bound" to the kernel
        if timeout_s != self._bound_s:
            self._channel.set_deadline(timeout_s)
            self._bound_s = timeout_s

    def _abandon(self, request_id: int, op: str, args: dict[str, Any], interrupted: bool = False) -> None:
        """The caller gives up on a request it sent: its reply will be dropped. (Interrupted,
        as by Ctrl-C, the link is checked on the next call: the interruption goes on up.)"""
        self._abandoned[request_id] = (op, args)
        if not interrupted and len(self._abandoned) > MAX_UNANSWERED_REQUESTS:
            raise _Broken(Timeout(f"server at {self.ipc_socket} left {len(self._abandoned)} requests "
                                  "unanswered"))

    def _drop_late(self, reply_id: Any, reply: dict[str, Any], fds: list[int], request_id: int) -> None:
        for fd in fds:
            os.close(fd)
        late = self._abandoned.pop(reply_id, None) if type(reply_id) is int else None
        if late is None:
            raise _Broken(ProtocolError(f"reply to request {request_id} carried id {reply_id!r}"))
        if "gone" in reply:     # dropped, but what it says of our segments still holds
            self._late_gone.extend(reply["gone"] if isinstance(reply["gone"], list) else [])
        undo = undo_of(late[0], late[1], reply)
        if undo is not None:
            self._undos.append(undo)

    def send_later(self, op: str, **args: Any) -> None:
        """`op`, unanswered, with the next request that gets through: a let-go that timed out
        (perhaps never sent) must still reach the server, else what it held stays held for
        the link's life. One that did get there is refused the second time, harmlessly."""
        self._undos.append({"op": op, **args})

    def _send_undos(self) -> None:
        """Send what undoes late replies' work, without waiting: the replies are dropped."""
        while self._undos:
            undo = self._undos.pop()
            undo["id"] = request_id = self._next_id
            self._next_id += 1
            try:
                self._channel.send_encoded(wire.encode(undo))
            except (OSError, MemfabricError) as exc:
                log.warning("could not send %r to undo a request given up on: %s", undo["op"], exc)
                return
            self._abandoned[request_id] = (undo["op"], undo)

    def _gone(self, op: str, exc: BaseException) -> ServerUnavailable:
        return ServerUnavailable(f"server at {self.ipc_socket} is gone ({op!r}: {exc.__class__.__name__})")

    def _fail(self) -> None:
        with self._lock:
            self._closed = True
            self._channel.close()
        self._revoke_all(ServerUnavailable(f"server {getattr(self, 'server_id', '?')} at {self.ipc_socket} "
                                           "was lost: this mapping reads zeros since"))

    # ---- liveness -------------------------------------------------------------------

    def peer_gone(self) -> bool:
        """Closed, or the server hung up (a restarted peer leaves our old link so)."""
        if not self._closed and self._channel.peer_gone():
            self._fail()
        return self._closed

    def check_alive(self) -> None:
        """peer_gone(), at most once per LIVENESS_CHECK_EVERY_S: reads and writes call this."""
        now = time.monotonic()
        if now - self._checked_at < LIVENESS_CHECK_EVERY_S and not self._closed:
            return
        self._checked_at = now
        if self.peer_gone():
            raise ServerUnavailable(f"server {self.server_id} at {self.ipc_socket} is gone")

    # ---- memory it hands over -----------------------------------------------------------

    def gen_table(self, creds: Creds, incarnation: int) -> memoryview:
        pool, ns, _ = creds
        entry = self._gen_tables.get((pool, ns, incarnation))
        if entry is not None:
            return entry[1]
        with self._map_lock:
            entry = self._gen_tables.get((pool, ns, incarnation))
            if entry is None:
                reply, fds = self.call_with_fds("ns_open", pool=pool, ns=ns, sec=creds[2])
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError(f"ns_open sent {len(fds)} fds, expected 1")
                mapped = _Mapped(fds[0], reply["table_bytes"], readonly=True, pool=pool, ns=ns)
                entry = (mapped, mapped.view.cast("Q"))
                # A newer incarnation means the older ones are destroyed: their tables go (and
                # read zeros for handles still holding them: NO_SUCH_OBJECT).
                for key in [k for k in self._gen_tables if k[:2] == (pool, ns)]:
                    self._gen_tables.pop(key)[0].close()
                self._gen_tables[(pool, ns, reply["incarnation"])] = entry
                self._forget_segments(reply.pop("gone", None))
        return entry[1]

    def _mapped(self, creds: Creds, segment: int) -> _Mapped:
        mapped = self._segments.get((creds[0], segment))
        if mapped is None:
            self.fetch_segments(creds, [segment])
            # Another thread may have heard it is gone meanwhile: then so is the object in it.
            mapped = self._segments.get((creds[0], segment))
            if mapped is None:
                raise NoSuchObject(f"segment {segment} of pool {creds[0]!r} is gone (its objects were freed)")
        return mapped

    def segment_view(self, creds: Creds, segment: int) -> memoryview:
        return self._mapped(creds, segment).view

    def segment_fd(self, creds: Creds, segment: int) -> int:
        return self._mapped(creds, segment).fd

    def fetch_segments(self, creds: Creds, segments: list[int]) -> None:
        pool = creds[0]
        if all((pool, s) in self._segments for s in segments):
            return
        with self._map_lock:
            missing = sorted({s for s in segments if (pool, s) not in self._segments})
            for i in range(0, len(missing), MAX_FDS_PER_MESSAGE):
                batch = missing[i:i + MAX_FDS_PER_MESSAGE]
                reply, fds = self.call_with_fds("segments", pool=pool, ns=creds[1], sec=creds[2],
                                                segments=batch)
                if len(fds) != len(batch):
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError(f"asked for {len(batch)} segments, got {len(fds)} fds")
                sizes = reply.get("sizes")
                if not isinstance(sizes, list) or len(sizes) != len(fds):
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError(f"segments reply without a size for each of its {len(fds)} fds")
                mappable = reply.get("mappable") or [True] * len(fds)
                for segment, fd, size, can_map in zip(batch, fds, sizes, mappable, strict=True):
                    if can_map or self.role != "peer":
                        self._segments[(pool, segment)] = _Mapped(fd, size, readonly=False, pool=pool, ns=creds[1])
                    else:
                        self._segments[(pool, segment)] = _FileSegment(fd, size, creds[1])
                # After storing: a segment destroyed since it was handed over is named here.
                self._forget_segments(reply.pop("gone", None))

    def populate(self, creds: Creds, segment: int, offset: int, length: int) -> None:
        """Fault in a range of a segment this link has mapped, before it is written."""
        mapped = self._segments.get((creds[0], segment))
        if isinstance(mapped, _Mapped):
            mapped.range.populate(offset, length)

    def map_object(self, pieces: list[tuple[int, int, int]], writable: bool, tag: tuple) -> SharedRange:
        """A user's contiguous mapping made of this link's segments; revoked with them.
        Populated at once: a mapping is made to be touched."""
        shared = SharedRange(pieces, writable, tag=tag, populate=True)
        self._ranges.add(shared)
        return shared

    def track(self, shared: SharedRange) -> None:
        """A mapping that uses this link's segments too (an object spread over servers)."""
        self._ranges.add(shared)

    # ---- letting go -------------------------------------------------------------------------

    def release_namespace(self, pool: str, ns: str) -> None:
        """A namespace is gone: revoke every range of it here and close its fds."""
        with self._map_lock:
            for shared in list(self._ranges):
                if shared.tag[:2] == (pool, ns):
                    shared.revoke(NoSuchNamespace(f"namespace {ns!r} in pool {pool!r} was destroyed: "
                                                  "this mapping reads zeros since"))
            for key in [key for key, m in self._segments.items() if key[0] == pool and m.ns == ns]:
                self._segments.pop(key).close()
            for key in [k for k in self._gen_tables if k[:2] == (pool, ns)]:
                self._gen_tables.pop(key)[0].close()
            for key in [k for k in self.attached if k[:2] == (pool, ns)]:
                self.attached.pop(key).close()

    def map_shared(self, fd: int, size: int, pool: str, ns: str) -> _Mapped:
        """Map writable memory the server handed over for this namespace (a plog's shared
        stage); closed, it is revoked first, so a thread still writing it writes nowhere."""
        return _Mapped(fd, size, readonly=False, pool=pool, ns=ns)

    def _forget_segments(self, gone: object) -> None:
        """The server destroyed these segments ([pool, id] each): unmap them, close their fds.
        No object lives in them any more, so no handle of ours reads them."""
        if not isinstance(gone, list):
            return
        with self._map_lock:
            for item in gone:
                if not (isinstance(item, list) and len(item) == 2):
                    continue
                pool, segment = item
                mapped = self._segments.pop((pool, segment), None)
                if mapped is not None:
                    mapped.close()
                # A user's mapping pins its object, so its segments go only with the namespace.
                for shared in list(self._ranges):
                    if shared.tag[0] == pool and shared.tag[2] and segment in shared.tag[2]:
                        shared.revoke(NoSuchNamespace(f"the namespace {shared.tag[1]!r} of this mapping was "
                                                      "destroyed: it reads zeros since"))

    def _revoke_all(self, reason: Exception | None = None) -> None:
        with self._map_lock:
            for shared in list(self._ranges):
                shared.revoke(reason)
            for mapped in list(self._segments.values()) + [m for m, _ in self._gen_tables.values()] + \
                    list(self.attached.values()):
                mapped.close()
            self._segments.clear()
            self._gen_tables.clear()
            self.attached.clear()

    def close(self) -> None:
        if self._abandoned and not self._closed:
            settle(self)
        with self._lock:
            self._closed = True
            self._channel.close()
        self._revoke_all()


_SERVER_LINK_CODES = methods_code(ServerLink)


def settle(link: Any) -> None:
    """Before a link closes with requests given up on: one last short call reads their late
    replies, and sends what undoes their work (an object allocated for no one), so that
    closing right after a TIMEOUT, or a Ctrl-C, leaves nothing behind."""
    with serving_until(time.monotonic() + SETTLE_S):
        try:
            link.call("stats")
        except MemfabricError:
            pass

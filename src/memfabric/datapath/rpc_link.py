"""A connection to a server on another host: pipelined RPC over one TCP connection.

Requests go out under a send lock. There is no reader thread: a waiting caller takes the
receive lock and reads replies itself, handing each to the request it answers (its payload
lands straight in the buffer that request registered) until its own arrives. A lone request
so costs no thread hand-off; many in flight share one reader at a time. Replies come in the
order of the requests (rpc.py), so a reader whose own request is the oldest unanswered one
takes its reply's payload straight into its buffer, with the header, in one receive.

A lone span read or write, or a lone kv_get, on an idle link (no other request in flight,
both locks free) goes through compiled code (_spans.c, _kvget.c: send, wait and receive in
one call, a read's payload straight into the caller's buffer); anything unusual in its
reply is read here as any reply is.

Every wait has a deadline. A request that runs out of time gets TIMEOUT and the link stays
in use: its entry is dropped, so its reply, when it comes, is read past (late_replies.py).
A caller never gets its buffer back while a reader may still be receiving into it. The link
closes only when the stream is broken: the peer is gone, a frame stalls part way, or a
protocol error.

A caller interrupted (Ctrl-C) between sending a request and waiting for it would leave the
request's entry, and so its buffer, to the next reader: callers go through request() (one
request) or InFlight (several at once), which know the request before it is sent and let go
of it however the call ends.
"""

from __future__ import annotations

import logging
import ssl
import socket
import threading
import time
from typing import Any

from ..errors import (LimitExceeded, MemfabricError, ProtocolError, ServerUnavailable, Timeout,
                      error_from_code)
from ..limits import BUSY_POLL_US, DEFAULT_REQUEST_TIMEOUT_S, MAX_RPC_IN_FLIGHT, MAX_UNANSWERED_REQUESTS
from ..transport import rpc, wire
from ..transport.rpc import _frames
from . import forks
from .reentry import methods_code, refuse_reentry
from .deadline import call_timeout_s
from .late_replies import undo_of
from .link import LIVENESS_CHECK_EVERY_S, Creds, settle

log = logging.getLogger("memfabric.link")
SPAN_HEAD_ENTRIES = 6         # pool, ns, sec, bm_id, segment, op: span_head()


class Pending:
    """One request in flight. Its reply lands here (its payload straight in `into`: one
    buffer, or a list of them filled in order), and then `done` is set. The caller that
    waits while another thread reads sleeps on `waker`, which is made only then: most
    callers read their own reply and never need one. The waker is a plain lock, held until
    the reply is in, not an Event: Event.set() waits for a lock of the Event's own, which its
    sleeper holds in Event.wait, and a signal's handler run there whose own request's reader
    hands the sleeper its reply waited for it (for ever, or stalling every reader of the
    link until the handler's timeout). A lock's release() never waits."""

    __slots__ = ("done", "waker", "reply", "into", "error", "op", "args", "id", "given_up")

    def __init__(self, into: memoryview | list | None, op: str = "", args: dict[str, Any] | None = None) -> None:
        self.done = False
        self.waker: Any = None     # a threading.Lock, held until done
        self.reply: dict[str, Any] | None = None
        self.into = into
        self.error: MemfabricError | None = None
        self.op = op               # kept to undo what the request did if its caller gives up
        self.args = args
        self.id = 0                # set as it is sent: until then no reader can reach it
        self.given_up = False      # its caller let go: no reply lands in `into` (now None)

    def finish(self) -> None:
        self.done = True
        waker = self.waker         # read after `done` is set: a sleeper that made it sees one or the other
        if waker is not None:
            try:
                waker.release()
            except RuntimeError:
                pass               # released already

    def sleep(self, timeout_s: float) -> bool:
        """Wait until done, at most `timeout_s`; returns whether it is done."""
        waker = self.waker
        if waker is None:
            waker = threading.Lock()
            waker.acquire()
            self.waker = waker
        if not self.done and waker.acquire(timeout=timeout_s):
            try:
                waker.release()    # left open once done, as a set Event: another sleeper wakes too
            except RuntimeError:
                pass
        return self.done


class RpcLink:
    is_local = False

    def __init__(self, address: str, token: bytes, tls: ssl.SSLContext | None = None,
                 timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, role: str = "client",
                 busy_poll_s: float = BUSY_POLL_US / 1e6) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.busy_poll_s = busy_poll_s
        # Connecting is bounded by the link's timeout and by the request being served, if any
        # (a server meeting a stuck peer must still answer its client in time).
        connect_s = call_timeout_s(timeout_s)
        if connect_s <= 0:
            raise Timeout(f"no time was left to connect to {address}")
        self._frames = rpc.connect(address, tls, connect_s, busy_poll_s)
        try:
            self.server_id = rpc.client_handshake(self._frames, token, call_timeout_s(timeout_s))
        except Timeout as exc:
            self._frames.close()
            raise Timeout(f"server at {address}: {exc}") from None
        except BaseException:
            self._frames.close()
            raise
        # RLocks for their _is_owned(): a Ctrl-C right after an acquire, before the try that
        # releases it, must not leave the lock taken for ever (every later call would hang).
        self._send_lock = threading.RLock()
        self._recv_lock = threading.RLock()
        self._lock = threading.RLock()           # (an RLock to tell its owner: _refuse_reentry)
        self._pending: dict[int, Pending] = {}
        self._abandoned: dict[int, Pending] = {}    # given up on: their replies are read past
        self._undos: list[dict[str, Any]] = []
        self._next_id = 1
        self._closed = False
        self._checked_at = 0.0
        self.compiled_spans = 0        # span requests that went through call_span()
        self.compiled_gets = 0         # gets that went through call_get()
        # call_span()'s own handle on the socket (plain TCP, _frames built): a duplicate, so a
        # close() by another thread never frees the fd number under a compiled call; it is
        # closed under the receive lock, which every such call holds. Its polling is its own.
        self._span_dup = None
        if self._frames.compiled and hasattr(_frames, "SpanFd"):
            try:
                self._span_dup = _frames.SpanFd(self._frames.sock.fileno())
            except OSError:          # out of fds: this link just goes without it
                pass
        self._span_fd = -1 if self._span_dup is None else self._span_dup.fd
        self._span_block = memoryview(bytearray(rpc.FIRST_BLOCK))
        self._span_window_s = busy_poll_s
        self._span_polling = busy_poll_s > 0
        try:
            hello = self.call("hello", role=role)
        except BaseException:
            self.close()
            raise
        self.host: str = hello["host"]
        forks.track(self)

    def forked(self) -> None:
        """In a forked child: the parent's connection, never used nor shut down here
        (forks.py); this process's copies of its fds are closed."""
        self._send_lock = threading.RLock()     # a thread of the parent's may have held them:
        self._recv_lock = threading.RLock()     # none is here to let go
        self._lock = threading.RLock()
        self._closed = True
        self._pending.clear()
        self._abandoned.clear()
        self._undos.clear()
        self._frames.forget()
        dup, self._span_dup, self._span_fd = self._span_dup, None, -1
        if dup is not None:
            dup.close()

    # ---- requests ---------------------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any], payload: memoryview | list | None = None,
                into: memoryview | list | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Send a request and wait for its reply (submit() and wait() in one): however this
        ends, by a reply, an error or an interruption at any line, no reply lands in `into`
        once it has returned or raised."""
        self._refuse_reentry(op)
        pending = Pending(into, op, args)
        try:
            self._send(pending, payload, timeout_s)
            return self.wait(pending.id, pending, op, timeout_s)
        finally:
            if not pending.done:
                # _let_go() in place: no call (where a signal's handler runs) before its try.
                interrupted = None
                while True:
                    try:
                        self.cancel(pending.id, pending)
                        break
                    except BaseException as exc:
                        interrupted = exc
                if interrupted is not None:
                    try:
                        raise interrupted
                    finally:
                        interrupted = None  # no cycle (frame, traceback) kept for the collector

    def submit(self, op: str, args: dict[str, Any], payload: memoryview | list | None = None,
               into: memoryview | list | None = None, timeout_s: float | None = None) -> tuple[int, Pending]:
        """Send a request; wait() for its reply or cancel() it. `timeout_s` bounds the send
        (default: the link's timeout, or less under a request's deadline). A caller
        interrupted before it waits leaves `into` to the next reader: request() and InFlight
        do not.

        `payload` is sent after the header (a list: its parts back to back); the reply's
        payload is received into `into` (a list: filled in order, skipping the buffers the
        reply names in its `failed` list of indices, for which it carries no bytes)."""
        self._refuse_reentry(op)
        pending = Pending(into, op, args)
        try:
            self._send(pending, payload, timeout_s)
        except BaseException:
            self._let_go(pending)
            raise
        return pending.id, pending

    def _refuse_reentry(self, op: str) -> None:
        """BUSY when re-entered from a signal's handler part way through a request of this
        thread here (a request now would go out inside another's frame, or its reader take
        up another's reply); locks a Ctrl-C left held are let go (reentry.py)."""
        if self._send_lock._is_owned() or self._recv_lock._is_owned() or self._lock._is_owned():
            refuse_reentry(self, (self._send_lock, self._recv_lock, self._lock), _RPC_LINK_CODES,
                           f"the connection to {self.address} ({op!r})")

    def _send(self, pending: Pending, payload: memoryview | list | None, timeout_s: float | None) -> None:
        """Register `pending` (its id set) and send its request."""
        op, args = pending.op, pending.args
        if timeout_s is None:
            timeout_s = call_timeout_s(self.timeout_s)
        deadline = time.monotonic() + timeout_s
        if self._closed:
            raise ServerUnavailable(f"the connection to server {self.server_id} at {self.address} is closed")
        try:
            if timeout_s <= 0 or not (self._send_lock.acquire(False) or self._send_lock.acquire(timeout=timeout_s)):
                raise Timeout(f"no time was left to send {op!r} to server at {self.address}")
            # Ids are taken under the send lock, so they ascend in the order requests go out,
            # which is the order of their replies: _read_one's fast path relies on it.
            with self._lock:
                if self._closed:
                    raise ServerUnavailable(f"the connection to server {self.server_id} at {self.address} is closed")
                if len(self._pending) >= MAX_RPC_IN_FLIGHT:
                    raise LimitExceeded(f"{MAX_RPC_IN_FLIGHT} requests already in flight to {self.address}")
                request_id = self._next_id
                self._next_id += 1
                self._pending[request_id] = pending
                pending.id = request_id
            args["op"] = op
            args["id"] = request_id
            try:
                self._frames.send(args, payload, deadline)     # a payload's send, within the request's time
            except rpc.MidFrameTimeout:
                self._shut(Timeout(f"server at {self.address} stopped taking {op!r} part way"))
            except socket.timeout:
                self._forget(pending)          # no byte went out: the stream is whole
                raise Timeout(f"server at {self.address} took no request for {self.timeout_s}s ({op!r})") from None
            except (OSError, ValueError):
                self._shut(ServerUnavailable(f"server at {self.address} is gone (sending {op!r})"))
            except BaseException:              # interrupted: a frame may be half sent
                self._shut(ServerUnavailable(f"sending {op!r} to {self.address} was interrupted"), raise_it=False)
                raise
        finally:
            try:
                self._send_lock.release()    # no call (where a signal's handler runs) before it
            except RuntimeError:
                pass                         # not ours: the wait for it timed out or was interrupted

    def wait(self, request_id: int, pending: Pending, op: str, timeout_s: float | None = None) -> dict[str, Any]:
        if timeout_s is None:
            timeout_s = call_timeout_s(self.timeout_s)
        deadline = time.monotonic() + timeout_s
        try:
            while not pending.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._give_up(request_id, pending, op, timeout_s)
                    break
                if self._recv_lock.acquire(blocking=False):
                    failure: MemfabricError | None = None
                    handled = False
                    try:
                        while not pending.done:
                            # Waits for a frame to begin until our deadline.
                            self._read_one(deadline, request_id, pending)
                        handled = True
                    except rpc.MidFrameTimeout:
                        handled = True
                        failure = Timeout(f"a reply from server at {self.address} stalled part way ({op!r})")
                    except socket.timeout:
                        handled = True                 # no frame began: the stream is whole
                    except (OSError, ConnectionError, ValueError, MemfabricError) as exc:
                        handled = True
                        failure = ServerUnavailable(f"server {self.server_id} at {self.address} is gone "
                                                    f"({exc.__class__.__name__})")
                    finally:
                        if not handled:
                            # Interrupted (Ctrl-C) while reading, perhaps part way through a
                            # frame: the stream's position is unknown. Shut while no other
                            # reader can start; then no reader touches our request again
                            # (we may have taken its entry, and not finished it).
                            self._shut(ServerUnavailable(f"reading from {self.address} was interrupted"),
                                       raise_it=False)
                            if not pending.done:
                                pending.error = ServerUnavailable(f"reading from {self.address} was interrupted")
                                pending.finish()
                        self._recv_lock.release()
                    if failure is not None:
                        self._shut(failure)
                else:
                    # Another caller is reading; it hands us our reply, or we take over when it is done.
                    pending.sleep(min(remaining, 0.0005))
        except MemfabricError:
            raise           # given up on (no reader will touch our buffer) or the link was shut
        except BaseException:
            if self._recv_lock._is_owned():    # interrupted between taking it and the try
                self._recv_lock.release()
                self._shut(ServerUnavailable(f"reading from {self.address} was interrupted"), raise_it=False)
            self.cancel(request_id, pending)   # interrupted: our buffer must not be written after
            raise
        if self._undos:
            self._send_undos()
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        if "error" in reply:
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        return reply
        return reply

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        timeout_s = call_timeout_s(self.timeout_s)
        if timeout_s <= 0:
            raise Timeout(f"no time was left to ask server at {self.address} for {op!r}")
        args["budget_s"] = timeout_s
        return self.request(op, args, timeout_s=timeout_s)

    def call_with_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        raise ProtocolError("file descriptors cannot cross hosts")

    def _give_up(self, request_id: int, pending: Pending, op: str, timeout_s: float) -> None:
        """Our deadline passed. Raises TIMEOUT, unless our reply landed meanwhile (then the
        caller takes it). Leaves no reader able to write into our buffer."""
        with self._lock:
            mine = self._pending.get(request_id) is pending
            if mine:
                self._abandon(request_id, pending)
                too_many = len(self._abandoned) > MAX_UNANSWERED_REQUESTS
        if mine:
            if too_many:
                self._shut(Timeout(f"server at {self.address} left {MAX_UNANSWERED_REQUESTS} requests unanswered"))
            raise Timeout(f"server at {self.address} did not answer {op!r} within {timeout_s:.3g}s")
        self._wait_out_reader(pending)

    def cancel(self, request_id: int, pending: Pending) -> None:
        """The caller will not wait for this request (a sibling transfer failed, or it was
        interrupted): drop it, so its reply is read past, and return once no reader can
        write into its buffer any more; at once for a request answered, given up on or
        never sent. Raises nothing but an interruption while a reader finishes a frame."""
        if pending.done or pending.given_up:
            return
        with self._lock:
            if not pending.id:                                 # never sent: no reader knows it
                pending.given_up = True
                pending.into = None
            elif self._pending.get(pending.id) is pending:     # no reader took it
                self._abandon(pending.id, pending)
        if pending.done or pending.given_up:
            return
        try:
            self._wait_out_reader(pending)     # a reader took it: it is landing the reply
        except MemfabricError:
            pass

    def _let_go(self, pending: Pending) -> None:
        """cancel(), carried through to its end however often it is interrupted meanwhile
        (a second Ctrl-C): the last interruption goes on up once it is done."""
        interrupted = None
        while True:
            try:
                self.cancel(pending.id, pending)
                break
            except BaseException as exc:
                interrupted = exc
        if interrupted is not None:
            try:
                raise interrupted
            finally:
                interrupted = None

    def _wait_out_reader(self, pending: Pending) -> None:
        """A reader took this request's entry: it is receiving the reply, into the caller's
        buffer. It finishes the frame within its frame bound, or fails and shuts the link;
        if neither happens in time, shut the link, which stops the reader."""
        if not pending.sleep(self.timeout_s + rpc.DEADLINE_SLACK_S):
            self._shut(Timeout(f"a reply from server at {self.address} stalled part way"))

    def _abandon(self, request_id: int, pending: Pending) -> None:
        """Under the lock, `pending` still in _pending: no reader took it, and none will
        write into its buffer now (its reply is read past): let go of the buffer. Only
        stores, which no signal handler can come between."""
        pending.given_up = True
        pending.into = None
        self._abandoned[request_id] = pending
        del self._pending[request_id]

    def _forget(self, pending: Pending) -> None:
        """A request that did not go out: no reply will come."""
        with self._lock:
            if self._pending.get(pending.id) is pending:
                del self._pending[pending.id]
            pending.given_up = True
            pending.into = None

    def send_later(self, op: str, **args: Any) -> None:
        """`op`, unanswered, with the next request that gets through: a let-go that timed out
        (perhaps never sent) must still reach the server, else what it held stays held for
        the link's life. One that did get there is refused the second time, harmlessly."""
        self._undos.append({"op": op, **args})

    def _send_undos(self) -> None:
        """Send what undoes late replies' work; their own replies are read past."""
        while self._undos and not self._closed:
            try:
                undo = self._undos.pop()
            except IndexError:
                return
            op = undo.pop("op")
            try:
                request_id, pending = self.submit(op, undo, timeout_s=self.timeout_s)
            except MemfabricError as exc:
                log.warning("could not send %r to undo a request given up on: %s", op, exc)
                return
            self.cancel(request_id, pending)

    # ---- data ---------------------------------------------------------------------------------

    def submit_write(self, creds: Creds, bm_id: str, segment: int, offset: int, src: memoryview):
        return self.submit("seg_write", segment_args(creds, bm_id, segment, offset, len(src)), payload=src)

    def submit_read(self, creds: Creds, bm_id: str, segment: int, offset: int, dst: memoryview):
        return self.submit("seg_read", segment_args(creds, bm_id, segment, offset, len(dst)), into=dst)

    def span_head(self, creds: Creds, bm_id: str, segment: int, op: str) -> bytes:
        """What call_span() sends of a span request besides offset, length and id: the pairs
        of its msgpack map (SPAN_HEAD_ENTRIES of them), encoded once per segment and op."""
        return wire.encode({"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": bm_id,
                            "segment": segment, "op": op})[1:]     # past the map's one-byte header

    def call_span(self, op: str, head: bytes, offset: int, length: int, payload: memoryview | None,
                  into: memoryview | None) -> bool:
        """A span read (`into`) or write (`payload`) through the compiled path, when this link
        is idle: done (True), or not taken (False: nothing was sent; submit() it). Raises as
        wait() does."""
        def call(request_id: int, timeout_s: float) -> bool | None:
            status, self._span_polling = _frames.call_span(
                self._span_fd, self._span_block, head, SPAN_HEAD_ENTRIES, offset, length, request_id, payload,
                into, self._span_window_s, self._span_polling, timeout_s, self.timeout_s)
            if status == _frames.UNSENT:
                return None
            self.compiled_spans += 1
            if status != _frames.OK:
                self._span_outcome(op, status, request_id, into, timeout_s)
            return True
        return self._idle_call(op, call) is not None

    def call_get(self, head: bytes, entries: int, into: Any, max_value: int) -> dict[str, Any] | None:
        """A kv_get through the compiled path (_kvget.c), when this link is idle: `head` the
        request's `entries` pairs but its id; `into` what request() would take for the reply's
        payload. Its reply, or None when not taken (nothing was sent: request() it). Raises
        as wait() does."""
        def call(request_id: int, timeout_s: float) -> dict[str, Any] | None:
            status, self._span_polling, value = _frames.call_get(
                self._span_fd, self._span_block, head, entries, request_id, self._span_window_s,
                self._span_polling, timeout_s, self.timeout_s, max_value)
            if status == _frames.UNSENT:
                return None
            self.compiled_gets += 1
            if status == _frames.OK:
                return {"found": False} if value is None else {"found": True, "value": value}
            if status == _frames.MISMATCH:
                self._shut(ProtocolError(f"a reply from server at {self.address} was not the get it began as"))
            return self._span_outcome("kv_get", status, request_id, into, timeout_s)
        if not hasattr(_frames, "call_get"):
            return None
        return self._idle_call("kv_get", call)

    def _idle_call(self, op: str, call: Any) -> Any:
        """`call(request_id, timeout_s)`, a compiled call that sends, waits and receives in one,
        when this link is idle (no other request in flight, both locks free), holding both
        locks: its result, or None when not taken (nothing was sent; `call` says so with None
        too). Raises as wait() does."""
        if self._span_fd < 0:
            return None
        send_lock, recv_lock = self._send_lock, self._recv_lock
        if send_lock._is_owned() or recv_lock._is_owned():
            return None                  # re-entered (a signal handler): the stream is not ours alone
        taken = 0
        try:
            # `taken` says what to release; a Ctrl-C between an acquire and its count is
            # caught by _is_owned() below.
            if not send_lock.acquire(False):
                return None
            taken = 1
            if not recv_lock.acquire(False):
                return None
            taken = 2
            with self._lock:
                if self._closed or self._pending or self._abandoned:
                    return None
                request_id = self._next_id
                self._next_id += 1
            timeout_s = call_timeout_s(self.timeout_s)
            if timeout_s <= 0:
                raise Timeout(f"no time was left to send {op!r} to server at {self.address}")
            try:
                return call(request_id, timeout_s)
            except MemfabricError:
                raise                    # the outcome's: a reply's error, a timeout given up on, a link shut
            except OSError as exc:       # ConnectionError too
                self._shut(ServerUnavailable(f"server {self.server_id} at {self.address} is gone "
                                             f"({exc.__class__.__name__})"))
            except BaseException:
                # Interrupted (Ctrl-C) in the call, or before its outcome is settled (the
                # caller's buffer registered for a reply not given up on yet, or a reply half
                # read): the stream's position is unknown, and only a shut link keeps the
                # late reply out of the buffer the caller gets back now.
                self._shut(ServerUnavailable(f"{op!r} to {self.address} was interrupted"), raise_it=False)
                raise
        finally:
            if taken == 2 or recv_lock._is_owned():
                if self._closed:
                    self._close_span_dup()
                recv_lock.release()
            if taken or send_lock._is_owned():
                send_lock.release()

    def _close_span_dup(self) -> None:
        """With the receive lock: no compiled call uses the duplicate any more."""
        dup, self._span_dup, self._span_fd = self._span_dup, None, -1
        if dup is not None:
            dup.close()

    def _span_outcome(self, op: str, status: int, request_id: int, into: Any,
                      timeout_s: float) -> dict[str, Any]:
        """What call_span() (or call_get()) got short of a plain answer, read as wait() reads a
        reply: the reply's error raised, a timeout given up on, a broken stream shut; else
        the reply."""
        if status == _frames.SEND_TIMEOUT:       # no byte went out: the stream is whole
            raise Timeout(f"server at {self.address} took no request for {self.timeout_s}s ({op!r})")
        if status == _frames.SEND_STALLED:
            self._shut(Timeout(f"server at {self.address} stopped taking {op!r} part way"))
        if status == _frames.STALLED:
            self._shut(Timeout(f"a reply from server at {self.address} stalled part way ({op!r})"))
        pending = Pending(into, op)
        with self._lock:
            self._pending[request_id] = pending
        if status == _frames.NOTHING:
            self._give_up(request_id, pending, op, timeout_s)    # raises, and reads its reply past later
        try:
            header, payload_len = self._frames.header_in_block(self.timeout_s, self._span_block)
            self._deliver(header, payload_len, status == _frames.LANDED, request_id, pending)
        except rpc.MidFrameTimeout:
            self._shut(Timeout(f"a reply from server at {self.address} stalled part way ({op!r})"))
        except (OSError, ConnectionError, ValueError, MemfabricError) as exc:
            self._shut(ServerUnavailable(f"server {self.server_id} at {self.address} is gone "
                                         f"({exc.__class__.__name__})"))
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        if "error" in reply:
            raise error_from_code(reply["error"], str(reply.get("msg", "")))
        return reply

    # ---- reading (done by whichever caller holds the receive lock) -------------------------------

    def _read_one(self, deadline: float, own_id: int = 0, own: Pending | None = None) -> None:
        """One frame, handed to its request. Waits for it to begin until `deadline`
        (socket.timeout: nothing began); once begun, it must end within the link's timeout
        (MidFrameTimeout), whoever's deadline passes meanwhile.

        When the reader's own request (`own_id`) is the oldest unanswered one, the next frame
        is its reply (a connection's requests are answered in order), so its payload may land
        in the reader's buffer in the same receive as the header."""
        frames = self._frames
        land = None
        if own is not None and frames.compiled and type(own.into) is memoryview and own.into.nbytes:
            with self._lock:
                oldest = next(iter(self._pending), None)
                if oldest == own_id and (not self._abandoned or min(self._abandoned) > own_id):
                    land = own.into
        header, payload_len, landed = frames.recv_frame(deadline, self.timeout_s, land)
        self._deliver(header, payload_len, landed, own_id, own)

    def _deliver(self, header: dict[str, Any], payload_len: int, landed: bool, own_id: int,
                 own: Pending | None) -> None:
        """A reply's header is in (and its payload, if `landed` in the reader's own buffer):
        hand it to its request, its payload read into that request's buffer."""
        frames = self._frames
        reply_id = header.get("id")
        if landed:
            with self._lock:
                mine = self._pending.pop(reply_id, None) if reply_id == own_id else None
            if mine is None:        # not its reply after all: the stream is not what it should be
                raise ProtocolError(f"a reply for request {reply_id!r} came before that of {own_id}")
            own.reply = header
            own.finish()
            return
        frame_deadline = time.monotonic() + self.timeout_s
        with self._lock:
            pending = self._pending.pop(reply_id, None)
            late = None if pending is not None else self._abandoned.pop(reply_id, None)
        try:
            if pending is None:
                if late is None:
                    raise ProtocolError(f"a reply for request {reply_id!r}, which is not in flight")
                frames.discard(payload_len, frame_deadline)     # its caller gave up on it
                undo = undo_of(late.op, late.args or {}, header)
                if undo is not None:
                    self._undos.append(undo)
                return
            into = pending.into
            if callable(into):          # sized by the reply: the caller makes the buffer (None: drop it)
                into = pending.into = into(payload_len) if payload_len and "error" not in header else None
                if into is None and payload_len and "error" not in header:
                    frames.discard(payload_len, frame_deadline)
                    payload_len = 0
            if "error" in header:
                if payload_len:
                    frames.discard(payload_len, frame_deadline)
            elif type(into) is list:
                views = _landing(into, header)
                expected = sum(len(v) for v in views)
                if payload_len == expected:
                    if payload_len:
                        frames.recv_into_views(views, frame_deadline)
                else:
                    frames.discard(payload_len, frame_deadline)
                    pending.error = ProtocolError(f"a reply of {payload_len} bytes for buffers of {expected}")
            elif payload_len:
                if into is not None and payload_len == len(into):
                    frames.recv_into_exact(into, frame_deadline)
                else:
                    frames.discard(payload_len, frame_deadline)
                    pending.error = ProtocolError(f"a reply of {payload_len} bytes for a buffer of "
                                                  f"{0 if into is None else len(into)}")
            elif into is not None and len(into):
                pending.error = ProtocolError("a reply without the bytes it should carry")
        except BaseException as exc:
            if pending is not None:       # this reader writes into its buffer no more
                pending.error = (Timeout(f"a reply from server at {self.address} stalled part way")
                                 if isinstance(exc, socket.timeout) else
                                 ServerUnavailable(f"server {self.server_id} at {self.address} is gone "
                                                   f"({exc.__class__.__name__})"))
                pending.finish()
            if isinstance(exc, socket.timeout) and not isinstance(exc, rpc.MidFrameTimeout):
                raise rpc.MidFrameTimeout("a reply's payload stalled part way") from None
            raise
        if pending is not None:
            pending.reply = header
            pending.finish()

    def _shut(self, error: MemfabricError, raise_it: bool = True) -> None:
        """Fail every request in flight and close; raises `error`. Callers hold no buffer of
        ours afterwards: only the holder of the receive lock writes into them, and it is us
        or it has let go."""
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
            self._abandoned.clear()
        # Every time, not only the first: a close an interruption cut short after the mark
        # above is finished by the next (the session's, as it lets this link go).
        self._frames.close()
        # Wait out a reader that may be mid-payload into a caller's buffer: the close above
        # ends its receive at once.
        if self._recv_lock.acquire(timeout=self.timeout_s + rpc.DEADLINE_SLACK_S):
            self._close_span_dup()
            self._recv_lock.release()
        else:
            log.warning("a reader of the link to %s did not let go after it closed", self.address)
        for p in pending:
            p.error = error
            p.finish()
        if raise_it:
            raise error

    # ---- liveness and life ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_gone(self) -> bool:
        """Closed, or the server hung up (a restarted peer leaves our old link so)."""
        if not self._closed and self._frames.peer_gone():
            self.close()
        return self._closed

    def check_alive(self) -> None:
        """peer_gone(), at most once per LIVENESS_CHECK_EVERY_S: reads and writes call this."""
        now = time.monotonic()
        if now - self._checked_at < LIVENESS_CHECK_EVERY_S and not self._closed:
            return
        self._checked_at = now
        if self.peer_gone():
            raise ServerUnavailable(f"server {self.server_id} at {self.address} is gone")

    def release_namespace(self, pool: str, ns: str) -> None:
        """Nothing is mapped across hosts; nothing to give back."""

    def close(self) -> None:
        if self._closed and self._frames.closed and self._span_dup is None:
            return
        if self._abandoned and not self._closed:
            settle(self)
        try:
            self._shut(ServerUnavailable("connection closed"), raise_it=False)
        except MemfabricError:
            pass


def segment_args(creds: Creds, bm_id: str, segment: int, offset: int, length: int) -> dict[str, Any]:
    """A seg_read's or seg_write's request."""
    return {"pool": creds[0], "ns": creds[1], "sec": creds[2], "bm_id": bm_id, "segment": segment,
            "offset": offset, "length": length}


class InFlight:
    """The requests one operation has in flight at once, on one link or several. Each is
    noted here before it is sent, and close() (the end of a `with`) lets go of every one
    not answered: however the operation ends (an error, a sibling's failure, Ctrl-C at any
    line), no reply lands in its buffers once it has returned or raised. (Left: a second
    interruption at the very entry of __exit__, after an error or a first one.)"""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests: list[tuple[RpcLink, Pending]] = []

    def __enter__(self) -> "InFlight":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Let go of every request not answered; an interruption meanwhile (Ctrl-C) goes on
        up once all are let go. (In here, not in a call from here: one call fewer where a
        signal's handler could run first.)"""
        interrupted = None
        requests = self.requests
        while requests:
            try:
                while requests:
                    link, pending = requests[-1]
                    if not (pending.done or pending.given_up):
                        link._let_go(pending)
                    requests.pop()
            except BaseException as exc:
                interrupted = exc
        if interrupted is not None:
            try:
                raise interrupted
            finally:
                interrupted = None

    def submit(self, link: RpcLink, op: str, args: dict[str, Any], payload: memoryview | list | None = None,
               into: Any = None) -> Pending:
        """Send a request (see RpcLink.submit); wait for it with wait(). BUSY, nothing sent, from
        a signal's handler while its thread is part way through a request on `link` (as
        RpcLink.submit: _send itself does not ask)."""
        link._refuse_reentry(op)
        pending = Pending(into, op, args)
        self.requests.append((link, pending))
        link._send(pending, payload, None)
        return pending

    @staticmethod
    def wait(link: RpcLink, pending: Pending) -> dict[str, Any]:
        return link.wait(pending.id, pending, pending.op)

    def wait_all(self) -> None:
        """Every reply, in the order sent; the first error raised."""
        for link, pending in self.requests:
            link.wait(pending.id, pending, pending.op)

    def close(self) -> None:
        self.__exit__(None, None, None)


def _landing(into: list, header: dict[str, Any]) -> list:
    """The buffers of a scatter read that its reply carries bytes for: all but those it
    names in `failed` (indices into the list)."""
    failed = header.get("failed")
    if not failed:
        return into
    if not isinstance(failed, list) or not all(type(i) is int and 0 <= i < len(into) for i in failed):
        raise ProtocolError("a reply's 'failed' must list indices of its request's buffers")
    skip = set(failed)
    return [view for i, view in enumerate(into) if i not in skip]


_RPC_LINK_CODES = methods_code(RpcLink)

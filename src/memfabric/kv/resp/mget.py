"""MGET's reply, sent as its values are fetched: the door holds a few batches of values at a
time, not the whole reply, and every byte it holds is taken from the door's reply budget
(budget.py) first, so that many clients' large MGETs at once cannot make the server hold more
than the budget.

Values are fetched a batch at a time (one request to a key's home, its reply bounded: up to
KV_GET_MANY_PAYLOAD_BYTES; a value too large to ride along is fetched alone) and sent in the
keys' order. A reply that is whole after its first batches is answered as before, in one piece,
and any error before that is the command's error reply. Once its first bytes are sent, a reply
that cannot go on (a server timed out, no budget within RESP_REPLY_BUDGET_WAIT_S, more than
RESP_MGET_REPLY_MAX_BYTES of values) is cut: the connection is closed, as Redis closes a client
past its output buffer limit.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import LimitExceeded, MemfabricError
from ...limits import (KV_INLINE_BYTES, MAX_KV_BATCH, RESP_MGET_REPLY_MAX_BYTES, RESP_REPLY_BUDGET_WAIT_S,
                       RESP_REPLY_BUFFER_BYTES)
from ..rules import MANY_AGAIN, MANY_ALONE, MANY_MISSING
from . import protocol as p
from .sending import send_all

if TYPE_CHECKING:
    from .budget import ReplyBudget
    from .commands import Client

LOOKAHEAD_KEYS = MAX_KV_BATCH       # positions past the next one a batch may take keys from


class ReplyCut(Exception):
    """A streamed reply could not go on: its connection must be closed."""


@dataclass
class Chunk:
    """Bytes fetched in one request (a batch's values back to back, or one value), held until
    every key in it has been sent for the last time."""
    data: memoryview
    charge: int                     # bytes of the budget it holds
    keys_left: int = 0


def too_large(total: int) -> str:
    return (f"MGET's values are {total} bytes or more, at most {RESP_MGET_REPLY_MAX_BYTES} in one reply: "
            "ask for fewer keys at a time")


class MgetReply:
    """One MGET's reply: prepare() answers it whole when it can; send() streams the rest."""

    label = "mget"                 # the command, for the door's error count

    def __init__(self, c: "Client", keys: list[bytes]) -> None:
        self.ks = c.keyspace()
        self.resp = c.resp
        self.budget: "ReplyBudget" = c.front.reply_budget
        self.keys = keys
        self.counts = Counter(keys)
        self.last = {k: i for i, k in enumerate(keys)}
        servers = self.ks.servers()
        self.home_of = self.ks.homes_of(keys, servers)
        # Fetched and not sent for the last time: (chunk, offset, length), or None (no such key).
        self.held: dict[bytes, tuple[Chunk, int, int] | None] = {}
        self.alone: set[bytes] = set()     # to fetch on their own when their turn comes
        self.position = 0                  # the next key to answer
        self.known_bytes = 0               # values the reply will carry, as far as fetched
        self.sent_bytes = 0                # values answered so far
        self.pieces: list[bytes | memoryview] = [b"*%d\r\n" % len(keys)]
        self.pending_bytes = 0
        self.releasing = 0                 # budget bytes to give back once the pieces are sent
        self.charged = 0                   # budget bytes this reply holds in all

    # ---- the command's reply ----------------------------------------------------------------------

    def prepare(self) -> bytes | None:
        """The whole reply, if it is whole before it has to wait for budget or grows past
        RESP_REPLY_BUFFER_BYTES; None: send() streams it. Errors are the command's."""
        try:
            while self.position < len(self.keys):
                if not self._fetch_next(may_wait=not self._holding()):
                    return None
                if self.known_bytes > RESP_MGET_REPLY_MAX_BYTES:
                    raise LimitExceeded(too_large(self.known_bytes))
                self._emit()
                if self.pending_bytes >= RESP_REPLY_BUFFER_BYTES and self.position < len(self.keys):
                    return None
            reply = b"".join(self.pieces)
            self.pieces = []
            self.close()
            return reply
        except BaseException:
            self.close()
            raise

    def send(self, sock: socket.socket) -> None:
        """The rest of the reply, sent as it is fetched. ReplyCut (or OSError: the client went
        away) leaves the reply partly sent: the connection must be closed."""
        try:
            self._flush(sock)
            while self.position < len(self.keys):
                try:
                    self._fetch_next(may_wait=True)
                    self._emit()
                except MemfabricError as exc:
                    raise ReplyCut(f"{exc.code.name} {exc}") from None
                self._flush(sock)
        finally:
            self.close()

    def close(self) -> None:
        """Give back whatever budget the reply still holds."""
        self.held.clear()
        self.pieces = []
        self.budget.give_back(self.charged)
        self.charged = self.releasing = 0

    # ---- fetching --------------------------------------------------------------------------------

    def _holding(self) -> bool:
        return self.charged > 0

    def _take(self, n: int, may_wait: bool) -> bool:
        """Take `n` bytes of the budget. Never waits holding any (what is held but not yet
        sent is let go, fetched again later): two replies must not wait on each other."""
        if self.budget.take(n, 0):
            self.charged += n
            return True
        if not may_wait:
            return False
        if n > self.budget.limit_bytes:
            raise LimitExceeded(f"MGET: reading a value this large takes {n} bytes of the door's reply memory "
                                f"(server.resp_reply_budget), more than its {self.budget.limit_bytes}")
        self._let_go_held()
        if not self.budget.take(n, RESP_REPLY_BUDGET_WAIT_S):
            raise LimitExceeded("MGET: the door's reply memory (server.resp_reply_budget) is taken by other "
                                "replies; try again")
        self.charged += n
        return True

    def _give_back(self, n: int) -> None:
        self.charged -= n
        self.budget.give_back(n)

    def _let_go_held(self) -> None:
        # Called with no values in hand unsent: send() sends them before it fetches again,
        # prepare() waits only while it holds nothing.
        chunks = {id(h[0]): h[0] for h in self.held.values() if h is not None}
        self.held = {k: h for k, h in self.held.items() if h is None}
        for chunk in chunks.values():
            self._give_back(chunk.charge)

    def _fetch_next(self, may_wait: bool) -> bool:
        """Fetch the next key's value, and with it those of the keys ahead of it homed on the
        same server (one request). False: no budget without waiting (may_wait False)."""
        key = self.keys[self.position]
        if key in self.alone:
            return self._fetch_alone(key, may_wait)
        server_id = self.home_of[self.position]
        batch: list[bytes] = []
        seen: set[bytes] = set()
        size = 0
        for i in range(self.position, min(len(self.keys), self.position + LOOKAHEAD_KEYS)):
            k = self.keys[i]
            if self.home_of[i] != server_id or k in self.held or k in self.alone or k in seen:
                continue
            if batch and (len(batch) == MAX_KV_BATCH or size + len(k) > KV_INLINE_BYTES):
                break
            batch.append(k)
            seen.add(k)
            size += len(k)
        most = self.ks.get_many_reply_max(server_id)
        if not self._take(most, may_wait):
            return False
        try:
            lengths, blob = self.ks.get_many_once(server_id, batch)
        except BaseException:
            self._give_back(most)
            raise
        chunk = Chunk(blob, len(blob))
        self._give_back(most - chunk.charge)
        at = 0
        for k, length in zip(batch, lengths, strict=True):
            if length >= 0:
                self.held[k] = (chunk, at, length)
                chunk.keys_left += 1
                at += length
                self.known_bytes += length * self.counts[k]
            elif length == MANY_MISSING:
                self.held[k] = None
            elif length == MANY_ALONE:
                self.alone.add(k)
            else:
                assert length == MANY_AGAIN, f"kv_get_many answered a length of {length}"
        if chunk.keys_left == 0:
            self._give_back(chunk.charge)
        return True

    def _fetch_alone(self, key: bytes, may_wait: bool) -> bool:
        """A value too large to ride in a batch: its length first, so that its bytes (and the
        copy made reading it) are taken from the budget before it is read."""
        described = self.ks.call(key, "kv_describe")
        reserved = 2 * (described["length"] if described["found"] else 0)
        if not self._take(reserved, may_wait):
            return False
        try:
            value = self.ks.get(key)
        except BaseException:
            self._give_back(reserved)
            raise
        self.alone.discard(key)
        if value is None:
            self._give_back(reserved)
            self.held[key] = None
            return True
        size = len(value)
        if size > reserved:                 # it grew meanwhile: counted, not refused
            self.budget.force(size - reserved)
            self.charged += size - reserved
        else:
            self._give_back(reserved - size)   # the reading copy is gone, the value stays
        self.held[key] = (Chunk(memoryview(value), size, keys_left=1), 0, size)
        self.known_bytes += size * self.counts[key]
        return True

    # ---- answering -----------------------------------------------------------------------------

    def _emit(self) -> None:
        """Encode the values of the keys from `position` on that are fetched, in order."""
        while self.position < len(self.keys):
            key = self.keys[self.position]
            if key not in self.held:
                return
            place = self.held[key]
            if place is None:
                self.pieces.append(p.nil(self.resp))
            else:
                chunk, at, length = place
                if self.sent_bytes + length > RESP_MGET_REPLY_MAX_BYTES:
                    raise LimitExceeded(too_large(self.sent_bytes + length))
                self.sent_bytes += length
                self.pieces.append(b"$%d\r\n" % length)
                self.pieces.append(chunk.data[at:at + length])
                self.pieces.append(b"\r\n")
                self.pending_bytes += length
            if self.last[key] == self.position:
                del self.held[key]
                if place is not None:
                    place[0].keys_left -= 1
                    if place[0].keys_left == 0:
                        self.releasing += place[0].charge
            self.position += 1

    def _flush(self, sock: socket.socket) -> None:
        """Send the pieces in hand (small ones together), then give back the budget of the
        chunks they emptied."""
        buffer = bytearray()
        for piece in self.pieces:
            if len(piece) >= RESP_REPLY_BUFFER_BYTES:
                if buffer:
                    send_all(sock, buffer)
                    buffer.clear()
                send_all(sock, piece)
            else:
                buffer += piece
                if len(buffer) >= RESP_REPLY_BUFFER_BYTES:
                    send_all(sock, buffer)
                    buffer.clear()
        if buffer:
            send_all(sock, buffer)
        self.pieces = []
        self.pending_bytes = 0
        self._give_back(self.releasing)
        self.releasing = 0

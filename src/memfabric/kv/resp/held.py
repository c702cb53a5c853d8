"""A large value's reply (GET, GETEX, GETRANGE, GETDEL, GETSET, SET ... GET), streamed from
where the value lies: the key's home holds its record (kv/service.py _value_or_hold: it
outlives a delete or an overwrite until let go), and the door reads it a piece at a time into
one buffer of RESP_VALUE_PIECE_BYTES, taken from the door's reply budget (budget.py) for as
long as the reply is being sent. A door with many clients reading large values holds a piece
per reply, never the values.

Budget first, where a command takes a value away (GETDEL, GETSET): the piece is taken before
the command runs, so that a reply that cannot get reply memory is refused before the key
changes; the others take it once they know the value is large, and let the hold go if they
cannot. Once the reply's first bytes are sent, a failure (its home gone) can only cut the
connection (ReplyCut), as a streamed MGET's does.

The hold is let go before the last piece is sent, and the reply completed only if the home
says it still held the value then: bytes read from a mapping of the home's memory are the
value's only while the home keeps it (its namespace destroyed meanwhile, they read zeros).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ...errors import LimitExceeded, MemfabricError
from ...limits import RESP_REPLY_BUDGET_WAIT_S, RESP_VALUE_PIECE_BYTES
from .mget import ReplyCut
from .sending import send_all

if TYPE_CHECKING:
    from .budget import ReplyBudget
    from .keys import Keyspace

CRLF = b"\r\n"


def take_piece(budget: "ReplyBudget", command: str, length: int = RESP_VALUE_PIECE_BYTES) -> int:
    """The reply budget for a value of `length` bytes (a piece at most: what its buffer
    takes), waiting a bounded while: what was taken."""
    want = min(RESP_VALUE_PIECE_BYTES, max(length, 1))
    if not budget.take(want, RESP_REPLY_BUDGET_WAIT_S):
        raise LimitExceeded(f"{command}: the door's reply memory (server.resp_reply_budget) is taken by other "
                            "replies; try again")
    return want


class HeldValue:
    """The bytes [start, start + length) of a value its home holds (a reply's "hold",
    "pieces"), as one bulk string. close() lets the hold go and gives the budget back,
    however the reply ended; call it once the reply is sent or abandoned."""

    def __init__(self, ks: "Keyspace", server_id: int, held: dict[str, Any], start: int, length: int,
                 budget: "ReplyBudget", charge: int, label: str) -> None:
        self.ks = ks
        self.server_id = server_id
        self.hold = held["hold"]
        self.pieces = [tuple(p) for p in held["pieces"]]
        self.start, self.length = start, length
        self.budget, self.charge = budget, charge
        self.label = label                    # the command, for the door's error count
        self._open = True
        self._holding = True

    def send(self, sock: socket.socket) -> None:
        """Header, the bytes piece by piece, CRLF. ReplyCut (or OSError: the client went away)
        leaves the reply part sent: the connection must be closed."""
        try:
            buffer = memoryview(bytearray(min(RESP_VALUE_PIECE_BYTES, max(self.length, 1))))
            send_all(sock, b"$%d\r\n" % self.length)
            steps = self._steps(len(buffer))
            for i, (at, n) in enumerate(steps):
                try:
                    self.ks.read_held(self.server_id, self.hold, self.pieces, at, buffer[:n])
                    if i == len(steps) - 1:
                        self._let_go_confirmed()
                except MemfabricError as exc:
                    raise ReplyCut(f"{exc.code.name} {exc}") from None
                send_all(sock, buffer[:n])
            send_all(sock, CRLF)
        finally:
            self.close()

    def _steps(self, most: int) -> list[tuple[int, int]]:
        """(position in the value, bytes) of each read: at most `most`, none across two of the
        value's pieces (a read over RPC lies within one)."""
        steps = []
        begin, end = self.start, self.start + self.length
        position = 0
        for _, _, n in self.pieces:
            lo, hi = max(begin, position), min(end, position + n)
            while lo < hi:
                take = min(most, hi - lo)
                steps.append((lo, take))
                lo += take
            position += n
        return steps

    def _let_go_confirmed(self) -> None:
        """Let the hold go; MemfabricError if the home no longer held the value (then what
        was read may not be it). Asked once, whatever the answer."""
        self._holding = False
        self.ks.let_go(self.server_id, self.hold, confirm=True)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self.budget.give_back(self.charge)
        self.charge = 0
        if self._holding:
            self._holding = False
            self.ks.let_go(self.server_id, self.hold)

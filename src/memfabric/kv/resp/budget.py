"""The door's reply memory: bytes of values its replies hold at once, across all connections
(server.resp_reply_budget). A reply takes its bytes before it fetches them and gives them back
once they are sent; past the budget it waits, bounded, for other replies to go out. Nothing
waits holding bytes (kv/resp/mget.py gives back what it holds first), so no two replies wait
on each other."""

from __future__ import annotations

import threading
import time


class ReplyBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self.refused = 0                 # takes that found no room within their wait
        self._room = threading.Condition()

    def take(self, n: int, wait_s: float) -> bool:
        """Take `n` bytes, waiting up to `wait_s` for room; False if there was none (and
        at once for more than the whole budget)."""
        if n > self.limit_bytes:
            with self._room:
                self.refused += 1
            return False
        deadline = time.monotonic() + wait_s
        with self._room:
            while self.used_bytes + n > self.limit_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        self.refused += 1
                    return False
                self._room.wait(left)
            self.used_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            return True

    def force(self, n: int) -> None:
        """Count `n` bytes already held (a value that grew between its length and its read)."""
        with self._room:
            self.used_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def give_back(self, n: int) -> None:
        if n <= 0:
            return
        with self._room:
            self.used_bytes -= n
            assert self.used_bytes >= 0, "the door's reply budget gave back more than it took"
            self._room.notify_all()

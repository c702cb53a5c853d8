"""The server's thread that makes pmem plogs' memory ready ahead of their appends (see
limits.PLOG_PREPARE_AHEAD_BYTES): zeros written and flushed past a log's reach, a round at a
time, by PlogService._prepare_round. Server side.

One thread for the server, so rounds never compete with each other for the disk, and a queue
that holds each plog at most once (its `preparing` flag, set under its lock by whoever queues
it): bounded by the number of plogs. A round checks `stopping()` before each MiB it writes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger("memfabric.plog")

STOP_WAIT_S = 5.0        # a stop waits this long for the round under way (it ends within a MiB)


class Preparer:
    def __init__(self, run_round: Callable[[Any], None]) -> None:
        self._run_round = run_round
        self._queue: deque[Any] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, plog: Any) -> bool:
        """Queue a round for `plog` (once: the caller set its `preparing` flag); False once stopping."""
        with self._wake:
            if self._stopping:
                return False
            self._queue.append(plog)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="plog-prepare", daemon=True)
                self._thread.start()
            self._wake.notify()
        return True

    def stopping(self) -> bool:
        return self._stopping

    def close(self) -> None:
        """No more rounds: the one under way ends at its next MiB; those queued never start
        (their appends make their memory ready themselves, or wait and find the server stopping)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(STOP_WAIT_S)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
                    return
                plog = self._queue.popleft()
            try:
                self._run_round(plog)       # a stopping round lets its plog go (its flag cleared)
            except Exception:               # noqa: BLE001 - a bug in one round must not end the others
                log.exception("a round of making a plog's memory ready failed")

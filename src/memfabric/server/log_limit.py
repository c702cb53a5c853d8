"""Log lines that clients can cause, rate-limited per kind.

Anyone who can connect can send garbage, fail a handshake or trip a bug as often as they
like; a line per event lets them flood the server's log and hide everything else in it.
So such lines go through a `LimitedLog`: at most `lines` per kind in each `interval_s`,
the last of them saying that more are held back, and the first one of a later interval
saying how many were. Kinds are few and fixed by the code (never taken from the input),
and their number is bounded anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..limits import LOG_INTERVAL_S, LOG_LINES_PER_KIND

MAX_KINDS = 256


class _Window:
    __slots__ = ("start", "written", "held_back")

    def __init__(self, start: float) -> None:
        self.start, self.written, self.held_back = start, 0, 0


class LimitedLog:
    def __init__(self, logger: logging.Logger, lines: int = LOG_LINES_PER_KIND,
                 interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        assert lines >= 1 and interval_s > 0
        self.logger = logger
        self.lines = lines
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log `msg % args` unless this kind is over its share; True if it was written."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(kind)
            held_back = 0
            if window is None or now - window.start >= self.interval_s:
                held_back = window.held_back if window is not None else 0
                window = _Window(now)
                self._windows.pop(kind, None)
                if len(self._windows) >= MAX_KINDS:
                    del self._windows[next(iter(self._windows))]   # the longest unseen
                self._windows[kind] = window
            if window.written >= self.lines:
                window.held_back += 1
                return False
            window.written += 1
            last = window.written == self.lines
        if held_back:
            msg += " (%d more like this were not logged)"
            args += (held_back,)
        if last:
            msg += " (more like this are not logged for %.0f s)"
            args += (self.interval_s,)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def info(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def exception(self, kind: str, msg: str, *args: Any) -> bool:
        """An error with the traceback of the exception being handled."""
        return self.log(logging.ERROR, kind, msg, *args, exc_info=True)

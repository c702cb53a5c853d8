"""Adaptive busy-polling: try a receive without sleeping for a short window before blocking.

On a virtual machine most of a round trip between two processes is waking the sleeping
receiver: measured here, a Unix-socket ping-pong takes 60-70 us when both sides block
and 7 us when they poll. So a waiting side polls a non-blocking receive (yielding the CPU
between tries, so a peer that shares its core still runs) for at most `window_s`, then
sleeps in the kernel as before.

Polling is adaptive, so an idle connection costs no CPU. A side keeps polling only while
its peer answers within the window. Once a wait outlasts the window, the next wait sleeps
at once. A wait that sleeps but is short enough turns polling back on.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class BusyPoll:
    __slots__ = ("window_s", "_worth_it")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._worth_it = window_s > 0

    def receive(self, try_now: Callable[..., T], block: Callable[..., T], *args: object) -> T:
        """`try_now(*args)` returns a result or raises BlockingIOError when nothing is there
        yet; `block(*args)` waits in the kernel."""
        start = time.perf_counter()
        if self._worth_it:
            end = start + self.window_s
            while True:
                try:
                    return try_now(*args)
                except BlockingIOError:
                    pass
                if time.perf_counter() >= end:
                    break
                os.sched_yield()
        result = block(*args)
        self._worth_it = self.window_s > 0 and time.perf_counter() - start <= self.window_s
        return result

    # The same rule for a compiled receive that polls and blocks by itself (_frames.c):
    def window(self) -> float:
        """How long the next wait may poll."""
        return self.window_s if self._worth_it else 0.0

    @property
    def polling(self) -> bool:
        """Whether the next wait polls. A compiled loop that waits many times (_spans.c's
        serve_spans) applies the rule itself, and leaves its outcome here."""
        return self._worth_it

    @polling.setter
    def polling(self, polling: bool) -> None:
        self._worth_it = bool(polling) and self.window_s > 0

    def waited(self, taken_s: float) -> None:
        """A wait took `taken_s`: poll next time only if that was within the window."""
        self._worth_it = self.window_s > 0 and taken_s <= self.window_s

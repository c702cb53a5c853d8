"""What the transport tests share: the receive paths each runs on, and a signal that
interrupts a wait as Ctrl-C does."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

# (polling window, compiled) of each path a test runs on: Python and _frames.c, each
# sleeping at once and polling first.
RECEIVE_PATHS = [(0.0, False), (0.05, False), (0.0, True), (0.05, True)]
RECEIVE_PATH_IDS = ["sleeps", "polls", "compiled-sleeps", "compiled-polls"]


class Interrupted(Exception):
    """What the alarm's handler raises (KeyboardInterrupt would stop pytest itself)."""


@contextmanager
def interrupted_after(seconds: float, raising: type[BaseException] = Interrupted) -> Iterator[None]:
    """A handler that raises `raising` runs `seconds` from now, as Ctrl-C's does (tests that
    expect it with pytest.raises may raise KeyboardInterrupt itself)."""
    def handler(signum, frame):
        raise raising()
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

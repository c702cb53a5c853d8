"""A stop a signal asks for: what `memfabric server` and `memfabric up` wait on.

threading.Event will not do. Its set() takes the lock its wait() holds for a moment on each
turn; a SIGTERM whose handler runs in that moment, in the same (main) thread, waits for that
lock forever. A server hung so on a Ctrl-C or SIGTERM, and ignored every later one. Here the
handler only sets a flag, and waiting polls it.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Iterable

POLL_S = 0.05     # how long a stop may wait to be seen

_interrupted = False      # a Ctrl-C came while catch_interrupts() held SIGINT


def catch_interrupts() -> None:
    """From a command's first line on: a Ctrl-C raises KeyboardInterrupt as always, and is also
    remembered. Python drops a KeyboardInterrupt raised where it cannot propagate (one landing
    in importlib's module locks during the first imports was printed as "Exception ignored" and
    lost), and the command went on as if no Ctrl-C came; raise_if_interrupted() says it did.
    Python's report of one it dropped, a traceback, is not printed: the command says it was
    interrupted instead. A SIGINT ignored by whoever started us (a shell script's `cmd &`) is
    left ignored, as Python leaves it: no Ctrl-C is the command's to catch."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        return

    def interrupt(signum: int, frame: object) -> None:
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    report = sys.unraisablehook

    def unraisable(args: sys.UnraisableHookArgs) -> None:
        if not (_interrupted and issubclass(args.exc_type, KeyboardInterrupt)):
            report(args)
    sys.unraisablehook = unraisable
    signal.signal(signal.SIGINT, interrupt)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a Ctrl-C came (see catch_interrupts), even one Python dropped."""
    if _interrupted:
        raise KeyboardInterrupt


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops `memfabric server` and `memfabric up`: SIGINT, SIGTERM, and SIGHUP (the
    terminal closed; it killed them outright) unless it is ignored, as under nohup."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


class StopRequest:
    def __init__(self) -> None:
        self._asked = False      # one assignment: atomic, takes no lock
        self._signals: list[signal.Signals] = []

    def request(self, *_: object) -> None:
        """Safe in a signal handler, and from any thread."""
        self._asked = True

    def is_set(self) -> bool:
        return self._asked

    def wait(self, timeout_s: float) -> bool:
        """True once a stop was asked for; False after `timeout_s` without one."""
        deadline = time.monotonic() + timeout_s
        while not self._asked:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))
        return True

    def on_signals(self, signals: Iterable[signal.Signals]) -> None:
        """Ask for a stop on each of `signals` (a Ctrl-C before, even one Python dropped, raises
        KeyboardInterrupt: nothing is started yet to stop)."""
        signals = list(signals)
        if signal.SIGINT in signals:
            raise_if_interrupted()
        for sig in signals:
            signal.signal(sig, self.request)
            self._signals.append(sig)

    def ignore_signals(self) -> None:
        """Once the stop is under way: the signals of on_signals are ignored from then on. Left
        handled, one landing as the interpreter exits, which has put their default action back
        by then, killed the process (status -15 or -2 after a clean stop, seen with a second
        Ctrl-C or SIGTERM)."""
        for sig in self._signals:
            signal.signal(sig, signal.SIG_IGN)

"""A call on a link made by a thread that holds one of the link's locks: re-entered from a
signal's handler, or after a Ctrl-C left a lock held.

Python runs a signal's handler between two lines of its thread, so a handler that calls the
fabric may find its own thread part way through a request on the same connection. Going on
would send a request inside another's frame, read another's reply as its own, or wait for a
lock its own thread holds (each seen). Such a call is refused with BUSY, nothing sent.

But a thread can also hold a link's lock with no request under way: a Ctrl-C that struck
between a lock's release and the line before it (no try catches that) left it held, and the
thread's next call is not re-entered at all. The two are told apart by the stack: re-entered,
a method of the link is part way through further up; if none is, the held locks are let go
and the call goes on. (A plog handle's combiner tells an append re-entered the same way:
further_up.)
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType
from typing import Any, Iterable

from ..errors import Busy


def methods_code(cls: type) -> frozenset[CodeType]:
    """The code of every function defined in `cls` (its methods, as they run)."""
    return frozenset(f.__code__ for f in vars(cls).values() if hasattr(f, "__code__"))


def refuse_reentry(link: Any, locks: Iterable[Any], codes: frozenset[CodeType], what: str) -> None:
    """Raises BUSY if this thread holds one of `locks` (RLocks) while a method of `link`
    (`codes`) is further up its stack; lets them go if it holds them with none."""
    held = [lock for lock in locks if lock._is_owned()]
    if not held:
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_code in codes and frame.f_locals.get("self") is link:
        frame = frame.f_back            # this call's own way in (call -> request, say)
    if further_up(link, codes, frame):
        raise Busy(f"this thread is part way through a request on {what}: another cannot be made on it from "
                   "a signal's handler")
    for lock in held:                   # left held by an interruption: no one is using them
        while lock._is_owned():
            lock.release()


def further_up(obj: Any, codes: frozenset[CodeType], frame: FrameType | None, local: str = "self") -> bool:
    """Whether `frame`, or one further up its stack, runs one of `codes` with `obj` as its
    `local` (its `self`: a method of `obj` part way through in this thread). A walk of the
    stack (a microsecond or more): for the rare case only."""
    while frame is not None:
        if frame.f_code in codes and frame.f_locals.get(local) is obj:
            return True
        frame = frame.f_back
    return False

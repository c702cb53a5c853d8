"""The deadline of the request being served, which bounds every call made for it.

A server that calls a peer on a client's behalf must answer before the client gives up:
otherwise the client sees its own TIMEOUT (and nothing about the stuck peer), and the
server's late answer finds no one waiting. So each request carries its caller's remaining
time (`budget_s`); the server serves it under `serving_until(deadline_for(budget_s))`, and a
link asked to call a peer meanwhile waits at most until that deadline (`call_timeout_s`).
The deadline is a context variable: each connection thread has its own.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar

from ..errors import InvalidArgument
from ..limits import DEADLINE_MARGIN_S, DEADLINE_MARGIN_SHARE

_deadline: ContextVar[float | None] = ContextVar("memfabric_request_deadline", default=None)
# Seconds beyond a link's own timeout that the calls made now may wait: work that takes time
# in proportion to its size (a persistent plog's memory zeroed and flushed) says so.
_allowance: ContextVar[float] = ContextVar("memfabric_call_allowance", default=0.0)


def deadline_for(budget_s: object) -> float | None:
    """The monotonic time by which the answer to a request with this budget must be on its
    way (None: the request named no budget)."""
    if budget_s is None:
        return None
    try:
        seconds = float(budget_s) if type(budget_s) in (int, float) else math.nan
    except OverflowError:
        seconds = math.inf
    if not seconds > 0:          # NaN too
        raise InvalidArgument(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    return time.monotonic() + seconds - min(DEADLINE_MARGIN_S, seconds * DEADLINE_MARGIN_SHARE)


class serving_until:
    """`with serving_until(deadline):` calls made inside wait at most until `deadline`.
    A class, not a @contextmanager generator: every request enters one, and a generator's
    machinery cost several times the rest of it."""

    __slots__ = ("_deadline_s", "_token")

    def __init__(self, deadline: float | None) -> None:
        self._deadline_s = deadline

    def __enter__(self) -> None:
        self._token = _deadline.set(self._deadline_s)

    def __exit__(self, *exc_info: object) -> None:
        _deadline.reset(self._token)


def unbounded() -> serving_until:
    """For work that must happen whatever the request's deadline: giving back what it held
    (pins, extents). Such calls wait as long as their link allows, no longer."""
    return serving_until(None)


class allowing:
    """`with allowing(extra_s):` calls made inside may wait `extra_s` more than their link's
    timeout (still no later than the request's deadline). A class, as serving_until is."""

    __slots__ = ("_extra_s", "_token")

    def __init__(self, extra_s: float) -> None:
        self._extra_s = extra_s

    def __enter__(self) -> None:
        self._token = _allowance.set(self._extra_s)

    def __exit__(self, *exc_info: object) -> None:
        _allowance.reset(self._token)


def time_left_s() -> float | None:
    """What is left of the request's deadline (None: it named none)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def call_timeout_s(link_timeout_s: float) -> float:
    """How long a call may wait: the link's own timeout, or less when the request being
    served must be answered sooner (zero or less: no time is left to ask)."""
    link_timeout_s += _allowance.get()
    deadline = _deadline.get()
    if deadline is None:
        return link_timeout_s
    return min(link_timeout_s, deadline - time.monotonic())

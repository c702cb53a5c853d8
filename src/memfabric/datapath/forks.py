"""Links a forked child inherits: its parent's connections, not its own.

A child shares each inherited link's socket with its parent, and the link's next request
ids: had both used it, a reply could be read by the wrong process and taken as its own (an
INCR answered with the other's count). So in the child every inherited link is closed as far
as the child goes, without a word on the connection (no request, no shutdown: the parent's
goes on), and the child's session opens links of its own as it needs them.

Other per-process state a child must not inherit half-way (a plog handle's combining of its
threads' appends, whose sending thread is not in the child) is let go the same way.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

_links: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Per-process state that, unlike a link, stays in use in the child (let go in every child
# forked from here on, and in their children: never dropped from this set).
_states: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track(link: Any) -> None:
    """`link` (with a forked() method) is let go in a child forked from here on."""
    _links.add(link)


def tracked(thing: Any) -> Any:
    """`thing` (with a forked() method) is let go in every child forked from here on, and in
    the children of those (it stays in use in a child, as a link does not); and thing."""
    _states.add(thing)
    return thing


def _forked() -> None:
    for link in list(_links):
        try:
            link.forked()
        except Exception:        # noqa: BLE001 - one link's trouble must leave no other shared
            link._closed = True
    _links.clear()
    for thing in list(_states):
        thing.forked()


os.register_at_fork(after_in_child=_forked)

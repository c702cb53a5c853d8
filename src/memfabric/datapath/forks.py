"""Links a forked child inherits: its parent's connections, not its own.

A child shares each inherited link's socket with its parent, and the link's next request
ids: had both used it, a reply could be read by the wrong process and taken as its own (an
INCR answered with the other's count). So in the child every inherited link is closed as far
as the child goes, without a word on the connection (no request, no shutdown: the parent's
goes on), and the child's session opens links of its own as it needs them.

Other per-process state a child must not inherit half-way (a plog handle's combining of its
threads' appends, whose sending thread is not in the child) is let go the same way. And the
client's locks are made anew in the child: a thread of the parent's that held one at the fork
(a session's lock is held through a reconnect, up to the session's timeout) is not in the
child to let it go, and the child's next call taking it waited for ever.
"""

from __future__ import annotations

import os
import threading
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


# Owners (objects, modules) of locks made anew in every child, by attribute name.
_lock_owners: "weakref.WeakKeyDictionary[Any, tuple[str, ...]]" = weakref.WeakKeyDictionary()
_RLOCK = type(threading.RLock())


def fresh_locks(owner: Any, *names: str) -> None:
    """`owner`'s locks `names` (attributes; a module's globals) are made anew, free, in every
    child forked from here on, and in theirs. A new lock, not the old one reset: a call of the
    forking thread's own that holds the old one lets go of that one."""
    _lock_owners[owner] = names


def _forked() -> None:
    for owner, names in list(_lock_owners.items()):
        for name in names:
            setattr(owner, name, threading.RLock() if isinstance(getattr(owner, name), _RLOCK) else threading.Lock())
    for link in list(_links):
        try:
            link.forked()
        except Exception:        # noqa: BLE001 - one link's trouble must leave no other shared
            link._closed = True
    _links.clear()
    for thing in list(_states):
        thing.forked()


os.register_at_fork(after_in_child=_forked)

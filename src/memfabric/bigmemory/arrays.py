"""numpy arrays over a mapping of an object (`BigMemory.ndarray`), which live as long as it does.

An array made with the buffer protocol pins its buffer: the mapping could then never be
closed while any array (or view of one) lives, and nothing would close it when the last one
goes. So the array is made over the mapping's address through `__array_interface__`, with an
ArrayMapping at the end of its chain of bases: numpy keeps the bases alive for the array and
every view of it, and when the last goes, the ArrayMapping's finalizer hands the mapping to
be closed.

A raw address must never be unmapped under an array, so an explicit close does not unmap:
it cuts the arrays off (zero pages over the range on this host, as a lost server's mapping
is revoked; the private copy zeroed for an object on other hosts), gives back the object's
pin at once, and leaves the address range mapped until the last array goes.

A finalizer runs wherever the last reference happened to drop (inside another memfabric
call holding a link's lock, for all it knows), so it only queues: a thread of this module
does the closing, which may talk to servers (an unpin, a remote mapping's last flush).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from .client import BigMemory, Mapping, RemoteMapping

log = logging.getLogger("memfabric.client")
_MAX_BASES = 64


class ArrayMapping:
    """The mapping behind the arrays `BigMemory.ndarray` makes; `ArrayMapping.of(arr)` finds
    it from an array or any view of one. It lives, and the object stays mapped, as long as
    any of them does; when the last goes, the mapping is closed (an object on other hosts
    gets its changed pages sent back first) on a thread of memfabric's, soon after.

    `flush()` sends back the pages changed since the last flush (objects on other hosts;
    on this host the array is the pool's memory itself and there is nothing to send);
    `close()` cuts the arrays off at once (see close)."""

    __slots__ = ("bm", "_mapping", "_cut", "__array_interface__", "__weakref__")

    def __init__(self, bm: "BigMemory", mapping: "Mapping | RemoteMapping", offset: int, nbytes: int,
                 writable: bool) -> None:
        self.bm = bm
        self._mapping = mapping
        self._cut = _Cut()
        probe = np.frombuffer(mapping.view, dtype=np.uint8)   # for the address; released at once
        address = probe.ctypes.data + offset
        del probe
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, not writable),
                                    "version": 3}
        finalizer = weakref.finalize(self, _CLOSER.submit, _close_mapping, mapping, self._cut)
        finalizer.atexit = False       # at exit, the process's end drops its pins with its connections

    @staticmethod
    def of(array: Any) -> "ArrayMapping":
        """The ArrayMapping behind `array`, made by BigMemory.ndarray or a view of one.
        Raises INVALID_ARGUMENT for any other array."""
        base = array
        for _ in range(_MAX_BASES):   # numpy keeps chains short (a view's base is its array's)
            if isinstance(base, ArrayMapping):
                return base
            base = getattr(base, "base", None)
            if base is None:
                break
        raise InvalidArgument("that array was not made by BigMemory.ndarray, nor is it a view of one")

    def __repr__(self) -> str:
        return f"ArrayMapping({self.bm.bm_id!r}{', closed' if self._cut.done else ''})"

    @property
    def closed(self) -> bool:
        """Whether close() cut the arrays off."""
        return self._cut.done

    def flush(self) -> int:
        """Send back the pages changed since the map or the last flush; returns how many were
        sent (always 0 on this host, where the array is the pool's memory). Nothing after a
        close. Raises SERVER_UNAVAILABLE or NO_SUCH_NAMESPACE if the mapping was lost."""
        if self._cut.done:
            return 0
        return self._mapping.flush() or 0

    def close(self) -> None:
        """Cut every array over this mapping off the object, at once: from here on they read
        zeros and writes to them go nowhere, as with a lost server's mapping; they stay safe
        to touch. An object on other hosts gets its changed pages sent back first. The
        object's pin goes now; the address range stays mapped (zeros) until the last array
        goes. A second close does nothing. Raises what the last flush raised (the changes
        are then lost, and the arrays cut off all the same)."""
        if self._cut.done:
            return
        try:
            self._mapping._cut_off()
        finally:
            self._cut.done = True


class _Cut:
    """Shared by an ArrayMapping and its finalizer (which must not hold the ArrayMapping)."""
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


def _close_mapping(mapping: Any, cut: _Cut) -> None:
    if cut.done:
        mapping._unmap_after_cut_off()      # pin and changes were dealt with at the close
    else:
        mapping.close()


class _Closer:
    """One thread per process, started with the first array, closing mappings whose last
    array went (an idle thread waiting on its queue costs nothing)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()    # put() is safe in finalizers
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Called where taking a lock is safe (making an array), never from a finalizer."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memfabric-array-closer", daemon=True)
                self._thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception as exc:          # noqa: BLE001 - nobody is left to raise it to
                log.info("closing a mapping whose last array went: %s", exc)

    def _forked(self) -> None:
        # The child has no thread: the next array starts one. What the parent had queued is
        # the parent's to close.
        self._lock = threading.Lock()
        self._thread = None
        self._queue = queue.SimpleQueue()


_CLOSER = _Closer()
os.register_at_fork(after_in_child=_CLOSER._forked)


def start_closer() -> None:
    _CLOSER.start()


def zero_private(area: mmap.mmap) -> None:
    """Drop a private anonymous mapping's pages: it reads zeros from here on."""
    area.madvise(mmap.MADV_DONTNEED)

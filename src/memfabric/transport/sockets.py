"""Socket helpers both transports share: hang-up detection and kernel timeouts."""

from __future__ import annotations

import select
import socket
import struct
import threading

try:    # the poll that keeps the GIL (_native.c hung_up): ./dev builds it
    from .. import _native
except ImportError:      # pragma: no cover
    _native = None

_GONE = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


def timeval(seconds: float) -> bytes:
    """`seconds` as SO_RCVTIMEO/SO_SNDTIMEO take it (0: no bound)."""
    return struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6))


class HangUpWatch:
    """Whether a connected socket's peer has hung up: one non-blocking poll.

    Looks only at hang-up events, so a reply waiting to be read (perhaps by another
    thread) is not mistaken for an end of stream. A peer whose host vanished without
    closing its end is not seen here; the next request's deadline catches it.

    Links are shared by threads (every connection thread of a server asks the same peer
    link), and a poll object refuses a second poll() while one runs: a lock takes turns
    (each poll returns at once). Close the watch before its socket: the fd number may
    then name another file, which must not be polled in its place.

    The poll keeps the GIL (_native.hung_up): reads ask every few ms, and a poll that let the
    GIL go and took it back at once kept the process's other threads from getting it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._poller: select.poll | None = select.poll()
        self._poller.register(self._fd, select.POLLRDHUP)
        # An RLock: a signal's handler that closes the link while its own thread polls here
        # takes it again (a Lock waited for ever); the poll then finds the socket closed.
        self._lock = threading.RLock()

    def peer_gone(self) -> bool:
        with self._lock:
            poller = self._poller
            if poller is None:
                return True
            try:
                if _native is not None:
                    return _native.hung_up(self._fd)
                events = poller.poll(0)
            except (OSError, ValueError):
                return True
        return any(ev & _GONE for _, ev in events)

    def close(self) -> None:
        with self._lock:
            self._poller = None

    def forked(self) -> None:
        """In a forked child: closed, without the lock (a thread of the parent's may have
        held it, and none is here to let go)."""
        self._lock = threading.RLock()
        self._poller = None

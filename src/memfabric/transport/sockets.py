"""Socket helpers both transports share: hang-up detection and kernel timeouts."""

from __future__ import annotations

import select
import socket
import struct

_GONE = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


def timeval(seconds: float) -> bytes:
    """`seconds` as SO_RCVTIMEO/SO_SNDTIMEO take it (0: no bound)."""
    return struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6))


class HangUpWatch:
    """Whether a connected socket's peer has hung up: one non-blocking poll.

    Looks only at hang-up events, so a reply waiting to be read (perhaps by another
    thread) is not mistaken for an end of stream. A peer whose host vanished without
    closing its end is not seen here; the next request's deadline catches it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLRDHUP)

    def peer_gone(self) -> bool:
        try:
            events = self._poller.poll(0)
        except (OSError, ValueError):
            return True
        return any(ev & _GONE for _, ev in events)

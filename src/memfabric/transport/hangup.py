"""Whether a connected socket's peer has hung up: one non-blocking poll, for both transports.

Looks only at hang-up events, so a reply waiting to be read (perhaps by another thread)
is not mistaken for an end of stream. A peer whose host vanished without closing its end
is not seen here; the next request's deadline catches it.
"""

from __future__ import annotations

import select
import socket

_GONE = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


class HangUpWatch:
    def __init__(self, sock: socket.socket) -> None:
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLRDHUP)

    def peer_gone(self) -> bool:
        try:
            events = self._poller.poll(0)
        except (OSError, ValueError):
            return True
        return any(ev & _GONE for _, ev in events)

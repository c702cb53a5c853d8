"""A reply sent to a door client within a bound in all, on a socket whose waits the kernel
bounds (front.py _bound_waits: SO_SNDTIMEO bounds each send() call, not a whole reply).

socket.sendall() goes on while each send() moves a few bytes within its bound: a client
reading 4 KiB every 59 s would keep a 1 MiB reply piece (a door thread and its share of the
reply budget) for hours. Python's socket timeout bounded the whole sendall; this does too."""

from __future__ import annotations

import socket
import time

from ...limits import RESP_SEND_TIMEOUT_S
from ...transport.sockets import timeval


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview, within_s: float = RESP_SEND_TIMEOUT_S) -> None:
    """Send all of `data` within `within_s`, else TimeoutError (an OSError: the client goes)."""
    deadline = time.monotonic() + within_s
    with memoryview(data) as whole, whole.cast("B") as view:    # released however it ends (a bytearray is reused)
        sent = sock.send(view)          # all of it, mostly: one system call, as sendall
        if sent == len(view):
            return
        try:
            while sent < len(view):
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TimeoutError(f"the client read {sent} of {len(view)} bytes in {within_s:g} seconds")
                # The rest within what is left (the bound is set back below: the rare path pays).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(max(left_s, 0.001)))
                with view[sent:] as rest:
                    sent += sock.send(rest)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(within_s))

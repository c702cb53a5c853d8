"""A front door's accept loop, which a shortage of file descriptors or memory cannot end.

accept() fails for reasons that pass: this process or the whole system is out of file
descriptors (EMFILE, ENFILE) or out of buffers (ENOBUFS, ENOMEM), or a client gave up
before it was taken (ECONNABORTED and the network errors Linux reports through accept).
The loop backs off (ACCEPT_BACKOFF_MIN_S doubling to ACCEPT_BACKOFF_MAX_S), logs once
when such a spell begins and once when it ends, and goes on; only its listener closing
(the server stopping) ends it.

While it cannot accept, it tells the server (`Server.door_accepting`), whose heartbeat
stops after a while: the cluster then sees the server dead instead of alive and serving no
one. A client that connects meanwhile is not left waiting in the backlog for its own
timeout: out of fds, the loop takes it with a spare fd kept for the purpose, and closes
it at once (the EMFILE trick of libuv), so the client hears no now.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import Callable

from ..limits import ACCEPT_BACKOFF_MAX_S, ACCEPT_BACKOFF_MIN_S

log = logging.getLogger("memfabric.server")

OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})
OUT_OF_RESOURCES = OUT_OF_FDS | {errno.ENOBUFS, errno.ENOMEM}
# One client's trouble (accept(2): Linux passes pending network errors on): take the next.
CLIENT_GAVE_UP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                            errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                            errno.ENETUNREACH, errno.ETIMEDOUT, errno.ECONNRESET})


class AcceptLoop:
    """Accepts on `listener` and hands each connection to `take`, which owns it from then on
    (and must close it if it cannot serve it)."""

    def __init__(self, door: str, listener: socket.socket, take: Callable[[socket.socket], None],
                 accepting: Callable[[bool], None]) -> None:
        self.door = door
        self._listener = listener
        self._take = take
        self._accepting = accepting       # told False when a spell begins, True when it ends
        self._stopped = threading.Event()
        self._spare = _open_spare()
        self._deaf_since: float | None = None
        self._turned_away = 0
        self._thread = threading.Thread(target=self._run, name=f"{door.lower()}-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Call before closing the listener: the loop then takes the error for the end."""
        self._stopped.set()

    def close(self) -> None:
        """Stop, and close the listener: shut down first, which wakes a loop blocked in accept()."""
        self.stop()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def join(self, timeout_s: float) -> None:
        if self._thread.ident is not None:     # a door made but never started (the start failed)
            self._thread.join(timeout_s)
        if self._spare is not None and not self._thread.is_alive():
            os.close(self._spare)
            self._spare = None

    def _run(self) -> None:
        backoff_s = ACCEPT_BACKOFF_MIN_S
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                # A spell, and nobody at the door for a while: could we take the next one?
                if self._fd_available():
                    self._hearing()
                continue
            except OSError as exc:
                if self._stopped.is_set() or self._listener.fileno() < 0:
                    return
                if exc.errno in CLIENT_GAVE_UP:
                    continue
                self._deaf(exc)
                if exc.errno in OUT_OF_FDS:
                    self._turn_away()
                self._stopped.wait(backoff_s)
                backoff_s = min(backoff_s * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            try:
                self._take(sock)
            except Exception as exc:   # noqa: BLE001 -- e.g. no thread for it: out of memory or threads
                sock.close()
                self._deaf(exc)
                self._stopped.wait(backoff_s)
                backoff_s = min(backoff_s * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            self._hearing()
            backoff_s = ACCEPT_BACKOFF_MIN_S

    def _deaf(self, exc: BaseException) -> None:
        if self._deaf_since is None:
            self._deaf_since = time.monotonic()
            self._turned_away = 0
            log.warning("%s door cannot accept connections (%s); retrying, backing off up to %.0f s",
                        self.door, exc, ACCEPT_BACKOFF_MAX_S)
            self._accepting(False)
            # From now on wait for a connection at most as long as a pause, so that a spell
            # ends even when nobody connects (see the socket.timeout branch above).
            self._set_timeout(ACCEPT_BACKOFF_MAX_S)

    def _hearing(self) -> None:
        if self._deaf_since is None:
            return
        log.warning("%s door accepts connections again after %.1f s (%d turned away meanwhile)",
                    self.door, time.monotonic() - self._deaf_since, self._turned_away)
        self._deaf_since = None
        self._set_timeout(None)
        self._accepting(True)

    def _turn_away(self) -> None:
        """Out of fds: take the waiting connection with the spare fd and close it at once."""
        if self._spare is None:
            self._spare = _open_spare()
            return
        os.close(self._spare)
        self._spare = None
        timeout = self._listener.gettimeout()
        self._set_timeout(0.0)
        try:
            sock, _ = self._listener.accept()
            sock.close()
            self._turned_away += 1
        except OSError:
            pass                          # nobody waiting, or still no fd
        finally:
            self._set_timeout(timeout)
            self._spare = _open_spare()

    def _set_timeout(self, timeout_s: float | None) -> None:
        try:
            self._listener.settimeout(timeout_s)
        except OSError:
            pass                          # closed meanwhile: the next accept ends the loop

    def _fd_available(self) -> bool:
        """One more fd could be opened now (beyond the spare, which is kept)."""
        if self._spare is None:
            self._spare = _open_spare()
            if self._spare is None:
                return False
        try:
            os.close(os.dup(self._spare))
        except OSError:
            return False
        return True


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None

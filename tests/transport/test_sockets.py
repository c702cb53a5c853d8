"""Hang-up detection (transport/sockets.py) shared by threads, on real sockets."""

from __future__ import annotations

import socket
import threading

from memfabric.transport.sockets import HangUpWatch

THREADS = 8
CHECKS_PER_THREAD = 20_000


def test_threads_may_ask_one_watch_at_once():
    """Every connection thread of a server asks the same peer link; every thread of a
    client session asks the same link. A poll object refuses concurrent poll() calls."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    watch = HangUpWatch(mine)
    failures: list[BaseException] = []
    answers: list[bool] = []

    def ask() -> None:
        try:
            for _ in range(CHECKS_PER_THREAD):
                answers.append(watch.peer_gone())
        except BaseException as exc:     # the bug raised RuntimeError here
            failures.append(exc)
    threads = [threading.Thread(target=ask) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not failures, f"{len(failures)} threads failed, first: {failures[0]!r}"
        assert not any(answers), "a live peer was reported gone"
        theirs.close()
        assert watch.peer_gone(), "a peer that hung up was not noticed"
    finally:
        mine.close()
        theirs.close()


def test_a_closed_watch_says_gone_without_touching_the_fd_number():
    """Once its socket is closed, the fd number may name another file: the watch must not
    poll it (and say "alive" for some unrelated pipe)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    watch = HangUpWatch(mine)
    watch.close()
    mine.close()
    reader, writer = socket.socketpair()     # likely takes the freed fd number
    try:
        assert watch.peer_gone()
    finally:
        for s in (theirs, reader, writer):
            s.close()

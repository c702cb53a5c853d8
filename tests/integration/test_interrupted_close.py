"""A link's close cut short by Ctrl-C at any of its lines, over real links to real servers.

The CI's Ctrl-C storm over RPC once ended holding one fd more than it began with: an
interruption between marking the link closed and closing its socket left a link that said it
was closed, which the session then replaced and nobody closed again; its socket lived on
until the garbage collector found the traceback's cycle. A close must be finished by the next
close() or by the session moving on, never left to the collector.

Every wait is bounded; no test asserts how fast something was.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest

import memfabric
from memfabric.client.session import Session
from memfabric.datapath.link import ServerLink, _Mapped
from memfabric.datapath.rpc_link import RpcLink

from ..helpers import interrupt_at, ns_name


def _lines(*functions) -> list[tuple[object, int]]:
    out = []
    for function in functions:
        code = function.__code__
        lines = sorted({line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno})
        out += [(function, line) for line in lines]
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _interrupted(tracer, call) -> bool:
    """call() with `tracer` set (sys.settrace); whether a KeyboardInterrupt ended it."""
    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


def _socket_closed(link) -> bool:
    if isinstance(link, RpcLink):
        return link._frames.sock.fileno() == -1 and link._span_dup is None
    return link._channel.sock.fileno() == -1


@pytest.mark.parametrize("door", ["rpc", "ipc"])
def test_a_close_cut_short_at_any_line_is_finished_when_the_session_moves_on(fabric, request, door):
    config = os.path.join(fabric.directory, "remote.toml") if door == "rpc" else fabric.directory
    link_class = RpcLink if door == "rpc" else ServerLink
    with memfabric.init(config) as s:
        ns = s.create_namespace(ns_name(request), "k")
        server_id = s.home().server_id
        interrupted = 0
        lines = _lines(link_class.close, *([RpcLink._shut] if door == "rpc" else []))
        for function, line in lines:
            old = s.link(server_id)
            old.call("stats")
            before = _fds()
            tracer, fired = interrupt_at(function, line)
            interrupted += _interrupted(tracer, old.close)
            where = f"Ctrl-C at {function.__qualname__} line {line}"
            new = s.link(server_id)                 # the session reconnects, or keeps a link not closed
            assert "id" in new.call("stats"), where
            if new is old:
                old.close()                         # a close begun again finishes
                new = s.link(server_id)
                new.call("stats")
            assert _socket_closed(old), where + ": the link the session let go of still holds its socket"
            assert _fds() <= before, where + f": {before} fds before, {_fds()} after"
        assert interrupted >= len(lines) // 2, f"{interrupted} of {len(lines)} lines reached"
        ns.destroy()


@pytest.mark.parametrize("door", ["rpc", "ipc"])
def test_a_session_close_cut_short_at_any_line_is_finished_by_the_next(fabric, request, door):
    """A session's close() interrupted at any of its lines, then called again (as a program
    would, or atexit): every link the session had is closed, its socket and the fds of what
    it mapped with it, without the collector's help (it is off here)."""
    config = os.path.join(fabric.directory, "remote.toml") if door == "rpc" else fabric.directory
    name = ns_name(request)
    with memfabric.init(config) as s:
        s.create_namespace(name, "k").kv().put(b"k", b"v" * 3000)
    interrupted = 0
    lines = _lines(Session.close)
    gc.disable()
    try:
        for function, line in lines:
            before = _fds()
            s = memfabric.init(config)
            kv = s.namespace(name, "k").kv()
            kv.put(b"k", b"v" * 3000)
            assert kv.get(b"k") == b"v" * 3000
            for server in s.servers():          # a link to each server
                s.link(server["server_id"]).call("stats")
            links = list(s._links.values())
            tracer, fired = interrupt_at(function, line)
            interrupted += _interrupted(tracer, s.close)
            s.close()
            where = f"Ctrl-C at {function.__qualname__} line {line}"
            assert all(_socket_closed(link) for link in links), where + ": a link still holds its socket"
            del s, kv, links
            assert _fds() <= before, where + f": {before} fds before, {_fds()} after"
    finally:
        gc.enable()
    assert interrupted >= len(lines) // 2, f"{interrupted} of {len(lines)} lines reached"
    with memfabric.init(config) as s:
        s.namespace(name, "k").destroy()


def _interrupt_on_return(function):
    """As interrupt_at, as `function` returns: after its last line has run."""
    fired: list[str] = []

    def local(frame, event, arg):
        if event == "return" and not fired:
            fired.append(event)
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is function.__code__ else None
    return tracer, fired


def test_a_same_host_close_cut_short_as_it_lets_a_mapping_go_is_finished_once(fabric, request):
    """Ctrl-C at any line of letting a mapped fd go (the link's close lets every one go):
    the session then finishes that close as it moves on, closing each fd once. One closed
    before the interruption was closed again: EBADF out of session.link(), or, had the
    number been taken again meanwhile, another file of this process closed."""
    with memfabric.init(fabric.directory) as s:
        kv = s.create_namespace(ns_name(request), "k").kv()
        server_id = s.local.server_id
        interrupted = 0
        lines = _lines(_Mapped.close) + [(_Mapped.close, "return")]
        for function, line in lines:
            before = _fds()
            old = s.link(server_id)
            kv.put(b"k", b"v" * 3000)
            assert kv.get(b"k") == b"v" * 3000      # maps the keyspace's index through `old`
            tracer, fired = interrupt_at(function, line) if line != "return" else _interrupt_on_return(function)
            interrupted += _interrupted(tracer, old.close)
            where = f"Ctrl-C at {function.__qualname__} line {line}"
            new = s.link(server_id)
            assert new is not old and "id" in new.call("stats"), where
            assert kv.get(b"k") == b"v" * 3000, where
            assert _socket_closed(old) and not old._segments and not old.attached, where
            new.close()                             # what `new` mapped goes too, to count fds
            assert _fds() <= before, where + f": {before} fds before, {_fds()} after"
        assert interrupted == len(lines), f"{interrupted} of {len(lines)} lines reached"

"""A link's close cut short by Ctrl-C at any of its lines, over real links to real servers.

The CI's Ctrl-C storm over RPC once ended holding one fd more than it began with: an
interruption between marking the link closed and closing its socket left a link that said it
was closed, which the session then replaced and nobody closed again; its socket lived on
until the garbage collector found the traceback's cycle. A close must be finished by the next
close() or by the session moving on, never left to the collector.

Every wait is bounded; no test asserts how fast something was.
"""

from __future__ import annotations

import os
import sys

import pytest

import memfabric
from memfabric.datapath.link import ServerLink
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
            sys.settrace(tracer)
            try:
                old.close()
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                sys.settrace(None)
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

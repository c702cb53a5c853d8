"""A signal's handler that calls the fabric while its own thread is part way through a request on
the same connection: refused at once with BUSY, nothing sent; never a reply taken for another's,
a request sent inside another's frame, or a wait for a lock its own thread holds (each seen: a
ProtocolError, a wrong reply, a hang for ever). Real signals (SIGALRM every 2 ms), a real
server, on this host and over RPC, in a child process (pytest-timeout has SIGALRM here)."""

from __future__ import annotations

import json
import os

import pytest

import memfabric

from ..conftest import run_client
from ..helpers import ns_name
from .test_plog_compiled import fab  # noqa: F401 - fab: the shared fabric (pools "ram", "disk")

HANDLER_CALLS = r"""
import collections, faulthandler, json, signal, sys, time
import memfabric
faulthandler.dump_traceback_later(60, exit=True)          # a hang: the child fails, loudly
path, ns, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with memfabric.init(path, timeout_s=3.0) as s:
    log = s.namespace(ns, "k", pool="ram").plog("wal")
    handler_errors, main_errors, calls = collections.Counter(), collections.Counter(), [0]

    def handler(sig, frame):
        try:
            log.info()
            calls[0] += 1
        except memfabric.MemfabricError as exc:
            handler_errors[exc.code.name] += 1

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
    appended, calls_made, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end and calls_made < 20000:     # (at most ~12.5 MiB of frames)
        calls_made += 1
        try:
            if calls_made % 2:
                log.append(b"x" * 100)
                appended += 1
            else:
                log.append_many([b"m" * 100, b"n" * 1000])
                appended += 2
        except Exception as exc:
            main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps({"appended": appended, "records": log.info()["records"], "calls": calls[0],
                      "handler_errors": handler_errors, "main_errors": main_errors}))
"""


@pytest.mark.parametrize("where", ["same host", "remote"])
def test_a_signal_handler_calling_on_a_connection_its_thread_is_using_gets_busy_and_breaks_nothing(
        fab, request, where):  # noqa: F811
    name = ns_name(request)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(name, sec_id="k", pool="ram")
        ns.create_plog("wal", 16 << 20)
        path = fab.directory if where == "same host" else os.path.join(fab.directory, "remote.toml")
        done = run_client(HANDLER_CALLS, path, name, "3", timeout_s=90)
        ns.destroy()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["main_errors"] == {}, out
    assert set(out["handler_errors"]) <= {"BUSY"}, out
    assert out["calls"] > 0 and out["records"] == out["appended"], out

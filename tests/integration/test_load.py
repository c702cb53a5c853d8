"""Many clients at once (memfabric load, load.py), then an audit of every server's memory:
no error outside the vocabulary of a loaded fabric (OUT_OF_MEMORY), and no byte leaked.

The issue's figure comes from `memfabric load --clients 16 --duration 60`; these runs are
short, so CI can afford them.
"""

from __future__ import annotations

import pytest

import memfabric
from memfabric.load import audit, leak_figures, run_load_on, run_threads

from ..helpers import alloc_when_possible, MiB, ns_name

LOAD_S = 5.0
SHARED_SESSION_THREADS = 6


def _explain(result) -> str:
    return f"errors {result['errors'] if isinstance(result, dict) else dict(result.errors)}: " + \
        "\n".join(result["samples"] if isinstance(result, dict) else result.samples)


def test_the_audit_accounts_for_live_objects(fresh_fabric, request):
    """The audit itself: objects of every placement, one pinned by a mapping after its free,
    show up byte for byte; freeing all leaves the namespace holding nothing."""
    fab = fresh_fabric(servers=2, capacity="32MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace(ns_name(request), "k")
        objects = [ns.alloc(5000), ns.alloc(3 * MiB, memfabric.Affinity("spread")),
                   ns.alloc(MiB, memfabric.Affinity("server", 2))]
        mapping = objects[0].map()
        objects[0].free()                    # pinned dead until the mapping goes
        audits = audit(s)
        live = {a["server_id"]: a["pools"]["default"] for a in audits}
        assert all(p["live_bytes"] == p["accounted_bytes"] for p in live.values()), live
        rows = {sid: next(r for r in p["namespaces"] if r["ns"] == ns.name) for sid, p in live.items()}
        assert rows[1]["pinned_dead_bytes"] == 8192
        assert sum(r["object_bytes"] + r["held_bytes"] for r in rows.values()) == 4 * MiB
        assert rows[2]["held_bytes"] > 0     # the spread object's share, held for server 1
        mapping.close()
        for bm in objects[1:]:
            bm.free()
        assert leak_figures(audit(s), "default", [ns.name]) == (0, 0)
        ns.destroy()


def test_a_loaded_fabric_leaks_nothing(fresh_fabric):
    """Client processes, two threads each, every operation at once; then every server's
    allocator balances and the load's namespace holds nothing."""
    fab = fresh_fabric(servers=2, capacity="128MiB")
    result = run_load_on(fab.directory, clients=4, threads=2, duration_s=LOAD_S)
    assert result["ops"] > 100, result
    assert result["unexpected_errors"] == 0, _explain(result)
    assert result["leaked_bytes"] == 0 and result["unaccounted_bytes"] == 0, result["audits"]


def test_one_session_shared_by_threads(fresh_fabric, request):
    """One session, several threads hammering alloc/read/write/expand/map/free, every byte
    checked: no error, nothing leaked. Three threads share each namespace."""
    fab = fresh_fabric(servers=2, capacity="64MiB")
    with memfabric.init(fab.directory, server=0) as s:
        spaces = [s.create_namespace(f"{ns_name(request)}-{i}", "k") for i in range(2)]
        tally = run_threads(s, [spaces[i % 2] for i in range(SHARED_SESSION_THREADS)], LOAD_S, seed=7)
        assert tally.ops > 100
        unexpected = {code: n for code, n in tally.errors.items() if code != "OUT_OF_MEMORY"}
        assert not unexpected, _explain(tally)
        assert leak_figures(audit(s), "default", [ns.name for ns in spaces]) == (0, 0)
        for ns in spaces:
            ns.destroy()


def test_a_segment_taken_back_while_another_thread_allocates_never_loses_bytes(fresh_fabric, request):
    """Once, a free answered which segments were idle and the client gave them back while
    another thread of the session allocated into them: that object read zeros. Now segments
    are taken back by the server only when nothing lives in them, and a taken-back segment's
    id never returns: a thread's new object is never in one."""
    fab = fresh_fabric(servers=1, capacity="8MiB")
    with memfabric.init(fab.directory) as s, memfabric.init(fab.directory) as other:
        ns = s.create_namespace(ns_name(request), "k")
        x = ns.alloc(4096)
        (_, before, _, _), = x._described.raw_extents
        x.free()                                              # thread A: its segment empties
        hog = other.create_namespace(ns_name(request) + "-hog", "k")
        while True:                                           # another tenant takes everything back
            try:
                hog.alloc(256 * 1024)
            except memfabric.OutOfMemory:
                break
        hog.destroy()
        y = alloc_when_possible(ns, 4096)                     # thread B
        y.write(b"B's bytes")
        (_, after, _, _), = y._described.raw_extents
        assert after != before, "the segment taken back came back"
        assert y.read(0, 9) == b"B's bytes"
        ns.destroy()


def test_a_ctrl_c_that_also_stopped_the_fabric_is_what_the_load_says(fresh_fabric, monkeypatch):
    """A terminal's Ctrl-C reaches `memfabric load` and the fabric it started (one process
    group). The load's cleanup then destroyed its namespaces on a fabric that was gone, and
    that error (SERVER_UNAVAILABLE, a traceback, status 1) replaced the Ctrl-C. The Ctrl-C is
    what comes out; the cleanup does what it can."""
    import memfabric.load as load
    fab = fresh_fabric(servers=1)

    def stopped_by_a_ctrl_c(*args, **kwargs):
        fab.stop()
        raise KeyboardInterrupt
    monkeypatch.setattr(load, "_run_clients", stopped_by_a_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_load_on(fab.directory, clients=1, threads=2, duration_s=1.0)

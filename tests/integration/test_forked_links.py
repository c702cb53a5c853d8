"""A client forks while its session holds links (a granted same-host put link, a remote
one), then parent and child both use the session at once. The child inherits each link's
socket and its next request ids: had both used them, a reply could be taken by the wrong
process (an INCR answering with the other's count, a put's "stored" read as a delete's
answer). Each process must get its own answers, and the parent's links must go on.

Every wait is bounded; no test asserts how fast anything was.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

import pytest

import memfabric

from ..helpers import CHILD_WAIT_S, ns_name

ROUNDS = 300


def _work(kv, me: bytes) -> dict:
    """INCRs of this process's own counter, and puts and gets of its own keys: how many
    answers were right, wrong, or errors."""
    counts = {"right": 0, "wrong": 0, "errors": []}
    expect = int(kv.get(me + b"-count")) + 1
    for i in range(ROUNDS):
        try:
            got = kv.incr(me + b"-count")
            counts["right" if got == expect else "wrong"] += 1
            expect = got + 1
            key, value = me + b"-%d" % (i % 20), me * 2000 + b"%d" % i
            counts["right" if kv.put(key, value) is True else "wrong"] += 1
            counts["right" if kv.get(key) == value else "wrong"] += 1
        except Exception as exc:     # noqa: BLE001 - counted, and the test fails on it
            counts["errors"].append(f"{exc.__class__.__name__}: {exc}"[:200])
    return counts


def _socket_of(link):
    return link._frames.sock if hasattr(link, "_frames") else link._channel.sock


def _read_to_end(fd: int) -> bytes:
    """What the child writes until its end closes (it exits), within CHILD_WAIT_S * 4."""
    deadline, got = time.monotonic() + CHILD_WAIT_S * 4, b""
    while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the child said only {got[:200]!r} in time")


def _waited(pid: int) -> tuple[int, int]:
    deadline = time.monotonic() + CHILD_WAIT_S
    while time.monotonic() < deadline:
        done = os.waitpid(pid, os.WNOHANG)
        if done[0]:
            return done
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)


@pytest.mark.parametrize("door", ["ipc", "rpc"])
def test_a_forked_child_and_its_parent_each_get_their_own_replies(fabric, request, door):
    path = fabric.directory if door == "ipc" else os.path.join(fabric.directory, "remote.toml")
    r, w = os.pipe()
    with memfabric.init(path) as s:
        kv = s.create_namespace(ns_name(request), sec_id="k").kv()
        kv.put(b"parent-count", b"1000000")
        kv.put(b"child-count", b"0")
        for i in range(3):                  # the put link granted: the next puts are compiled
            kv.put(b"warm", b"w" * 2000)
        # Links closed earlier but still referenced (a traceback's, a test's) are let go of
        # in the child too: one of them must not stop the others being let go of.
        closed = [s.link(sid) for sid in list(s._links)]
        for link in closed:
            link.close()
        kv.put(b"warm", b"w" * 2000)               # the session reconnects
        kv.put(b"warm", b"w" * 2000)
        links = {sid: s.link(sid) for sid in s._links}
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                # The child holds no copy of its parent's connections open: they end when the
                # parent closes them, whatever the child does meanwhile.
                still_open = sum(_socket_of(link).fileno() != -1 for link in links.values())
                os.write(w, json.dumps({**_work(kv, b"child"), "inherited_open": still_open}).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            mine = _work(kv, b"parent")
            theirs = _read_to_end(r)
        finally:
            os.close(r)
            _, status = _waited(pid)
        assert status == 0
        theirs = json.loads(theirs)
        assert theirs.pop("inherited_open") == 0
        for who, counts in (("parent", mine), ("child", theirs)):
            assert counts["wrong"] == 0 and not counts["errors"], (who, counts)
            assert counts["right"] == 3 * ROUNDS, (who, counts)
        # The parent's connections went on: the child never spoke on them, nor shut them.
        assert all(s._links.get(sid) is link and not link.closed for sid, link in links.items())
        assert int(kv.get(b"child-count")) == ROUNDS
        assert int(kv.get(b"parent-count")) == 1000000 + ROUNDS


_CHILD_EXITS = r"""
import os, sys
import memfabric
with memfabric.init(sys.argv[1]) as s:
    kv = s.create_namespace(sys.argv[2], sec_id="k").kv()
    keys = [b"k%d" % i for i in range(20)]
    for key in keys:
        kv.put(key, key * 50)
    links = dict(s._links)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)          # exits as programs do: atexit closes the session it inherited
    os.waitpid(pid, 0)
    print("links", "kept" if all(not link.closed and not link.peer_gone() for link in links.values()) else "lost")
    print("values", "right" if all(kv.get(key) == key * 50 for key in keys) else "wrong")
"""


@pytest.mark.parametrize("door", ["ipc", "rpc"])
def test_a_forked_child_that_exits_leaves_its_parents_connections_alone(fabric, request, door):
    """A forked child that exits normally closes its session (atexit): only its own copies of
    the inherited links' fds. A shutdown of a remote link's socket ended the parent's
    connection too."""
    from ..conftest import run_client
    path = fabric.directory if door == "ipc" else os.path.join(fabric.directory, "remote.toml")
    done = run_client(_CHILD_EXITS, path, ns_name(request), timeout_s=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "links kept" in done.stdout and "values right" in done.stdout, done.stdout + done.stderr[-3000:]


def test_a_forked_childs_inherited_mappings_stay_as_its_session_moves_on(fabric, request):
    """A parent maps an object and forks: the child reads it through the inherited mapping,
    also after its session let go of the inherited link for one of its own. The parent still
    holds that mapping; the child's copy must not turn to zeros because the child moved on."""
    r, w = os.pipe()
    with memfabric.init(fabric.directory) as s:
        ns = s.create_namespace(ns_name(request), sec_id="k")
        bm = ns.alloc(1 << 20)
        bm.write(b"m" * (1 << 20))
        mapping = bm.map()
        kv = ns.kv()
        kv.put(b"k", b"v" * 100)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                got = [kv.get(b"k") == b"v" * 100, bytes(bm.read(0, 4)) == b"mmmm",
                       bytes(mapping.view[:4]) == b"mmmm" and bytes(mapping.view[-4:]) == b"mmmm"]
                os.write(w, json.dumps(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            theirs = _read_to_end(r)
        finally:
            os.close(r)
            _, status = _waited(pid)
        assert status == 0
        assert json.loads(theirs) == [True, True, True]
        assert bytes(mapping.view[:4]) == b"mmmm"
        mapping.close()
        ns.destroy()

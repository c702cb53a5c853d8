"""Sharing between client processes, and what happens when a client or a server dies."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

import memfabric
from memfabric import Affinity
from memfabric.errors import NoSuchObject, ServerUnavailable

from ..conftest import run_client
from ..helpers import CHILD_WAIT_S as WAIT_S, Child, MiB, wait_until as _wait_until



def wait_until(condition, what: str, timeout_s: float = WAIT_S):
    return _wait_until(condition, what, timeout_s)


def pool_used_bytes(directory: str) -> dict[int, int]:
    """server id -> used bytes of the default pool, from `memfabric status --json`."""
    out = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", directory, "--json"],
                         capture_output=True, text=True, timeout=WAIT_S, check=True).stdout
    return {s["server_id"]: s["pools"]["default"]["used_bytes"] for s in json.loads(out)["servers"]}


@pytest.fixture
def ns(session):
    name = f"proc-{uuid.uuid4().hex[:10]}"
    handle = session.create_namespace(name, sec_id="shared-secret")
    yield handle
    session.destroy_namespace(name, "shared-secret")


# ---- passing objects between processes ----------------------------------------------------------

WRITER = r"""
import hashlib, sys, numpy as np, memfabric
directory, ns_name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
with memfabric.init(directory, server=0) as s:
    bm = s.namespace(ns_name, "shared-secret").alloc(3 * 2**20 + 77, memfabric.Affinity("spread"))
    data = np.random.default_rng(seed).integers(0, 256, bm.size, dtype=np.uint8).tobytes()
    bm.write(data)
    print(bm.bm_id, hashlib.sha256(data).hexdigest())
"""

READER = r"""
import hashlib, sys, memfabric
directory, ns_name, bm_id, digest = sys.argv[1:5]
with memfabric.init(directory, server=1) as s:
    bm = s.namespace(ns_name, "shared-secret").open(bm_id)
    data = bm.read()
    assert hashlib.sha256(data).hexdigest() == digest, "reader saw other bytes than the writer wrote"
    bm.write(data[::-1][:4096], 2**20 - 2048)    # write back: the reversed tail, across an extent edge
    print("ok", bm.size)
"""


def test_object_passes_between_processes(fabric, session, ns):
    a = run_client(WRITER, fabric.directory, ns.name, "7")
    assert a.returncode == 0, a.stderr
    bm_id, digest = a.stdout.split()
    # The writer has exited; its object lives on.
    b = run_client(READER, fabric.directory, ns.name, bm_id, digest)
    assert b.returncode == 0, b.stderr
    size = 3 * MiB + 77
    assert b.stdout.split() == ["ok", str(size)]

    want = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    want[MiB - 2048:MiB + 2048] = want[::-1][:4096].copy()
    got = ns.open(bm_id).read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want.tobytes()).hexdigest()

    # And this process's writes are what a third process sees.
    ns.open(bm_id).write(b"from the parent", 5)
    want[5:20] = np.frombuffer(b"from the parent", np.uint8)
    c = run_client(READER, fabric.directory, ns.name, bm_id, hashlib.sha256(want.tobytes()).hexdigest())
    assert c.returncode == 0, c.stderr


def test_another_process_needs_the_sec_id(fabric, ns):
    bm = ns.alloc(4096)
    bm.write(b"private")
    code = r"""
import sys, memfabric
with memfabric.init(sys.argv[1]) as s:
    try:
        s.namespace(sys.argv[2], "guess").open(sys.argv[3])
    except memfabric.PermissionDenied:
        print("denied")
"""
    r = run_client(code, fabric.directory, ns.name, bm.bm_id)
    assert r.returncode == 0 and r.stdout.strip() == "denied", r.stderr


# ---- map coherence -------------------------------------------------------------------------------

MAPPER = r"""
import sys, memfabric
directory, ns_name, bm_id = sys.argv[1:4]
with memfabric.init(directory, server=1) as s:
    bm = s.namespace(ns_name, "shared-secret").open(bm_id)
    with bm.map() as m:
        view = m.view
        print("mapped", view.nbytes, flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "get":                      # get OFFSET LENGTH -> hex of what this mapping shows
                off, n = int(rest[0]), int(rest[1])
                print(bytes(view[off:off + n]).hex(), flush=True)
            elif cmd == "put":                    # put OFFSET HEX -> store through this mapping
                off, data = int(rest[0]), bytes.fromhex(rest[1])
                view[off:off + len(data)] = data
                print("done", flush=True)
            elif cmd == "quit":
                break
        del view
print("unmapped", flush=True)
"""


def test_two_processes_see_each_others_writes_through_mappings(fabric, ns):
    bm = ns.alloc(2 * MiB + 4096, Affinity("spread"))
    assert len({sid for sid, _ in bm.extents}) == 2, "the object should span both servers"
    child = Child(MAPPER, fabric.directory, ns.name, bm.bm_id)
    try:
        assert child.expect() == f"mapped {bm.size}"
        with bm.map() as m:
            view = m.view
            rng = np.random.default_rng(8)
            for off in (0, MiB - 3, MiB, 2 * MiB + 4090):
                # Parent writes through its mapping; the child's mapping shows it with no flush or call.
                mine = rng.integers(0, 256, 6, dtype=np.uint8).tobytes()
                view[off:off + 6] = mine
                assert child.ask(f"get {off} 6") == mine.hex()
                # Child writes through its mapping; the parent's mapping shows it at once.
                theirs = rng.integers(0, 256, 6, dtype=np.uint8).tobytes()
                assert child.ask(f"put {off} {theirs.hex()}") == "done"
                assert bytes(view[off:off + 6]) == theirs
                assert bm.read(off, 6) == theirs
            del view
        child.send("quit")
        assert child.expect() == "unmapped"
        assert child.close() == 0, child.stderr()
    finally:
        child.kill()


# ---- a client killed while holding memory -------------------------------------------------------

HOARDER = r"""
import sys, memfabric
directory, ns_name = sys.argv[1:3]
s = memfabric.init(directory, server=0)
ns = s.namespace(ns_name, "shared-secret")
objs = [ns.alloc(2**20, memfabric.Affinity("local")) for _ in range(3)]
objs += [ns.alloc(3 * 2**20, memfabric.Affinity("spread")) for _ in range(2)]
for bm in objs:
    bm.write(b"\xcc" * bm.size)
mapped = objs[3].map()
view = mapped.view
view[:4] = b"held"
print(" ".join(bm.bm_id for bm in objs), flush=True)
sys.stdin.readline()      # wait to be killed
"""


def test_killed_client_leaks_nothing(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    capacity_total = 16 * MiB
    with memfabric.init(fab.directory, server=0) as s:
        s.create_namespace("hoard", sec_id="shared-secret")
        child = Child(HOARDER, fab.directory, "hoard")
        try:
            ids = child.expect().split()
            assert len(ids) == 5
            wait_until(lambda: sum(pool_used_bytes(fab.directory).values()) == 9 * MiB,
                       "the servers to publish the hoard's 9 MiB")
            # Free the mapped object under the child's feet: its memory waits for the unmap.
            assert s.namespace("hoard", "shared-secret").batch_free([ids[3]]) == [0]
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait(WAIT_S)
            assert child.proc.returncode == -signal.SIGKILL
        finally:
            child.kill()

        # The objects outlive their maker; they hold what it wrote. (Looked at from a session of
        # its own: a session keeps the segments it mapped until it closes.)
        with memfabric.init(fab.directory, server=1) as peek:
            ns = peek.namespace("hoard", "shared-secret")
            assert ns.open(ids[0]).read(0, 4) == b"\xcc" * 4
            assert ns.open(ids[4]).read() == b"\xcc" * 3 * MiB
            with pytest.raises(NoSuchObject):
                ns.open(ids[3])
        s.destroy_namespace("hoard", "shared-secret")
        assert "hoard" not in {n.ns for n in s.namespaces()}
        wait_until(lambda: set(pool_used_bytes(fab.directory).values()) == {0},
                   "the pool's used bytes to return to 0")
        for server in s.servers():
            assert server["pools"]["default"]["used_bytes"] == 0

        # Nothing stays pinned by the dead client: another namespace gets the whole pool.
        fresh = s.create_namespace("after", sec_id="k")
        got, deadline = 0, time.monotonic() + WAIT_S
        while got < capacity_total:
            try:
                fresh.alloc(MiB)
                got += MiB
            except memfabric.OutOfMemory:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert got == capacity_total, f"only {got} of {capacity_total} bytes could be allocated again"


MAPPER_OF_SPREAD = r"""
import sys, memfabric
s = memfabric.init(sys.argv[1], server=0)
bm = s.namespace(sys.argv[2], "shared-secret").alloc(4 * 2**20, memfabric.Affinity("spread"))
mapping = bm.map()
print(bm.bm_id, flush=True)
sys.stdin.readline()      # wait to be killed
"""


def test_object_freed_while_a_killed_client_mapped_it_is_given_back(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        ns = s.create_namespace("pinned", sec_id="shared-secret")
        child = Child(MAPPER_OF_SPREAD, fab.directory, "pinned")
        try:
            bm_id = child.expect().strip()
            wait_until(lambda: sorted(pool_used_bytes(fab.directory).values()) == [2 * MiB, 2 * MiB],
                       "the servers to publish the object's 2 + 2 MiB")
            assert ns.batch_free([bm_id]) == [0]       # freed, but the child's mapping pins it
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait(WAIT_S)
        finally:
            child.kill()
        deadline = time.monotonic() + 3.0
        used = pool_used_bytes(fab.directory)
        while set(used.values()) != {0} and time.monotonic() < deadline:
            time.sleep(0.1)
            used = pool_used_bytes(fab.directory)
        assert set(used.values()) == {0}, f"used bytes per server after the mapper died: {used}"


# ---- a server killed ------------------------------------------------------------------------------


def test_killed_server_is_reported_dead_and_others_keep_working(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=0) as s:
        me = s.local.server_id
        victim = next(x["server_id"] for x in s.servers() if x["server_id"] != me)
        pids = fab.server_pids()
        assert set(pids) == {me, victim}, pids
        ns = s.create_namespace("survive", sec_id="k")
        here = ns.alloc(2 * MiB)
        there = ns.alloc(MiB, Affinity("server", server_id=victim))
        striped = ns.alloc(4 * MiB, Affinity("spread"))
        assert {sid for sid, _ in striped.extents} == {me, victim}
        data = np.random.default_rng(9).integers(0, 256, here.size, dtype=np.uint8).tobytes()
        here.write(data)
        there.write(b"doomed")

        os.kill(pids[victim], signal.SIGKILL)
        status = wait_until(lambda: {x["server_id"]: x["alive"] for x in s.servers()}.get(victim) is False
                            and s.servers(), "the killed server to be reported dead", timeout_s=10.0)
        assert {x["server_id"]: x["alive"] for x in status} == {me: True, victim: False}

        # Objects homed there, or with bytes there, fail with SERVER_UNAVAILABLE, in this session
        # and in one that starts now.
        with memfabric.init(fab.directory, server=0) as newcomer:
            for attempt in (lambda: there.read(0, 6), lambda: there.write(b"x", 0), lambda: there.free(),
                            lambda: there.map(), lambda: newcomer.namespace("survive", "k").open(there.bm_id),
                            lambda: striped.read(0, 10), lambda: striped.write(b"x", 0),
                            lambda: ns.alloc(4096, Affinity("server", server_id=victim))):
                with pytest.raises(ServerUnavailable):
                    attempt()

        # Objects on the live server keep working, and new ones go there.
        assert here.read() == data
        here.write(b"still alive", 0)
        assert here.read(0, 11) == b"still alive"
        with here.map() as m:
            assert bytes(m.view[:11]) == b"still alive"
        fresh = ns.alloc(3 * MiB, Affinity("spread"))
        assert {sid for sid, _ in fresh.extents} == {me}
        fresh.write(b"\x42" * fresh.size)
        assert fresh.read() == b"\x42" * fresh.size
        fresh.free()
        # The bookkeeping still works: a new namespace, then destroying both.
        other = s.create_namespace("later", sec_id="k")
        other.alloc(4096).write(b"ok")
        s.destroy_namespace("later", "k")
        s.destroy_namespace("survive", "k")
        assert {n.ns for n in s.namespaces()} == set()

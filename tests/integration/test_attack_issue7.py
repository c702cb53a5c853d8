"""A second attack on issue 7 as merged: each test shows one defect still there, and fails on the
code it was written against (main at f62cf16). Every loop and wait is bounded (seconds).

Found with real processes: a token holder or a plain IPC client guessing secIds, a server told
"home_restarted" while it lends memory, SIGTERM and SIGSTOP at awkward moments, numpy ints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OperatorCode
from memfabric import compat as C
from memfabric.config import load_fabric_config
from memfabric.datapath.rpc_link import RpcLink
from memfabric.errors import LimitExceeded, MemfabricError, PermissionDenied
from memfabric.launcher import wait_for_line, write_token
from memfabric.limits import SEC_ID_FAILURE_BURST

from ..conftest import short_tmp_dir
from ..helpers import CHILD_WAIT_S, WAIT_S, KiB, MiB, ns_name, stop_process, wait_until

GUESSES = 3 * SEC_ID_FAILURE_BURST     # well past the burst a client may get wrong


def _tally(call, guesses: int = GUESSES) -> dict[str, int]:
    """Run `call(i)` for each guess; count the outcomes by error class."""
    seen: dict[str, int] = {}
    for i in range(guesses):
        try:
            call(i)
            kind = "ok"
        except MemfabricError as exc:
            kind = type(exc).__name__
        seen[kind] = seen.get(kind, 0) + 1
    return seen


# ---- item 3: guessers are cut off, whichever door and whatever they call themselves ----------------

def test_a_token_holder_that_says_it_is_a_peer_is_cut_off_from_guessing_too(fresh_fabric, request):
    """Over RPC a client is its address, and after SEC_ID_FAILURE_BURST wrong secIds it gets
    LIMIT_EXCEEDED without a hash. But the cluster token, which every remote client holds,
    lets a connection say hello with role "peer", and a peer's secIds are checked with no
    client at all (Server._namespace: `None if conn.role == "peer"`): no budget is spent,
    none is checked. Seen: 30 wrong guesses as "client" -> 10 PERMISSION_DENIED then
    LIMIT_EXCEEDED; the same 30 as "peer" -> 30 PERMISSION_DENIED, each one a full scrypt hash
    (about 20 guesses a second per hashing slot, 4 slots)."""
    fab = fresh_fabric(servers=1, capacity="16MiB")
    cfg = load_fabric_config(fab.directory)
    with memfabric.init(fab.directory) as s:
        ns = s.create_namespace(ns_name(request), "right")
        bm = ns.alloc(4 * KiB)
        link = RpcLink(cfg.rpc_addresses[0], cfg.cluster.token(), None, WAIT_S, role="peer")
        try:
            seen = _tally(lambda i: link.call("describe", pool=ns.pool, ns=ns.name, sec=f"guess-{i}".encode(),
                                              bm_id=bm.bm_id))
        finally:
            link.close()
    assert seen.get("LimitExceeded", 0) > 0, (
        f"{GUESSES} wrong secIds from one address calling itself a peer: {seen}; never cut off")


@pytest.mark.parametrize("how", ["copy", "gather"])
def test_a_client_guessing_through_a_copy_or_gather_homed_elsewhere_is_cut_off(fresh_fabric, request, how):
    """copy and gather name their objects' namespaces and secIds; for an object homed on
    another server, the client's server asks that server to pin it (map_pin) over its own
    peer link, forwarding the secId unchecked. The home checks it as a peer's: no client, no
    budget. So any IPC client (no token needed) guesses another namespace's secId as fast as
    the home can hash, never LIMIT_EXCEEDED. Seen: 25 of 25 PERMISSION_DENIED, by copy and by
    gather; the same guesses sent to the home directly were cut off after 10."""
    fab = fresh_fabric(servers=2, capacity="16MiB")
    name = ns_name(request)
    with memfabric.init(fab.directory, server=1) as victim, memfabric.init(fab.directory, server=0) as attacker:
        target = victim.create_namespace(name, "right").alloc(4 * KiB)
        assert target.bm_id.split("-")[0] != str(attacker.local.server_id), "the target must live elsewhere"
        mine = attacker.create_namespace(f"{name}-mine", "mine")
        dst = mine.alloc(4 * KiB)
        dst_wire = {**mine.wire_creds, "bm_id": dst.bm_id}

        def guess(i: int) -> None:
            src = {"pool": "default", "ns": name, "sec": f"guess-{i}".encode(), "bm_id": target.bm_id}
            if how == "copy":
                attacker.local.call("copy", src=src, dst=dst_wire, src_offset=0, dst_offset=0, length=16)
            else:
                attacker.local.call("gather", inputs=[{**src, "offset": 0, "length": 16}], operator="concat",
                                    dtype="uint8", dst=dst_wire)
        seen = _tally(guess)
    assert "ok" not in seen
    assert seen.get("LimitExceeded", 0) > 0, f"{GUESSES} wrong secIds through {how}: {seen}; never cut off"


# ---- peers free what they hold only for objects that are gone -------------------------------------

def test_home_restarted_never_frees_the_extents_of_an_object_being_allocated(fresh_fabric, request):
    """A spread allocation claims its id at the home, reserves extents on the peers
    (extent_alloc: the peer records them under that id), then on the home, and only then
    creates the object. A `home_restarted` reaching a peer in between makes it ask the home
    which of the ids it holds extents for are alive; a claimed id is not (ObjectTable.is_live
    knows created objects only), so the peer gives the extents of a live-to-be object back,
    and the next allocation there gets the same bytes: two objects share memory. Any token
    holder may send home_restarted (README, "Trust across hosts"); a restarting home sends it
    itself from announce(), after its doors already serve allocations. Seen: 8 extents of a
    live 16 MiB spread object released by the very first allocation under a stream of
    home_restarted; the bytes of the spread object then changed under a write to another."""
    fab = fresh_fabric(servers=2, capacity="128MiB", segment_size="1MiB")
    cfg = load_fabric_config(fab.directory)
    token = cfg.cluster.token()
    with memfabric.init(fab.directory, server=1) as s:       # its home is the second server
        home = s.local.server_id
        ns = s.create_namespace(ns_name(request), "k")
        peers = [RpcLink(a, token, None, WAIT_S, role="peer") for a in cfg.rpc_addresses]
        peer = next(link for link in peers if link.server_id != home)
        released = [0]
        stop = threading.Event()

        def say_home_restarted() -> None:
            while not stop.is_set():
                released[0] += peer.call("home_restarted", home=home)["released_extents"]
        sender = threading.Thread(target=say_home_restarted)
        sender.start()
        spread = []
        try:
            deadline = time.monotonic() + WAIT_S
            while not released[0] and len(spread) < 3 and time.monotonic() < deadline:
                spread.append(ns.alloc(16 * MiB, Affinity("spread")))
        finally:
            stop.set()
            sender.join(WAIT_S)
            for link in peers:
                link.close()
        for bm in spread:
            bm.write(np.full(bm.size, 0xAA, dtype=np.uint8))
        time.sleep(0.1)              # past the reuse grace: released extents are lendable again
        others = []
        for _ in range(len(spread)):
            try:
                other = ns.alloc(8 * MiB, Affinity("server", peer.server_id))
            except memfabric.OutOfMemory:
                break
            other.write(np.full(other.size, 0x55, dtype=np.uint8))
            others.append(other)
        changed = sum(int((np.frombuffer(bm.read(), dtype=np.uint8) != 0xAA).sum()) for bm in spread)
        assert released[0] == 0 and changed == 0, (
            f"home_restarted gave back {released[0]} extents of live objects; {changed} bytes of them "
            "were then overwritten by another object's write")

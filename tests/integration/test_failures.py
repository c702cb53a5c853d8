"""A home server that crashes and comes back: what peers held for its lost objects returns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import memfabric
from memfabric.launcher import die_with_parent, wait_for_line

from ..helpers import MiB, wait_until


def used_bytes(session, server_id: int) -> int:
    record = next(s for s in session.servers() if s["server_id"] == server_id)
    return record["pools"]["default"]["used_bytes"] if record["alive"] else -1


def test_peers_give_back_what_they_held_for_a_restarted_homes_lost_objects(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory, server=1) as s:     # a client of server 2
        peer = s.local.server_id
        home = next(x["server_id"] for x in s.servers() if x["server_id"] != peer)
        ns = s.create_namespace("orphans", sec_id="k")
        before = used_bytes(s, peer)
        # Homed on the other server, striped over both (more than one server holds).
        home_link = s.link(home)
        reply = home_link.call("alloc", **ns.wire_creds, size=12 * MiB, policy="spread", server_id=None)
        assert {e[0] for e in reply["extents"]} == {home, peer}
        wait_until(lambda: used_bytes(s, peer) > before, "the peer to publish what it holds")

        os.kill(fab.server_pids()[home], signal.SIGKILL)       # DRAM: its objects are gone
        config = os.path.join(fab.directory, f"server-{home}", "server.toml")
        restarted = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=die_with_parent)
        try:
            lines: list[str] = []
            wait_for_line(restarted, " ready ", 30, lines)
            assert f"memfabric server {home} ready" in lines[-1]     # the same id
            wait_until(lambda: used_bytes(s, peer) == before, "the peer to give back the orphaned extents")
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(15)

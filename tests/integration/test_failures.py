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


def _restart(fab, server_id: int) -> subprocess.Popen:
    config = os.path.join(fab.directory, f"server-{server_id}", "server.toml")
    proc = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
    wait_for_line(proc, " ready ", 30, [])
    return proc


def test_a_mapping_whose_server_died_says_so(fresh_fabric):
    """The revocation stays (the view reads zeros), and it is no longer silent: the next call
    on the handle or the mapping raises SERVER_UNAVAILABLE."""
    fab = fresh_fabric(servers=1, capacity="8MiB", segment_size="1MiB")
    s = memfabric.init(fab.directory)
    ns = s.create_namespace("lost", sec_id="k")
    bm = ns.alloc(MiB)
    m = bm.map()
    m.view[:4] = b"data"
    os.kill(fab.server_pids()[s.local.server_id], signal.SIGKILL)
    wait_until(lambda: fab.proc.poll() is not None or _pid_gone(fab), "the server to die")
    try:
        try:
            bm.read(0, 4)
            raise AssertionError("a read through the handle of a dead server succeeded")
        except memfabric.ServerUnavailable:
            pass
        assert bytes(m.view[:4]) == b"\0\0\0\0"          # revoked: zeros, not the old bytes
        for call in (m.flush, m.close):
            try:
                call()
                raise AssertionError(f"{call.__name__} on a lost mapping said nothing")
            except memfabric.ServerUnavailable:
                pass
    finally:
        s.close()


def _pid_gone(fab) -> bool:
    try:
        os.kill(list(fab.server_pids().values())[0], 0)
        return False
    except ProcessLookupError:
        return True


def test_a_handle_from_before_a_dram_restart_never_reaches_a_new_object(fresh_fabric):
    """After a restart, DRAM objects are gone: a kept handle or info() gets NO_SUCH_OBJECT or
    SERVER_UNAVAILABLE, and never reads or writes the new object that took its place."""
    fab = fresh_fabric(servers=1, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        me = s.local.server_id
        ns = s.create_namespace("kept", sec_id="k")
        old = ns.alloc(4096)
        old.write(b"old")
        info = old.info()
        pid = fab.server_pids()[me]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the server to die")
        restarted = _restart(fab, me)
        try:
            with memfabric.init(fab.directory) as other:
                new = other.namespace("kept", sec_id="k").alloc(4096)
                new.write(b"new")
                assert new.bm_id != info["bm_id"], "a new object took the id of one from before"
                for attempt in (lambda: old.write(b"OVERWRITE"), lambda: old.read(0, 3),
                                lambda: ns.open(info["bm_id"]).read(0, 3)):
                    try:
                        attempt()
                        raise AssertionError("an old handle reached an object after the restart")
                    except (memfabric.NoSuchObject, memfabric.ServerUnavailable):
                        pass
                assert new.read(0, 3) == b"new"
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(15)

"""The server's front doors under abuse: no fd leaks on any path, and a server out of file
descriptors turns clients away, says so in its liveness, and serves again once it can.

Real servers throughout; the fd limit is lowered on the running server process (prlimit).
"""

from __future__ import annotations

import os
import resource
import socket
from contextlib import contextmanager
from typing import Iterator

import msgpack
import pytest

import memfabric
from memfabric import InvalidArgument, LimitExceeded
from memfabric.datapath.link import ServerLink
from memfabric.datapath.rpc_link import RpcLink
from memfabric.errors import BmError, MemfabricError
from memfabric.limits import MAX_CLIENTS_PER_SERVER

from ..helpers import WAIT_S, ns_name, wait_until


def server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def token_of(fab) -> bytes:
    with open(os.path.join(fab.directory, "token"), "rb") as f:
        return f.read().strip()


def record(session: memfabric.Session, server_id: int) -> dict:
    return next(s for s in session.servers() if s["server_id"] == server_id)


# ---- no fd leaks ---------------------------------------------------------------------------------


def test_ns_open_leaks_no_server_fd_over_rpc_or_ipc(fabric, request):
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as session:
        session.create_namespace(name, sec_id="k")
        me = record(session, session.local.server_id)
        pid = fabric.server_pids()[me["server_id"]]
        remote = RpcLink(me["rpc_address"], token_of(fabric))
        local = ServerLink(me["ipc_socket"])
        creds = {"pool": "default", "ns": name, "sec": b"k"}
        try:
            def open_over_ipc() -> None:
                reply, fds = local.call_with_fds("ns_open", **creds)
                assert len(fds) == 1
                os.close(fds[0])

            def open_over_rpc() -> None:
                with pytest.raises(InvalidArgument, match="file descriptors"):
                    remote.call("ns_open", **creds)

            for call in (open_over_ipc, open_over_rpc):
                call()                          # warm: both connections made, namespace cached
            # A request on each connection after the last one: the server is done with it.
            settled = lambda: (local.call("stats"), remote.call("stats"), server_fds(pid))[2]   # noqa: E731
            before = settled()
            for _ in range(300):
                open_over_ipc()
                open_over_rpc()
            after = settled()
            assert after - before <= 2, f"server fds {before} -> {after} after 300 ns_open per door"

            # Clients that ask and hang up before the answer: the server's send fails, and the
            # fd it made for the reply is closed all the same (as is the connection, soon after).
            for _ in range(100):
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.connect(me["ipc_socket"])
                    sock.send(msgpack.packb({"op": "ns_open", "id": 1, **creds}))
            wait_until(lambda: server_fds(pid) - before <= 2, "the server to close what hung-up clients left")
        finally:
            remote.close()
            local.close()
            session.destroy_namespace(name, "k")


def test_fd_operations_over_rpc_are_refused_before_they_hold_anything(fabric, request):
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=0) as session:
        ns = session.create_namespace(name, sec_id="k")
        bm = ns.alloc(4096)
        me = record(session, session.local.server_id)
        segment = session.local.call("describe", pool="default", ns=name, sec=b"k", bm_id=bm.bm_id)["extents"][0][1]
        remote = RpcLink(me["rpc_address"], token_of(fabric))
        try:
            for op, args in (("ns_open", {}), ("segments", {"segments": [segment]})):
                with pytest.raises(InvalidArgument, match="same-host"):
                    remote.call(op, pool="default", ns=name, sec=b"k", **args)
            # Refused before any check: even a wrong secId learns nothing more.
            with pytest.raises(InvalidArgument, match="same-host"):
                remote.call("ns_open", pool="default", ns=name, sec=b"wrong")
        finally:
            remote.close()
            session.destroy_namespace(name, "k")


# ---- a server out of fds -------------------------------------------------------------------------


@contextmanager
def fd_limit(pid: int, soft: int) -> Iterator[None]:
    """The running process's soft RLIMIT_NOFILE lowered to `soft`, restored after."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        except ProcessLookupError:
            pass


def test_a_server_out_of_fds_turns_clients_away_reads_dead_and_recovers(fresh_fabric):
    fab = fresh_fabric(servers=2)
    with memfabric.init(fab.directory, server=1) as watcher:    # a client of the other server
        deaf_id = next(s["server_id"] for s in watcher.servers() if s["server_id"] != watcher.local.server_id)
        rec = record(watcher, deaf_id)
        pid = fab.server_pids()[deaf_id]
        token = token_of(fab)
        log_start = len(fab.output)
        held: list[ServerLink | RpcLink] = []     # every client that gets in stays: nothing frees an fd

        def gets_in(door: str) -> bool:
            try:
                link = ServerLink(rec["ipc_socket"], timeout_s=2.0) if door == "ipc" else \
                    RpcLink(rec["rpc_address"], token, timeout_s=2.0)
            except MemfabricError:
                return False
            held.append(link)
            return True

        try:
            with fd_limit(pid, server_fds(pid) + 8):
                # Use up the last few fds with clients at both doors, until both turn clients away.
                for _ in range(64):
                    ipc_in, rpc_in = gets_in("ipc"), gets_in("rpc")
                    if not ipc_in and not rpc_in:
                        break
                else:
                    pytest.fail(f"{len(held)} clients got in under a limit of 8 more fds")
                # Out of fds, each door keeps a spare one to turn clients away with, and one door
                # may take the other's once: all but a couple of new clients are turned away.
                turned_away = {door: sum(not gets_in(door) for _ in range(10)) for door in ("ipc", "rpc")}
                assert min(turned_away.values()) >= 8, turned_away
                # The cluster learns that this server serves no one new: it reads as dead.
                wait_until(lambda: not record(watcher, deaf_id)["alive"], "the deaf server to read as dead")
                # Clients already in are still served, at both doors.
                for link in (next(k for k in held if k.is_local), next(k for k in held if not k.is_local)):
                    assert link.call("stats")["server_id"] == deaf_id

                # Its clients go: it accepts again (under the same low limit) and beats again.
                for link in held:
                    link.close()
                held.clear()
                wait_until(lambda: gets_in("ipc"), "the server to accept over IPC again")
                wait_until(lambda: gets_in("rpc"), "the server to accept over RPC again")
                wait_until(lambda: record(watcher, deaf_id)["alive"], "the server to read as alive again")
        finally:
            for link in held:
                link.close()
        with memfabric.init(fab.directory, server=0) as again:
            assert again.local.server_id == deaf_id
            ns = again.create_namespace("after", sec_id="k")
            bm = ns.alloc(4096)
            bm.write(b"served")
            assert bm.read(0, 6) == b"served"
        # A line when a door stops accepting and one when it starts again: not one per client.
        lines = fab.output[log_start:]
        for door in ("IPC", "RPC"):
            stopped = [line for line in lines if f"{door} door cannot accept" in line]
            started = [line for line in lines if f"{door} door accepts connections again" in line]
            assert 1 <= len(stopped) == len(started) < turned_away[door.lower()] / 2, (stopped, started)


def test_clients_past_the_connection_limit_get_limit_exceeded_and_the_door_goes_on(fabric):
    with memfabric.init(fabric.directory, server=0) as session:
        path = session.local.ipc_socket
        held: list[socket.socket] = []
        try:
            # The session's link and the other server's are some of them: fill the rest.
            for _ in range(MAX_CLIENTS_PER_SERVER + 1):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                held.append(sock)
                sock.settimeout(WAIT_S)
                sock.connect(path)
                sock.send(msgpack.packb({"op": "hello", "id": 1}))
                reply = msgpack.unpackb(sock.recv(1 << 16))
                if "error" in reply:
                    assert reply["error"] == BmError.LIMIT_EXCEEDED, reply
                    break
            else:
                pytest.fail(f"{len(held)} connections taken, past the limit of {MAX_CLIENTS_PER_SERVER}")
            with pytest.raises(LimitExceeded):
                ServerLink(path, timeout_s=WAIT_S)
            assert session.local.call("stats")["server_id"] == session.local.server_id
        finally:
            for sock in held:
                sock.close()
        link = wait_until(lambda: _link_or_none(path), "a free connection slot")
        link.close()


def _link_or_none(path: str) -> ServerLink | None:
    try:
        return ServerLink(path, timeout_s=WAIT_S)
    except LimitExceeded:
        return None

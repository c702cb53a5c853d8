"""Clients on a host without a server: everything over RPC (TCP on loopback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OperatorCode
from memfabric.datapath.rpc_link import RpcLink
from memfabric.launcher import LocalFabric, wait_for_line

from ..conftest import short_tmp_dir
from ..helpers import MiB, stopped, wait_until



@pytest.fixture(scope="module")
def remote_fabric():
    fab = LocalFabric(short_tmp_dir("mf-rpc-"), servers=2, capacity="64MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0).start()
    yield fab
    fab.stop()


def remote(fab, **kwargs):
    return memfabric.init(os.path.join(fab.directory, "remote.toml"), **kwargs)


def test_remote_client_uses_rpc_only(remote_fabric):
    with remote(remote_fabric) as s:
        assert not s.local.is_local
        assert {srv["server_id"] for srv in s.servers()} == {1, 2}


def test_every_operation_over_rpc(remote_fabric):
    rng = np.random.default_rng(3)
    with remote(remote_fabric) as s:
        ns = s.create_namespace("everything", sec_id="k")
        try:
            bm = ns.alloc(3 * MiB + 5)
            data = rng.integers(0, 256, bm.size, dtype=np.uint8)
            bm.write(data)
            assert bm.read() == data.tobytes()
            into = np.empty_like(data)
            bm.read(0, into=into)
            assert np.array_equal(into, data)

            spread = ns.alloc(6 * MiB, Affinity("spread"))
            assert {server for server, _ in spread.extents} == {1, 2}
            more = rng.integers(0, 256, spread.size, dtype=np.uint8)
            spread.write(more)
            assert spread.read() == more.tobytes()

            spread.copy_to(bm, src_offset=MiB - 3, dst_offset=11, length=2 * MiB)
            assert bm.read(11, 2 * MiB) == more[MiB - 3: 3 * MiB - 3].tobytes()

            bm.expand(5 * MiB)
            assert bm.read(11, 100) == more[MiB - 3: MiB + 97].tobytes()
            assert bm.read(4 * MiB, 100) == bytes(100)

            a = ns.alloc(4096, Affinity("server", 1))
            b = ns.alloc(4096, Affinity("server", 2))
            a.write(np.arange(1024, dtype=np.int32))
            b.write(np.full(1024, 7, dtype=np.int32))
            total, n = ns.gather([(a, 0, 4096), (b, 0, 4096)], OperatorCode.SUM, dtype="int32")
            assert n == 4096
            assert np.array_equal(np.frombuffer(total.read(), dtype=np.int32), np.arange(1024) + 7)
            joined, n = ns.gather([(a, 0, 4096), (b, 0, 4096)], OperatorCode.CONCAT)
            assert n == 8192 and joined.read(0, 8192) == a.read() + b.read()

            path = os.path.join(short_tmp_dir("mf-swap-"), "f.bin")
            with open(path, "wb") as f:
                f.write(b"swapped!" * 1000)
            spread.swap_in(path, offset=MiB - 100, length=8000)
            assert spread.read(MiB - 100, 8000) == b"swapped!" * 1000

            gone = a.bm_id
            a.free()
            with pytest.raises(memfabric.NoSuchObject):
                ns.open(gone).read(0, 1)
            with pytest.raises(memfabric.PermissionDenied):
                s.namespace("everything", "wrong").open(b.bm_id)
            with pytest.raises(memfabric.OutOfRange):
                b.write(b"x", offset=4096)
        finally:
            ns.destroy()


def test_remote_mapping_writes_back_only_changed_pages(remote_fabric):
    with remote(remote_fabric) as s:
        ns = s.create_namespace("mapped", sec_id="k")
        try:
            bm = ns.alloc(4 * MiB, Affinity("spread"))
            bm.write(b"\x01" * bm.size)
            with bm.map() as m:
                assert bytes(m.view[:4]) == b"\x01" * 4
                m.view[10:13] = b"abc"
                m.view[3 * MiB: 3 * MiB + 2] = b"zz"
                assert m.flush() == 2          # two dirty pages, nothing else
                assert m.flush() == 0
                m.view[-1:] = b"!"
            assert bm.read(10, 3) == b"abc" and bm.read(3 * MiB, 2) == b"zz"
            assert bm.read(bm.size - 1, 1) == b"!"     # written back on unmap
            assert bm.read(20, 10) == b"\x01" * 10
        finally:
            ns.destroy()


def test_wrong_token_is_refused_before_any_request(remote_fabric, tmp_path):
    bad = tmp_path / "token"
    bad.write_text("f" * 64)
    address = open(os.path.join(remote_fabric.directory, "remote.toml")).read().split('"')[1]
    with pytest.raises(memfabric.PermissionDenied):
        RpcLink(address, b"f" * 64)
    config = tmp_path / "remote.toml"
    config.write_text(f'[cluster]\ntoken_file = "{bad}"\n\n[[servers]]\nrpc_address = "{address}"\n')
    with pytest.raises(memfabric.ServerUnavailable, match="refused"):
        memfabric.init(str(config))
    with remote(remote_fabric) as s:        # the server is fine
        assert s.servers()


def test_garbage_on_the_rpc_port_closes_only_that_connection(remote_fabric):
    address = open(os.path.join(remote_fabric.directory, "remote.toml")).read().split('"')[1]
    host, port = address.rsplit(":", 1)
    for junk in (os.urandom(5000), b"\xff" * 12 + b"\x00" * 100, b""):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.recv(4096)                 # the server's greeting
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
            except OSError:                 # the server may close first: also fine
                pass
            sock.settimeout(5)
            try:
                while sock.recv(4096):      # the server answers (refusal) and closes ...
                    pass
            except ConnectionResetError:    # ... or resets, having unread garbage
                pass
    with remote(remote_fabric) as s:
        ns = s.create_namespace("after-garbage", sec_id="k")
        ns.alloc(4096).write(b"fine")
        ns.destroy()


def test_pipelined_requests_on_one_connection(remote_fabric):
    with remote(remote_fabric) as s:
        ns = s.create_namespace("pipe", sec_id="k")
        try:
            objs = [ns.alloc(4096, Affinity("server", s.local.server_id)) for _ in range(64)]
            link = s.local
            pending = []
            for i, bm in enumerate(objs):
                seg = bm._layout.pieces[0][2]
                pending.append(link.submit_write(ns.creds, bm.bm_id, seg.segment, bm._layout.pieces[0][3],
                                                 memoryview(bytes([i]) * 4096)))
            assert len(link._pending) > 1 or all(p.done for _, p in pending)
            for rid, p in pending:
                link.wait(rid, p, "seg_write")
            assert all(bm.read(0, 4096) == bytes([i]) * 4096 for i, bm in enumerate(objs))
        finally:
            ns.destroy()


def test_a_stopped_server_costs_a_timeout_not_a_hang(remote_fabric):
    with remote(remote_fabric, timeout_s=1.0) as s:
        ns = s.create_namespace("stopped", sec_id="k")
        bm = ns.alloc(4096, Affinity("server", 2))
        pid = remote_fabric.server_pids()[2]
        with stopped(pid):
            with pytest.raises(memfabric.Timeout):
                bm.write(b"x")
        bm = ns.open(bm.bm_id)           # a new connection once the server answers again
        bm.write(b"y")
        assert bm.read(0, 1) == b"y"
        ns.destroy()


def test_killed_server_fails_its_objects_only(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB")
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=2.0) as s:
        ns = s.create_namespace("kill", sec_id="k")
        doomed = ns.alloc(4096, Affinity("server", 2))
        survivor = ns.alloc(4096, Affinity("server", 1))
        doomed.write(b"a")
        os.kill(fab.server_pids()[2], signal.SIGKILL)
        with pytest.raises((memfabric.ServerUnavailable, memfabric.Timeout)):
            doomed.read(0, 1)
        survivor.write(b"ok")
        assert survivor.read(0, 2) == b"ok"


def test_a_remote_link_sees_its_server_die_without_a_call(fresh_fabric):
    fab = fresh_fabric(servers=2, capacity="8MiB")
    with memfabric.init(os.path.join(fab.directory, "remote.toml"), timeout_s=2.0) as s:
        link = s.link(2)
        assert not link.is_local and not link.peer_gone()
        link.check_alive()
        os.kill(fab.server_pids()[2], signal.SIGKILL)
        wait_until(link.peer_gone, "the link to see its server's end hung up")
        with pytest.raises(memfabric.ServerUnavailable):
            link.check_alive()


def _openssl_cert(directory: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_between_client_and_server():
    directory = short_tmp_dir("mf-tls-")
    cert, key = _openssl_cert(directory)
    with open(os.path.join(directory, "token"), "w") as f:
        f.write("t" * 64)
    with open(os.path.join(directory, "server.toml"), "w") as f:
        f.write(f'[server]\ndata_dir = "{directory}/data"\nipc_socket = "{directory}/s.sock"\n'
                f'rpc_listen = "127.0.0.1:0"\ntls_cert = "{cert}"\ntls_key = "{key}"\nsegment_size = "1MiB"\n\n'
                f'[cluster]\nbackend = "embedded"\npath = "{directory}/cluster.db"\ntoken_file = "{directory}/token"\n'
                f'tls_ca = "{cert}"\n\n[[pool]]\nname = "default"\ncapacity = "4MiB"\n')
    proc = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", f"{directory}/server.toml"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        wait_for_line(proc, " ready ", 30, lines)
        address = next(p.split("=", 1)[1] for p in lines[-1].split() if p.startswith("rpc="))
        for name, ca in (("tls.toml", f'tls_ca = "{cert}"\n'), ("plain.toml", "")):
            with open(os.path.join(directory, name), "w") as f:
                f.write(f'[cluster]\ntoken_file = "{directory}/token"\n{ca}\n[[servers]]\nrpc_address = "{address}"\n')
        with memfabric.init(os.path.join(directory, "tls.toml")) as s:
            ns = s.create_namespace("tls", sec_id="k")
            bm = ns.alloc(MiB)
            bm.write(b"over tls" * 1000)
            assert bm.read(0, 8000) == b"over tls" * 1000
            for i in range(5):        # a connection's later span requests too: never the compiled path
                bm.write(bytes([i]) * 65536, 4096)
                assert bm.read(4096, 65536) == bytes([i]) * 65536
            assert s.home().compiled_spans == 0 and s.home().call("stats")["compiled_spans"] == 0
            kv = ns.kv()
            kv.put(b"k", b"v" * 4096)
            for _ in range(5):        # nor gets (_kvget.c)
                assert kv.get(b"k") == b"v" * 4096 and kv.get(b"missing") is None
            assert s.home().compiled_gets == 0 and s.home().call("stats")["compiled_gets"] == 0
        with pytest.raises((memfabric.ServerUnavailable, memfabric.PermissionDenied)):
            memfabric.init(os.path.join(directory, "plain.toml"), timeout_s=2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

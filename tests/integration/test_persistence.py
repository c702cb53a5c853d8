"""pmem and ramdisk pools keep their objects across a server restart, crash included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import memfabric
from memfabric.launcher import wait_for_line

from ..conftest import short_tmp_dir

MF = [sys.executable, "-m", "memfabric", "server", "--config"]


class PersistentServer:
    def __init__(self, medium: str, cluster_db: str | None = None, capacity: str = "8MiB") -> None:
        """`cluster_db`: join another server's cluster (its embedded database); `capacity`: the pool's."""
        self.dir = short_tmp_dir(f"mf-{medium}-")
        # ramdisk: a file on tmpfs; pmem: a file on an ordinary file system (no DAX here).
        pool_dir = f"/dev/shm/{os.path.basename(self.dir)}" if medium == "ramdisk" else f"{self.dir}/pmem"
        self.pool_dir = pool_dir
        self.config = os.path.join(self.dir, "server.toml")
        self.cluster_db = cluster_db or f"{self.dir}/cluster.db"
        with open(self.config, "w") as f:
            f.write(f'[server]\ndata_dir = "{self.dir}/data"\nipc_socket = "{self.dir}/s.sock"\n'
                    f'segment_size = "1MiB"\n\n[cluster]\nbackend = "embedded"\npath = "{self.cluster_db}"\n'
                    f'liveness_timeout_s = 2.0\n\n'
                    f'[[pool]]\nname = "keep"\nmedium = "{medium}"\ncapacity = "{capacity}"\npath = "{pool_dir}"\n')
        self.proc: subprocess.Popen | None = None
        self.server_id = None

    def start(self) -> "PersistentServer":
        self.proc = subprocess.Popen(MF + [self.config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        wait_for_line(self.proc, " ready ", 30, lines)
        self.server_id = int(lines[-1].split()[2])
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)

    def cleanup(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", self.pool_dir], check=False)


@pytest.fixture(params=["ramdisk", "pmem"])
def server(request):
    srv = PersistentServer(request.param).start()
    yield srv
    srv.cleanup()


@pytest.mark.parametrize("how", ["crash", "clean stop"])
def test_objects_come_back_byte_for_byte_after_a_restart(server, how):
    rng = np.random.default_rng(17)
    with memfabric.init(server.config) as s:
        ns = s.create_namespace("durable", sec_id="k", pool="keep")
        kept = ns.alloc(3 * (1 << 20) + 123)
        data = rng.integers(0, 256, kept.size, dtype=np.uint8)
        kept.write(data)
        grown = ns.alloc(4096)
        grown.write(b"before")
        grown.expand(1 << 20)
        grown.write(b"after", offset=(1 << 20) - 5)
        gone = ns.alloc(4096)
        gone.write(b"secret")
        gone_id = gone.bm_id
        gone.free()
        ids = (kept.bm_id, grown.bm_id)
    first_id = server.server_id
    server.kill() if how == "crash" else server.stop()
    server.start()
    assert server.server_id == first_id                    # the same id after a restart
    with memfabric.init(server.config) as s:
        ns = s.namespace("durable", sec_id="k", pool="keep")
        kept, grown = (ns.open(i) for i in ids)
        assert kept.size == data.size and kept.read() == data.tobytes()
        assert grown.size == 1 << 20
        assert grown.read(0, 6) == b"before" and grown.read((1 << 20) - 5, 5) == b"after"
        with pytest.raises(memfabric.NoSuchObject):
            ns.open(gone_id)
        # The pool knows what lives: filling it gives out the rest, zeroed, never the old bytes.
        fresh = []
        while True:
            try:
                fresh.append(ns.alloc(1 << 20))
            except memfabric.OutOfMemory:
                break
        assert sum(bm.size for bm in fresh) + kept.size + grown.size <= 8 << 20
        assert all(bm.read() == bytes(bm.size) for bm in fresh)
        assert kept.read() == data.tobytes()


def test_a_namespace_destroyed_while_down_is_not_restored(server):
    with memfabric.init(server.config) as s:
        ns = s.create_namespace("doomed", sec_id="k", pool="keep")
        ns.alloc(1 << 20).write(b"x" * (1 << 20))
    server.kill()
    # The catalog outlives the server (it is the cluster service): drop the namespace there.
    from memfabric.cluster import open_cluster
    cluster = open_cluster("embedded", path=f"{server.dir}/cluster.db")
    record = cluster.get_namespace("keep", "doomed")
    assert cluster.delete_namespace("keep", "doomed", record.incarnation)
    cluster.close()
    server.start()
    with memfabric.init(server.config) as s:
        other = s.create_namespace("other", sec_id="k", pool="keep")
        whole = other.alloc(8 << 20)                       # all of the pool is free again
        assert whole.read(0, 1 << 20) == bytes(1 << 20)    # and zeroed before reuse


def test_a_torn_journal_tail_is_cut_and_the_rest_restored(server):
    with memfabric.init(server.config) as s:
        ns = s.create_namespace("torn", sec_id="k", pool="keep")
        bm = ns.alloc(4096)
        bm.write(b"whole")
        bm_id = bm.bm_id
    server.kill()
    with open(os.path.join(server.pool_dir, "objects.journal"), "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage-from-a-crash-mid-append")
    server.start()
    with memfabric.init(server.config) as s:
        assert s.namespace("torn", sec_id="k", pool="keep").open(bm_id).read(0, 5) == b"whole"


def test_ids_never_repeat_across_restarts(server):
    """An id names one object forever: objects made after a crash never take the id of one
    from before (live or freed), freed ids stay dead, restored objects keep theirs."""
    with memfabric.init(server.config) as s:
        ns = s.create_namespace("ids", sec_id="k", pool="keep")
        before = [ns.alloc(4096) for _ in range(20)]
        for bm in before:
            bm.write(bm.bm_id.encode())
        freed = [bm.bm_id for bm in before[::2]]
        for bm in before[::2]:
            bm.free()
        kept = [bm.bm_id for bm in before[1::2]]
    server.kill()
    server.start()
    with memfabric.init(server.config) as s:
        ns = s.namespace("ids", sec_id="k", pool="keep")
        after = [ns.alloc(4096).bm_id for _ in range(20)]
        assert not set(after) & (set(freed) | set(kept)), "a new object took an old id"
        for bm_id in freed:
            with pytest.raises(memfabric.NoSuchObject):
                ns.open(bm_id)
        for bm_id in kept:
            assert ns.open(bm_id).read(0, len(bm_id)) == bm_id.encode()


@pytest.mark.parametrize("home", ["this host's server", "another server"])
def test_a_handle_kept_across_its_homes_restart_finds_its_object_again(server, home):
    """While the home is down: SERVER_UNAVAILABLE (not 'freed'); once it is back, the next
    call finds the object again, through the same handle and the same session."""
    client_side = server
    if home == "another server":
        client_side = PersistentServer("ramdisk", cluster_db=server.cluster_db).start()
    try:
        _kept_across_restart(client_side, server)
    finally:
        if client_side is not server:
            client_side.cleanup()


def _kept_across_restart(client_side: PersistentServer, server: PersistentServer) -> None:
    with memfabric.init(client_side.config) as s:
        ns = s.create_namespace("again", sec_id="k", pool="keep")
        bm = ns.alloc(8192, memfabric.Affinity("server", server.server_id))
        bm.write(b"persisted")
        server.kill()
        for _ in range(3):
            with pytest.raises(memfabric.ServerUnavailable):
                bm.read(0, 9)
        with pytest.raises(memfabric.ServerUnavailable):
            bm.map()
        server.start()
        assert bm.read(0, 9) == b"persisted"
        bm.write(b"again")
        with bm.map() as m:
            assert bytes(m.view[:5]) == b"again"


def test_a_truncated_segment_file_costs_its_namespace_not_the_server(server):
    """Files cannot be sealed: a client may truncate its segment file. The server reads and
    writes files through their fd, so it answers IO_ERROR instead of dying of SIGBUS."""
    code = (
        "import os, sys, memfabric\n"
        "s = memfabric.init(sys.argv[1])\n"
        "ns = s.create_namespace('trunc', sec_id='k', pool='keep')\n"
        "bm = ns.alloc(1 << 20)\n"
        "bm.write(b'x' * (1 << 20))\n"
        "for m in s.local._segments.values():\n"
        "    os.ftruncate(m.fd, 0)\n"
        "print(bm.bm_id, flush=True)\n"
        "os._exit(0)\n")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code, server.config], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    bm_id = out.stdout.split()[0]
    with memfabric.init(server.config) as s:
        victim = s.namespace("trunc", sec_id="k", pool="keep").open(bm_id)   # mapped, never touched
        dst = s.namespace("trunc", sec_id="k", pool="keep").alloc(1 << 20)
        with pytest.raises(memfabric.IOError_):
            victim.copy_to(dst)              # done by the server, through the file's fd
        other = s.create_namespace("bystander", sec_id="k", pool="keep")
        ok = other.alloc(4096)
        ok.write(b"fine")
        assert ok.read(0, 4) == b"fine"
    assert server.proc.poll() is None, "the server died"


def test_kept_file_segment_fds_never_show_another_namespace(server):
    """As for DRAM (test_isolation.py): a file segment is one namespace's for its whole life,
    and a destroyed one is punched out, so an fd kept by namespace A's client reads zeros."""
    with memfabric.init(server.config) as s:
        a = s.create_namespace("a", sec_id="a", pool="keep")
        objs = [a.alloc(1 << 20) for _ in range(6)]
        for bm in objs:
            bm.write(b"\xaa" * (1 << 20))
        kept = [(os.dup(m.fd), m.size) for m in s.local._segments.values()]
        a.destroy()
    try:
        with memfabric.init(server.config) as s:
            b = s.create_namespace("b", sec_id="b", pool="keep")
            filled = 0
            while True:
                try:
                    b.alloc(1 << 20).write(b"\xbb" * (1 << 20))
                    filled += 1
                except memfabric.OutOfMemory:
                    break
            assert filled >= 6
            for fd, size in kept:
                data = os.pread(fd, size, 0)
                assert b"\xbb" * 4096 not in data, "namespace A's kept fd shows B's bytes"
    finally:
        for fd, _ in kept:
            os.close(fd)

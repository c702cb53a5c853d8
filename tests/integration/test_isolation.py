"""Tenant isolation against clients that keep what they were handed (issue 7, items 1, 2).

An fd cannot be taken back from a process: a client may keep it, or fork. So memory once
handed out for namespace A must never show a byte of another namespace, whatever A's
processes do. Each test fills the pool with namespace B's bytes after A let go, and counts
B's bytes readable through what A kept: the target is 0.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time

import numpy as np

import memfabric
from memfabric import Affinity, MemfabricError
from memfabric.errors import NoSuchNamespace

from ..helpers import MiB, WAIT_S

B_BYTE = 0xBB


def kept_fds(session: memfabric.Session) -> list[tuple[int, int]]:
    """Duplicates of every segment fd the session's local link holds, with their sizes: what
    an attacker keeps (it could as well read them off the socket itself)."""
    link = session.local
    return [(os.dup(m.fd), m.size) for m in link._segments.values()]


def bytes_of_b_visible(fds: list[tuple[int, int]]) -> int:
    """How many bytes equal to B's fill byte show through the kept fds, in 4 KiB runs (a run
    of B's pattern, not a stray byte)."""
    seen = 0
    for fd, size in fds:
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            pages = np.frombuffer(m, dtype=np.uint8).reshape(-1, 4096)
            seen += int((pages == B_BYTE).all(axis=1).sum()) * 4096
            del pages
    return seen


def fill_pool_as_b(fabric_dir: str, total_bytes: int) -> list[memfabric.BigMemory]:
    s = memfabric.init(fabric_dir, server=0)
    b = s.create_namespace(f"b-{time.monotonic_ns()}", sec_id="b-secret")
    objs = []
    while True:
        try:
            bm = b.alloc(MiB, Affinity("local"))
        except memfabric.OutOfMemory:
            break
        bm.write(np.full(MiB, B_BYTE, dtype=np.uint8))
        objs.append(bm)
    assert len(objs) * MiB >= total_bytes // 2, "B should get most of the pool"
    fill_pool_as_b.session = s       # kept open by the caller's test
    return objs


def test_kept_fds_never_show_another_namespace(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="8MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        a = s.create_namespace("a", sec_id="a-secret")
        objs = [a.alloc(MiB) for _ in range(6)]
        for bm in objs:
            bm.write(np.full(MiB, 0xAA, dtype=np.uint8))
        fds = kept_fds(s)
        assert fds
        for bm in objs:
            bm.free()
        a.destroy()
    try:
        fill_pool_as_b(fab.directory, 8 * MiB)
        assert bytes_of_b_visible(fds) == 0
        fill_pool_as_b.session.close()
    finally:
        for fd, _ in fds:
            os.close(fd)


def test_kept_fds_of_a_live_namespace_never_show_another(fresh_fabric):
    """A keeps its namespace and its fds, its objects freed: the server may take the empty
    segments back for B, but A's fds must then read zeros, not B."""
    fab = fresh_fabric(servers=1, capacity="8MiB", segment_size="1MiB")
    s = memfabric.init(fab.directory)
    try:
        a = s.create_namespace("a", sec_id="a-secret")
        objs = [a.alloc(MiB) for _ in range(6)]
        for bm in objs:
            bm.write(np.full(MiB, 0xAA, dtype=np.uint8))
        fds = kept_fds(s)
        for bm in objs:
            bm.free()
        time.sleep(0.1)      # past the reuse grace
        try:
            b_objects = fill_pool_as_b(fab.directory, 8 * MiB)
            assert bytes_of_b_visible(fds) == 0
            for bm in b_objects:
                bm.free()
            time.sleep(0.1)      # past the reuse grace
            # A still works: a new object (in a new segment) reads zeros and keeps what it gets.
            again = a.alloc(4096)
            assert again.read(0, 4) == b"\0\0\0\0"
            again.write(b"mine")
            assert again.read(0, 4) == b"mine"
        finally:
            for fd, _ in fds:
                os.close(fd)
            fill_pool_as_b.session.close()
    finally:
        s.close()


def test_a_forked_child_never_sees_the_next_tenant(fresh_fabric):
    """No malice: a client forks while it maps an object, then unmaps, frees and closes as
    documented. The child still has the parent's mappings and fds."""
    fab = fresh_fabric(servers=1, capacity="8MiB", segment_size="1MiB")
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    with memfabric.init(fab.directory) as s:
        a = s.create_namespace("a", sec_id="a-secret")
        objs = [a.alloc(MiB) for _ in range(6)]
        mappings = [bm.map() for bm in objs]
        for m in mappings:
            m.view[:] = b"\xaa" * MiB
        views = [(m._shared.base, m._shared.length) for m in mappings]
        pid = os.fork()
        if pid == 0:      # the child: waits, then counts B's bytes in what it inherited
            try:
                os.read(go_r, 1)
                seen = 0
                for base, length in views:
                    buf = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * length).from_address(base)))
                    pages = buf.reshape(-1, 4096)
                    seen += int((pages == B_BYTE).all(axis=1).sum()) * 4096
                os.write(w, str(seen).encode())
            finally:
                os._exit(0)
        for m in mappings:
            m.close()
        for bm in objs:
            bm.free()
    a_gone = memfabric.init(fab.directory)
    a_gone.destroy_namespace("a", "a-secret")
    a_gone.close()
    try:
        fill_pool_as_b(fab.directory, 8 * MiB)
        os.write(go_w, b"x")
        seen = int(os.read(r, 64).decode())
        assert seen == 0, f"the child read {seen} bytes of namespace B"
        fill_pool_as_b.session.close()
    finally:
        os.waitpid(pid, 0)
        for fd in (r, w, go_r, go_w):
            os.close(fd)


def test_received_fds_are_close_on_exec(session, ns):
    bm = ns.alloc(4096)
    bm.write(b"x")
    assert session.local._segments and session.local._gen_tables
    for mapped in session.local._segments.values():
        assert fcntl.fcntl(mapped.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    for mapped, _ in session.local._gen_tables.values():
        assert fcntl.fcntl(mapped.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_ns_open_racing_ns_destroy_never_sends_a_stray_fd(fabric):
    """Every fd ns_open hands over is the namespace's generation table, never another fd
    that took the number of one a concurrent destroy closed."""
    stop = time.monotonic() + 3.0
    bad: list[str] = []
    errors: list[BaseException] = []

    def destroyer() -> None:
        with memfabric.init(fabric.directory, server=0) as s:
            while time.monotonic() < stop:
                try:
                    s.create_namespace("race", sec_id="r")
                except MemfabricError:
                    pass
                try:
                    s.destroy_namespace("race", "r")
                except MemfabricError:
                    pass

    def opener() -> None:
        with memfabric.init(fabric.directory, server=0) as s:
            link = s.local
            while time.monotonic() < stop:
                try:
                    reply, fds = link.call_with_fds("ns_open", pool="default", ns="race", sec=b"r")
                except (NoSuchNamespace, MemfabricError) as exc:
                    if exc.code == memfabric.BmError.INTERNAL_ERROR:
                        errors.append(exc)
                    continue
                for fd in fds:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                    if "gens-race" not in target:
                        bad.append(target)
                    os.close(fd)

    threads = [threading.Thread(target=destroyer), threading.Thread(target=opener)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not bad, f"ns_open handed over fds that are not the table: {bad[:5]}"
    assert not errors, errors[:3]


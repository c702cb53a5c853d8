"""The attacks of issue 7, replayed on MemKV: a client that keeps what it was handed (the
index, refs and stats fds, the segments holding records), forks, writes where it may (its
own records, refs, stats), or outlives a server restart, never sees another namespace's
keys or values, and never makes a server misbehave. Each test counts the bytes of namespace
B that show through what A kept: the target is 0."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import memfabric
from memfabric.kv import index as ix
from memfabric.kv.space import EXTENT
from memfabric.launcher import die_with_parent, wait_for_line

from ..helpers import MiB, wait_until

B_BYTE = 0xBB
B_SECRET = b"B-SECRET-" * 100


def _kept(session: memfabric.Session) -> list[tuple[int, int]]:
    """Duplicates of every fd the session's local link holds for KV and segments: what an
    attacker keeps (it could as well read them off the socket)."""
    link = session.local
    fds = [(os.dup(m.fd), m.size) for m in link._segments.values()]
    for idx in link.attached.values():
        for mapped in (idx.index, idx.refs, idx.stats):
            fds.append((os.dup(mapped.fd), mapped.size))
    return fds


def _b_visible(fds: list[tuple[int, int]]) -> int:
    """Bytes of B's (its fill byte in whole 4 KiB pages, or its secret anywhere) readable
    through the kept fds."""
    seen = 0
    for fd, size in fds:
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            data = bytes(m)
        if size % 4096 == 0:
            pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4096)
            seen += int((pages == B_BYTE).all(axis=1).sum()) * 4096
        seen += data.count(B_SECRET) * len(B_SECRET)
    return seen


def _fill_as_b(directory: str) -> memfabric.Session:
    """Namespace B writes keys and values until its pool is full (the session stays open)."""
    s = memfabric.init(directory, server=0)
    kv = s.create_namespace(f"b-{time.monotonic_ns()}", sec_id="b-secret").kv()
    i = 0
    try:
        while i < 100_000:
            kv.put(f"b{i}".encode() + B_SECRET, bytes([B_BYTE]) * (MiB if i % 2 else 20_000))
            i += 1
    except memfabric.OutOfMemory:
        pass
    assert i > 4, "B should get most of the pool"
    return s


def _a_with_keys(s: memfabric.Session) -> memfabric.Namespace:
    a = s.create_namespace("a", sec_id="a-secret")
    kv = a.kv()
    for i in range(50):
        kv.put(f"a{i}", b"\xaa" * (MiB if i % 10 == 0 else 3000))
    for i in range(50):                            # read back on this host: every fd gets mapped
        assert kv.get(f"a{i}") is not None
    return a


def test_kept_kv_fds_never_show_another_namespace(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="16MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s:
        a = _a_with_keys(s)
        fds = _kept(s)
        assert len(fds) > 3
        a.destroy()
    try:
        b = _fill_as_b(fab.directory)
        assert _b_visible(fds) == 0
        b.close()
    finally:
        for fd, _ in fds:
            os.close(fd)


def test_kept_fds_of_a_live_keyspace_whose_keys_went_never_show_another(fresh_fabric):
    """A keeps its namespace and its fds, its keys deleted: the server takes the empty pages and
    segments back for B, and A's fds read zeros there, not B."""
    fab = fresh_fabric(servers=1, capacity="16MiB", segment_size="1MiB")
    s = memfabric.init(fab.directory)
    try:
        a = _a_with_keys(s)
        fds = _kept(s)
        a.kv().flush()
        time.sleep(0.2)                            # past the reuse grace
        try:
            b = _fill_as_b(fab.directory)
            assert _b_visible(fds) == 0
            # B took the whole pool, A's empty pages too (a pool short takes them back): once
            # B is gone, A's keyspace goes on.
            for info in b.namespaces():
                if info.ns.startswith("b-"):
                    b.destroy_namespace(info.ns, "b-secret")
            b.close()
            a.kv().put("still", b"works")
            assert a.kv().get("still") == b"works"
        finally:
            for fd, _ in fds:
                os.close(fd)
    finally:
        s.close()


def test_a_forked_child_never_sees_the_next_tenants_keys(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="16MiB", segment_size="1MiB")
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    with memfabric.init(fab.directory) as s:
        a = _a_with_keys(s)
        fds = _kept(s)          # the child inherits these (and the mappings)
        pid = os.fork()
        if pid == 0:
            try:
                os.read(go_r, 1)
                os.write(w, str(_b_visible(fds)).encode())
            finally:
                os._exit(0)
        a.destroy()
    try:
        b = _fill_as_b(fab.directory)
        os.write(go_w, b"x")
        seen = int(os.read(r, 64).decode())
        assert seen == 0, f"the child read {seen} bytes of namespace B"
        b.close()
    finally:
        os.waitpid(pid, 0)
        for fd in (r, w, go_r, go_w):
            os.close(fd)
        for fd, _ in fds:
            os.close(fd)


def test_a_server_restart_takes_the_keys_and_kept_fds_show_nothing_of_the_next_tenant(fresh_fabric):
    fab = fresh_fabric(servers=1, capacity="16MiB", segment_size="1MiB")
    s = memfabric.init(fab.directory)
    a = _a_with_keys(s)
    fds = _kept(s)
    me = s.local.server_id
    pid = fab.server_pids()[me]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the server to die")
    config = os.path.join(fab.directory, f"server-{me}", "server.toml")
    restarted = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", config],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=die_with_parent)
    try:
        wait_for_line(restarted, " ready ", 30, [])
        try:            # the old link is gone: unavailable, or (reconnected) a miss; never old bytes
            assert a.kv().get("a1") is None
        except memfabric.MemfabricError:
            pass
        s.close()
        with memfabric.init(fab.directory) as again:
            kv = again.namespace("a", "a-secret").kv()
            assert kv.get("a1") is None and len(kv) == 0      # DRAM: the keys went with the server
            kv.put("new", b"life")
            assert kv.get("new") == b"life"
            b = _fill_as_b(fab.directory)
            assert _b_visible(fds) == 0
            b.close()
    finally:
        for fd, _ in fds:
            os.close(fd)
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(15)


def test_the_index_cannot_be_written_by_a_client(fabric):
    with memfabric.init(fabric.directory, server=0) as s:
        ns = s.create_namespace(f"idx-{time.monotonic_ns()}", sec_id="k")
        try:
            kv = ns.kv()
            kv.put("k", b"v")
            assert kv.get("k") == b"v"
            (idx,) = s.local.attached.values()
            with pytest.raises(OSError):
                os.pwrite(idx.index.fd, b"\0" * 8, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(idx.index.fd, idx.index.size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.ftruncate(idx.index.fd, 0)
            assert kv.get("k") == b"v"
        finally:
            ns.destroy()


def test_garbage_in_refs_and_stats_skews_only_its_own_namespace(fabric):
    with memfabric.init(fabric.directory, server=0) as s:
        mine = s.create_namespace(f"g-{time.monotonic_ns()}", sec_id="k")
        other = s.create_namespace(f"o-{time.monotonic_ns()}", sec_id="o")
        try:
            kv, okv = mine.kv(), other.kv()
            kv.put("k", b"v")
            okv.put("o", b"w")
            kv.get("k")
            okv.get("o")
            base = okv.stats()
            for idx in s.local.attached.values():
                if idx is s.local.attached.get(("default", mine.name, "kv")):
                    idx.refs.view[:] = b"\xff" * idx.refs.size
                    idx.stats.view[:] = b"\xff" * idx.stats.size
            stats = kv.stats()                     # huge, but a number; the server answers
            assert stats["hits"] > 0 and kv.get("k") == b"v"
            assert okv.stats()["hits"] == base["hits"] and okv.get("o") == b"w"
            with pytest.raises(OSError):           # the sizes are sealed
                os.ftruncate(s.local.attached[("default", mine.name, "kv")].refs.fd, 0)
        finally:
            mine.destroy()
            other.destroy()


def test_a_forged_record_never_reaches_another_namespaces_memory(fresh_fabric):
    """A same-host client may write its own records (its segments are writable). It rewrites
    the extent table of a large value to point at B's memory: neither the server nor its own
    lock-free reads follow it there."""
    fab = fresh_fabric(servers=1, capacity="32MiB", segment_size="1MiB")
    with memfabric.init(fab.directory) as s, memfabric.init(fab.directory) as bs:
        b = bs.create_namespace("b", sec_id="b-secret").kv()
        b.put("secret", bytes([B_BYTE]) * (2 * MiB))
        b_segments = list(bs.local._segments)      # where B's bytes are (as B's client maps them)
        assert b_segments
        a = s.create_namespace("a", sec_id="a-secret")
        kv = a.kv()
        kv.put("large", b"\xaa" * (2 * MiB))
        assert kv.get("large") == b"\xaa" * (2 * MiB)
        idx = s.local.attached[("default", "a", "kv")]
        words = idx.words
        forged = 0
        for slot in range(words[ix.H_SLOTS]):
            base = ix.HEADER_WORDS + slot * ix.SLOT_WORDS
            if words[base + ix.HASH] > ix.TOMBSTONE and words[base + ix.EXTENTS] & 0xFFFFFFFF:
                segment, packed = words[base + ix.SEGMENT], words[base + ix.OFFSET_KLEN]
                offset, klen = packed & ix.OFFSET_MASK, packed >> 32
                view = s.local.segment_view(a.creds, segment)
                n = words[base + ix.EXTENTS] & 0xFFFFFFFF
                table = b"".join(EXTENT.pack(seg, 0, MiB) for _, seg in (b_segments * n)[:n])
                view[offset + klen:offset + klen + len(table)] = table
                forged += 1
        assert forged == 1
        got = kv.get("large")              # lock-free: B's segments are not A's to map
        assert got is not None and got.count(B_BYTE) == 0
        remote = memfabric.init(os.path.join(fab.directory, "remote.toml"))
        try:
            got = remote.namespace("a", "a-secret").kv().get("large")     # the server's path
            assert got == b"\xaa" * (2 * MiB)
        finally:
            remote.close()
        kv.delete("large")                 # frees the server's own list, not the forged one
        assert b.get("secret") == bytes([B_BYTE]) * (2 * MiB)
        a.destroy()

"""Whether this host has what a configuration asks for, checked before anything is written
or reserved: a server pre-faults its whole capacity at start, and asking for more than there
is ends with the kernel killing some process (not necessarily ours) part way through.

DRAM pools (and file pools on tmpfs or ramfs, whose files are memory too) are weighed
against MemAvailable of /proc/meminfo; pmem and ramdisk pools against the free space of
their directory's file system, less what files already there hold (a restarted server
reuses its own). The figures go into the message.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from .config import PoolConfig
from .units import format_size

MEMINFO = "/proc/meminfo"
FDS_PER_SEGMENT = 2
FD_RESERVE = 1024            # for connections (clients, handshakes, peers) and the server's own files
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


class NotEnoughCapacity(Exception):
    """The configuration asks for more than this host has; the message gives the figures."""


def mem_available_bytes() -> int:
    with open(MEMINFO) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise NotEnoughCapacity(f"{MEMINFO} has no MemAvailable line: cannot tell how much memory there is")


def check_memory(asked_bytes: int, what: str) -> None:
    """`what` says who asks, e.g. "3 servers x 8GiB of DRAM"."""
    available = mem_available_bytes()
    if asked_bytes > available:
        raise NotEnoughCapacity(f"{what} ask for {format_size(asked_bytes)}, but this host has "
                                f"{format_size(available)} of memory available (MemAvailable in {MEMINFO})")


@dataclass
class _FileSystem:
    mount: str
    kind: str
    free_bytes: int
    asked_bytes: int = 0


def check_pools(pools: list[PoolConfig], source: str) -> list[str]:
    """Every pool of one server against this host's memory and file systems. Returns what is
    allowed but likely not meant (a ramdisk pool whose files are on a disk), for a warning."""
    notes: list[str] = []
    memory_asked = 0
    memory_pools: list[str] = []
    file_systems: dict[int, _FileSystem] = {}
    for i, pool in enumerate(pools):
        name = f"pool[{i}] {pool.name!r} ({pool.medium}"
        if pool.path is None:
            memory_asked += pool.capacity_bytes
            memory_pools.append(name + ")")
            continue
        existing = os.path.realpath(_nearest_existing(pool.path))
        st = os.statvfs(existing)
        device = os.stat(existing).st_dev
        mount, kind = mount_of(existing)
        needed = max(0, pool.capacity_bytes - _held_by_files(pool.path))
        if kind in MEMORY_FILE_SYSTEMS:
            memory_asked += needed
            memory_pools.append(f"{name} on {kind} at {mount})")
        elif pool.medium == "ramdisk":
            # Allowed (a test, a host without tmpfs), but a disk: each append into space never
            # written costs its file system's bookkeeping (some 20 us on ext4).
            notes.append(f"{name}) has its files on {kind} at {mount}, not in memory: a ramdisk pool "
                         "belongs on tmpfs (such as /dev/shm)")
        fs = file_systems.setdefault(device, _FileSystem(mount, kind, st.f_bavail * st.f_frsize))
        fs.asked_bytes += needed
    for fs in file_systems.values():
        if fs.asked_bytes > fs.free_bytes:
            raise NotEnoughCapacity(
                f"{source}: pools on the file system at {fs.mount} ({fs.kind}) ask for {format_size(fs.asked_bytes)} "
                f"more than their files hold already, but it has {format_size(fs.free_bytes)} free")
    if memory_asked:
        check_memory(memory_asked, f"{source}: {', '.join(memory_pools)}")
    return notes


def _nearest_existing(path: str) -> str:
    """The pool's directory, or the nearest one above it that exists (it is made at start)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _held_by_files(directory: str) -> int:
    """Bytes the files already in the pool's directory take on disk."""
    held = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                held += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass
    return held


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) of the longest mount that holds `path`."""
    best = ("/", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, fields[2])
    except OSError:
        pass
    return best


def segment_slots(pools: list[PoolConfig], segment_bytes: int) -> dict[str, int]:
    """How many segments each pool may have at once: each costs the server two fds (its memfd
    or file, and its mapping's own), and the fd limit (the hard one: servers raise the soft
    one to it) must leave room for connections. Shared by the pools in proportion to their
    capacity. Raises NotEnoughCapacity when a pool could not be lent whole even in segments
    of the largest size."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    usable = max(0, limit - FD_RESERVE) // FDS_PER_SEGMENT
    total = sum(p.capacity_bytes for p in pools) or 1
    slots = {p.name: usable * p.capacity_bytes // total for p in pools}
    for p in pools:
        needed = -(-p.capacity_bytes // segment_bytes)
        if needed > slots[p.name]:
            raise NotEnoughCapacity(
                f"pool {p.name!r}: {format_size(p.capacity_bytes)} in segments of at most {format_size(segment_bytes)} "
                f"needs {needed} segments, {FDS_PER_SEGMENT} fds each, but the fd limit ({limit}, less {FD_RESERVE} "
                f"for connections) leaves room for {slots[p.name]}: raise the fd limit (ulimit -n), raise "
                "segment_size, or lower the capacity")
    return slots

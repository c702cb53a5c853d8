"""`memfabric load`: many clients at once for a while, then an audit of every server's memory.

Client processes (each with one or more threads sharing its session) allocate, write, read,
expand, map and free objects, checking every byte they read back. Then every client frees
what it holds and the servers are audited (server/audit.py): per pool, the allocator's live
bytes must equal what live objects account for, and the load's namespaces must hold nothing
once all is freed. Whatever they still hold is the figure "bytes leaked".

Thread i of every client uses namespace i % 2: processes share namespaces, and so do the
threads of one session.

OUT_OF_MEMORY is an expected answer under load; every other error is counted as unexpected.

    memfabric load --clients 16 --duration 60          # a fabric of its own, 2 servers
    memfabric load --dir run/fabric --clients 4 --threads 4 --duration 10 --json
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .client.session import Namespace, Session, init
from .client.types import Affinity
from .config import load_fabric_config
from .errors import MemfabricError, OutOfMemory
from .launcher import LocalFabric

KiB, MiB = 1 << 10, 1 << 20
HELD_PER_THREAD = 4           # objects a thread keeps alive at once
SAMPLE_BYTES = 64 * KiB       # a read or a map checks at most this many bytes
EXPECTED = {"OUT_OF_MEMORY"}
# A client process gets this long beyond the load's duration to start, free and exit.
CLIENT_GRACE_S = 60.0
# After the clients exit, the servers learn of it asynchronously (disconnects unpin).
SETTLE_S = 10.0


@dataclass
class Tally:
    ops: int = 0
    errors: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        if code not in EXPECTED and len(self.samples) < 10:
            self.samples.append(f"{code}: {message}")

    def merge(self, other: dict[str, Any]) -> None:
        self.ops += other["ops"]
        self.errors.update(other["errors"])
        self.samples.extend(other["samples"][:10 - len(self.samples)])

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "errors": dict(self.errors), "samples": self.samples}


class _Held:
    """One object a thread owns, and the byte every one of its bytes should be (None while
    unknown: a write that failed may have landed in part)."""

    __slots__ = ("bm", "tag")

    def __init__(self, bm: Any) -> None:
        self.bm, self.tag = bm, None

    def fill(self, tag: int, offset: int = 0) -> None:
        self.tag = None
        self.bm.write(np.full(self.bm.size - offset, tag, dtype=np.uint8), offset=offset)
        self.tag = tag


def _check(tally: Tally, got: Any, tag: int | None, what: str, held: _Held) -> None:
    data = np.frombuffer(got, dtype=np.uint8)
    if tag is not None and len(data) and not (data == tag).all():
        tally.error("DATA_MISMATCH", f"{what} of {held.bm.bm_id}: expected {tag}, "
                                     f"saw {np.unique(data)[:8].tolist()}")


def _sample(rng: random.Random, size: int) -> tuple[int, int]:
    length = min(size, rng.randint(1, SAMPLE_BYTES))
    return rng.randint(0, size - length), length


def _step(ns: Namespace, rng: random.Random, held: list[_Held], tally: Tally, servers: list[int]) -> None:
    roll = rng.random()
    if not held or (roll < 0.35 and len(held) < HELD_PER_THREAD):
        size = rng.choice([rng.randint(1, 64 * KiB), rng.randint(64 * KiB, 900 * KiB),
                           rng.randint(MiB, 3 * MiB)])
        kind = rng.random()
        affinity = (Affinity("spread") if kind < 0.3 else
                    Affinity("server", rng.choice(servers)) if kind < 0.45 else None)
        item = _Held(ns.alloc(size, affinity))
        held.append(item)
        item.fill(rng.randint(1, 255))
    elif roll < 0.55:
        item = rng.choice(held)
        offset, length = _sample(rng, item.bm.size)
        _check(tally, item.bm.read(offset, length), item.tag, "read", item)
    elif roll < 0.65:
        rng.choice(held).fill(rng.randint(1, 255))
    elif roll < 0.72:
        item = rng.choice(held)
        old, tag = item.bm.size, item.tag
        item.tag = None
        item.bm.expand(old + rng.choice([4 * KiB, 300 * KiB, MiB + 5]))
        _check(tally, item.bm.read(old, min(item.bm.size - old, SAMPLE_BYTES)), 0, "grown bytes", item)
        if tag is not None:
            item.fill(tag, offset=old)
    elif roll < 0.82:
        item = rng.choice(held)
        offset, length = _sample(rng, item.bm.size)
        with item.bm.map() as mapping:
            _check(tally, bytes(mapping.view[offset:offset + length]), item.tag, "mapping", item)
            if item.tag is not None:
                mapping.view[offset:offset + 1] = bytes([item.tag])
    else:
        item = held.pop(rng.randrange(len(held)))
        item.bm.free()


def _guarded(tally: Tally, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except OutOfMemory as exc:
        tally.error("OUT_OF_MEMORY", str(exc))
    except MemfabricError as exc:
        tally.error(exc.code.name, str(exc))
    except Exception as exc:        # not in the vocabulary: a bug, counted as one
        tally.error(f"EXCEPTION_{type(exc).__name__}", repr(exc))


def run_thread(ns: Namespace, seed: int, end_at: float, tally: Tally, servers: list[int]) -> None:
    """One thread's share of the load until `end_at` (monotonic), then it frees what it holds."""
    rng = random.Random(seed)
    held: list[_Held] = []
    while time.monotonic() < end_at:
        tally.ops += 1
        _guarded(tally, _step, ns, rng, held, tally, servers)
    for item in held:
        tally.ops += 1
        _guarded(tally, item.bm.free)


def run_threads(session: Session, namespaces: list[Namespace], duration_s: float, seed: int) -> Tally:
    """One thread per namespace, all sharing `session`, for `duration_s`; their tallies merged."""
    servers = [s["server_id"] for s in session.servers() if s["alive"]]
    end_at = time.monotonic() + duration_s
    tallies = [Tally() for _ in namespaces]
    workers = [threading.Thread(target=run_thread, args=(ns, seed * 1000 + i, end_at, tallies[i], servers),
                                name=f"load-{i}") for i, ns in enumerate(namespaces)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration_s + CLIENT_GRACE_S)
    total = Tally()
    for w, t in zip(workers, tallies, strict=True):
        total.merge(t.as_dict())
        if w.is_alive():
            total.error("HUNG", f"thread {w.name} still running {CLIENT_GRACE_S}s after the load ended")
    return total


def client_main() -> None:
    """A client process: argv = directory, server index, namespaces (comma-separated, one
    thread each), secId, duration_s, seed. Prints its tally as one JSON line."""
    directory, server, names, sec, duration_s, seed = sys.argv[1:7]
    tally = Tally()
    try:
        with init(directory, server=int(server)) as session:
            namespaces = [session.namespace(name, sec) for name in names.split(",")]
            tally = run_threads(session, namespaces, float(duration_s), int(seed))
    except MemfabricError as exc:
        tally.error(exc.code.name, f"session: {exc}")
    print(json.dumps(tally.as_dict()), flush=True)


def _run_clients(directory: str, names: list[str], sec: str, clients: int, duration_s: float) -> Tally:
    server_count = len(load_fabric_config(directory).ipc_sockets)
    code = "from memfabric.load import client_main; client_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, directory, str(i % server_count), ",".join(names),
                               sec, str(duration_s), str(i + 1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for i in range(clients)]
    total = Tally()
    deadline = time.monotonic() + duration_s + CLIENT_GRACE_S
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            total.error("HUNG", f"client {i} did not finish")
            continue
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            total.error("CLIENT_DIED", f"client {i} exited with {proc.returncode}: {err.strip()[-500:]}")
            continue
        total.merge(json.loads(lines[-1]))
    return total


def audit(session: Session) -> list[dict[str, Any]]:
    """Every live server's audit (server/audit.py)."""
    return [session.link(s["server_id"]).call("audit") for s in session.servers() if s["alive"]]


def leak_figures(audits: list[dict[str, Any]], pool: str, names: list[str]) -> tuple[int, int]:
    """(bytes the namespaces still hold on all servers, bytes no record accounts for on all servers)."""
    held = unaccounted = 0
    for report in audits:
        figures = report["pools"].get(pool)
        if figures is None:
            continue
        unaccounted += abs(figures["live_bytes"] - figures["accounted_bytes"])
        held += sum(row["live_bytes"] for row in figures["namespaces"] if row["ns"] in names)
    return held, unaccounted


LOAD_NAMESPACES = 2     # threads share them: thread i of every client uses namespace i % 2


def run_load_on(directory: str, clients: int, threads: int, duration_s: float) -> dict[str, Any]:
    """The load on a running fabric, in namespaces of its own (destroyed after)."""
    run, sec = uuid.uuid4().hex[:12], uuid.uuid4().hex
    names = [f"load-{run}-{i % LOAD_NAMESPACES}" for i in range(threads)]
    with init(directory) as session:
        made = []
        try:
            for name in sorted(set(names)):
                made.append(session.create_namespace(name, sec))
            started = time.monotonic()
            tally = _run_clients(directory, names, sec, clients, duration_s)
            elapsed_s = time.monotonic() - started
            settle_until = time.monotonic() + SETTLE_S
            while True:
                audits = audit(session)
                leaked, unaccounted = leak_figures(audits, "default", names)
                if (leaked == 0 and unaccounted == 0) or time.monotonic() > settle_until:
                    break
                time.sleep(0.1)
        except BaseException:
            # What stopped the load is what it says: a terminal's Ctrl-C stops the fabric too
            # (one process group), and the cleanup then finds it gone.
            for ns in made:
                with suppress(MemfabricError):
                    ns.destroy()
            raise
        for ns in made:
            ns.destroy()
    unexpected = {code: n for code, n in tally.errors.items() if code not in EXPECTED}
    return {"clients": clients, "threads": threads, "duration_s": duration_s, "elapsed_s": round(elapsed_s, 1),
            "ops": tally.ops, "errors": dict(tally.errors), "unexpected_errors": sum(unexpected.values()),
            "samples": tally.samples, "leaked_bytes": leaked, "unaccounted_bytes": unaccounted,
            "audits": audits}


def run_load(directory: str | None, clients: int, threads: int, duration_s: float, servers: int,
             capacity: str, as_json: bool) -> int:
    with ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-load-", dir="/tmp"))
            stack.enter_context(LocalFabric(directory, servers=servers, capacity=capacity, segment_size="1MiB"))
        result = run_load_on(directory, clients, threads, duration_s)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{clients} clients x {threads} threads for {duration_s:g} s: {result['ops']} operations")
        print(f"errors: {result['errors'] or 'none'} ({result['unexpected_errors']} unexpected)")
        for sample in result["samples"]:
            print(f"  {sample}")
        print(f"bytes leaked after the load: {result['leaked_bytes']}")
        print(f"bytes the allocators count that no record accounts for: {result['unaccounted_bytes']}")
    ok = not result["unexpected_errors"] and not result["leaked_bytes"] and not result["unaccounted_bytes"]
    return 0 if ok else 1

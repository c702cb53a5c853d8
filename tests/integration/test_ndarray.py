"""`BigMemory.ndarray`: numpy arrays over a mapping of the object, which lives as long as they do
(issue 8, item 9)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import memfabric
from memfabric import InvalidArgument, OutOfRange

from ..conftest import run_client
from ..helpers import MiB, wait_until


def _mapped(address: int) -> bool:
    """Whether this process maps `address` (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def _pinned_dead_bytes(session, ns) -> int:
    report = session.home().call("audit")["pools"]["default"]["namespaces"]
    return sum(row["pinned_dead_bytes"] for row in report if row["ns"] == ns.name)


def test_an_array_is_the_objects_memory(ns):
    bm = ns.alloc(64 * 1024)
    arr = bm.ndarray(np.float32, (4, 8))
    assert arr.shape == (4, 8) and arr.dtype == np.float32 and arr.flags.writeable
    arr[:] = np.arange(32, dtype=np.float32).reshape(4, 8)
    assert bm.read(0, 128) == np.arange(32, dtype=np.float32).tobytes()
    bm.write(np.full(8, 7, dtype=np.float32), offset=32)
    assert arr[1].tolist() == [7.0] * 8
    whole = bm.ndarray("uint64")
    assert whole.shape == (64 * 1024 // 8,)
    tail = bm.ndarray(np.uint8, offset=64 * 1024 - 3)
    assert tail.shape == (3,)
    ro = bm.ndarray(np.float32, 8, writable=False)
    assert not ro.flags.writeable and ro[1] == 1.0
    with pytest.raises(ValueError):
        ro[0] = 1
    with pytest.raises(ValueError):
        ro.flags.writeable = True
    scalar = bm.ndarray(np.int32, ())
    assert scalar.shape == () and scalar.nbytes == 4


def test_wrong_shapes_offsets_and_dtypes(ns):
    bm = ns.alloc(4096)
    with pytest.raises(OutOfRange):
        bm.ndarray(np.float64, 513)
    with pytest.raises(OutOfRange):
        bm.ndarray(np.uint8, 2, offset=4095)
    with pytest.raises(OutOfRange):
        bm.ndarray(np.uint8, offset=4097)
    for dtype in (object, np.dtype([]), "not a dtype", [("a", object)]):
        with pytest.raises(InvalidArgument):
            bm.ndarray(dtype)
    for shape in ((-1,), (2, -2), "4", (1.5,)):
        with pytest.raises(InvalidArgument):
            bm.ndarray(np.uint8, shape)


def test_an_array_outlives_its_handle_and_its_views_outlive_it(session, ns):
    made = ns.alloc(8192)
    bm = session.namespace(ns.name, f"sec-{ns.name}").open(made.bm_id)
    arr = bm.ndarray(np.uint16)
    address = arr.ctypes.data
    view = arr[100:110]
    del bm, arr
    gc.collect()
    view[:] = 42
    assert made.read(200, 20) == np.full(10, 42, dtype=np.uint16).tobytes()
    assert _mapped(address)
    del view
    gc.collect()
    wait_until(lambda: not _mapped(address), "the mapping to go with its last array")


def test_the_last_array_gone_unmaps_and_unpins(session, ns):
    bm = ns.alloc(MiB)
    arr = bm.ndarray(np.uint8)
    arr[:5] = list(b"still")
    bm.free()
    # Freed while mapped: the memory stays the array's until it goes.
    assert bytes(arr[:5]) == b"still"
    assert _pinned_dead_bytes(session, ns) >= MiB
    address = arr.ctypes.data
    del arr
    gc.collect()
    wait_until(lambda: _pinned_dead_bytes(session, ns) == 0, "the pin to go with the last array")
    assert not _mapped(address)


def test_explicit_close_cuts_arrays_off_and_they_stay_safe(session, ns):
    bm = ns.alloc(8192)
    bm.write(b"kept")
    arr = bm.ndarray(np.uint8)
    owner = memfabric.ArrayMapping.of(arr)
    assert isinstance(owner, memfabric.ArrayMapping) and memfabric.ArrayMapping.of(arr[2:].T) is owner
    with pytest.raises(InvalidArgument):
        memfabric.ArrayMapping.of(np.zeros(3))
    owner.close()
    assert owner.closed
    assert bytes(arr[:4]) == bytes(4), "cut off: it reads zeros"
    arr[:4] = 1                               # and writes go nowhere
    assert bm.read(0, 4) == b"kept"
    owner.close()                              # once is enough
    bm.free()
    del arr, owner
    gc.collect()


def test_closing_the_session_cuts_arrays_off(fabric, ns):
    with memfabric.init(fabric.directory) as s:
        bm = s.namespace(ns.name, f"sec-{ns.name}").alloc(8192)
        bm.write(b"data")
        arr = bm.ndarray(np.uint8)
        assert bytes(arr[:4]) == b"data"
    assert bytes(arr[:4]) == bytes(4)
    arr[:] = 9                                  # no crash, and nothing reaches the object
    assert ns.open(bm.bm_id).read(0, 4) == b"data"
    del arr
    gc.collect()


def test_another_process_sees_writes_through_its_own_array(fabric, ns):
    bm = ns.alloc(4096)
    arr = bm.ndarray(np.int64, 16)
    arr[:] = np.arange(16)
    info = bm.info()
    code = ("import sys, json, numpy as np, memfabric\n"
            "info = json.loads(sys.argv[2])\n"
            "with memfabric.init(sys.argv[1]) as s:\n"
            "    arr = s.namespace(info['ns'], sys.argv[3], pool=info['pool']).open(info['bm_id']).ndarray(\n"
            "        np.int64, 16)\n"
            "    assert arr.tolist() == list(range(16)), arr.tolist()\n"
            "    arr *= 10\n")
    import json
    proc = run_client(code, fabric.directory, json.dumps(info), f"sec-{ns.name}")
    assert proc.returncode == 0, proc.stderr
    assert arr.tolist() == [10 * i for i in range(16)]


def test_arrays_of_an_object_on_another_host(fabric, ns):
    bm = ns.alloc(3 * 4096)
    with memfabric.init(os.path.join(fabric.directory, "remote.toml")) as remote:
        far = remote.namespace(ns.name, f"sec-{ns.name}").open(bm.bm_id)
        bm.write(b"seen")
        arr = far.ndarray(np.uint8)
        assert bytes(arr[:4]) == b"seen"
        arr[4096:4100] = list(b"sent")
        assert bm.read(4096, 4) == bytes(4), "a private copy: sent on flush"
        assert memfabric.ArrayMapping.of(arr).flush() == 1
        assert bm.read(4096, 4) == b"sent"
        arr[8192:8196] = list(b"last")
        del arr
        gc.collect()
        wait_until(lambda: bm.read(8192, 4) == b"last", "the last array's changes to be sent")


def test_threads_making_and_dropping_arrays_leave_nothing_mapped_or_pinned(session, ns):
    import random
    import threading
    objects = [ns.alloc(64 * 1024) for _ in range(8)]
    addresses: list[int] = []
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        kept = []
        try:
            for i in range(40):
                bm = rng.choice(objects)
                try:
                    arr = bm.ndarray(np.uint32, offset=4 * rng.randrange(16))
                except memfabric.NoSuchObject:
                    continue                              # one of those freed meanwhile
                arr[0] = seed
                addresses.append(arr.ctypes.data)
                if rng.random() < 0.3:
                    memfabric.ArrayMapping.of(arr).close()
                kept.append(arr[rng.randrange(4):])      # a view keeps its mapping
                if len(kept) > 5:
                    kept.pop(rng.randrange(len(kept)))
        except BaseException as exc:      # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    ns.batch_free([bm.bm_id for bm in objects[:4]])     # freed while arrays of them live
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and errors == []
    gc.collect()
    wait_until(lambda: _pinned_dead_bytes(session, ns) == 0, "every freed object's last mapping to close")
    wait_until(lambda: not any(_mapped(a) for a in addresses), "every array's mapping to be unmapped")

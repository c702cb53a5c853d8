"""The benchmark suite: `./dev test benchmarks` (or `.venv/bin/pytest benchmarks`).

Each data-path case has its memcpy twin measured in the same run: compare their means in
pytest-benchmark's table (`memfabric bench` prints the ratios directly).
"""

import numpy as np
import pytest

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s >> 10}KiB")
def test_memcpy_baseline(benchmark, size):
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    benchmark(np.copyto, dst, src)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s >> 10}KiB")
def test_write_api(benchmark, ns, size):
    bm = ns.alloc(size)
    src = np.ones(size, dtype=np.uint8)
    benchmark(bm.write, src)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s >> 10}KiB")
def test_read_into_api(benchmark, ns, size):
    bm = ns.alloc(size)
    dst = np.zeros(size, dtype=np.uint8)
    benchmark(bm.read, 0, into=dst)


def test_alloc_free(benchmark, ns):
    """The steady state of a cache: the namespace holds a live object meanwhile."""
    live = ns.alloc(1 << 20)
    benchmark(lambda: ns.alloc(4096).free())
    live.free()


def test_alloc_free_namespace_empty(benchmark, ns):
    """Each free empties the namespace, so its segment goes back to the pool and the next
    alloc fetches and maps it again: four round trips instead of two."""
    benchmark(lambda: ns.alloc(4096).free())


def test_map_unmap(benchmark, ns):
    bm = ns.alloc(1 << 20)

    def map_unmap():
        with bm.map():
            pass
    benchmark(map_unmap)


def test_namespace_create_destroy(benchmark, session):
    names = iter(range(10**9))
    benchmark(lambda: session.create_namespace(f"cd-{next(names)}", sec_id="k").destroy())

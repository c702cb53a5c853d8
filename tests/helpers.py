"""Small helpers the test modules share."""

from __future__ import annotations

import time

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OutOfMemory

MiB = 1 << 20
WAIT_S = 10.0       # the bound on every wait for something the servers do asynchronously


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def wait_until(condition, what: str, timeout_s: float = WAIT_S):
    """Poll `condition` until it returns something true (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def alloc_when_possible(ns: memfabric.Namespace, size: int, affinity: Affinity | None = None,
                        timeout_s: float = WAIT_S) -> memfabric.BigMemory:
    """Allocate, retrying OUT_OF_MEMORY for a bounded time: freed memory rests before reuse,
    and released segments and published figures come back asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ns.alloc(size, affinity)
        except OutOfMemory:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

"""Fixtures the integration modules share (the fabric itself comes from tests/conftest.py)."""

import pytest

import memfabric
from memfabric import compat as C


@pytest.fixture
def session(fabric):
    # One session per test: closing it lets the server lend its segments to other namespaces.
    with memfabric.init(fabric.directory, server=0) as s:
        yield s


@pytest.fixture
def compat_session(fabric):
    assert C.BM_Init(fabric.directory) == 0
    try:
        yield
    finally:
        C.BM_Exit()

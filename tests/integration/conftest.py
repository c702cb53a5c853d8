"""Fixtures the integration modules share (the fabric itself comes from tests/conftest.py)."""

import pytest

import memfabric
from memfabric import compat as C

from ..helpers import ns_name


@pytest.fixture
def session(fabric):
    # One session per test: closing it lets the server lend its segments to other namespaces.
    with memfabric.init(fabric.directory, server=0) as s:
        yield s


@pytest.fixture
def ns(session, request):
    """A namespace of its own for the test, named after it, destroyed after it."""
    name = ns_name(request)
    handle = session.create_namespace(name, sec_id=f"sec-{name}")
    yield handle
    session.destroy_namespace(name, f"sec-{name}")


@pytest.fixture
def compat_session(fabric):
    assert C.BM_Init(fabric.directory) == 0
    try:
        yield
    finally:
        C.BM_Exit()

import tempfile

import pytest

import memfabric
from memfabric.launcher import LocalFabric


@pytest.fixture(scope="session")
def session():
    with tempfile.TemporaryDirectory(prefix="mf-bench-", dir="/tmp") as directory:
        with LocalFabric(directory, servers=1, capacity="512MiB"):
            with memfabric.init(directory) as s:
                yield s


@pytest.fixture
def ns(session):
    namespace = session.create_namespace(f"bench-{id(object())}", sec_id="bench")
    yield namespace
    namespace.destroy()

"""The deadline of a request being served, and the allowance of calls whose work is large
(datapath/deadline.py): a call waits its link's timeout plus what it is allowed, and never past
the deadline of the request it is made for."""

from __future__ import annotations

import time

import pytest

from memfabric.datapath.deadline import allowing, call_timeout_s, deadline_for, serving_until
from memfabric.errors import InvalidArgument


def test_a_call_waits_its_links_timeout_outside_any_request():
    assert call_timeout_s(3.0) == 3.0


def test_an_allowance_adds_to_the_links_timeout_inside_its_block_only():
    with allowing(6.0):
        assert call_timeout_s(3.0) == 9.0
        with allowing(1.0):            # nested: the inner one counts
            assert call_timeout_s(3.0) == 4.0
        assert call_timeout_s(3.0) == 9.0
    assert call_timeout_s(3.0) == 3.0


def test_an_allowance_never_passes_the_requests_deadline():
    with serving_until(time.monotonic() + 1.0), allowing(100.0):
        assert 0 < call_timeout_s(3.0) <= 1.0


def test_a_budget_that_is_not_a_positive_number_is_refused():
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(InvalidArgument, match="budget_s"):
            deadline_for(bad)

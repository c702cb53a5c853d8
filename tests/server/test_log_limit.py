"""The rate limit on log lines clients can cause (server/log_limit.py), on a real logger."""

from __future__ import annotations

import logging

import pytest

from memfabric.server.log_limit import MAX_KINDS, LimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured():
    logger = logging.getLogger("test.log_limit")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield logger, records
    logger.removeHandler(handler)


def test_a_burst_of_one_kind_writes_its_share_then_one_line_says_what_was_held_back(captured):
    logger, records = captured
    clock = Clock()
    limited = LimitedLog(logger, lines=3, interval_s=60, clock=clock)
    written = [limited.warning("garbage", "connection %d closed", i) for i in range(1000)]
    assert written == [True] * 3 + [False] * 997
    assert [r.getMessage() for r in records] == [
        "connection 0 closed", "connection 1 closed",
        "connection 2 closed (more like this are not logged for 60 s)"]
    clock.now += 59.9
    assert not limited.warning("garbage", "connection %d closed", 1000)
    clock.now += 0.1                          # a new interval: the first line tells the count
    assert limited.warning("garbage", "connection %d closed", 1001)
    assert records[-1].getMessage() == "connection 1001 closed (998 more like this were not logged)"
    assert len(records) == 4


def test_kinds_have_shares_of_their_own(captured):
    logger, records = captured
    limited = LimitedLog(logger, lines=2, interval_s=60, clock=Clock())
    for _ in range(10):
        limited.info("a", "a")
        limited.warning("b", "b")
    assert [r.getMessage().split()[0] for r in records] == ["a", "b", "a", "b"]
    assert [r.levelno for r in records[:2]] == [logging.INFO, logging.WARNING]


def test_exception_lines_carry_the_traceback(captured):
    logger, records = captured
    limited = LimitedLog(logger, lines=1, interval_s=60, clock=Clock())
    for _ in range(5):
        try:
            raise ValueError("bad dtype")
        except ValueError:
            limited.exception("bug in gather", "operation %r failed", "gather")
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR and records[0].exc_info[0] is ValueError


def test_many_kinds_cost_bounded_memory(captured):
    logger, records = captured
    limited = LimitedLog(logger, lines=1, interval_s=60, clock=Clock())
    for i in range(MAX_KINDS * 4):
        limited.info(f"kind {i}", "line")
    assert len(limited._windows) <= MAX_KINDS
    assert len(records) == MAX_KINDS * 4     # each kind is new: its first line is written

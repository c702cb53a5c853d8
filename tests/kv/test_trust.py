"""When a MemKV server forgets its keys (kv/service.py): only after a silence the cluster may
have taken for death, never for a heartbeat that was merely late."""

from __future__ import annotations

from memfabric.kv.service import TRUSTED_SHARE, may_have_been_dead
from memfabric.limits import HEARTBEAT_INTERVAL_S, LIVENESS_TIMEOUT_S, MIN_BEATS_PER_LIVENESS_TIMEOUT


def test_a_late_heartbeat_keeps_the_keys_a_silence_past_the_timeout_forgets_them():
    timeout = LIVENESS_TIMEOUT_S
    # Late by many intervals, even past the trusted share (requests were refused a moment):
    # the cluster, which waits the whole timeout after a beat it got, never saw it dead.
    for landed in (HEARTBEAT_INTERVAL_S, 3 * HEARTBEAT_INTERVAL_S, TRUSTED_SHARE * timeout, 0.999 * timeout):
        assert not may_have_been_dead(100.0, 100.0 + landed, timeout)
    for landed in (timeout, 2 * timeout, 3600.0):
        assert may_have_been_dead(100.0, 100.0 + landed, timeout)


def test_the_defaults_leave_room_for_late_beats():
    # Requests are refused, and same-host readers stop, before the cluster could see the
    # server dead; several beats fit in that share, so one late beat refuses nothing.
    assert TRUSTED_SHARE < 1
    assert HEARTBEAT_INTERVAL_S * MIN_BEATS_PER_LIVENESS_TIMEOUT <= LIVENESS_TIMEOUT_S
    assert MIN_BEATS_PER_LIVENESS_TIMEOUT * TRUSTED_SHARE >= 3

"""memfabric bench --kv's scale case (kv/bench.py bench_scale) against a real fabric: it
leaves nothing behind in the fabric it ran in, whatever --scale-keys says.

No test asserts how fast anything was.
"""

from __future__ import annotations

import memfabric
from memfabric.kv.bench import SCALE_SMALL, bench_scale


def test_the_scale_case_with_as_many_keys_as_its_baseline_leaves_no_namespace(fabric):
    """--scale-keys 1000 (the baseline's own count): two keyspaces, two rows, both gone
    after (the second had taken the first's place in a dict keyed by count, which then
    stayed in the fabric, 1,000 keys in it)."""
    with memfabric.init(fabric.directory, server=0) as s:
        before = {info.ns for info in s.namespaces()}
        rows = bench_scale(s, SCALE_SMALL, 100)
        assert len(rows) == 2, [row.name for row in rows]
        assert {info.ns for info in s.namespaces()} == before

"""The request path's histogram: Prometheus's bucket rule, exact counts under threads, bounded labels."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from memfabric.server.metrics import LATENCY_BUCKETS_S, RequestMetrics


def samples(metrics: RequestMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def bucket(found: dict, op: str, le: float) -> float:
    return next(v for (name, labels), v in found.items() if name == "memfabric_operation_seconds_bucket"
                and dict(labels)["op"] == op and float(dict(labels)["le"]) == le)


def test_a_bound_counts_in_its_own_bucket_and_slower_ones_only_in_inf():
    metrics = RequestMetrics(["alloc"])
    metrics.observe("alloc", None, LATENCY_BUCKETS_S[2])        # le is "less than or equal"
    metrics.observe("alloc", None, LATENCY_BUCKETS_S[-1] * 2)
    found = samples(metrics)
    assert bucket(found, "alloc", LATENCY_BUCKETS_S[1]) == 0
    assert bucket(found, "alloc", LATENCY_BUCKETS_S[2]) == 1
    assert bucket(found, "alloc", LATENCY_BUCKETS_S[-1]) == 1
    assert bucket(found, "alloc", float("inf")) == 2
    assert found[("memfabric_operation_seconds_count", (("op", "alloc"),))] == 2


def test_threads_lose_no_observation():
    metrics = RequestMetrics(["alloc", "free"])
    per_thread = 5000

    def work(i: int) -> None:
        for n in range(per_thread):
            metrics.observe("alloc" if i % 2 else "free", None, (n % 40) * 1e-5)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found = samples(metrics)
    assert found[("memfabric_operation_seconds_count", (("op", "alloc"),))] == 4 * per_thread
    assert found[("memfabric_operation_seconds_count", (("op", "free"),))] == 4 * per_thread


def test_names_and_codes_from_the_wire_never_become_labels():
    metrics = RequestMetrics(["alloc"])
    for op in ("no_such_op", ["a", "list"], None, 7, "x" * 1000):
        metrics.observe(op, -1, 1e-4)
    metrics.observe("alloc", -999, 1e-4)              # a code outside the vocabulary
    found = samples(metrics)
    ops = {dict(labels).get("op") for _, labels in found}
    assert ops == {"alloc", "unknown"}
    assert found[("memfabric_operation_errors_total", (("code", "INVALID_ARGUMENT"), ("op", "unknown")))] == 5
    assert found[("memfabric_operation_errors_total", (("code", "INTERNAL_ERROR"), ("op", "alloc")))] == 1

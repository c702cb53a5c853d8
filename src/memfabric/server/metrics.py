"""A server's Prometheus metrics: what its requests cost, and what its state is when scraped.

Two kinds, two mechanisms. The request path (`Server.serve`, the one place every semantic's
operations pass) observes a latency histogram per operation and counts errors by operation
and code. The histogram is a lean one of our own (one lock, a C bisect: about 1 us a request
here), exposed as a Prometheus histogram: prometheus_client's own took about 3 us (two locks
and a Python loop over the buckets), several per cent of a same-host alloc+free's server time.
Everything else (pools, namespaces, clients, peers) is read from the server's state by a
collector when a scrape asks for it: no thread polls, and an idle server does no work for its
metrics.

Every label set is bounded: operation names come from the dispatcher's table (anything else a
client sends counts as "unknown"), error codes from BmError, namespaces from the cluster's
limit (MAX_NAMESPACES), doors and peers from the server's own configuration and view.

Remote reads and writes of object bytes (`seg_read`/`seg_write`) are served by the RPC door
straight from segment memory, outside the dispatcher; same-host clients copy without the
server at all. Neither shows in the operation figures: those count control calls.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from bisect import bisect_left
from itertools import accumulate
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..errors import BmError
from ..limits import MAX_METRICS_SCRAPES, METRICS_SCRAPE_TIMEOUT_S
from ..transport.rpc import parse_address

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("memfabric.server")

UNKNOWN_OP = "unknown"
# Seconds: from the fastest control call on one host (tens of microseconds) to the longest a
# request may wait for its peers.
LATENCY_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CODE_NAMES = {int(code): code.name for code in BmError}


class OperationTimes:
    """One operation's latency histogram: a count per bucket (the last for anything slower than
    every bound) and the sum, under one lock."""

    __slots__ = ("_lock", "_counts", "_sum_s")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._sum_s = 0.0

    def observe(self, seconds: float) -> None:
        slot = bisect_left(LATENCY_BUCKETS_S, seconds)      # the first bound >= seconds: Prometheus's le
        with self._lock:
            self._counts[slot] += 1
            self._sum_s += seconds

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum_s


class RequestMetrics(Collector):
    """The request path's figures, in a registry of this server's own (two servers in one
    process, as some tests run them, keep theirs apart)."""

    def __init__(self, operations: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._by_op = {op: OperationTimes() for op in sorted(operations)}
        self._unknown = OperationTimes()
        self.registry.register(self)
        self._errors = Counter("memfabric_operation_errors",
                               "Operations answered with an error, by operation and error code",
                               ["op", "code"], registry=self.registry)

    def observe(self, op: Any, code: int | None, seconds: float) -> None:
        times = self._by_op.get(op) if type(op) is str else None
        (times or self._unknown).observe(seconds)
        if code is not None:
            self._errors.labels(op if times is not None else UNKNOWN_OP,
                                CODE_NAMES.get(int(code), "INTERNAL_ERROR")).inc()

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily("memfabric_operation_seconds",
                                       "Time the server took to answer a control operation, by operation "
                                       "(its _count counts them all, errors included)", labels=["op"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for op, times in [*self._by_op.items(), (UNKNOWN_OP, self._unknown)]:
            counts, sum_s = times.snapshot()
            family.add_metric([op], list(zip(bounds, accumulate(counts))), sum_s)
        yield family


class StateCollector(Collector):
    """Figures read from the server when scraped."""

    def __init__(self, server: "Server", doors: Callable[[], dict[str, int]]) -> None:
        self.server = server
        self.doors = doors                 # door name -> connected clients now
        self.started_s = time.time()
        self._started_monotonic_s = time.monotonic()

    def describe(self) -> Iterable[Any]:
        return []         # else registering would collect: a cluster read before the server starts

    def collect(self) -> Iterable[Any]:
        server = self.server
        yield InfoMetricFamily("memfabric_server", "This server: its id and host label",
                               value={"server_id": str(server.server_id), "host": server.cfg.host})
        yield GaugeMetricFamily("memfabric_server_epoch", "This server life's number from the cluster service "
                                "(it grows at every start of any server)", value=server.epoch)
        yield GaugeMetricFamily("memfabric_server_uptime_seconds", "Seconds since this server process started",
                                value=time.monotonic() - self._started_monotonic_s)
        yield from self._pools_and_namespaces()
        clients = GaugeMetricFamily("memfabric_clients", "Connections open now, by front door "
                                    "(clients, and peers asking for clients)", labels=["door"])
        for door, count in sorted(self.doors().items()):
            clients.add_metric([door], count)
        yield clients
        yield from self._peers()

    def _pools_and_namespaces(self) -> Iterable[Any]:
        server = self.server
        pool_figures = {key: GaugeMetricFamily(f"memfabric_pool_{key}", text, labels=["pool", "medium"])
                        for key, text in (
                            ("capacity_bytes", "Bytes this server gives the pool"),
                            ("used_bytes", "Bytes of the pool's memory here that live objects hold"),
                            ("free_bytes", "Bytes of the pool here that hold no object (capacity - used)"),
                            ("lendable_bytes", "Bytes a namespace with nothing here could get now"))}
        namespaces = GaugeMetricFamily("memfabric_namespaces", "Namespaces this server holds state of")
        objects = GaugeMetricFamily("memfabric_namespace_objects", "Objects whose home is this server",
                                    labels=["pool", "ns"])
        held = GaugeMetricFamily("memfabric_namespace_bytes", "Bytes of this server's memory the namespace's "
                                 "objects hold (wherever their home is); they add up to the pool's used bytes",
                                 labels=["pool", "ns"])
        with server.lock:          # O(pools + namespaces): nothing here walks objects
            for name, pool in server.pools.items():
                figures = pool.allocator.figures()
                for key, family in pool_figures.items():
                    family.add_metric([name, pool.medium_kind], figures[key])
            namespaces.add_metric([], len(server.namespaces))
            for (pool_name, ns), state in server.namespaces.items():
                pool = server.pools.get(pool_name)
                objects.add_metric([pool_name, ns], len(state.objects.table))
                held.add_metric([pool_name, ns], 0 if pool is None else pool.allocator.live_bytes(state.key))
        yield from pool_figures.values()
        yield namespaces
        yield objects
        yield held
        yield from self._keyspaces()
        yield from self._plogs()

    def _plogs(self) -> Iterable[Any]:
        """MemPlog: plogs homed here per namespace, and this server's appends since it started."""
        plog = self.server.plog
        counts = plog.counts()
        yield CounterMetricFamily("memfabric_plog_appends", "Records appended to plogs homed here",
                                  value=counts["appends"])
        yield CounterMetricFamily("memfabric_plog_appended_bytes", "Payload bytes of those records",
                                  value=counts["appended_bytes"])
        yield CounterMetricFamily("memfabric_plog_compiled_appends", "Of those, appends served by the compiled "
                                  "same-host path (plog/fast_append.py)", value=counts["compiled_appends"])
        yield CounterMetricFamily("memfabric_plog_flushes", "Flushes that made appends durable (pmem: "
                                  "fdatasync rounds, each shared by the appends waiting then)", value=counts["flushes"])
        forwards = plog.forward_counts()
        yield CounterMetricFamily("memfabric_plog_forwards", "Forward messages of plogs homed here sent to their copies "
                                  "(pieces, or places a same-host copy reads from this home's files)",
                                  value=forwards["forwards"])
        yield CounterMetricFamily("memfabric_plog_compiled_forwards", "Of those, pieces sent by the "
                                  "compiled call on a same-host peer link (plog/fast_append.py)",
                                  value=forwards["compiled_forwards"])
        count = GaugeMetricFamily("memfabric_plogs", "Plogs homed here", labels=["pool", "ns"])
        length = GaugeMetricFamily("memfabric_plog_bytes", "Committed bytes of the plogs homed here",
                                   labels=["pool", "ns"])
        with self.server.lock:
            states = list(self.server.namespaces.items())
        for (pool, ns), state in states:
            usage = plog.usage(state)
            if usage:
                count.add_metric([pool, ns], usage["plogs"])
                length.add_metric([pool, ns], usage["plog_bytes"])
        yield count
        yield length

    def _keyspaces(self) -> Iterable[Any]:
        """MemKV, per namespace with a keyspace here: what its stats() says, summed by clients."""
        families = {
            "keys": GaugeMetricFamily("memfabric_kv_keys", "Keys whose first home is this server", labels=["pool", "ns"]),
            "held_keys": GaugeMetricFamily("memfabric_kv_held_keys", "Keys this server holds, replicas included",
                                           labels=["pool", "ns"]),
            "bytes": GaugeMetricFamily("memfabric_kv_bytes", "Bytes of keys and values held here (records, large "
                                       "values, reservations)", labels=["pool", "ns"]),
            "memory_limit": GaugeMetricFamily("memfabric_kv_memory_limit_bytes", "The namespace's whole memory "
                                              "limit (0: none)", labels=["pool", "ns"]),
        }
        counters = {name: CounterMetricFamily(f"memfabric_kv_{name}", text, labels=["pool", "ns"]) for name, text in (
            ("hits", "Gets that found their key here, the clients' own lock-free ones included"),
            ("misses", "Gets that did not"),
            ("evictions", "Keys evicted to keep the namespace within its memory limit"),
            ("expired", "Keys deleted because their TTL ran out"))}
        with self.server.lock:
            spaces = [(pool, ns, s.kv) for (pool, ns), s in self.server.namespaces.items() if s.kv is not None]
        for pool, ns, space in spaces:
            with space.lock:
                if space.closed:
                    continue
                stats = space.stats()
            for name, family in families.items():
                family.add_metric([pool, ns], stats[name] or 0)
            for name, family in counters.items():
                family.add_metric([pool, ns], stats[name])
        yield from families.values()
        yield from counters.values()

    def _peers(self) -> Iterable[Any]:
        up = GaugeMetricFamily("memfabric_peer_up", "1 if the cluster view this server has counts the server "
                               "alive, else 0 (this server included)", labels=["server_id", "host"])
        seen = GaugeMetricFamily("memfabric_peer_last_seen_seconds", "Seconds since the server's last "
                                 "heartbeat, as this server's clock tells", labels=["server_id", "host"])
        try:
            view = self.server.view()
        except Exception as exc:   # noqa: BLE001 -- the cluster service away: a scrape without peers
            log.warning("metrics: no cluster view for peer liveness: %s", exc)
            return
        now = time.time()
        for record in view:
            labels = [str(record.server_id), record.host]
            up.add_metric(labels, 1 if record.alive else 0)
            seen.add_metric(labels, max(0.0, now - record.last_seen_s))
        yield up
        yield seen


class _Handler(WSGIRequestHandler):
    timeout = METRICS_SCRAPE_TIMEOUT_S     # a client that sends nothing lets go of its slot

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 -- the base class's name
        pass                                # scrapes every few seconds would drown the log


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, at most MAX_METRICS_SCRAPES at once; more are closed at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_METRICS_SCRAPES)
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass           # a scraper that timed out or hung up: nothing for the log

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsEndpoint:
    """The HTTP endpoint (any path answers, as Prometheus asks for /metrics)."""

    def __init__(self, address: str, server: "Server", doors: Callable[[], dict[str, int]]) -> None:
        """Binds at once, so that a taken port fails the server's start (OSError)."""
        host, port = parse_address(address)
        # The *_created series would double a scrape for what uptime already says; this is a
        # server process, whose one library user we are.
        disable_created_metrics()
        registry = server.metrics.registry
        self.collector = StateCollector(server, doors)
        registry.register(self.collector)
        ProcessCollector(registry=registry)      # CPU, memory, open fds of this process

        class Server(_BoundedServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Handler)
        bound_host, bound_port = self._httpd.server_address[:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

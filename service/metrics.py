"""Prometheus metrics on their own HTTP port (`--metrics-port`, default 8002; 0: off).

Nothing on the request path touches Prometheus objects: a custom collector
reads the engine's stats snapshot (service/engine/api.py) when Prometheus
scrapes. The engine's counters belong to the event loop, so the scrape (on the
HTTP server's thread) asks for the snapshot on the loop and waits for it: one
short callback per scrape, no locks on the hot path.

Every name starts with `trtserve_`. Labels: `model`; per worker also `worker`
(its index), `profile` (its optimization profile) and `device` ("cpu", or the
GPU the worker's stream runs on). docs/protocols.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.engine.api import (
    ByteBudgetSnapshot,
    DurationHistogram,
    Engine,
    FrontendSnapshot,
    ModelDescription,
    StatsSnapshot,
    WorkerSnapshot,
)

log = logging.getLogger(__name__)

PREFIX = "trtserve"
MODEL_LABELS = ("model",)
WORKER_LABELS = ("model", "worker", "profile", "device")
# How long a scrape waits for the event loop before it fails (HTTP 500).
SCRAPE_TIMEOUT_S = 5.0


def _buckets(histogram: DurationHistogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, from per-bucket counts."""
    result: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        total += count
        result.append((floatToGoString(bound), total))
    result.append(("+Inf", total + histogram.counts[-1]))
    return result


def _batch_size_bounds(max_batch_size: int) -> list[int]:
    """Powers of two below the model's largest batch, and that batch."""
    bounds, size = [], 1
    while size < max_batch_size:
        bounds.append(size)
        size *= 2
    bounds.append(max(max_batch_size, 1))
    return bounds


def _batch_size_buckets(stats: WorkerSnapshot,
                        bounds: Sequence[int]) -> list[tuple[str, float]]:
    counts = stats.batch_sizes
    result: list[tuple[str, float]] = [
        (floatToGoString(bound), sum(n for size, n in counts.items() if size <= bound))
        for bound in bounds]
    result.append(("+Inf", sum(counts.values())))
    return result


class _Families:
    """The metric families of one scrape, filled model by model."""

    def __init__(self) -> None:
        self._all: list[Metric] = []

    def _add(self, family: Metric) -> Metric:
        self._all.append(family)
        return family

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
        family = self._add(CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels))
        assert isinstance(family, CounterMetricFamily)
        return family

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
        family = self._add(GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels))
        assert isinstance(family, GaugeMetricFamily)
        return family

    def histogram(self, name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
        family = self._add(HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=labels))
        assert isinstance(family, HistogramMetricFamily)
        return family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._all)


def families(snapshot: StatsSnapshot,
             descriptions: Mapping[str, ModelDescription]) -> list[Metric]:
    """Every metric of the models in `snapshot` (`descriptions` by name: backend, batch)."""
    f = _Families()
    info = f.gauge("model_info", "A served model (value 1), with its backend and platform.",
                   [*MODEL_LABELS, "backend", "platform"])
    ready = f.gauge("model_ready", "1 while the model accepts requests and has a healthy "
                    "worker, else 0.", MODEL_LABELS)
    depth = f.gauge("model_queue_depth", "Requests waiting in the batcher's queue.",
                    MODEL_LABELS)
    requests = f.counter("model_requests", "Requests accepted into the queue.", MODEL_LABELS)
    success = f.counter("model_request_success", "Requests answered with a result.",
                        MODEL_LABELS)
    failures = f.counter(
        "model_request_failures",
        "Requests not answered with a result, by reason: error (a failed batch), "
        "deadline_exceeded, queue_full (refused), cancelled (by the client).",
        [*MODEL_LABELS, "reason"])
    latency = f.histogram("model_request_duration_seconds",
                          "Time answered requests spent in the server (queue and execution).",
                          MODEL_LABELS)
    w_requests = f.counter("worker_requests", "Requests in the batches the worker completed.",
                           WORKER_LABELS)
    w_batches = f.counter("worker_batches", "Batches the worker completed.", WORKER_LABELS)
    w_rows = f.counter("worker_inferences", "Rows (batch elements) the worker completed.",
                       WORKER_LABELS)
    w_errors = f.counter("worker_batch_failures", "Batches that failed on the worker.",
                         WORKER_LABELS)
    w_graphs = f.counter("worker_graph_launches", "Batches run by launching a CUDA graph.",
                         WORKER_LABELS)
    w_plain = f.counter("worker_plain_enqueues",
                        "Batches run with a plain enqueueV3 (no CUDA graph).", WORKER_LABELS)
    w_capture = f.gauge("worker_graph_capture_failures",
                        "Batch sizes whose CUDA graph capture failed (run without a graph).",
                        WORKER_LABELS)
    w_inline = f.counter("worker_inline_batches", "Batches run on the event loop instead of "
                         "the worker's thread (inline_below_us).", WORKER_LABELS)
    w_rebuilds = f.counter("worker_rebuilds", "Times the worker's executor was rebuilt after "
                           "a failure.", WORKER_LABELS)
    w_rejected = f.counter("worker_rejected_requests", "Requests whose input the backend "
                           "refused (INVALID_ARGUMENT; not worker failures).", WORKER_LABELS)
    w_retries = f.counter("worker_retries", "Rebuilds tried while the worker was out of the "
                          "rotation.", WORKER_LABELS)
    w_busy = f.counter("worker_busy_seconds", "Time the worker's stream (or session) was "
                       "busy computing.", WORKER_LABELS)
    w_util = f.gauge("worker_utilization", "Busy fraction of the worker over the stats "
                     "window (0 to 1).", WORKER_LABELS)
    w_in_flight = f.gauge("worker_in_flight_batches", "Batches handed to the worker and not "
                          "finished.", WORKER_LABELS)
    w_healthy = f.gauge("worker_healthy", "1 while the worker is in the rotation, else 0.",
                        WORKER_LABELS)
    w_aux = f.gauge("worker_aux_streams", "Auxiliary CUDA streams of the worker's context.",
                    WORKER_LABELS)
    w_stage = f.counter("worker_stage_seconds", "Time of completed batches by stage: input "
                        "(gather, host-to-device), infer, output (device-to-host).",
                        [*WORKER_LABELS, "stage"])
    w_queue = f.histogram("worker_queue_duration_seconds", "Time each request waited in the "
                          "queue before its batch went to this worker.", WORKER_LABELS)
    w_compute = f.histogram("worker_compute_duration_seconds", "Compute time of each "
                            "completed batch (CUDA events on a GPU, wall time on the CPU).",
                            WORKER_LABELS)
    w_batch = f.histogram("worker_batch_size", "Rows per completed batch.", WORKER_LABELS)

    for model in snapshot.models:
        name, c = model.name, model.counters
        description = descriptions[name]
        spec = description.spec
        info.add_metric([name, spec.backend, spec.platform], 1)
        ready.add_metric([name], 1 if model.ready else 0)
        depth.add_metric([name], model.queue_depth)
        requests.add_metric([name], c.requests)
        success.add_metric([name], c.success)
        for reason, value in (("error", c.errors), ("deadline_exceeded", c.deadline_exceeded),
                              ("queue_full", c.rejected_queue_full),
                              ("cancelled", c.cancelled)):
            failures.add_metric([name, reason], value)
        latency.add_metric([name], _buckets(c.success_histogram), c.success_histogram.sum_s)
        bounds = _batch_size_bounds(description.batching.max_batch_size)
        for s in model.workers:
            labels = [name, str(s.index), str(s.info.profile), s.info.device]
            w_requests.add_metric(labels, s.requests)
            w_batches.add_metric(labels, s.batches)
            w_rows.add_metric(labels, s.inferences)
            w_errors.add_metric(labels, s.errors)
            w_graphs.add_metric(labels, s.graph_launches)
            w_plain.add_metric(labels, s.plain_enqueues)
            w_capture.add_metric(labels, len(s.capture_failures))
            w_inline.add_metric(labels, s.inline_batches)
            w_rebuilds.add_metric(labels, s.rebuilds)
            w_rejected.add_metric(labels, s.rejected)
            w_retries.add_metric(labels, s.retries)
            w_busy.add_metric(labels, s.busy_s)
            w_util.add_metric(labels, s.utilization)
            w_in_flight.add_metric(labels, s.in_flight)
            w_healthy.add_metric(labels, 1 if s.healthy else 0)
            w_aux.add_metric(labels, s.info.aux_streams)
            for stage, seconds in (("input", s.stages.input_s), ("infer", s.stages.infer_s),
                                   ("output", s.stages.output_s)):
                w_stage.add_metric([*labels, stage], seconds)
            w_queue.add_metric(labels, _buckets(s.queue_histogram), s.queue_histogram.sum_s)
            w_compute.add_metric(labels, _buckets(s.compute_histogram),
                                 s.compute_histogram.sum_s)
            w_batch.add_metric(labels, _batch_size_buckets(s, bounds), s.inferences)
    return list(f)


def budget_families(budget: ByteBudgetSnapshot) -> list[Metric]:
    """The server-wide budget of request bytes in flight."""
    f = _Families()
    f.gauge("request_bytes_in_flight", "Input bytes of accepted requests not yet answered.",
            ()).add_metric((), budget.held_bytes)
    f.gauge("request_bytes_budget", "max_request_bytes_in_flight (0: no budget).",
            ()).add_metric((), budget.limit_bytes)
    f.counter("requests_over_budget", "Requests refused because their bytes did not fit "
              "the budget (RESOURCE_EXHAUSTED).", ()).add_metric((), budget.refused)
    return list(f)


def frontend_families(frontends: Sequence[FrontendSnapshot]) -> list[Metric]:
    """One row per frontend process (server.frontends > 1; none in one process)."""
    if not frontends:
        return []
    f = _Families()
    labels = ("frontend", "pid")
    requests = f.counter("frontend_requests", "Requests a frontend process passed to the "
                         "engine.", labels)
    in_flight = f.gauge("frontend_in_flight", "Requests of a frontend process not yet "
                        "answered by the engine.", labels)
    cpu = f.counter("frontend_cpu_seconds", "CPU time (user + system) of a frontend process.",
                    labels)
    for s in frontends:
        row = (str(s.index), str(s.pid))
        requests.add_metric(row, s.requests)
        in_flight.add_metric(row, s.in_flight)
        cpu.add_metric(row, s.cpu_s)
    return list(f)


class StatsCollector(Collector):
    """Reads the engine's stats snapshot at scrape time, on the event loop that owns it."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self._engine = engine
        self._loop = loop
        self._timeout_s = timeout_s

    async def _read(self) -> list[Metric]:
        snapshot = await self._engine.stats()
        descriptions = {m.name: self._engine.describe(m.name) for m in snapshot.models}
        return (families(snapshot, descriptions) + budget_families(snapshot.request_bytes)
                + frontend_families(snapshot.frontends))

    def collect(self) -> Iterable[Metric]:
        loop = self._loop
        if loop is None:
            return asyncio.run(self._read())
        if _running_loop() is loop:
            # The snapshot is awaited on this loop, which a call from the loop's own
            # thread would block: scrapes come from the HTTP server's threads.
            raise RuntimeError("metrics are collected from another thread than the loop's")
        if loop.is_closed():
            return []
        return asyncio.run_coroutine_threadsafe(self._read(), loop).result(self._timeout_s)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood stderr; errors still surface as 500s."""


class MetricsServer:
    """The HTTP endpoint: `/metrics` (any path answers) on its own thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family, address = _best_family(host, port)

        class Server(ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(address, port, make_wsgi_app(registry), Server,
                                  handler_class=_QuietHandler)
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,),
                                        name="trtserve-metrics", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = info[0]
    return family, str(sockaddr[0])


def start_metrics(port: int, host: str, engine: Engine) -> MetricsServer:
    """Serve Prometheus metrics for `engine` on host:port (port 0: any free port).

    Call on the event loop that serves the engine: scrapes read its stats there.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(engine, _running_loop()))
    ProcessCollector(namespace=PREFIX, registry=registry)
    server = MetricsServer(host, port, registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.port)
    return server

"""Prometheus metrics on their own address (`--metrics-host`, default 127.0.0.1) and port
(`--metrics-port`, default 8002; 0: off).

Nothing on the request path touches Prometheus objects: the engine's stats
snapshot (service/engine/api.py) is read when Prometheus scrapes. The engine's
counters belong to the event loop, so a render is answered on the loop: one
short read per render, no locks on the hot path. Renders are shared by every scrape within a second
(service/metrics_http.py), so scrapers cannot multiply that callback.

Every name starts with `trtserve_`. Labels: `model`; per worker also `worker`
(its index), `profile` (its optimization profile) and `device` ("cpu", or the
GPU the worker's stream runs on). docs/protocols.md lists every metric.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from trtserve.service import auth
from trtserve.service.config import ServerConfig
from trtserve.service.engine.api import (
    ByteBudgetSnapshot,
    DurationHistogram,
    FrontendSnapshot,
    ModelDescription,
    RegionUsage,
    StatsSnapshot,
    StatsSource,
    WorkerSnapshot,
)
from trtserve.service.errors import ConfigError, NotFound
from trtserve.service.metrics_http import PATH, ScrapeLimits, bind
from trtserve.service.metrics_process import MetricsProcess, MetricsStartError

log = logging.getLogger(__name__)

PREFIX = "trtserve"
MODEL_LABELS = ("model",)
WORKER_LABELS = ("model", "worker", "profile", "device")


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
    info = f.gauge("model_info", "A served model (value 1), with its backend, platform and "
                   "the version served (one more per reload).",
                   [*MODEL_LABELS, "backend", "platform", "version"])
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
    shm_bytes = f.counter("model_shared_memory_bytes", "Tensor bytes read from (direction "
                          "input) or written into (output) clients' shared-memory regions "
                          "instead of crossing gRPC.", [*MODEL_LABELS, "direction"])
    shm_avoided = f.counter("model_shared_memory_copies_avoided", "Region tensors the "
                            "executor read where they lay or wrote where they go (bound by "
                            "address, or one copy straight to or from the device) instead of "
                            "through a staging buffer.", MODEL_LABELS)
    shm_host = f.counter("model_shared_memory_host_copies", "Region tensors copied through "
                         "host memory because region and backend live on different sides "
                         "(a CUDA region on the CPU backend).", MODEL_LABELS)
    grouped = f.counter("model_grouped_requests", "Requests of equal shapes the engine "
                        "process read together and queued as one group (with frontend "
                        "processes; also counted in model_requests).", MODEL_LABELS)
    groups = f.counter("model_request_groups", "Groups of requests the engine process "
                       "queued as one (model_grouped_requests over this: their mean size).",
                       MODEL_LABELS)
    shm_paths = f.counter("model_shared_memory_batches", "Batches with shared-memory tensors "
                          "by how they ran: bound (addresses set, no copy) or copied.",
                          [*MODEL_LABELS, "path"])
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
        description = descriptions.get(name)
        if description is None:
            continue  # unloaded since the snapshot: not served any more
        spec = description.spec
        info.add_metric([name, spec.backend, spec.platform, model.version], 1)
        ready.add_metric([name], 1 if model.ready else 0)
        depth.add_metric([name], model.queue_depth)
        requests.add_metric([name], c.requests)
        success.add_metric([name], c.success)
        for reason, value in (("error", c.errors), ("deadline_exceeded", c.deadline_exceeded),
                              ("queue_full", c.rejected_queue_full),
                              ("cancelled", c.cancelled)):
            failures.add_metric([name, reason], value)
        latency.add_metric([name], _buckets(c.success_histogram), c.success_histogram.sum_s)
        shm_bytes.add_metric([name, "input"], c.shm_input_bytes)
        shm_bytes.add_metric([name, "output"], c.shm_output_bytes)
        shm_avoided.add_metric([name], c.copies_avoided)
        shm_host.add_metric([name], c.host_copies)
        grouped.add_metric([name], c.grouped_requests)
        groups.add_metric([name], c.groups)
        for path in ("bound", "copied"):
            shm_paths.add_metric([name, path], c.io_paths.get(path, 0))
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


def shared_memory_families(usage: RegionUsage) -> list[Metric]:
    """Shared-memory regions now, and the tensor bytes they spared the wire."""
    f = _Families()
    f.gauge("shared_memory_regions", "Shared-memory regions registered.",
            ()).add_metric((), usage.regions)
    f.gauge("shared_memory_mapped_bytes", "Bytes mapped over every registered region.",
            ()).add_metric((), usage.mapped_bytes)
    f.counter("shared_memory_input_bytes", "Input bytes read from regions instead of "
              "crossing gRPC.", ()).add_metric((), usage.input_bytes)
    f.counter("shared_memory_output_bytes", "Output bytes written into regions instead of "
              "crossing gRPC.", ()).add_metric((), usage.output_bytes)
    f.counter("shared_memory_zero_copy_inputs", "Inputs handed to the batch as views of a "
              "region, without a copy.", ()).add_metric((), usage.zero_copy_inputs)
    f.counter("shared_memory_host_copies", "Tensors copied between host and device because "
              "region and backend differ.", ()).add_metric((), usage.host_copies)
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
    frames = f.counter("frontend_request_frames", "Frames that carried a frontend process's "
                       "requests to the engine.", labels)
    files = f.gauge("frontend_open_files", "Files a frontend process holds open, its gRPC "
                    "connections among them (server.grpc_max_connections caps those).", labels)
    for s in frontends:
        row = (str(s.index), str(s.pid))
        requests.add_metric(row, s.requests)
        in_flight.add_metric(row, s.in_flight)
        cpu.add_metric(row, s.cpu_s)
        frames.add_metric(row, s.request_frames)
        files.add_metric(row, s.open_files)
    return list(f)


async def snapshot(engine: StatsSource) -> bytes:
    """Every model's metric families, pickled for the metrics process. Call on the loop.

    Reading them is the part that must run here; the text format, which costs more,
    is the child's work (timings: docs/reliability.md, "Metrics endpoint").
    """
    stats = await engine.stats()
    descriptions = {}
    for model in stats.models:
        # A model unloaded between the snapshot and now is left out of this scrape.
        with contextlib.suppress(NotFound):
            descriptions[model.name] = engine.describe(model.name)
    found = (families(stats, descriptions) + budget_families(stats.request_bytes)
             + shared_memory_families(stats.shared_memory)
             + frontend_families(stats.frontends))
    return pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL)


def start_metrics(config: ServerConfig, engine: StatsSource) -> MetricsProcess:
    """Serve Prometheus metrics for `engine` on metrics_host:metrics_port.

    Call on the event loop that owns the models: renders read their stats there.
    The HTTP side runs in a child process (service/metrics_child.py).
    """
    token = auth.load_token(config.auth_token_file) if config.metrics_requires_auth else None
    if config.metrics_requires_auth and token is None:
        raise ConfigError(f"server.metrics_requires_auth: got True, but no token is set "
                          f"(server.auth_token_file or {auth.TOKEN_ENV})")
    tls = {"cert_file": config.tls.cert_file, "key_file": config.tls.key_file,
           "client_ca_file": config.tls.client_ca_file} if config.metrics_tls else None
    limits = ScrapeLimits(config.metrics_max_connections, config.metrics_timeout_s,
                          config.metrics_render_interval_s)
    sock = bind(config.metrics_host, config.metrics_port, backlog=limits.max_connections)
    try:
        server = MetricsProcess(sock, lambda: snapshot(engine), limits,
                                token=token, tls=tls)
    except MetricsStartError as e:
        sock.close()
        raise ConfigError(str(e)) from None
    scheme = "https" if tls else "http"
    log.info("Prometheus metrics on %s://%s:%d%s (%s)", scheme, config.metrics_host,
             server.port, PATH, "bearer token required" if token else "no token")
    if not _is_loopback(config.metrics_host) and token is None:
        log.warning("metrics on %s without a token: anyone who can reach it can read them "
                    "(set metrics_requires_auth, or metrics_host 127.0.0.1)",
                    config.metrics_host)
    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

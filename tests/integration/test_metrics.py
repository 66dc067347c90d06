"""The Prometheus endpoint, scraped over HTTP after real traffic, against the Stats RPC."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, Controls, controlled_model
from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.service.config import ModelConfig
from trtserve.service.engine.stats import LATENCY_BUCKETS_S
from trtserve.service.testing.servers import ServerProcess, free_port, running_server, server_config

Labels = tuple[tuple[str, str], ...]


def scrape(port: int) -> dict[str, dict[Labels, float]]:
    """{sample name: {sorted label pairs: value}} from one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = s.value
    return samples


def key(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def worker_labels(model: str, worker: int, device: str = "cpu") -> dict[str, str]:
    return {"device": device, "model": model, "profile": "0", "worker": str(worker)}


@pytest.fixture(scope="module")
def served(example_onnx):
    metrics_port = free_port()
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=2, max_batch_size=16,
                    max_queue_delay_us=1000),
        metrics_port=metrics_port,
        metrics_render_interval_s=0.0,  # exact counts right after traffic
    )
    # "tiny" overflows on purpose: one slow worker (a test double, 50 ms a batch),
    # a queue of one, so a flood of requests is refused for certain, not by timing.
    tiny = ControlledBackend(Controls(sleep_s=0.05)).runtime(
        controlled_model("tiny", workers=1, max_batch_size=4, max_queue_size=1,
                         max_queue_delay_us=0))
    with running_server(config) as s:
        s.call(s.server.add_model(tiny))
        yield s, metrics_port


async def _traffic(url: str) -> None:
    rng = np.random.default_rng(0)
    async with AsyncClient(url) as c:
        await asyncio.gather(*(c.infer("example", {"input": rng.standard_normal(
            (1 + i % 4, 64)).astype(np.float32)}) for i in range(60)))


def test_counters_match_stats_after_traffic(served):
    server, port = served
    asyncio.run(_traffic(server.url))
    # KServe traffic lands in the same counters.
    kserve = triton.InferenceServerClient(server.url)
    try:
        x = np.ones((2, 64), np.float32)
        tensor = triton.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(5):
            kserve.infer("example", [tensor])
    finally:
        kserve.close()
    with Client(server.url) as c:
        with pytest.raises(InferenceError):  # refused before it is queued: no count
            c.infer("example", {"input": np.ones((1, 3), np.float32)})
        stats = c.stats("example").models[0]

    m = scrape(port)
    model = key(model="example")
    assert m["trtserve_model_requests_total"][model] == stats.requests == 65
    assert m["trtserve_model_request_success_total"][model] == 65
    for reason in ("error", "deadline_exceeded", "queue_full", "cancelled"):
        assert m["trtserve_model_request_failures_total"][key(model="example",
                                                              reason=reason)] == 0
    assert m["trtserve_model_request_duration_seconds_count"][model] == 65
    assert m["trtserve_model_request_duration_seconds_bucket"][
        key(model="example", le="+Inf")] == 65
    assert m["trtserve_model_request_duration_seconds_sum"][model] > 0
    assert m["trtserve_model_queue_depth"][model] == stats.queue_depth == 0
    assert m["trtserve_model_ready"][model] == 1
    assert m["trtserve_model_info"][key(model="example", backend="onnxruntime",
                                        platform="onnxruntime_onnx", version="1")] == 1

    assert len(stats.workers) == 2
    for w in stats.workers:
        wl = worker_labels("example", w.index)
        labels = key(**wl)
        assert m["trtserve_worker_requests_total"][labels] == w.requests
        assert m["trtserve_worker_batches_total"][labels] == w.batches
        assert m["trtserve_worker_inferences_total"][labels] == w.inferences
        assert m["trtserve_worker_batch_failures_total"][labels] == w.errors == 0
        assert m["trtserve_worker_graph_launches_total"][labels] == w.graph_launches
        assert m["trtserve_worker_plain_enqueues_total"][labels] == w.plain_enqueues
        assert m["trtserve_worker_graph_capture_failures"][labels] == 0
        assert m["trtserve_worker_rebuilds_total"][labels] == w.rebuilds
        assert m["trtserve_worker_inline_batches_total"][labels] == w.inline_batches
        assert m["trtserve_worker_busy_seconds_total"][labels] == pytest.approx(w.busy_seconds)
        assert m["trtserve_worker_healthy"][labels] == 1
        assert m["trtserve_worker_in_flight_batches"][labels] == 0
        assert 0 <= m["trtserve_worker_utilization"][labels] <= 1
        assert m["trtserve_worker_stage_seconds_total"][key(**wl, stage="infer")] == \
            pytest.approx(w.busy_seconds)
        # Histograms: one queue observation per request, one compute per batch.
        assert m["trtserve_worker_queue_duration_seconds_count"][labels] == w.requests
        assert m["trtserve_worker_compute_duration_seconds_count"][labels] == w.batches
        assert m["trtserve_worker_compute_duration_seconds_sum"][labels] == \
            pytest.approx(w.busy_seconds)
        assert m["trtserve_worker_batch_size_count"][labels] == w.batches
        assert m["trtserve_worker_batch_size_sum"][labels] == w.inferences
        # Batch sizes: exact, from the Stats histogram (buckets 1, 2, 4, 8, 16 = max).
        sizes = w.batch_size_histogram
        for bound in (1, 2, 4, 8, 16):
            assert m["trtserve_worker_batch_size_bucket"][key(**wl, le=f"{bound}.0")] == \
                sum(n for size, n in sizes.items() if size <= bound)
        # Latency buckets are cumulative and end at the count.
        queue = [m["trtserve_worker_queue_duration_seconds_bucket"][key(**wl, le=le)]
                 for le in [*(floatToGoString(b) for b in LATENCY_BUCKETS_S), "+Inf"]]
        assert queue == sorted(queue) and queue[-1] == w.requests
    assert sum(w.requests for w in stats.workers) == 65
    assert sum(w.inferences for w in stats.workers) == stats.inferences


def test_refusals_are_counted_by_reason(served):
    server, port = served

    async def flood() -> list[BaseException | dict[str, np.ndarray]]:
        async with AsyncClient(server.url) as c:
            x = np.ones((4, WIDTH), np.float32)
            return await asyncio.gather(*(c.infer("tiny", {INPUT: x}) for _ in range(40)),
                                        return_exceptions=True)

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, InferenceError)]
    with Client(server.url) as c:
        stats = c.stats("tiny").models[0]
    m = scrape(port)
    model = key(model="tiny")
    assert stats.rejected_queue_full == len(refused) > 0
    assert m["trtserve_model_request_failures_total"][key(model="tiny", reason="queue_full")] \
        == stats.rejected_queue_full
    assert m["trtserve_model_requests_total"][model] == stats.requests == 40 - len(refused)


def test_metrics_port_zero_turns_the_endpoint_off(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1))
    assert config.metrics_port == 0
    with running_server(config) as s:
        assert s.server._metrics is None


def test_the_cli_flag_serves_metrics(example_onnx):
    metrics_port = free_port()
    process = ServerProcess(["--model", f"example={example_onnx}", "--workers", "1",
                             "--metrics-port", str(metrics_port)])
    try:
        process.wait_ready()
        with Client(process.url) as c:
            c.infer("example", {"input": np.ones((1, 64), np.float32)})
        m = scrape(metrics_port)
        assert m["trtserve_model_request_success_total"][key(model="example")] == 1
        assert m["trtserve_process_cpu_seconds_total"][()] > 0
    finally:
        code, out = process.terminate()
    assert code == 0, out

"""The TensorRT executor's CUDA path on a real GPU, with the GPU stand-in (a test double)
in place of TensorRT: results, graph capture, streams, overlap and Stats' busy time.

Skipped without an NVIDIA GPU, CuPy or cuda-python. Run: pytest -m gpu
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from trtserve.service import cpus
from trtserve.service.backends.tensorrt.api import gpu_present
from trtserve.service.backends.tensorrt.cuda import CudaRuntime, runtime_module
from trtserve.service.backends.tensorrt.executor import TrtExecutor
from trtserve.service.backends.tensorrt.load import graph_buckets

pytestmark = pytest.mark.gpu

if not gpu_present():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)
cupy = pytest.importorskip("cupy")
try:
    runtime_module()
except RuntimeError as err:
    pytest.skip(str(err), allow_module_level=True)

from trtserve.client.client import Client  # noqa: E402
from trtserve.service.testing.gpu_standin import (  # noqa: E402
    INPUT,
    LABEL,
    OUTPUT,
    StandinEngine,
    serving_standin,
    standin_config,
)
from trtserve.service.testing.trt_double import trt_module  # noqa: E402

# FP32 with different summation orders: far under this (METHOD.md: FP32 lands << 1e-3).
TOLERANCE = 1e-5


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def cuda() -> CudaRuntime:
    runtime = CudaRuntime(0)
    runtime.set_device()
    return runtime


@pytest.fixture(scope="module")
def engine() -> Iterator[StandinEngine]:
    eng = StandinEngine(profiles=2, trace_capacity=1 << 20)
    yield eng
    eng.close()


def executor(engine: StandinEngine, cuda: CudaRuntime, **options: object) -> TrtExecutor:
    options.setdefault("graph_batch_sizes", graph_buckets((), engine.batch[2]))
    return TrtExecutor(engine, cuda, trt_module=trt_module, **options)  # type: ignore[arg-type]


def random_rows(rng: np.random.Generator, rows: int, features: int = 512) -> np.ndarray:
    return rng.standard_normal((rows, features)).astype(np.float32)


def merged(intervals: np.ndarray) -> list[tuple[int, int]]:
    """Union of [start, end] intervals, sorted."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(map(tuple, intervals.tolist())):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> tuple[int, int]:
    """(ns during which both ran, how many pairs of their intervals overlap)."""
    total, pairs, i, j = 0, 0, 0, 0
    while i < len(a) and j < len(b):
        both = min(a[i][1], b[j][1]) - max(a[i][0], b[j][0])
        if both > 0:
            total += both
            pairs += 1
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total, pairs


def busy_ns(intervals: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in intervals)


# --- the executor on the GPU ----------------------------------------------------------------


@pytest.mark.parametrize(("cuda_graphs", "graph_io"), [(True, True), (True, False),
                                                      (False, True)])
def test_executor_matches_numpy(engine: StandinEngine, cuda: CudaRuntime,
                                cuda_graphs: bool, graph_io: bool,
                                caplog: pytest.LogCaptureFixture) -> None:
    ex = executor(engine, cuda, cuda_graphs=cuda_graphs, graph_io=graph_io)
    rng = np.random.default_rng(1)
    try:
        assert ex.info.stream_non_blocking and cuda.stream_non_blocking(int(ex.info.stream, 16))
        for rows in (1, 2, 3, 7, 16, 33, 64, 5, 3):
            x = random_rows(rng, rows)
            result = ex.run({INPUT: np.array_split(x, min(3, rows))}, rows)
            out = result.outputs[OUTPUT]
            assert out.shape == (rows, engine.out_features)
            assert relative_error(out, engine.reference(x)) < TOLERANCE, rows
            assert result.graph_launch is cuda_graphs
            assert result.capture_failure is None
            assert result.compute_s > 0 and result.input_s > 0 and result.output_s > 0
        assert "refused" not in caplog.text  # CUDA took the copies and events into graphs
    finally:
        ex.close()


def test_capture_failure_on_the_gpu_falls_back_and_says_why(cuda: CudaRuntime) -> None:
    engine = StandinEngine(in_features=64, hidden=128, out_features=64, uncapturable=True)
    ex = executor(engine, cuda)
    rng = np.random.default_rng(2)
    try:
        x = random_rows(rng, 3, 64)
        first = ex.run({INPUT: [x]}, 3)
        assert first.graph_launch is False
        assert first.capture_failure is not None
        bucket, reason = first.capture_failure
        assert bucket == 4 and "cudaErrorStreamCapture" in reason, reason
        assert relative_error(first.outputs[OUTPUT], engine.reference(x)) < TOLERANCE
        x = random_rows(rng, 4, 64)
        again = ex.run({INPUT: [x]}, 4)  # same bucket: no second try, no second report
        assert again.capture_failure is None and again.graph_launch is False
        assert relative_error(again.outputs[OUTPUT], engine.reference(x)) < TOLERANCE
        assert not cuda.is_capturing(int(ex.info.stream, 16))
        assert cuda.clear_error() is None
    finally:
        ex.close()
        engine.close()


def test_aux_streams_are_non_blocking_and_used(cuda: CudaRuntime) -> None:
    engine = StandinEngine(num_aux_streams=1)
    rng = np.random.default_rng(3)
    try:
        for cuda_graphs in (True, False):
            ex = executor(engine, cuda, cuda_graphs=cuda_graphs)
            try:
                assert ex.info.aux_streams == 1
                for rows in (1, 5, 64):
                    x = random_rows(rng, rows)
                    result = ex.run({INPUT: [x]}, rows)
                    assert result.capture_failure is None
                    assert result.graph_launch is cuda_graphs
                    assert relative_error(result.outputs[OUTPUT], engine.reference(x)) < TOLERANCE
                assert engine.aux_streams_seen
                for stream in engine.aux_streams_seen:
                    assert stream != int(ex.info.stream, 16)
                    assert cuda.stream_non_blocking(stream)
            finally:
                ex.close()
            engine.aux_streams_seen.clear()
    finally:
        engine.close()


def test_the_non_blocking_check_tells_streams_apart(cuda: CudaRuntime) -> None:
    """Control for the stream checks above: a default-flag stream reads as blocking."""
    rt = runtime_module()
    err, stream = rt.cudaStreamCreate()
    assert err == rt.cudaError_t.cudaSuccess
    try:
        assert cuda.stream_non_blocking(int(stream)) is False
    finally:
        cuda.stream_destroy(int(stream))


def test_two_workers_kernels_overlap_in_time(cuda: CudaRuntime) -> None:
    """Two workers, each on its own thread and stream: their kernels run at the same time
    (per-block %globaltimer stamps written by the kernels themselves).

    The stand-in here is wide enough that a batch's kernels outlast the host's work
    between batches (about 0.1 ms of Python per batch); with kernels shorter than that,
    overlap would depend on how the GIL happens to interleave the two threads.
    """
    engine = StandinEngine(hidden=16384, profiles=2, trace_capacity=1 << 22)
    try:
        _overlap_two_workers(engine, cuda)
    finally:
        engine.close()


def _overlap_two_workers(engine: StandinEngine, cuda: CudaRuntime) -> None:
    engine.reset_trace()
    start = threading.Barrier(2)
    streams: list[int] = []
    errors: list[BaseException] = []

    def worker(profile: int) -> None:
        try:
            ex = executor(engine, cuda, profile=profile)
        except BaseException as err:
            errors.append(err)
            start.abort()
            return
        try:
            streams.append(int(ex.info.stream, 16))
            x = random_rows(np.random.default_rng(profile), 64)
            ex.run({INPUT: [x]}, 64)  # capture outside the measured part
            start.wait()
            for _ in range(60):
                ex.run({INPUT: [x]}, 64)
        except BaseException as err:
            errors.append(err)
        finally:
            ex.close()

    threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    trace = engine.read_trace()
    assert len(trace) < engine.trace_capacity, "trace buffer full"
    a, b = (merged(trace[trace[:, 0] == s][:, 1:]) for s in streams)
    both, pairs = overlap(a, b)
    print(f"\nkernel time: worker A {busy_ns(a) / 1e6:.2f} ms, worker B {busy_ns(b) / 1e6:.2f} ms, "
          f"both at once {both / 1e6:.2f} ms in {pairs} overlaps (stand-in, not TensorRT)")
    # Not one coincidence at a boundary: blocks of both streams were resident together
    # many times over the run.
    assert both > 0 and pairs >= 10


# --- through the whole gRPC path ---------------------------------------------------------------


@pytest.mark.parametrize("frontends", [1, 2])
def test_served_results_equal_numpy_with_several_workers(engine: StandinEngine,
                                                         cuda: CudaRuntime,
                                                         frontends: int) -> None:
    """Through one process, and through 2 frontend processes and the engine process
    (inputs of 1-8 rows: inline in the link and through the arenas)."""
    config = standin_config(workers=2, max_queue_delay_us=2000)  # 2 profiles x 2 workers
    failures: list[str] = []
    with serving_standin(engine, config, frontends=frontends) as server:

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with Client(server.url) as c:
                for _ in range(25):
                    x = random_rows(rng, int(rng.integers(1, 9)))
                    out = c.infer("standin", {INPUT: x}, timeout=30)[OUTPUT]
                    err = relative_error(out, engine.reference(x))
                    if out.shape != (len(x), engine.out_features) or err >= TOLERANCE:
                        failures.append(f"rows {len(x)}: shape {out.shape}, error {err}")

        threads = [threading.Thread(target=client, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with Client(server.url) as c:
            response = c.stats("standin")
        stats = response.models[0]
        assert not failures, failures[:5]
        assert stats.backend == LABEL
        assert stats.requests == 16 * 25 and stats.errors == 0
        if frontends > 1:
            assert len(response.frontends) == frontends
            assert sum(f.requests for f in response.frontends) == 16 * 25
            # The engine's weights and contexts are on the GPU once: only the engine
            # process (this one) has CUDA loaded; no frontend process does.
            assert _maps_cuda(os.getpid())
            assert not any(_maps_cuda(f.pid) for f in response.frontends)
        assert len(stats.workers) == 4
        assert sorted(w.profile for w in stats.workers) == [0, 0, 1, 1]
        assert sum(w.batches > 0 for w in stats.workers) >= 2
        assert stats.graph_launches > 0
        assert all(not w.capture_failures for w in stats.workers)
        for w in stats.workers:
            assert w.device == "cuda:0"
            assert w.stream_non_blocking
            assert cuda.stream_non_blocking(int(w.stream, 16))  # asked of CUDA itself
        assert len({w.stream for w in stats.workers}) == 4


def test_the_engine_on_a_core_of_its_own_serves_with_every_thread_there(
        engine: StandinEngine) -> None:
    """`server.engine_cpus` with the GPU path: this process is the engine's, so CUDA's
    own threads (started when the fixtures made their context) are pinned with the
    workers; every frontend's threads keep off that core, and answers stay exact."""
    usable = frozenset(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs two usable cores")
    core = max(usable)
    config = standin_config(workers=2, max_queue_delay_us=2000)
    try:
        with serving_standin(engine, config, frontends=2,
                             server_options={"engine_cpus": str(core)}) as server:
            rng = np.random.default_rng(7)
            with Client(server.url) as c:
                for rows in (1, 3, 8, 1):
                    x = random_rows(rng, rows)
                    out = c.infer("standin", {INPUT: x}, timeout=30)[OUTPUT]
                    assert relative_error(out, engine.reference(x)) < TOLERANCE
                response = c.stats("standin")
            assert response.models[0].requests == 4
            ours = {tid: os.sched_getaffinity(tid) for tid in cpus.threads()}
            assert all(a == {core} for a in ours.values()), ours
            for f in response.frontends:
                theirs = [os.sched_getaffinity(tid) for tid in cpus.threads(f.pid)]
                assert theirs and all(a == usable - {core} for a in theirs), theirs
    finally:
        cpus.pin_process(usable)  # the test runner's threads back on every core


def test_served_without_batching_each_request_runs_alone_with_its_shape(
        engine: StandinEngine, cuda: CudaRuntime) -> None:
    """`batching = false` on the GPU: full shapes, plain enqueues, never two requests in one."""
    config = standin_config(workers=2, max_queue_delay_us=2000, batching=False)
    failures: list[str] = []
    with serving_standin(engine, config) as server:

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with Client(server.url) as c:
                for _ in range(20):
                    x = random_rows(rng, int(rng.integers(1, 9)))
                    out = c.infer("standin", {INPUT: x}, timeout=30)[OUTPUT]
                    err = relative_error(out, engine.reference(x))
                    if out.shape != (len(x), engine.out_features) or err >= TOLERANCE:
                        failures.append(f"rows {len(x)}: shape {out.shape}, error {err}")

        threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with Client(server.url) as c:
            stats = c.stats("standin").models[0]
            metadata = c.metadata("standin")
        assert not failures, failures[:5]
        assert not stats.batching and (metadata.batching, metadata.max_batch_size) == (False, 0)
        assert stats.requests == stats.batches == 8 * 20 and stats.errors == 0
        assert stats.graph_launches == 0 and stats.plain_enqueues == stats.batches


def test_stats_busy_time_agrees_with_the_gpu(cuda: CudaRuntime) -> None:
    """Stats' busy seconds (CUDA events) against the kernels' own timestamps, and
    utilization against busy seconds over the window."""
    engine = StandinEngine(trace_capacity=1 << 21)
    config = standin_config(workers=1, max_queue_delay_us=500)
    try:
        with serving_standin(engine, config, stats_window_s=120) as server:
            engine.reset_trace()
            stop = time.monotonic() + 1.5

            def client(seed: int) -> None:
                rng = np.random.default_rng(seed)
                with Client(server.url) as c:
                    while time.monotonic() < stop:
                        c.infer("standin", {INPUT: random_rows(rng, 4)}, timeout=30)

            threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            with Client(server.url) as c:
                worker = c.stats("standin").models[0].workers[0]
        trace = engine.read_trace()
        assert 0 < len(trace) < engine.trace_capacity
        kernels_s = busy_ns(merged(trace[trace[:, 0] == int(worker.stream, 16)][:, 1:])) / 1e9
        busy_s = worker.busy_seconds
        print(f"\nbatches {worker.batches}: Stats busy {busy_s * 1e3:.1f} ms, kernels "
              f"{kernels_s * 1e3:.1f} ms, utilization {worker.utilization:.3f} over "
              f"{worker.window_seconds:.2f} s (stand-in, not TensorRT)")
        # The events are nodes of the batch's graph, next to its kernels: the busy time
        # is the kernels' plus the gaps between graph nodes, with no host time in it.
        assert worker.graph_launches == worker.batches
        assert busy_s >= 0.9 * kernels_s
        assert busy_s <= 1.1 * kernels_s + worker.batches * 10e-6
        assert worker.window_seconds < 120  # the window holds every batch
        assert worker.utilization == pytest.approx(busy_s / worker.window_seconds,
                                                   rel=0.05, abs=0.005)
    finally:
        engine.close()


def _maps_cuda(pid: int) -> bool:
    """Whether the process has the CUDA driver library mapped (a CUDA context's owner)."""
    with open(f"/proc/{pid}/maps") as f:
        return "libcuda.so" in f.read()

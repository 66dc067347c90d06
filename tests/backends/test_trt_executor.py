"""The TensorRT executor's call protocol, against recording doubles (no GPU, no TensorRT).

The doubles (service/testing/trt_double.py) log every call of the CUDA runtime and of every
execution context in one ordered list; these tests read that log.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from trtserve.service.backends.base import LoadedModel
from trtserve.service.backends.tensorrt.executor import TensorRTError, TrtExecutor
from trtserve.service.backends.tensorrt.load import (
    EngineHandle,
    EngineLoadError,
    engine_spec,
    executor_factories,
    graph_buckets,
    manifest_spec,
)
from trtserve.service.config import BuildConfig, ModelConfig
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.errors import InputRejected
from trtserve.service.testing.trt_double import Call, HostCudaRuntime, RecordingEngine, trt_module

FEATURES = 4


@pytest.fixture
def cuda() -> HostCudaRuntime:
    return HostCudaRuntime()


@pytest.fixture
def engine(cuda: HostCudaRuntime) -> RecordingEngine:
    return RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8),))


def make(engine: RecordingEngine, cuda: HostCudaRuntime, **options: object) -> TrtExecutor:
    options.setdefault("graph_batch_sizes", graph_buckets((), 8))
    return TrtExecutor(engine, cuda, trt_module=trt_module, **options)  # type: ignore[arg-type]


@pytest.fixture
def executor(engine: RecordingEngine, cuda: HostCudaRuntime) -> Iterator[TrtExecutor]:
    ex = make(engine, cuda)
    yield ex
    ex.close()


Batch = dict[str, list[np.ndarray]]


def batch(rows: int, parts: int = 1, seed: int = 0) -> tuple[Batch, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    return {"x": np.array_split(x, parts)}, x


def calls(log: list[Call], who: str | None = None, method: str | None = None) -> list[Call]:
    return [c for c in log if (who is None or c.who == who) and
            (method is None or c.method == method)]


def contexts(log: list[Call]) -> list[str]:
    return sorted({c.who for c in log if c.who.startswith("context")})


# --- results ------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("parts", [1, 3])
def test_results_are_2x_plus_1(executor: TrtExecutor, rows: int, parts: int) -> None:
    inputs, x = batch(rows, min(parts, rows), seed=rows)
    result = executor.run(inputs, rows)
    np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
    assert result.outputs["y"].shape == (rows, FEATURES)
    assert result.graph_launch is True
    assert result.capture_failure is None


def test_graph_replays_compute_fresh_inputs(executor: TrtExecutor,
                                            cuda: HostCudaRuntime) -> None:
    for seed in range(4):
        inputs, x = batch(3, seed=seed)
        np.testing.assert_array_equal(executor.run(inputs, 3).outputs["y"], 2 * x + 1)
    assert len(calls(cuda.log, "cuda", "begin_capture")) == 1  # bucket 4, captured once
    assert len(calls(cuda.log, "cuda", "graph_launch")) == 4


def test_plain_enqueue_without_graphs(engine: RecordingEngine, cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, cuda_graphs=False)
    try:
        inputs, x = batch(5)
        result = ex.run(inputs, 5)
        np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
        assert result.graph_launch is False
        assert not calls(cuda.log, "cuda", "begin_capture")
    finally:
        ex.close()


def test_results_own_their_memory(executor: TrtExecutor) -> None:
    """Outputs are copied out of the pinned staging buffer, not views of it."""
    first_inputs, first_x = batch(2, seed=1)
    first = executor.run(first_inputs, 2).outputs["y"]
    executor.run(batch(2, seed=2)[0], 2)
    np.testing.assert_array_equal(first, 2 * first_x + 1)


def test_a_batch_waits_on_its_own_event_only(executor: TrtExecutor,
                                             cuda: HostCudaRuntime) -> None:
    for _ in range(2):  # the first captures the graph
        before = len(cuda.log)
        result = executor.run(batch(2)[0], 2)
        methods = [c.method for c in cuda.log[before:]]
        assert methods.count("event_synchronize") == 1
        assert "stream_synchronize" not in methods
        assert result.compute_s >= 0 and result.input_s >= 0 and result.output_s >= 0


# --- call protocol --------------------------------------------------------------------


def test_profile_set_before_shapes_on_every_context(executor: TrtExecutor,
                                                    cuda: HostCudaRuntime,
                                                    engine: RecordingEngine) -> None:
    for rows in (1, 2, 3, 8):
        executor.run(batch(rows)[0], rows)
    assert len(contexts(cuda.log)) == 5  # plain + buckets 1, 2, 4 (3 pads to 4) and 8
    for who in contexts(cuda.log):
        methods = [c.method for c in calls(cuda.log, who)]
        first_profile = methods.index("set_optimization_profile_async")
        assert all(i > first_profile for i, m in enumerate(methods) if m == "set_input_shape")
        if "execute_async_v3" in methods:  # the plain context runs no batch here
            assert methods.index("set_device_memory") < methods.index("execute_async_v3")
    assert engine.violations == []


def test_profile_is_the_workers_own_on_its_own_stream(cuda: HostCudaRuntime) -> None:
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 2, 4), (4, 8, 16)))
    ex = make(engine, cuda, profile=1)
    try:
        ex.run(batch(6)[0], 6)
        stream = int(ex.info.stream, 16)
        for call in calls(cuda.log, method="set_optimization_profile_async"):
            assert call.args == (1, stream)
        assert ex.info.profile == 1
        assert (ex.info.min_batch_size, ex.info.max_batch_size) == (4, 16)
        assert ex.info.device == "cuda:0"
    finally:
        ex.close()


def test_every_io_tensor_address_set_before_execution(engine: RecordingEngine,
                                                      cuda: HostCudaRuntime) -> None:
    executor = make(engine, cuda, graph_batch_sizes=(1, 4))
    for rows in (1, 3, 7):  # 7 has no bucket: the plain context runs too
        executor.run(batch(rows)[0], rows)
    device = set(cuda.device_buffers)
    for who in contexts(cuda.log):
        log = calls(cuda.log, who)
        if not calls(log, method="execute_async_v3"):
            continue
        first_run = next(i for i, c in enumerate(log) if c.method == "execute_async_v3")
        addresses = {c.args[0]: c.args[1] for c in log[:first_run]
                     if c.method == "set_tensor_address"}
        assert set(addresses) == {"x", "y"}, who
        assert addresses["x"] != addresses["y"]
        assert set(addresses.values()) <= device
    # Every context points at the same buffers.
    per_context = {tuple(sorted(c.args for c in calls(cuda.log, who, "set_tensor_address")))
                   for who in contexts(cuda.log)}
    assert len(per_context) == 1
    executor.close()


def test_one_plain_enqueue_after_the_shape_change_before_capture(
        executor: TrtExecutor, cuda: HostCudaRuntime) -> None:
    executor.run(batch(3)[0], 3)
    graph_context = contexts(cuda.log)[1]  # context 0 is the plain one
    sequence = [(c.method, c.args[-1] if c.method == "execute_async_v3" else None)
                for c in cuda.log
                if (c.who == graph_context and c.method in ("set_input_shape",
                                                            "execute_async_v3"))
                or (c.who == "cuda" and c.method in ("begin_capture", "end_capture"))]
    assert sequence == [
        ("set_input_shape", None),
        ("execute_async_v3", False),  # not capturing: the warm-up enqueue
        ("begin_capture", None),
        ("execute_async_v3", True),  # captured
        ("end_capture", None),
    ]
    shape = calls(cuda.log, graph_context, "set_input_shape")[0].args
    assert shape == ("x", (4, FEATURES))  # padded up to the bucket


def test_one_context_per_graph_all_sharing_one_memory_block(
        executor: TrtExecutor, cuda: HostCudaRuntime, engine: RecordingEngine) -> None:
    for rows in (1, 2, 3, 4, 5, 8, 2, 1):
        executor.run(batch(rows)[0], rows)
    # Buckets 1, 2, 4, 8 were used: four graphs, four contexts for them plus the plain one.
    assert len(calls(cuda.log, "cuda", "graph_instantiate")) == 4
    assert engine.created == 5
    memory = {c.args for c in calls(cuda.log, method="set_device_memory")}
    assert len(memory) == 1
    (ptr, size), = memory
    assert size == engine.get_device_memory_size_for_profile_v2(0)
    assert ptr in cuda.device_buffers
    for call in calls(cuda.log, method="create"):
        assert call.args[0] is trt_module.ExecutionContextAllocationStrategy.USER_MANAGED


def test_aux_streams_are_non_blocking_and_given_to_every_context(
        cuda: HostCudaRuntime) -> None:
    engine = RecordingEngine(cuda, FEATURES, num_aux_streams=2)
    ex = make(engine, cuda)
    try:
        ex.run(batch(3)[0], 3)
        main = int(ex.info.stream, 16)
        given = calls(cuda.log, method="set_aux_streams")
        assert len(given) == len(contexts(cuda.log)) == 2
        aux = given[0].args[0]
        assert all(c.args[0] == aux for c in given)
        assert len(aux) == 2 and main not in aux and len(set(aux)) == 2
        assert all(cuda.streams[s] for s in (*aux, main))  # cudaStreamNonBlocking
        assert ex.info.aux_streams == 2 and ex.info.stream_non_blocking
    finally:
        ex.close()
    assert cuda.streams == {}


def test_no_aux_streams_when_the_engine_has_none(executor: TrtExecutor,
                                                 cuda: HostCudaRuntime) -> None:
    executor.run(batch(1)[0], 1)
    assert not calls(cuda.log, method="set_aux_streams")
    assert executor.info.aux_streams == 0


def test_set_input_shape_only_when_the_shape_changes(engine: RecordingEngine,
                                                     cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, cuda_graphs=False)
    try:
        opened = len(cuda.log)
        for rows in (3, 3, 5, 5, 5, 3):
            ex.run(batch(rows)[0], rows)
        shapes = [c.args[1][0] for c in calls(cuda.log[opened:], method="set_input_shape")]
        assert shapes == [3, 5, 3]
        assert len(calls(cuda.log[opened:], method="execute_async_v3")) == 6
    finally:
        ex.close()


def test_graphs_set_no_shapes_after_capture(executor: TrtExecutor,
                                            cuda: HostCudaRuntime) -> None:
    executor.run(batch(3)[0], 3)
    captured = len(cuda.log)
    for rows in (3, 4, 3):
        executor.run(batch(rows)[0], rows)
    assert not calls(cuda.log[captured:], method="set_input_shape")
    assert not calls(cuda.log[captured:], method="execute_async_v3")


def test_batches_beyond_every_bucket_use_plain_enqueue(engine: RecordingEngine,
                                                       cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, graph_batch_sizes=(1, 2))
    try:
        inputs, x = batch(6)
        result = ex.run(inputs, 6)
        assert result.graph_launch is False
        np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
    finally:
        ex.close()


# --- graphs captured at start (the serving path) -------------------------------------------


def test_a_serving_executor_captures_every_bucket_at_start(engine: RecordingEngine,
                                                           cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, capture_at_start=True)
    try:
        started = len(cuda.log)
        assert len(calls(cuda.log, "cuda", "begin_capture")) == 4  # buckets 1, 2, 4, 8
        for rows in (1, 2, 3, 5, 8):
            inputs, x = batch(rows, seed=rows)
            result = ex.run(inputs, rows)
            np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
            assert result.graph_launch is True and result.capture_failure is None
        # No batch waited for a capture.
        assert not calls(cuda.log[started:], "cuda", "begin_capture")
    finally:
        ex.close()
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


def test_capture_failures_at_start_are_reported_with_the_first_batches(
        engine: RecordingEngine, cuda: HostCudaRuntime) -> None:
    cuda.fail_end_capture = "cudaErrorStreamCaptureInvalidated"
    ex = make(engine, cuda, capture_at_start=True)
    try:
        captures = len(calls(cuda.log, "cuda", "begin_capture"))
        cuda.fail_end_capture = None
        reported = []
        for seed in range(5):
            inputs, x = batch(3, seed=seed)
            result = ex.run(inputs, 3)
            np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
            assert result.graph_launch is False  # bucket 4 failed at start: plain enqueue
            if result.capture_failure is not None:
                reported.append(result.capture_failure)
        # One report per bucket, each once, with CUDA's reason; none captured again.
        assert [bucket for bucket, _ in reported] == [1, 2, 4, 8]
        assert all("cudaErrorStreamCaptureInvalidated" in why for _, why in reported)
        assert len(calls(cuda.log, "cuda", "begin_capture")) == captures
    finally:
        ex.close()


async def test_capture_failures_at_start_show_in_stats_before_any_batch(
        cuda: HostCudaRuntime) -> None:
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8),))
    handle = EngineHandle(engine)  # type: ignore[arg-type]
    config = ModelConfig(name="double", path="double.engine", backend="tensorrt", workers=2)
    cuda.fail_end_capture = "cudaErrorStreamCaptureUnsupported"
    loaded = LoadedModel(engine_spec(engine, "double"),  # type: ignore[arg-type]
                         executor_factories(handle, cuda, 2, (2, 8), True, trt_module, "double"),
                         handle.close)
    runtime = ModelRuntime(config, loaded)
    await runtime.start()
    try:
        for stats in runtime.worker_stats:
            assert stats.batches == 0
            assert [f.batch_size for f in stats.capture_failures] == [2, 8]
            assert all("cudaErrorStreamCaptureUnsupported" in f.reason
                       for f in stats.capture_failures)
        # A batch still runs (plain enqueue), and reports nothing twice.
        cuda.fail_end_capture = None
        out = await runtime.infer({"x": np.ones((2, FEATURES), np.float32)})
        np.testing.assert_array_equal(out["y"], np.full((2, FEATURES), 3, np.float32))
        assert sum(len(s.capture_failures) for s in runtime.worker_stats) == 4
        assert sum(s.graph_launches for s in runtime.worker_stats) == 0
    finally:
        await runtime.stop()


# --- capture failures -------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "fail_end", "reason"), [
    ("false", None, "execute_async_v3 returned False"),
    ("raise", None, "execute_async_v3 raised RuntimeError"),
    ("ok", "cudaErrorStreamCaptureInvalidated", "cudaErrorStreamCaptureInvalidated"),
])
def test_capture_failure_falls_back_to_plain_enqueue_and_says_why(
        engine: RecordingEngine, cuda: HostCudaRuntime, behaviour: str,
        fail_end: str | None, reason: str) -> None:
    engine.capture_behaviour = behaviour
    cuda.fail_end_capture = fail_end
    ex = make(engine, cuda)
    try:
        inputs, x = batch(3)
        first = ex.run(inputs, 3)
        np.testing.assert_array_equal(first.outputs["y"], 2 * x + 1)
        assert first.graph_launch is False
        assert first.capture_failure is not None
        bucket, why = first.capture_failure
        assert bucket == 4 and reason in why
        assert cuda.capturing == {}  # the capture was ended
        assert cuda.graphs == {} and cuda.graph_execs == {}
        # Tried with copies and events in the graph, then with the engine's work alone.
        assert len(calls(cuda.log, "cuda", "begin_capture")) == 2
        # Reported once; the bucket is not captured again.
        inputs, x = batch(4, seed=1)
        second = ex.run(inputs, 4)
        np.testing.assert_array_equal(second.outputs["y"], 2 * x + 1)
        assert second.capture_failure is None and second.graph_launch is False
        assert len(calls(cuda.log, "cuda", "begin_capture")) == 2
        # Other buckets still get graphs.
        engine.capture_behaviour = "ok"
        cuda.fail_end_capture = None
        third = ex.run(batch(2)[0], 2)
        assert third.graph_launch is True
    finally:
        ex.close()
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


def test_one_launch_per_batch_with_copies_and_events_in_the_graph(
        executor: TrtExecutor, cuda: HostCudaRuntime) -> None:
    executor.run(batch(3)[0], 3)
    begin = max(i for i, c in enumerate(cuda.log) if c.method == "begin_capture")
    end = max(i for i, c in enumerate(cuda.log) if c.method == "end_capture")
    captured = [c.method for c in cuda.log[begin + 1:end]
                if c.who == "cuda" or c.method == "execute_async_v3"]
    assert captured == ["event_record", "memcpy_h2d_async", "event_record", "execute_async_v3",
                        "event_record", "memcpy_d2h_async", "event_record"]
    assert all(c.args[-1] is True for c in cuda.log[begin:end] if c.method == "event_record")
    # The padded bucket travels: 4 rows in, 4 rows out.
    assert [c.args[1] for c in cuda.log[begin:end] if c.method.startswith("memcpy")] == \
        [4 * FEATURES * 4, 4 * FEATURES * 4]
    assert cuda.capture_problems == []
    before = len(cuda.log)
    inputs, x = batch(3, seed=5)
    result = executor.run(inputs, 3)
    np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
    assert [c.method for c in cuda.log[before:]] == ["graph_launch", "event_synchronize"]


def test_without_graph_io_the_graph_holds_the_engine_work_alone(
        engine: RecordingEngine, cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, graph_io=False)
    try:
        ex.run(batch(3)[0], 3)
        before = len(cuda.log)
        inputs, x = batch(3, seed=6)
        result = ex.run(inputs, 3)
        np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
        assert result.graph_launch is True
        assert [c.method for c in cuda.log[before:]] == [
            "event_record", "memcpy_h2d_async", "event_record", "graph_launch",
            "event_record", "memcpy_d2h_async", "event_record", "event_synchronize"]
        h2d = next(c for c in cuda.log[before:] if c.method == "memcpy_h2d_async")
        assert h2d.args[1] == 3 * FEATURES * 4  # only the batch's rows
    finally:
        ex.close()


def test_copies_refused_in_capture_leave_a_graph_of_the_engine_work(
        engine: RecordingEngine, cuda: HostCudaRuntime,
        caplog: pytest.LogCaptureFixture) -> None:
    cuda.refuse_in_capture = {"memcpy_h2d_async"}
    ex = make(engine, cuda)
    try:
        inputs, x = batch(3)
        result = ex.run(inputs, 3)
        np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
        assert result.graph_launch is True and result.capture_failure is None
        assert "refused" in caplog.text and "cudaErrorStreamCaptureUnsupported" in caplog.text
        assert cuda.capturing == {} and len(cuda.graphs) == 1
        before = len(cuda.log)
        ex.run(batch(3, seed=1)[0], 3)
        assert "memcpy_h2d_async" in [c.method for c in cuda.log[before:]]
    finally:
        ex.close()
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


# --- failures that must be loud ---------------------------------------------------------


def test_execute_returning_false_raises(engine: RecordingEngine,
                                        cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda, cuda_graphs=False)
    try:
        engine.execute_result = False
        with pytest.raises(TensorRTError, match="execute_async_v3 returned False"):
            ex.run(batch(2)[0], 2)
    finally:
        ex.close()


def test_warm_up_enqueue_returning_false_raises(engine: RecordingEngine,
                                                cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda)
    try:
        engine.execute_result = False
        with pytest.raises(TensorRTError, match="execute_async_v3 returned False"):
            ex.run(batch(2)[0], 2)
    finally:
        ex.close()


def test_profile_returning_false_raises_and_frees_what_was_made(
        engine: RecordingEngine, cuda: HostCudaRuntime) -> None:
    engine.profile_result = False
    with pytest.raises(TensorRTError, match="set_optimization_profile_async"):
        make(engine, cuda)
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


def test_shape_outside_the_profile_raises(executor: TrtExecutor) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TensorRTError, match=r"input 'x' of shape \[9, 4\] is outside"):
        executor.run({"x": [rng.standard_normal((9, FEATURES)).astype(np.float32)]}, 9)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_shapes_tensorrt_refuses_are_the_inputs_fault(engine: RecordingEngine,
                                                      cuda: HostCudaRuntime,
                                                      cuda_graphs: bool) -> None:
    """set_input_shape returning False for a shape inside the profile is InputRejected;
    the executor keeps serving, and a refused shape is refused again (never stale)."""
    ex = make(engine, cuda, cuda_graphs=cuda_graphs, graph_batch_sizes=(2, 4, 8))
    try:
        engine.refused_rows = {4}
        for _ in range(2):
            with pytest.raises(InputRejected, match=r"set_input_shape\('x', \[4, 4\]\)"):
                ex.run(batch(4)[0], 4)
            inputs, x = batch(2, seed=1)
            np.testing.assert_array_equal(ex.run(inputs, 2).outputs["y"], 2 * x + 1)
    finally:
        ex.close()


def test_outputs_tensorrt_cannot_resolve_are_the_inputs_fault_and_never_stale(
        engine: RecordingEngine, cuda: HostCudaRuntime) -> None:
    """infer_shapes failing after set_input_shape took the shape: InputRejected, and the
    same shape again is set and checked again, not run with the last batch's outputs."""
    ex = make(engine, cuda, cuda_graphs=False)
    try:
        inputs, x = batch(2, seed=2)
        ex.run(inputs, 2)
        engine.unresolved_rows = {3}
        for _ in range(2):
            with pytest.raises(InputRejected, match=r"infer_shapes could not resolve \['y'\]"):
                ex.run(batch(3)[0], 3)
        assert not calls(engine.log, method="execute_async_v3")[1:]  # only the good batch
        np.testing.assert_array_equal(ex.run(inputs, 2).outputs["y"], 2 * x + 1)
    finally:
        ex.close()


def test_missing_input_raises(executor: TrtExecutor) -> None:
    with pytest.raises(TensorRTError, match="lacks inputs"):
        executor.run({}, 1)


# --- teardown ---------------------------------------------------------------------------


def test_close_frees_everything_in_order(engine: RecordingEngine,
                                         cuda: HostCudaRuntime) -> None:
    ex = make(engine, cuda)
    for rows in (1, 3, 8):
        ex.run(batch(rows)[0], rows)
    closing = len(cuda.log)
    ex.close()
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)
    assert len(engine.live_contexts) == 0
    order = [c.method for c in cuda.log[closing:]]

    def last(method: str) -> int:
        return max(i for i, m in enumerate(order) if m == method)

    def first(method: str) -> int:
        return order.index(method)

    assert first("stream_synchronize") == 0
    assert last("graph_destroy") < first("released")
    assert last("released") < first("free")
    assert last("free") < first("stream_destroy")
    ex.close()  # again: nothing left to free, nothing raised
    with pytest.raises(TensorRTError, match="closed"):
        ex.run(batch(1)[0], 1)


def test_host_staging_is_cleared_before_use(engine: RecordingEngine,
                                            cuda: HostCudaRuntime) -> None:
    """Rows padded up to a bucket are zeros at first, never left-over garbage."""
    ex = make(engine, cuda)
    try:
        assert all((b == 0).all() for b in cuda.host_buffers.values())
    finally:
        ex.close()


# --- wiring ------------------------------------------------------------------------------


def test_graph_buckets() -> None:
    assert graph_buckets((), 64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets((), 48) == (1, 2, 4, 8, 16, 32, 48)
    assert graph_buckets((8, 1, 32), 64) == (1, 8, 32)


def test_factories_are_profile_major(cuda: HostCudaRuntime) -> None:
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 2, 4), (1, 4, 8)))
    factories = executor_factories(EngineHandle(engine), cuda, 2, (1, 2, 4, 8), True,  # type: ignore[arg-type]
                                   trt_module, "m")
    executors = [f() for f in factories]
    try:
        assert [e.info.profile for e in executors] == [0, 0, 1, 1]
        assert [e.info.max_batch_size for e in executors] == [4, 4, 8, 8]
        assert len({e.info.stream for e in executors}) == 4
    finally:
        for e in executors:
            e.close()


def test_released_engine_handle_refuses_new_executors(cuda: HostCudaRuntime,
                                                      engine: RecordingEngine) -> None:
    handle = EngineHandle(engine)  # type: ignore[arg-type]
    factory = executor_factories(handle, cuda, 1, (), True, trt_module, "m")[0]
    handle.close()
    with pytest.raises(EngineLoadError, match="released"):
        factory()


def test_engine_spec(cuda: HostCudaRuntime) -> None:
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 2, 4), (2, 8, 16)))
    spec = engine_spec(engine, "m")  # type: ignore[arg-type]
    assert spec.backend == "tensorrt" and spec.platform == "tensorrt_plan"
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("x", "FP32", (-1, 4))]
    assert [(t.name, t.dtype, t.shape) for t in spec.outputs] == [("y", "FP32", (-1, 4))]
    assert (spec.min_batch_size, spec.max_batch_size) == (1, 16)
    assert [p.ranges["x"] for p in spec.profiles] == [((1, 4), (2, 4), (4, 4)),
                                                      ((2, 4), (8, 4), (16, 4))]


async def test_served_through_model_runtime(cuda: HostCudaRuntime) -> None:
    """The executor behind the real batcher, scheduler and workers: 2 profiles x 2."""
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8), (1, 4, 8)))
    spec = engine_spec(engine, "double")  # type: ignore[arg-type]
    handle = EngineHandle(engine)  # type: ignore[arg-type]
    config = ModelConfig(name="double", path="double.engine", backend="tensorrt", workers=2,
                         max_queue_delay_us=2000)
    loaded = LoadedModel(spec, executor_factories(handle, cuda, 2, graph_buckets((), 8), True,
                                                  trt_module, "double"), handle.close)
    runtime = ModelRuntime(config, loaded)
    await runtime.start()
    try:
        import asyncio

        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((1 + i % 3, FEATURES)).astype(np.float32) for i in range(40)]
        outs = await asyncio.gather(*(runtime.infer({"x": x}) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out["y"], 2 * x + 1)
        assert sum(s.graph_launches for s in runtime.worker_stats) > 0
        assert all(s.info.stream_non_blocking for s in runtime.worker_stats)
        assert [s.info.profile for s in runtime.worker_stats] == [0, 0, 1, 1]
    finally:
        await runtime.stop()
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


# --- loading a real engine (TensorRT-RTX builds on the CPU) ------------------------------


def _rtx_available() -> bool:
    try:
        from trtserve.service.backends.tensorrt.api import import_tensorrt

        import_tensorrt()
    except RuntimeError:
        return False
    return True


needs_trt = pytest.mark.skipif(not _rtx_available(), reason="needs tensorrt or tensorrt_rtx")


@pytest.fixture(scope="module")
def built_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtserve.service.build.build import BuildOptions, build_engine
    from trtserve.service.testing.onnx_models import mlp

    folder = tmp_path_factory.mktemp("engine")
    onnx_path = mlp(folder / "mlp.onnx", in_features=32, out_features=8)
    engine_path = folder / "mlp.engine"
    build_engine(onnx_path, engine_path, BuildOptions(profiles=2, batch=(1, 32, 64)))
    return engine_path


@needs_trt
def test_spec_from_the_manifest_of_a_real_engine(built_engine: Path) -> None:
    """TensorRT-RTX engines cannot be deserialized without a GPU (checked: the runtime
    needs a CUDA driver), so on the CPU the spec is read from the build manifest."""
    from trtserve.service.build.build import load_manifest

    spec = manifest_spec(load_manifest(built_engine), "mlp")
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("input", "FP32", (-1, 32))]
    assert [(t.name, t.dtype, t.shape) for t in spec.outputs] == [("output", "FP32", (-1, 8))]
    assert len(spec.profiles) == 2
    assert all(p.ranges["input"] == ((1, 32), (32, 32), (64, 32)) for p in spec.profiles)
    assert (spec.min_batch_size, spec.max_batch_size) == (1, 64)


@needs_trt
def test_load_says_a_gpu_is_needed(built_engine: Path) -> None:
    from trtserve.service.backends.tensorrt import load as tensorrt
    from trtserve.service.backends.tensorrt.api import gpu_present

    if gpu_present():
        pytest.skip("this machine has a GPU: load() would deserialize the engine")
    config = ModelConfig(name="mlp", path=str(built_engine))
    with pytest.raises(EngineLoadError, match="needs an NVIDIA GPU"):
        tensorrt.load(config, built_engine)


@needs_trt
def test_load_builds_an_onnx_model_first_with_its_timing_cache(tmp_path: Path) -> None:
    from trtserve.service.backends.tensorrt import load as tensorrt
    from trtserve.service.backends.tensorrt.api import gpu_present
    from trtserve.service.build import serving
    from trtserve.service.build.build import load_manifest
    from trtserve.service.testing.onnx_models import mlp

    onnx_path = mlp(tmp_path / "m.onnx", in_features=16, out_features=4)
    config = ModelConfig(name="m", path=str(onnx_path), backend="tensorrt", max_batch_size=32,
                         build=BuildConfig(profiles=2))
    engine = serving.engine_for(config)
    assert engine == tmp_path / "m.engine" and engine.is_file()
    manifest = load_manifest(engine)
    cache = manifest["timing_cache"]
    assert cache["path"] == str(tmp_path / "m.timing-cache")
    # A library that ignores timing caches (tensorrt_rtx) gets no file written.
    assert (tmp_path / "m.timing-cache").is_file() == (cache["status"] != "ignored")
    assert [p["inputs"]["input"]["max"] for p in manifest["profiles"]] == [[32, 16], [32, 16]]
    built = engine.stat().st_mtime_ns
    time.sleep(0.01)
    assert serving.engine_for(config) == engine
    assert engine.stat().st_mtime_ns == built  # same options, same library: reused
    changed = dataclasses.replace(config, build=BuildConfig(profiles=1))
    serving.engine_for(changed)
    assert engine.stat().st_mtime_ns != built
    assert len(load_manifest(engine)["profiles"]) == 1
    if not gpu_present():
        with pytest.raises(EngineLoadError, match="needs an NVIDIA GPU"):
            tensorrt.load(config, serving.engine_for(config))

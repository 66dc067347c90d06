"""TensorRT engines built without a batch dimension: described, validated and run as given.

The executor runs on the CPU doubles (service/testing/trt_double.py) with a static-shape
engine; real engines are built with TensorRT-RTX where it is installed, and read
back from their build manifest (they cannot be deserialized without a GPU).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from trtserve.service.backends.base import LoadedModel
from trtserve.service.backends.tensorrt.executor import TrtExecutor
from trtserve.service.backends.tensorrt.load import (
    EngineHandle,
    engine_spec,
    executor_factories,
    manifest_spec,
)
from trtserve.service.config import ModelConfig
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.errors import ConfigError, TensorError
from trtserve.service.testing import onnx_models
from trtserve.service.testing.trt_double import HostCudaRuntime, RecordingEngine, trt_module

FEATURES = 4
# No batch dimension at all (a scalar, a vector), and a fixed one.
STATIC_SHAPES = [(), (FEATURES,), (3, FEATURES)]


@pytest.fixture
def cuda() -> HostCudaRuntime:
    return HostCudaRuntime()


@pytest.mark.parametrize("shape", STATIC_SHAPES)
def test_an_engine_without_a_batch_dimension_does_not_batch(cuda, shape):
    engine = RecordingEngine(cuda, FEATURES, static_shape=shape)
    spec = engine_spec(engine, "m")  # type: ignore[arg-type]
    assert not spec.batching
    assert (spec.min_batch_size, spec.max_batch_size) == (1, 1)
    assert [(t.name, t.shape) for t in spec.inputs + spec.outputs] == [("x", shape), ("y", shape)]
    with pytest.raises(ConfigError, match=r"models\.m\.batching: got true.*tensor 'x'"):
        engine_spec(engine, "m", batching_mode=True)  # type: ignore[arg-type]


def test_a_batching_engine_can_be_told_not_to(cuda):
    engine = RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8),))
    assert engine_spec(engine, "m").batching  # type: ignore[arg-type]
    spec = engine_spec(engine, "m", batching_mode=False)  # type: ignore[arg-type]
    assert not spec.batching and spec.profiles[0].ranges["x"] == ((1, 4), (4, 4), (8, 4))


def test_the_executor_runs_full_shapes_with_plain_enqueues(cuda):
    engine = RecordingEngine(cuda, FEATURES, static_shape=(3, FEATURES))
    executor = TrtExecutor(engine, cuda, trt_module=trt_module,  # type: ignore[arg-type]
                           graph_batch_sizes=(1, 2, 4), batching=False, capture_at_start=True)
    try:
        assert (executor.info.min_batch_size, executor.info.max_batch_size) == (1, 1)
        assert executor.info.capture_failures == ()
        x = np.arange(3 * FEATURES, dtype=np.float32).reshape(3, FEATURES)
        result = executor.run({"x": [x]}, 1)
        assert result.graph_launch is False  # graph buckets pad dimension 0: none here
        np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
    finally:
        executor.close()
    assert engine.violations == []


@pytest.mark.parametrize("shape", [(), (3, FEATURES)])
async def test_served_through_model_runtime_one_request_per_execution(cuda, shape):
    engine = RecordingEngine(cuda, FEATURES, static_shape=shape)
    spec = engine_spec(engine, "double")  # type: ignore[arg-type]
    handle = EngineHandle(engine)  # type: ignore[arg-type]
    config = ModelConfig(name="double", path="double.engine", backend="tensorrt", workers=2,
                         max_queue_delay_us=2000)
    factories = executor_factories(handle, cuda, 2, (1, 2, 4), True, trt_module, "double",
                                   batching=spec.batching)
    runtime = ModelRuntime(config, LoadedModel(spec, factories, handle.close))
    await runtime.start()
    try:
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(24)]
        outs = await asyncio.gather(*(runtime.infer({"x": x}) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            assert out["y"].shape == shape
            np.testing.assert_array_equal(out["y"], 2 * x + 1)
        stats = runtime.worker_stats
        assert sum(s.batches for s in stats) == len(xs)  # never two requests in one
        assert sum(s.graph_launches for s in stats) == 0
        wrong = np.zeros((*shape, 1), np.float32)
        with pytest.raises(TensorError, match="'x'"):
            await runtime.infer({"x": wrong})
    finally:
        await runtime.stop()
    assert engine.violations == []
    assert cuda.live() == dict.fromkeys(cuda.live(), 0)


# --- real engines (TensorRT-RTX builds on the CPU) -----------------------------------------


def _rtx_available() -> bool:
    try:
        from trtserve.service.backends.tensorrt.api import import_tensorrt

        import_tensorrt()
    except RuntimeError:
        return False
    return True


needs_trt = pytest.mark.skipif(not _rtx_available(), reason="needs tensorrt or tensorrt_rtx")


@needs_trt
def test_a_real_vad_engine_is_built_and_described_as_not_batching(tmp_path: Path) -> None:
    """The VAD model's scalar input and its batch on axis 1 of the state, built for real."""
    from trtserve.service.build.build import BuildOptions, build_engine, load_manifest

    onnx_path = onnx_models.vad(tmp_path / "vad.onnx")
    engine_path = tmp_path / "vad.engine"
    build_engine(onnx_path, engine_path, BuildOptions(
        batch=(1, 4, 16), shapes={"state": ((2, 1, 128), (2, 4, 128), (2, 16, 128))}))
    spec = manifest_spec(load_manifest(engine_path), "vad")
    assert not spec.batching
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [
        ("audio", "FP32", (-1, 512)), ("state", "FP32", (2, -1, 128)), ("sr", "INT64", ())]
    assert [(t.name, t.shape) for t in spec.outputs] == [("prob", (-1, 1)),
                                                        ("new_state", (2, -1, 128))]
    assert spec.profiles[0].ranges["sr"] == ((), (), ())
    assert spec.profiles[0].accepts({"audio": (3, 512), "state": (2, 3, 128), "sr": ()})


def test_kserve_config_of_an_engine_without_a_batch_dimension(cuda):
    from trtserve.service.frontends import kserve_model_config

    engine = RecordingEngine(cuda, FEATURES, static_shape=(1, FEATURES))
    spec = engine_spec(engine, "fixed")  # type: ignore[arg-type]
    factories = executor_factories(EngineHandle(engine), cuda, 1, (1, 2),  # type: ignore[arg-type]
                                   True, trt_module, "fixed", batching=spec.batching)
    config = ModelConfig(name="fixed", path="fixed.plan", backend="tensorrt", workers=1,
                         graph_batch_sizes=(1, 2))
    described = kserve_model_config.model_config(
        ModelRuntime(config, LoadedModel(spec, factories)).description())
    assert described.max_batch_size == 0
    assert [list(i.dims) for i in described.input] == [[1, FEATURES]]
    assert [list(o.dims) for o in described.output] == [[1, FEATURES]]
    assert described.WhichOneof("scheduling_choice") is None
    # Graph buckets pad dimension 0, which this engine has not: it runs plain enqueues.
    assert not described.optimization.cuda.graphs
    assert list(described.optimization.cuda.graph_spec) == []

"""TensorRT models: one deserialized engine, one `TrtExecutor` per worker.

`load` deserializes the engine once (for an .onnx model, the one that
service/build/serving.py built with the model's build options and timing cache;
serving never imports the build), so every worker's contexts share
the engine's weights on the GPU, and hands out one executor factory per worker,
profile-major: `workers` factories for profile 0, then as many for profile 1...
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtserve.service.backends.base import (
    Executor,
    ExecutorFactory,
    LoadedModel,
    ModelSpec,
    ProfileSpec,
    check_unbatched_config,
    decide_batching,
)
from trtserve.service.backends.tensorrt.api import (
    IOTensor,
    engine_io,
    gc_paused,
    gpu_present,
    import_tensorrt,
    library_info,
    profile_shapes,
)
from trtserve.service.backends.tensorrt.cuda import CudaRuntime
from trtserve.service.backends.tensorrt.executor import Shape, TrtExecutor
from trtserve.service.config import ModelConfig
from trtserve.service.errors import StartError
from trtserve.service.tensors import TensorSpec

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


_WIRE_DTYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
}


class EngineLoadError(StartError, RuntimeError):
    """An engine could not be loaded for serving; the message names the model."""



# ---------------------------------------------------------------------------------
# The model's description


def model_spec(
    io_tensors: Sequence[IOTensor],
    wire_dtypes: Mapping[str, str],
    profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]],
    model: str,
    batching_mode: bool | str = "auto",
) -> ModelSpec:
    """A ModelSpec from an engine's IO tensors and its profiles' (min, opt, max) shapes.

    The engine batches (the server stacks requests along dimension 0 and splits
    outputs along it) when every IO tensor has a dynamic dimension 0 and
    `batching_mode` (the model's `batching` key) allows it. An engine built
    without a batch dimension (a scalar, a fixed or non-leading batch) runs each
    request alone with its full shapes.
    """
    profile_specs = tuple(ProfileSpec(i, dict(shapes)) for i, shapes in enumerate(profiles))
    if not profile_specs:
        raise EngineLoadError(f"model '{model}': the engine has no optimization profile")
    inputs = tuple(
        TensorSpec(t.name, wire_dtypes[t.name], t.shape) for t in io_tensors if t.mode == "input"
    )
    outputs = tuple(
        TensorSpec(t.name, wire_dtypes[t.name], t.shape) for t in io_tensors if t.mode == "output"
    )
    batching = decide_batching(batching_mode, inputs + outputs, model)
    if batching:
        max_batch = max(p.max_batch or 1 for p in profile_specs)
        min_batch = min(p.min_batch for p in profile_specs)
    else:
        max_batch = min_batch = 1  # a batch is one request
    return ModelSpec(
        backend="tensorrt",
        platform="tensorrt_plan",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        min_batch_size=min_batch,
        profiles=profile_specs,
        batching=batching,
        device_io=True,
    )


def engine_spec(engine: trt.ICudaEngine, model: str,
                batching_mode: bool | str = "auto") -> ModelSpec:
    """The ModelSpec of a deserialized engine (or anything with its tensor API)."""
    io_tensors = engine_io(engine)
    wire = {}
    for tensor in io_tensors:
        name = engine.get_tensor_dtype(tensor.name).name
        if name not in _WIRE_DTYPES:
            raise EngineLoadError(
                f"model '{model}': tensor '{tensor.name}' has TensorRT type {name}, which "
                f"the wire format cannot carry (supported: {sorted(_WIRE_DTYPES)})"
            )
        wire[tensor.name] = _WIRE_DTYPES[name]
    profiles = [profile_shapes(engine, i) for i in range(engine.num_optimization_profiles)]
    return model_spec(io_tensors, wire, profiles, model, batching_mode)


def graph_buckets(configured: Iterable[int], max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a CUDA graph: the configured ones, else powers of two up to
    `max_batch` and `max_batch` itself (so every batch size has a bucket)."""
    sizes = set(configured)
    if not sizes:
        sizes = {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch}
        sizes.add(max_batch)
    return tuple(sorted(sizes))


# ---------------------------------------------------------------------------------
# Loading


class EngineHandle:
    """The deserialized engine (and the runtime that made it), shared by a model's workers.

    Executor factories reach the engine through the handle, so `close()` (called when
    the model unloads, after its workers have closed their contexts) really drops
    the last references: engine first, then runtime.
    """

    def __init__(self, engine: trt.ICudaEngine, runtime: Any = None, logger: Any = None) -> None:
        self._engine: trt.ICudaEngine | None = engine
        self._runtime = runtime
        self._logger = logger

    @property
    def engine(self) -> trt.ICudaEngine:
        if self._engine is None:
            raise EngineLoadError("the engine was released (the model has been unloaded)")
        return self._engine

    def close(self) -> None:
        self._engine = None
        self._runtime = None


def executor_factories(
    handle: EngineHandle,
    cuda: CudaRuntime,
    workers_per_profile: int,
    graph_batch_sizes: Sequence[int],
    cuda_graphs: bool,
    trt_module: types.ModuleType | Any,
    model: str,
    batching: bool = True,
) -> list[ExecutorFactory]:
    """One factory per worker, profile-major (ModelRuntime assigns profiles that way)."""
    factories: list[ExecutorFactory] = []
    for profile in range(handle.engine.num_optimization_profiles):
        for worker in range(workers_per_profile):
            index = profile * workers_per_profile + worker

            def factory(profile: int = profile, index: int = index) -> Executor:
                return TrtExecutor(
                    handle.engine, cuda, profile=profile, graph_batch_sizes=graph_batch_sizes,
                    cuda_graphs=cuda_graphs, trt_module=trt_module,
                    name=f"{model} worker {index} (profile {profile})",
                    capture_at_start=True, batching=batching,
                )

            factories.append(factory)
    return factories


class _TrtLogger:
    """Forwards TensorRT's messages to logging; keeps the errors to explain a failure."""

    def __init__(self, trt_module: types.ModuleType, model: str) -> None:
        self.errors: list[str] = []
        errors = self.errors
        levels = {"INTERNAL_ERROR": logging.ERROR, "ERROR": logging.ERROR,
                  "WARNING": logging.WARNING, "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG}

        class Logger(trt_module.ILogger):  # type: ignore[name-defined]
            def __init__(self) -> None:
                trt_module.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = levels.get(severity.name, logging.INFO)
                if level >= logging.ERROR:
                    errors.append(msg)
                log.log(level, "model '%s': TensorRT: %s", model, msg)

        self.logger = Logger()


def load(config: ModelConfig, engine_path: Path) -> LoadedModel:
    """Deserialize the model's engine once and hand out one executor factory per worker.

    `engine_path`: the engine file to serve, which for an .onnx model the build
    package has built first (service/build/serving.py: `engine_for`).
    """
    trt_module = import_tensorrt()
    if not engine_path.is_file():
        raise EngineLoadError(f"model '{config.name}': engine not found: {engine_path}")
    if not gpu_present():
        raise EngineLoadError(
            f"model '{config.name}': serving a TensorRT engine needs an NVIDIA GPU, and this "
            "machine has none (serve the .onnx model with the onnxruntime backend instead)"
        )
    cuda = CudaRuntime(config.device)
    cuda.set_device()
    logger = _TrtLogger(trt_module, config.name)
    started = time.perf_counter()
    with gc_paused():
        runtime = trt_module.Runtime(logger.logger)
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        reason = logger.errors[0] if logger.errors else "no reason logged"
        raise EngineLoadError(f"model '{config.name}': could not load {engine_path}: {reason}")
    spec = engine_spec(engine, config.name, config.batching)
    if not spec.batching:
        check_unbatched_config(config)
    name, version = library_info(trt_module)
    log.info("model '%s': %s loaded with %s %s in %.2fs: %d profiles, %d aux streams",
             config.name, engine_path, name, version, time.perf_counter() - started,
             engine.num_optimization_profiles, engine.num_aux_streams)
    buckets = graph_buckets(config.graph_batch_sizes,
                            min(config.max_batch_size or spec.max_batch_size, spec.max_batch_size))
    handle = EngineHandle(engine, runtime, logger)
    factories = executor_factories(handle, cuda, config.workers, buckets, config.cuda_graphs,
                                   trt_module, config.name, batching=spec.batching)
    return LoadedModel(spec=spec, factories=factories, close=handle.close)

"""The served models by name, and the loading of each from its config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

from service import echo
from service.backends.base import LoadedModel
from service.config import ModelConfig
from service.engine.model import ModelRuntime
from service.errors import ConfigError, ModelLoadError, NotFound, StartError, first_line

log = logging.getLogger(__name__)


def check_model(config: ModelConfig) -> None:
    """What can be checked without loading: the file is there, and the backend's
    library (and GPU) for it. Raises ModelLoadError naming the model and file."""
    path = Path(config.path)
    if not path.is_file():
        problem = "is a directory, not a model file" if path.is_dir() else "file not found"
        raise ModelLoadError(config.name, config.path,
                             f"{problem}; check models.{config.name}.path (or --model "
                             f"{config.name}=PATH)")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ModelLoadError(config.name, config.path, f"cannot read it: {e.strerror}") from None
    if config.resolved_backend == "tensorrt":
        from service.backends.tensorrt.api import INSTALL_HINT, gpu_present, import_tensorrt

        try:
            import_tensorrt()
        except RuntimeError:
            raise ModelLoadError(
                config.name, config.path,
                f"the tensorrt backend needs TensorRT, which is not installed: on a machine "
                f"with an NVIDIA GPU run {INSTALL_HINT}, or serve the .onnx model on the "
                "CPU (backend onnxruntime)") from None
        if not gpu_present():
            raise ModelLoadError(
                config.name, config.path,
                "serving with TensorRT needs an NVIDIA GPU and this machine has none; run "
                "on a GPU host, or serve the .onnx model on the CPU (backend onnxruntime)")


def load_backend(config: ModelConfig) -> LoadedModel:
    """Open a model file with its backend (blocking: run it off the event loop).

    Raises a StartError naming the model: ConfigError for a setting the model
    contradicts, ModelLoadError (or the backend's own StartError) for the rest.
    """
    try:
        return _open(config)
    except StartError:
        raise
    except Exception as e:  # a backend library's own error: name the model, keep the cause
        log.debug("model '%s' failed to load", config.name, exc_info=True)
        raise ModelLoadError(config.name, config.path,
                             f"{type(e).__name__}: {first_line(e)}") from e


def _open(config: ModelConfig) -> LoadedModel:
    backend = config.resolved_backend
    # Imported on use: each backend pulls in its own runtime library.
    if backend == "onnxruntime":
        from service.backends.onnxruntime import load as load_onnxruntime

        return load_onnxruntime(config)
    if backend == "tensorrt":
        from service.backends.tensorrt.load import load as load_tensorrt
        from service.build.serving import engine_for

        return load_tensorrt(config, engine_for(config))
    raise ConfigError(f"models.{config.name}.backend: unknown backend {backend!r}")


def check_preferred_sizes(config: ModelConfig, max_batch_size: int) -> None:
    """Preferred batch sizes above the batch the model takes could never form."""
    too_big = [s for s in config.preferred_batch_sizes if s > max_batch_size]
    if too_big:
        raise ConfigError(
            f"models.{config.name}.preferred_batch_sizes: got "
            f"{list(config.preferred_batch_sizes)}, but {too_big} exceed the model's "
            f"max batch size of {max_batch_size}")


class ModelRepository:
    def __init__(self) -> None:
        self._models: dict[str, ModelRuntime] = {}
        # Models that failed to load at start and were skipped (server.model_load_failure
        # = "skip"): name -> why, for the log; clients get NOT_FOUND saying so.
        self.failed: dict[str, str] = {}

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ModelRuntime:
        model = self._models.get(name)
        if model is None:
            if name in self.failed:
                raise NotFound(f"model '{name}' failed to load when the server started "
                               "(the server log says why)")
            raise NotFound(f"model '{echo.text(name)}' is not served here; served models: "
                           f"{sorted(self._models)}")
        return model

    async def add(self, runtime: ModelRuntime) -> None:
        if runtime.name in self._models:
            raise ConfigError(f"model '{runtime.name}' is already served")
        self._models[runtime.name] = runtime
        await runtime.start()

    async def load(self, config: ModelConfig, stats_window_s: float = 10.0) -> ModelRuntime:
        loaded = await asyncio.to_thread(load_backend, config)
        try:
            check_preferred_sizes(config, min(config.max_batch_size or loaded.spec.max_batch_size,
                                              loaded.spec.max_batch_size))
        except ConfigError:
            loaded.close()
            raise
        runtime = ModelRuntime(config, loaded, stats_window_s)
        try:
            await self.add(runtime)
        except StartError:
            raise
        except Exception as e:  # a worker could not start (a CUDA context, a session...)
            log.debug("model '%s': workers failed to start", config.name, exc_info=True)
            self._models.pop(config.name, None)
            await asyncio.gather(*(w.stop() for w in runtime.workers), return_exceptions=True)
            loaded.close()
            raise ModelLoadError(config.name, config.path, f"its workers did not start: "
                                 f"{type(e).__name__}: {first_line(e)}") from e
        log.info("model '%s' ready: %s, %d workers, %s", config.name, runtime.spec.backend,
                 len(runtime.workers), f"max batch {runtime.max_batch_size}"
                 if runtime.spec.batching else "not batching (one request per execution)")
        return runtime

    async def drain(self) -> None:
        await asyncio.gather(*(m.drain() for m in self._models.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self._models.values()))

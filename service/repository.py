"""The served models by name, and the loading of each from its config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from service import echo
from service.backends.base import LoadedModel
from service.config import ModelConfig
from service.errors import ConfigError, NotFound
from service.model import ModelRuntime

log = logging.getLogger(__name__)


def load_backend(config: ModelConfig) -> LoadedModel:
    """Open a model file with its backend (blocking: run it off the event loop)."""
    backend = config.resolved_backend
    # Imported on use: each backend pulls in its own runtime library.
    if backend == "onnxruntime":
        from service.backends.onnxruntime import load as load_onnxruntime

        return load_onnxruntime(config)
    if backend == "tensorrt":
        from service.backends.tensorrt import load as load_tensorrt

        return load_tensorrt(config)
    raise ConfigError(f"models.{config.name}.backend: unknown backend {backend!r}")


class ModelRepository:
    def __init__(self) -> None:
        self._models: dict[str, ModelRuntime] = {}

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ModelRuntime:
        model = self._models.get(name)
        if model is None:
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
        runtime = ModelRuntime(config, loaded, stats_window_s)
        await self.add(runtime)
        log.info("model '%s' ready: %s, %d workers, max batch %d", config.name,
                 runtime.spec.backend, len(runtime.workers), runtime.max_batch_size)
        return runtime

    async def drain(self) -> None:
        await asyncio.gather(*(m.drain() for m in self._models.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self._models.values()))

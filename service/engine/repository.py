"""The served models by name, and the loading of each from its config, at start
and while the server runs (load, unload, reload: issue 20's model control).

One owner: the repository alone maps a name to the runtime that serves it. A
reload builds the new runtime (backend, executors, workers) beside the old one,
off the event loop; only once it has started does the name point to it, in one
assignment on the loop. A request is bound to a runtime when its model is looked
up and is queued in that runtime's batcher in the same step, so every request
is answered by exactly one version, and none by one that is half loaded. The
old runtime then drains (it answers what it accepted, in-flight batches
included) and stops, closing its executors and freeing their memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from trtserve.service import echo
from trtserve.service.backends.base import LoadedModel
from trtserve.service.config import ModelConfig
from trtserve.service.engine.api import LOADING, READY, UNAVAILABLE, UNLOADING, ModelState
from trtserve.service.engine.folder import scan_one
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.errors import (
    ConfigError,
    InvalidArgument,
    LoadFailed,
    ModelLoadError,
    NotFound,
    StartError,
    Unavailable,
    first_line,
)

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
        from trtserve.service.backends.tensorrt.api import (
            INSTALL_HINT,
            gpu_present,
            import_tensorrt,
        )

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
        from trtserve.service.backends.onnxruntime import load as load_onnxruntime

        return load_onnxruntime(config)
    if backend == "tensorrt":
        from trtserve.service.backends.tensorrt.load import load as load_tensorrt
        from trtserve.service.build.serving import engine_for

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


@dataclasses.dataclass
class _Turn:
    """One model's lock for load, unload and reload, and how many hold or wait for it."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class ModelRepository:
    def __init__(self, stats_window_s: float = 10.0) -> None:
        self._stats_window_s = stats_window_s
        self._models: dict[str, ModelRuntime] = {}
        # Models that failed to load at start and were skipped (server.model_load_failure
        # = "skip"): name -> why, for the log; clients get NOT_FOUND saying so.
        self.failed: dict[str, str] = {}
        # Every model known, served or not: its config (the last one loaded, or configured).
        self._configs: dict[str, ModelConfig] = {}
        # The last version each model was served at (one more per successful load).
        self._versions: dict[str, int] = {}
        # Models not served: (state, why) for RepositoryIndex and NOT_FOUND messages.
        self._states: dict[str, tuple[str, str]] = {}
        # One load, unload or reload of a model at a time; others wait their turn.
        self._locks: dict[str, _Turn] = {}
        # Old versions draining after a reload or unload; the server's stop waits for them.
        self._retiring: set[ModelRuntime] = set()
        # Set by drain: the server is stopping, and a load finishing now is not served.
        self._closing = False
        # Called on the loop with the runtime a name now points to (None: unloaded).
        self.on_switch: Callable[[str, ModelRuntime | None], None] | None = None
        # The repository folder (server.model_repository), absolute; "" without one. A
        # load by name without a file reads the model's entry there (engine/folder.py).
        self.folder = ""

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
            if name in self._states:
                state, why = self._states[name]
                raise NotFound(f"model '{echo.text(name)}' is not loaded ({state}: {why})")
            raise NotFound(f"model '{echo.text(name)}' is not served here; served models: "
                           f"{sorted(self._models)}")
        return model

    def know(self, config: ModelConfig) -> None:
        """Remember a configured model, so that it can be loaded by name later."""
        self._configs.setdefault(config.name, config)

    async def add(self, runtime: ModelRuntime) -> None:
        if runtime.name in self._models:
            raise ConfigError(f"model '{runtime.name}' is already served")
        self._models[runtime.name] = runtime
        self._configs.setdefault(runtime.name, runtime.config)
        self._versions[runtime.name] = max(self._versions.get(runtime.name, 0),
                                           int(runtime.version))
        await runtime.start()

    async def load(self, config: ModelConfig, stats_window_s: float | None = None,
                   version: str = "1") -> ModelRuntime:
        """Load a configured model at start; StartError naming the model if it fails."""
        self._configs[config.name] = config
        runtime = await self._build(config, version, stats_window_s)
        self._switch(config.name, runtime)
        return runtime

    async def _build(self, config: ModelConfig, version: str,
                     stats_window_s: float | None = None) -> ModelRuntime:
        """A started runtime for `config`, not yet served; StartError naming what failed."""
        loaded = await asyncio.to_thread(load_backend, config)
        try:
            check_preferred_sizes(config, min(config.max_batch_size or loaded.spec.max_batch_size,
                                              loaded.spec.max_batch_size))
        except ConfigError:
            loaded.close()
            raise
        runtime = ModelRuntime(config, loaded, stats_window_s or self._stats_window_s, version)
        try:
            await runtime.start()
        except Exception as e:  # a worker could not start (a CUDA context, a session...)
            log.debug("model '%s': workers failed to start", config.name, exc_info=True)
            await asyncio.gather(*(w.stop() for w in runtime.workers), return_exceptions=True)
            loaded.close()
            raise ModelLoadError(config.name, config.path, f"its workers did not start: "
                                 f"{type(e).__name__}: {first_line(e)}") from e
        log.info("model '%s' ready (version %s): %s, %d workers, %s", config.name, version,
                 runtime.spec.backend, len(runtime.workers), f"max batch {runtime.max_batch_size}"
                 if runtime.spec.batching else "not batching (one request per execution)")
        return runtime

    def _switch(self, name: str, runtime: ModelRuntime | None) -> ModelRuntime | None:
        """Point the name at `runtime` (None: at nothing) in one step; returns the old one."""
        old = self._models.pop(name, None)
        if runtime is not None:
            self._models[name] = runtime
            self._versions[name] = int(runtime.version)
            self._configs[name] = runtime.config
            self._states.pop(name, None)
            self.failed.pop(name, None)
        if old is not None:
            # Its workers' health is no longer the name's.
            old.on_health_change = None
        if self.on_switch is not None:
            self.on_switch(name, runtime)
        return old

    # --- model control -------------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """Hold the model's turn; the lock lives only while someone holds or waits for it,
        so names asked for once (a typo, a failed load) leave nothing behind."""
        turn = self._locks.get(name)
        if turn is None:
            turn = self._locks[name] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._locks[name]

    def state(self, name: str) -> ModelState:
        runtime = self._models.get(name)
        config = self._configs.get(name)
        if runtime is not None:
            return ModelState(name, runtime.version, READY, runtime.config.path)
        path = config.path if config else ""
        version = str(self._versions[name]) if name in self._versions else ""
        if name in self.failed:
            return ModelState(name, version, UNAVAILABLE, path, self.failed[name])
        state, why = self._states.get(name, (UNAVAILABLE, "not loaded"))
        return ModelState(name, version, state, path, why)

    def index(self) -> list[ModelState]:
        names = set(self._configs) | set(self._models) | set(self.failed) | set(self._states)
        return [self.state(name) for name in sorted(names)]

    def _config_for(self, name: str, path: str) -> ModelConfig:
        """The config to load `name` with: its own, with `path` as its file if given."""
        config = self._configs.get(name)
        try:
            if config is None:
                if not path:
                    raise NotFound(f"model '{echo.text(name)}' is not in the repository; give "
                                   "its model file (the 'path' parameter) to load it")
                return ModelConfig(name=name, path=path)
            if path and path != config.path:
                # The backend follows the new file's suffix unless the config names one.
                return dataclasses.replace(config, path=path)
        except ConfigError as e:
            raise InvalidArgument(str(e)) from None
        return config

    def in_folder(self, path: str) -> bool:
        """Whether a model file lies in the repository folder (the folder watch's)."""
        return bool(self.folder) and path.startswith(self.folder + "/")

    async def _source(self, name: str, path: str) -> tuple[ModelConfig, str]:
        """What a load of `name` by a client loads, and as which version: the file
        `path` if given (the next version), else the model's entry in the repository
        folder as it is now (the folder's version), else its configured file."""
        if not path and self.folder:
            entry = await asyncio.to_thread(scan_one, self.folder, name)
            if entry is not None:
                if entry.config is None:
                    raise LoadFailed(f"model '{echo.text(name)}' in the repository folder "
                                     f"cannot be loaded: {entry.error}")
                return entry.config, entry.version
        return self._config_for(name, path), str(self._versions.get(name, 0) + 1)

    async def load_named(self, name: str, path: str = "") -> ModelRuntime:
        """Load `name`, or reload it if it is served (Triton's RepositoryModelLoad)."""
        async with self._turn(name):
            config, version = await self._source(name, path)
            return await self._load_locked(config, version)

    async def load_version(self, config: ModelConfig, version: str) -> ModelRuntime:
        """Serve `config` as `version`: a load, or a reload if the model is served (the
        repository folder's watch). LoadFailed when it fails; what served serves on."""
        async with self._turn(config.name):
            return await self._load_locked(config, version)

    async def _load_locked(self, config: ModelConfig, version: str) -> ModelRuntime:
        name = config.name
        if name in self._models:
            return await self._reload(config, version)
        before = self._states.get(name)
        self._states[name] = (LOADING, "loading")
        try:
            runtime = await self._build_for_client(config, version)
        except LoadFailed as e:
            self.list_unavailable(name, str(e))
            raise
        except BaseException:
            if before is None:
                self._states.pop(name, None)
            else:
                self._states[name] = before
            raise
        self._switch(name, runtime)
        return runtime

    async def reload(self, name: str, path: str = "") -> ModelRuntime:
        """A new version of a served model; NotFound when it is not served."""
        async with self._turn(name):
            self.get(name)  # NotFound saying why
            config, version = await self._source(name, path)
            return await self._reload(config, version)

    async def _reload(self, config: ModelConfig, version: str) -> ModelRuntime:
        name = config.name
        old = self._models[name]
        # Built beside the old version, which serves on meanwhile (and if this fails).
        runtime = await self._build_for_client(config, version)
        self._switch(name, runtime)
        log.info("model '%s': version %s serves; version %s drains and stops", name,
                 runtime.version, old.version)
        await self._retire(old)
        return runtime

    async def remove(self, name: str, reason: str = "") -> None:
        """The model left the repository folder: unload it if it is served (what it
        accepted is answered), and forget it, so that the index no longer lists it; or,
        given a `reason` (its folder is there without a version), list it UNAVAILABLE."""
        async with self._turn(name):
            old = self._models.get(name)
            if old is not None:
                self._states[name] = (UNLOADING, "removed from the repository folder")
                self._switch(name, None)
                try:
                    await self._retire(old)
                finally:
                    self._states.pop(name, None)
                log.info("model '%s' version %s unloaded: removed from the repository "
                         "folder", name, old.version)
            if reason:
                self.list_unavailable(name, reason)
                return
            for known in (self._configs, self._versions, self._states, self.failed):
                known.pop(name, None)

    async def mark_unavailable(self, name: str, reason: str) -> None:
        """A model of the folder that cannot be loaded as it is: listed UNAVAILABLE with
        the reason (a served version serves on: the reason is only logged)."""
        async with self._turn(name):
            if name in self._models:
                log.error("model '%s': its repository folder changed and cannot be loaded "
                          "(version %s serves on): %s", name, self._models[name].version,
                          reason)
                return
            log.error("model '%s' in the repository folder cannot be loaded: %s", name,
                      reason)
            self.list_unavailable(name, reason)

    def list_unavailable(self, name: str, reason: str) -> None:
        """List a model that is not served as UNAVAILABLE, with the reason (the latest:
        it replaces why the model failed at start, if it did)."""
        self.failed.pop(name, None)
        self._states[name] = (UNAVAILABLE, reason)

    async def unload(self, name: str) -> ModelState:
        async with self._turn(name):
            old = self.get(name)  # NotFound saying why
            self._states[name] = (UNLOADING, "unloading")
            self._switch(name, None)
            try:
                await self._retire(old)
            finally:
                self._states[name] = (UNAVAILABLE, "unloaded")
            log.info("model '%s' version %s unloaded", name, old.version)
            return self.state(name)

    async def _build_for_client(self, config: ModelConfig, version: str) -> ModelRuntime:
        """_build for a run-time load: its failure is the client's LoadFailed."""
        if self._closing:
            raise Unavailable("the server is shutting down; models are not loaded")
        try:
            await asyncio.to_thread(check_model, config)
            runtime = await self._build(config, version)
        except StartError as e:
            log.error("model '%s': load failed: %s", config.name, e)
            still = ("the version served before still serves" if config.name in self._models
                     else "the model is not served")
            raise LoadFailed(f"{e}; {still}") from None
        if self._closing:  # the server began to stop while this loaded: it is not served
            await runtime.stop()
            raise Unavailable("the server is shutting down; models are not loaded")
        return runtime

    async def _retire(self, runtime: ModelRuntime) -> None:
        """Answer what the old runtime accepted, then stop it and free its executors."""
        self._retiring.add(runtime)
        try:
            await runtime.stop()
        finally:
            self._retiring.discard(runtime)

    def refuse_loads(self) -> None:
        """The server is stopping: loads and reloads from now on are UNAVAILABLE."""
        self._closing = True

    async def drain(self) -> None:
        self.refuse_loads()
        await asyncio.gather(*(m.drain() for m in [*self._models.values(), *self._retiring]))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in [*self._models.values(), *self._retiring]))

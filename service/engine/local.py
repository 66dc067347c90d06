"""The engine in this process: `Engine` over the repository of served models.

Today's path, kept as it was: a request's arrays go straight to the model's
batcher on this event loop (no copy, no hop), and a quick batch still runs
inline. What this adds is only the seam: plain data in (`InferRequest`), plain
data out (`InferResult`, `ModelDescription`, `StatsSnapshot`), so that the
protocol side never holds a live model, worker or future of the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.engine.api import (
    MODEL_VERSION,
    HealthListener,
    InferRequest,
    InferResult,
    ModelDescription,
    RegionRef,
    StatsSnapshot,
    TensorOut,
    check_version,
    wanted_outputs,
)
from service.engine.model import ModelRuntime
from service.engine.repository import ModelRepository
from service.errors import NotFound, TensorError
from service.limits import ByteBudget, request_bytes
from service.tensors import TensorSpec


class LocalEngine:
    """`Engine` for the models of `repository`, served on the caller's event loop."""

    def __init__(self, repository: ModelRepository, budget: ByteBudget | None = None) -> None:
        self._repository = repository
        # Input bytes of requests accepted and not yet answered, over every model and
        # protocol (max_request_bytes_in_flight).
        self._budget = budget or ByteBudget(0)
        # name -> (the runtime it describes, its description): computed once per loaded
        # model, since frontends ask for it on every request.
        self._descriptions: dict[str, tuple[ModelRuntime, ModelDescription]] = {}
        self._listeners: list[HealthListener] = []

    @property
    def repository(self) -> ModelRepository:
        """The models themselves: for the server's lifecycle (load, drain, stop), not frontends."""
        return self._repository

    # --- models --------------------------------------------------------------------------

    def models(self) -> Sequence[str]:
        return [m.name for m in self._repository]

    def _runtime(self, model: str, version: str) -> ModelRuntime:
        runtime = self._repository.get(model)  # NotFound naming the served models
        check_version(model, version)
        return runtime

    def describe(self, model: str, version: str = "") -> ModelDescription:
        runtime = self._repository.get(model)  # NotFound naming the served models
        if version:
            check_version(model, version)
        return runtime.description()

    def ready(self, model: str | None = None) -> bool:
        """Accepting requests, with at least one worker in the rotation (an unknown model:
        False, as Triton answers, so that clients polling while models load see False)."""
        if model is None:
            return all(_is_ready(m) for m in self._repository)
        try:
            return _is_ready(self._repository.get(model))
        except NotFound:
            return False

    # --- requests ------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResult:
        # On every request's path, at concurrency 1 too: kept to plain lookups.
        runtime = self._repository.get(request.model)
        if request.version:
            check_version(request.model, request.version)
        outputs_asked = request.outputs
        wanted = wanted_outputs(request.model, runtime.spec, outputs_asked) if outputs_asked \
            else runtime.spec.outputs
        if request.output_regions:
            name = next(iter(request.output_regions))
            raise TensorError(name, "output to a shared-memory region: shared-memory regions "
                              "are not supported")
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, tensor in request.inputs.items():
            data = tensor.data
            if isinstance(data, RegionRef):
                raise TensorError(name, f"shared-memory region '{data.region}': shared-memory "
                                  "regions are not supported")
            arrays[name] = data
            dtypes[name] = tensor.dtype
        # The server's budget of request bytes in flight holds the inputs until the request
        # is answered. Validation comes first, so that a request that can never run is told
        # so (INVALID_ARGUMENT) rather than to retry (RESOURCE_EXHAUSTED). The bytes are
        # released once, however the request ends: answered, failed, cancelled or expired.
        budget = self._budget
        nbytes = request_bytes(arrays)
        try:
            validated = runtime.validate(arrays, dtypes)
            budget.acquire(nbytes)
            try:
                outputs = await runtime.infer(arrays, request.deadline, dtypes, validated)
            finally:
                budget.release(nbytes)
        finally:
            budget.finished(nbytes)
        return InferResult(request.model, MODEL_VERSION, _answer(wanted, outputs))

    # --- statistics and health -----------------------------------------------------------

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        runtimes = [self._repository.get(model)] if model is not None else list(self._repository)
        return StatsSnapshot(models=tuple(r.snapshot() for r in runtimes),
                             request_bytes=self._budget.snapshot())

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call `listener(model, serving)` on this loop when a model loses its last healthy
        worker, or one rejoins a model that had none. Models loaded later are watched
        once `watch` is called for them (the server does, as each loads)."""
        self._listeners.append(listener)
        for runtime in self._repository:
            self.watch(runtime)

    def watch(self, runtime: ModelRuntime) -> None:
        """Pass the runtime's health changes on to the listeners."""
        runtime.on_health_change = self._health_changed

    def _health_changed(self, model: str, serving: bool) -> None:
        for listener in self._listeners:
            listener(model, serving)


def _is_ready(runtime: ModelRuntime) -> bool:
    return runtime.ready and runtime.healthy_workers > 0


def _answer(wanted: Sequence[TensorSpec],
            outputs: Mapping[str, np.ndarray]) -> dict[str, TensorOut]:
    result: dict[str, TensorOut] = {}
    for tensor_spec in wanted:
        array = outputs[tensor_spec.name]
        result[tensor_spec.name] = TensorOut(tensor_spec.dtype, array.shape, array)
    return result


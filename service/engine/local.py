"""The engine in this process: `Engine` over the repository of served models.

Today's path, kept as it was: a request's arrays go straight to the model's
batcher on this event loop (no copy, no hop), and a quick batch still runs
inline. What this adds is only the seam: plain data in (`InferRequest`), plain
data out (`InferResult`, `ModelDescription`, `StatsSnapshot`), so that the
protocol side never holds a live model, worker or future of the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trtserve.service import echo
from trtserve.service.backends.base import ModelSpec, Targets
from trtserve.service.engine.api import (
    HealthListener,
    InferRequest,
    InferResult,
    Keep,
    ModelDescription,
    ModelState,
    RegionRef,
    RegionStatus,
    StatsSnapshot,
    TensorOut,
    check_version,
    wanted_outputs,
)
from trtserve.service.engine.batch import MemberOutcomes, Request, Validated
from trtserve.service.engine.cuda_ipc import HostPinner
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.engine.regions import (
    Lease,
    RegionRegistry,
    expected_output_bytes,
    infer_with_regions,
)
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.engine.shared_calls import SharedCalls
from trtserve.service.errors import NotFound, PermissionDenied, ServeError, TensorError
from trtserve.service.limits import ByteBudget, request_bytes
from trtserve.service.tensors import TensorSpec


class LocalEngine:
    """`Engine` for the models of `repository`, served on the caller's event loop."""

    def __init__(self, repository: ModelRepository, budget: ByteBudget | None = None,
                 regions: RegionRegistry | None = None, model_control: bool = True) -> None:
        self._repository = repository
        # Shared-memory regions clients registered, for every protocol (and, through
        # the IPC engine, every frontend process).
        self._regions = regions or RegionRegistry()
        # Whether clients may load, unload and reload models (server.model_control).
        self._model_control = model_control
        repository.on_switch = self._switched
        # Input bytes of requests accepted and not yet answered, over every model and
        # protocol (max_request_bytes_in_flight).
        self._budget = budget or ByteBudget(0)
        # name -> (the runtime it describes, its description): computed once per loaded
        # model, since frontends ask for it on every request.
        self._descriptions: dict[str, tuple[ModelRuntime, ModelDescription]] = {}
        self._listeners: list[HealthListener] = []
        # Stats calls that overlap (every frontend's, Prometheus's) share one snapshot.
        self._stats_calls: SharedCalls[StatsSnapshot] = SharedCalls()

    @property
    def repository(self) -> ModelRepository:
        """The models themselves: for the server's lifecycle (load, drain, stop), not frontends."""
        return self._repository

    # --- models --------------------------------------------------------------------------

    def models(self) -> Sequence[str]:
        return [m.name for m in self._repository]

    def _runtime(self, model: str, version: str) -> ModelRuntime:
        runtime = self._repository.get(model)  # NotFound naming the served models
        check_version(model, version, runtime.version)
        return runtime

    def arena_pinner(self, model: str) -> HostPinner | None:
        """What page-locks host memory for `model`, if it is served and its executors
        read device memory (TensorRT); else None."""
        try:
            device_io = self._repository.get(model).spec.device_io
        except NotFound:
            return None
        return self._regions.host_pinner() if device_io else None

    def backlogged(self) -> list[str]:
        """The served models whose batcher has a backlog (Batcher.backlogged)."""
        return [runtime.name for runtime in self._repository if runtime.backlogged]

    def group_rows(self, model: str) -> int:
        """The most rows a group of `model`'s requests may stack (engine/groups.py): its
        rows per request; 0 where it never groups (it does not batch, or is not served)."""
        try:
            runtime = self._repository.get(model)
        except NotFound:
            return 0
        return runtime.max_rows_per_request if runtime.spec.batching else 0

    def describe(self, model: str, version: str = "") -> ModelDescription:
        runtime = self._repository.get(model)  # NotFound naming the served models
        if version:
            check_version(model, version, runtime.version)
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
        runtime, wanted, arrays, dtypes, in_regions = self._prepare(request)
        if in_regions or request.output_regions:
            return await self._infer_with_regions(runtime, request, wanted, arrays, dtypes)
        outputs = await self._run(runtime, arrays, request.deadline, dtypes, request_bytes(arrays),
                                  keep=request.keep)
        return InferResult(request.model, runtime.version, _answer(wanted, outputs))

    def submit(self, request: InferRequest, more_follow: bool,
               on_done: Callable[[Submitted], None]) -> Submitted:
        """`infer` without a task, for the engine process's host: the request queued;
        `on_done(submitted)` once it has its outcome (at once, before this returns,
        when its batch ran inline). Refusals raise here.

        `more_follow`: more requests of the same group (one frame of a frontend)
        follow at once; they form batches together (`Batcher.submit`).
        """
        runtime, wanted, arrays, dtypes, in_regions = self._prepare(request)
        if in_regions or request.output_regions:  # the rare path, as a task
            submitted = Submitted(None, wanted)
            kept = False

            def keep() -> Callable[[], None]:
                # Cancelled while its batch runs: settled (which gives the caller's
                # memory back) once that batch is done, not when the task ends.
                nonlocal kept
                kept = True
                return lambda: submitted.settle(on_done)

            task = submitted.future = asyncio.ensure_future(
                self.infer(dataclasses.replace(request, keep=_keep_both(keep, request.keep))))
            task.add_done_callback(lambda _: None if kept else submitted.settle(on_done))
            return submitted
        return self._submit(runtime, wanted, arrays, dtypes, request.deadline, more_follow,
                            on_done)

    def submit_arrays(self, model: str, version: str, arrays: dict[str, np.ndarray],
                      dtypes: dict[str, str], outputs: Sequence[str], deadline: float | None,
                      more_follow: bool, on_done: Callable[[Submitted], None],
                      members: tuple[int, ...] = (), validated: Validated | None = None,
                      parts: Mapping[str, list[np.ndarray]] | None = None) -> Submitted:
        """`submit` of a request whose tensors are all arrays (no region, in or out),
        given as the engine process's host reads them from a frame: the same checks
        and outcome, without an InferRequest and its TensorIns to build and take
        apart again (a few microseconds of the engine loop per request).

        `members`: the arrays stack that many client requests of these rows each (a
        group, engine/groups.py); their outcomes come from `Submitted.member_tensors`.
        `validated`: what `validate` said of these arrays, if asked already.
        `parts`: a group's inputs left in its members' arena ranges, which `arrays`
        then only describes (`Request.parts`).
        """
        runtime = self._repository.get(model)
        if version:
            check_version(model, version, runtime.version)
        wanted = wanted_outputs(model, runtime.spec, outputs) if outputs \
            else runtime.spec.outputs
        return self._submit(runtime, wanted, arrays, dtypes, deadline, more_follow, on_done,
                            members, validated, parts)

    def validate(self, model: str, arrays: Mapping[str, np.ndarray],
                 dtypes: Mapping[str, str]) -> Validated:
        """The model's validation of these arrays (NotFound, TensorError...), as `submit`
        checks them."""
        return self._repository.get(model).validate(arrays, dtypes)

    def _submit(self, runtime: ModelRuntime, wanted: Sequence[TensorSpec],
                arrays: dict[str, np.ndarray], dtypes: dict[str, str], deadline: float | None,
                more_follow: bool, on_done: Callable[[Submitted], None],
                members: tuple[int, ...] = (), validated: Validated | None = None,
                parts: Mapping[str, list[np.ndarray]] | None = None) -> Submitted:
        nbytes = request_bytes(arrays)
        budget = self._budget
        submitted = Submitted(runtime.version, wanted)

        def settled(queued: Request) -> None:
            # Once, however the request ends (as in _run).
            budget.release(nbytes)
            budget.finished(nbytes)
            submitted.future = queued.future
            submitted.request = queued
            submitted.settle(on_done)

        try:
            validated = validated or runtime.validate(arrays, dtypes)
            budget.acquire(nbytes, len(members) or 1)
            try:
                queued = runtime.submit(arrays, deadline, dtypes, validated, more_follow,
                                        settled, members, parts)
            except BaseException:
                budget.release(nbytes)
                raise
        except BaseException:
            budget.finished(nbytes)
            raise
        submitted.future = queued.future
        submitted.request = queued
        return submitted

    def _prepare(self, request: InferRequest) -> tuple[
            ModelRuntime, Sequence[TensorSpec], dict[str, np.ndarray], dict[str, str], bool]:
        runtime = self._repository.get(request.model)
        if request.version:
            check_version(request.model, request.version, runtime.version)
        outputs_asked = request.outputs
        wanted = wanted_outputs(request.model, runtime.spec, outputs_asked) if outputs_asked \
            else runtime.spec.outputs
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        in_regions = False
        for name, tensor in request.inputs.items():
            data = tensor.data
            if isinstance(data, RegionRef):
                in_regions = True
            else:
                arrays[name] = data
            dtypes[name] = tensor.dtype
        return runtime, wanted, arrays, dtypes, in_regions

    async def _run(self, runtime: ModelRuntime, arrays: Mapping[str, np.ndarray],
                   deadline: float | None, dtypes: Mapping[str, str],
                   nbytes: int, targets: Targets | None = None, keep: Keep | None = None,
                   admitted: Callable[[], Awaitable[None]] | None = None
                   ) -> Mapping[str, np.ndarray]:
        """`runtime.infer`, holding `nbytes` in the server's budget of request bytes in
        flight until answered. Validation comes first, so that a request that can never
        run is told so (INVALID_ARGUMENT) rather than to retry (RESOURCE_EXHAUSTED). The
        bytes are released once, however the request ends: answered, failed, cancelled
        or expired; a request cancelled while its batch runs keeps them until that batch
        ends, since the batch still holds its arrays (as the engine process's `_submit`
        does). `keep`: the caller's, for memory it lent (see Keep). `admitted`: awaited
        once the bytes are held, before the request is queued (its inputs read in)."""
        budget = self._budget
        batch_holds = False  # set when a running batch gives the bytes back, not us

        def until_batch_ends() -> Callable[[], None]:
            nonlocal batch_holds
            batch_holds = True
            give_back = keep() if keep is not None else None

            def batch_ended() -> None:
                budget.release(nbytes)
                budget.finished(nbytes)
                if give_back is not None:
                    give_back()
            return batch_ended

        try:
            validated = runtime.validate(arrays, dtypes)
            budget.acquire(nbytes)
            try:
                if admitted is not None:
                    await admitted()
                return await runtime.infer(arrays, deadline, dtypes, validated, targets,
                                           until_batch_ends)
            finally:
                if not batch_holds:
                    budget.release(nbytes)
        finally:
            if not batch_holds:
                budget.finished(nbytes)

    async def _infer_with_regions(self, runtime: ModelRuntime, request: InferRequest,
                                  wanted: Sequence[TensorSpec], arrays: dict[str, np.ndarray],
                                  dtypes: dict[str, str]) -> InferResult:
        """A request naming shared-memory regions: references checked and resolved (inputs
        as views of the regions), run, outputs written into their regions."""
        if request.output_regions:
            wanted = _with_region_outputs(request.model, runtime.spec, wanted, request.outputs,
                                          request.output_regions)
        # Bytes that crossed the wire count against the budget, and region inputs copied
        # into the server's memory (read before running, once admitted): a region read
        # where it lies (in_place) is the client's memory, not held by the server.
        wire_bytes = request_bytes(arrays)

        async def run(lease: Lease) -> Mapping[str, np.ndarray]:
            return await self._run(runtime, lease.arrays, request.deadline, dtypes,
                                   wire_bytes + lease.copied_bytes, lease.targets(),
                                   _keep_both(lease.keep, request.keep),
                                   admitted=lease.read_inputs)

        def counted(lease: Lease) -> None:
            counters = runtime.counters
            counters.shm_input_bytes += lease.input_bytes
            counters.shm_output_bytes += lease.output_bytes
            counters.host_copies += lease.host_copies

        spec = runtime.spec
        outputs = await infer_with_regions(
            self._regions, request.inputs, request.output_regions, run,
            device_io=spec.device_io,
            output_bytes=expected_output_bytes(spec, request.inputs, request.output_regions),
            counted=counted)
        return InferResult(request.model, runtime.version, _answer(wanted, outputs))

    # --- model control -------------------------------------------------------------------

    def _check_control(self, rpc: str) -> None:
        if not self._model_control:
            raise PermissionDenied(f"{rpc}: model control is off on this server "
                                   "(server.model_control = false, --no-model-control)")

    async def repository_index(self) -> Sequence[ModelState]:
        return tuple(self._repository.index())

    async def load_model(self, model: str, path: str = "") -> ModelState:
        self._check_control("load")
        runtime = await self._repository.load_named(model, path)
        return self._repository.state(runtime.name)

    async def unload_model(self, model: str) -> ModelState:
        self._check_control("unload")
        return await self._repository.unload(model)

    async def reload_model(self, model: str, path: str = "") -> ModelState:
        self._check_control("reload")
        return await self.reload(model, path)

    async def reload(self, model: str, path: str = "") -> ModelState:
        """reload_model whatever server.model_control says: for the server's own file
        watch (engine/watch.py), which the operator configured."""
        runtime = await self._repository.reload(model, path)
        return self._repository.state(runtime.name)

    def _switched(self, model: str, runtime: ModelRuntime | None) -> None:
        """The name points to another runtime (None: none): watch it, and tell the
        listeners whether the model serves now."""
        if runtime is not None:
            self.watch(runtime)
        serving = runtime is not None and _is_ready(runtime)
        self._health_changed(model, serving)

    # --- shared-memory regions ----------------------------------------------------------

    @property
    def regions(self) -> RegionRegistry:
        return self._regions

    async def register_system_region(self, name: str, key: str, offset: int,
                                     byte_size: int) -> None:
        self._regions.register_system(name, key, offset, byte_size)

    async def register_cuda_region(self, name: str, raw_handle: bytes, device_id: int,
                                   byte_size: int) -> None:
        self._regions.register_cuda(name, raw_handle, device_id, byte_size)

    async def unregister_region(self, name: str | None, kind: str | None = None) -> None:
        self._regions.unregister(name, kind)

    async def region_status(self, name: str | None, kind: str | None = None
                            ) -> tuple[RegionStatus, ...]:
        return self._regions.status(name, kind)

    def close(self) -> None:
        """Unmap every region (the server is stopping; nothing runs any more)."""
        self._regions.close()

    # --- statistics and health -----------------------------------------------------------

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        return await self._stats_calls.run(model, lambda: self._snapshot(model))

    async def _snapshot(self, model: str | None) -> StatsSnapshot:
        runtimes = [self._repository.get(model)] if model is not None else list(self._repository)
        return StatsSnapshot(models=tuple(r.snapshot() for r in runtimes),
                             request_bytes=self._budget.snapshot(),
                             shared_memory=self._regions.usage())

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


# A result as the engine process's host encodes it: each output's (name, dtype, shape, data).
Tensors = list[tuple[str, str, tuple[int, ...], np.ndarray | RegionRef]]


class Submitted:
    """A request `LocalEngine.submit` took: done, cancel, and its result (`tensors`)."""

    __slots__ = ("_version", "_wanted", "finished", "future", "request")

    def __init__(self, version: str | None, wanted: Sequence[TensorSpec]) -> None:
        # The batcher's future of the request's outputs, or (version None) a task that
        # gives its InferResult; set by `submit`.
        self.future: asyncio.Future[Any] | None = None
        # The batcher's request (version not None), cancelled through its own `cancel`.
        self.request: Request | None = None
        self._version = version
        self._wanted = wanted
        # Whether its outcome is in (and `on_done` called).
        self.finished = False

    def settle(self, on_done: Callable[[Submitted], None]) -> None:
        self.finished = True
        on_done(self)

    def tensors(self) -> tuple[str, Tensors]:
        """The result, once finished, as the engine process's host encodes it: the
        model's version and each output's (name, dtype, shape, data), without an
        InferResult and TensorOuts in between. Raises what the request ended with."""
        assert self.future is not None
        value = self.future.result()
        if self._version is None:
            result: InferResult = value
            return result.version, [(name, t.dtype, t.shape, t.data)
                                    for name, t in result.outputs.items()]
        return self._version, self._tensors(value)

    def _tensors(self, value: Mapping[str, Any]) -> Tensors:
        tensors = []
        for tensor_spec in self._wanted:
            array = value[tensor_spec.name]
            tensors.append((tensor_spec.name, tensor_spec.dtype, array.shape,
                            array.data if isinstance(array, TensorOut) else array))
        return tensors

    def member_tensors(self, members: Sequence[int], whole: bool = False) -> tuple[
            str, Tensors | None, list[Tensors | ServeError]]:
        """A group's result, once finished: the model's version, then either (with
        `whole`, when the group ran as one) its outputs whole, the members' rows
        stacked, as `tensors` gives them, or, per member (of `members` rows each, in
        order), its outputs (views of the group's rows) or its own error. Raises what
        the whole group ended with."""
        assert self.future is not None and self._version is not None
        value = self.future.result()
        if isinstance(value, MemberOutcomes):
            return self._version, None, [e if isinstance(e, ServeError)
                                         else self._tensors(e) for e in value]
        if whole:
            return self._version, self._tensors(value), []
        per_member: list[Tensors | ServeError] = []
        start = 0
        for rows in members:
            end = start + rows
            per_member.append(self._tensors({name: array[start:end]
                                             for name, array in value.items()}))
            start = end
        return self._version, None, per_member

    def cancel_member(self, expired: bool) -> None:
        """A group's member was given up (`expired`: past its own deadline): counted as
        such; the group itself is cancelled once all its members are."""
        request = self.request
        if request is None or request.answered:
            return
        request.members_cancelled += 1
        if expired:
            request.members_expired += 1
        if request.members_cancelled >= request.count:
            request.cancel()

    def cancel(self) -> None:
        """Take the request out of its batch (if not run yet); it ends CancelledError."""
        if self.request is not None:
            self.request.cancel()
        elif self.future is not None:
            self.future.cancel()


def _keep_both(regions: Keep, caller: Keep | None) -> Keep:
    """The regions' lease and the caller's own memory (an arena range), kept together."""
    if caller is None:
        return regions

    def keep() -> Callable[[], None]:
        give_back_regions, give_back_caller = regions(), caller()

        def give_back() -> None:
            give_back_regions()
            give_back_caller()

        return give_back

    return keep


def _is_ready(runtime: ModelRuntime) -> bool:
    return runtime.ready and runtime.healthy_workers > 0


def _answer(wanted: Sequence[TensorSpec],
            outputs: Mapping[str, np.ndarray | TensorOut]) -> dict[str, TensorOut]:
    result: dict[str, TensorOut] = {}
    for tensor_spec in wanted:
        array = outputs[tensor_spec.name]
        if isinstance(array, TensorOut):  # written into a region: where, not the bytes
            result[tensor_spec.name] = TensorOut(tensor_spec.dtype, array.shape, array.data)
        else:
            result[tensor_spec.name] = TensorOut(tensor_spec.dtype, array.shape, array)
    return result


def _with_region_outputs(model: str, spec: ModelSpec, wanted: Sequence[TensorSpec],
                         asked: Sequence[str], regions: Mapping[str, RegionRef]
                         ) -> Sequence[TensorSpec]:
    """Outputs written into regions are answered (with where) even when not asked for."""
    extra: list[TensorSpec] = []
    for name in regions:
        tensor_spec = spec.output(name)
        if tensor_spec is None:
            raise TensorError(name, f"output_regions names an unknown output; model "
                              f"'{echo.text(model)}' gives {sorted(t.name for t in spec.outputs)}")
        if asked and name not in asked:
            extra.append(tensor_spec)
    return [*wanted, *extra]


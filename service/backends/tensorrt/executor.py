"""The TensorRT executor: what one worker owns and how it runs a batch.

A `TrtExecutor` belongs to one worker thread and owns, until `close()`:

- one non-blocking CUDA stream, and `engine.num_aux_streams` more for TensorRT's
  within-inference parallelism (`set_aux_streams`);
- one device-memory block for activations, sized for its profile and shared by all
  of its execution contexts (user-managed allocation): they never run at once;
- one execution context for plain `execute_async_v3`, plus one per captured CUDA
  graph (one per batch bucket), all bound to the worker's profile;
- device buffers and pinned host staging buffers for every IO tensor, sized for the
  profile's maximum shapes, allocated once;
- four timing events, recorded around H2D, compute and D2H.

Per batch: gather into pinned memory, then either one graph launch or the plain
path, then a wait on the batch's last event (never a device-wide sync) and one
allocation for the outputs. A graph (one per batch bucket; the batch is padded up
to it) holds the H2D copies, the engine's work, the D2H copies and the four timing
events, so a batch costs one launch and its busy time has no host gaps in it. The
plain path records the events and copies around `execute_async_v3`, calling
`set_input_shape` only when a shape changed. A bucket whose graph cannot be
captured falls back to the plain path, and the batch that found out reports why
(Stats show it). A serving worker (`capture_at_start`) captures every bucket's
graph at the profile's opt shapes when it starts; failures found then are in
its `info` (Stats from the start) and reported again with its first batches,
which is how an executor rebuilt after a failure tells them.
"""

from __future__ import annotations

import functools
import logging
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from trtserve.service.backends.base import (
    BatchResult,
    DeviceTarget,
    DeviceTensor,
    HostTarget,
    PinnedHostArray,
    Targets,
    WorkerInfo,
)
from trtserve.service.backends.tensorrt.api import (
    IOTensor,
    dims_tuple,
    engine_io,
    import_tensorrt,
    profile_shapes,
)
from trtserve.service.backends.tensorrt.cuda import CudaError, CudaRuntime, Event, Graph, GraphExec
from trtserve.service.errors import InputRejected

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
_ALIGN = 256  # bytes: each output's offset in a batch's result block


class TensorRTError(RuntimeError):
    """A TensorRT call failed (returned False or None); the message names the call."""


class _ShapeRefused(TensorRTError):
    """TensorRT refused a batch's input shapes (set_input_shape, infer_shapes).

    Nothing has run on the device yet: the context is sound and a batch of
    other shapes runs. In `run` it becomes InputRejected (the input's fault).
    """


# ---------------------------------------------------------------------------------
# The executor


@dataclass
class _Binding:
    """One IO tensor's buffers on one worker, sized for the profile's maximum shape."""

    tensor: IOTensor
    device: int  # device pointer
    host: np.ndarray  # pinned uint8 staging buffer
    nbytes: int

    def host_view(self, shape: Shape) -> np.ndarray:
        count = math.prod(shape)
        return self.host[: count * self.tensor.dtype.itemsize].view(self.tensor.dtype).reshape(
            shape
        )


@dataclass
class _CapturedGraph:
    context: Any  # trt.IExecutionContext: the context the graph was captured with
    graph: Graph
    graph_exec: GraphExec
    output_shapes: dict[str, Shape]
    # True: the graph also copies the (padded) batch in and out and records the events.
    with_io: bool


class _CaptureFailed(Exception):
    """A graph could not be captured; the message says why (it goes to Stats)."""


class TrtExecutor:
    """One worker's execution contexts, stream, buffers and graphs (see the module doc).

    `engine` is a deserialized ICudaEngine (or a double with the same API), `cuda` a
    CudaRuntime for the worker's device. Create, use and close it on one thread.
    """

    info: WorkerInfo  # what Stats shows: set when the executor opens
    # A lone request's (or frontend group's) page-locked inputs of at least this many
    # bytes in all are copied to the device straight from where they lie, with no
    # staging copy. Below it the batch is staged like any other: one memcpy on this
    # thread and one graph launch holding the copies and events, against four more
    # CUDA calls on the direct path, each a release and a retake of the GIL that the
    # engine's loop contends for. Staged, 8-row requests (16-128 KiB batches) served
    # 10-14% more rows on the H100 host (docs/processes-measured.md, "Session 15";
    # `benchmarks.frontends_rows once --direct-min-bytes N` sets it for a run).
    direct_min_bytes = 256 << 10

    def __init__(
        self,
        engine: trt.ICudaEngine,
        cuda: CudaRuntime,
        *,
        profile: int = 0,
        graph_batch_sizes: Sequence[int] = (),
        cuda_graphs: bool = True,
        graph_io: bool = True,
        trt_module: types.ModuleType | Any = None,
        name: str = "",
        capture_at_start: bool = False,
        batching: bool = True,
    ) -> None:
        self._engine = engine
        # False: an engine without a batch dimension (ModelSpec.batching): every
        # batch is one request, run with its full shapes, and no CUDA graphs
        # (their buckets pad dimension 0).
        self._batching = batching
        self._cuda = cuda
        self._trt = trt_module if trt_module is not None else import_tensorrt()
        self._graph_io = graph_io
        self._profile = profile
        self._name = name or f"profile {profile}"
        self._stream: int | None = None
        self._aux_streams: list[int] = []
        self._memory: int | None = None
        self._memory_size = 0
        self._events: list[Event] = []
        self._bindings: dict[str, _Binding] = {}
        self._plain: Any = None  # trt.IExecutionContext for plain enqueue
        self._plain_shapes: dict[str, Shape] = {}
        self._plain_outputs: dict[str, Shape] = {}
        self._graphs: dict[tuple[Shape, ...], _CapturedGraph] = {}
        self._capture_failures: dict[tuple[Shape, ...], str] = {}
        # Graphs of the engine's work alone, for buckets whose graph holds the copies,
        # used by batches whose tensors lie in device memory or go to a target.
        self._bare_graphs: dict[tuple[Shape, ...], _CapturedGraph] = {}
        self._bare_failures: set[tuple[Shape, ...]] = set()
        # Capture failures found at start: in `info` (Stats at start) and reported
        # again with the next batches, for an executor rebuilt after a failure.
        self._unreported: list[tuple[int, str]] = []
        try:
            self._open(graph_batch_sizes, cuda_graphs)
            if capture_at_start:
                self._capture_buckets()
                self.info = replace(self.info, capture_failures=tuple(self._unreported))
        except BaseException:
            try:
                self.close()
            except Exception:  # the error that stopped the start is the one to raise
                log.exception("%s: freeing after a failed start failed too", self._name)
            raise

    # --- setup ----------------------------------------------------------------------

    def _open(self, graph_batch_sizes: Sequence[int], cuda_graphs: bool) -> None:
        cuda, engine = self._cuda, self._engine
        cuda.set_device()
        self._stream = cuda.stream_create()
        for _ in range(engine.num_aux_streams):
            self._aux_streams.append(cuda.stream_create())
        for _ in range(4):
            self._events.append(cuda.event_create())
        self._ranges = profile_shapes(engine, self._profile)
        tensors = engine_io(engine)
        self._inputs = [t for t in tensors if t.mode == "input"]
        self._outputs = [t for t in tensors if t.mode == "output"]
        missing = [t.name for t in self._inputs if t.name not in self._ranges]
        if missing:
            raise TensorRTError(
                f"{self._name}: inputs {missing} have no profile shapes; shape-tensor inputs "
                "are not supported"
            )
        self._memory_size = _device_memory_size(engine, self._profile)
        self._memory = cuda.malloc(self._memory_size)
        # The plain context finds the output shapes for the profile's maximum input
        # shapes, which size every buffer; the graphs' contexts come later, lazily.
        self._plain = self._new_context(with_addresses=False)
        max_shapes = {name: r[2] for name, r in self._ranges.items()}
        self._set_shapes(self._plain, self._plain_shapes, max_shapes)
        max_outputs = self._output_shapes(self._plain)
        for tensor in tensors:
            shape = max_shapes[tensor.name] if tensor.mode == "input" else max_outputs[tensor.name]
            self._bindings[tensor.name] = self._allocate(tensor, shape)
        self._plain_outputs = max_outputs
        self._set_addresses(self._plain)
        # Zeroed buffers: rows padded up to a bucket never hold garbage (NaN) values.
        done = self._events[3]
        cuda.event_record(done, self._stream)
        cuda.event_synchronize(done)
        if self._batching:
            low = max(r[0][0] for r in self._ranges.values())
            high = min(r[2][0] for r in self._ranges.values())
        else:
            low = high = 1
        self._buckets = (
            tuple(sorted(b for b in set(graph_batch_sizes) if low <= b <= high))
            if cuda_graphs and self._batching else ()
        )
        self.info = WorkerInfo(
            profile=self._profile,
            device=f"cuda:{cuda.device}",
            stream=hex(self._stream),
            stream_non_blocking=cuda.stream_non_blocking(self._stream),
            aux_streams=len(self._aux_streams),
            min_batch_size=low,
            max_batch_size=high,
        )

    def _capture_buckets(self) -> None:
        """Capture every bucket's graph now, at the profile's opt shapes.

        A capture takes a new context, a plain enqueue and the capture itself:
        milliseconds on the worker's thread, which a batch that met a bucket
        first would otherwise wait out, and a quick batch behind it too. Other
        non-batch shapes are still captured when a batch first brings them.
        """
        for bucket in self._buckets:
            shapes = {t.name: (bucket, *self._ranges[t.name][1][1:]) for t in self._inputs}
            key = tuple(shapes[t.name] for t in self._inputs)
            graph, reason = self._try_capture(bucket, key, shapes)
            if graph is None:
                self._unreported.append((bucket, reason))

    def _try_capture(self, bucket: int, key: tuple[Shape, ...], shapes: Mapping[str, Shape]
                     ) -> tuple[_CapturedGraph | None, str]:
        """The bucket's graph, or None and why not; a failure is remembered, never retried."""
        try:
            return self._capture(key, shapes), ""
        except _CaptureFailed as err:
            reason = str(err)
            self._capture_failures[key] = reason
            log.warning("%s: no CUDA graph for batch bucket %d, plain enqueue instead: %s",
                        self._name, bucket, reason)
            return None, reason

    def _allocate(self, tensor: IOTensor, shape: Shape) -> _Binding:
        if any(d < 0 for d in shape):
            raise TensorRTError(
                f"{self._name}: output '{tensor.name}' has shape {list(shape)} at the profile's "
                "maximum input shapes; data-dependent output shapes are not supported"
            )
        nbytes = math.prod(shape) * tensor.dtype.itemsize
        device = self._cuda.malloc(nbytes)
        try:
            host = self._cuda.host_alloc(nbytes)
        except BaseException:
            self._cuda.free(device)
            raise
        binding = _Binding(tensor, device, host, nbytes)
        host.fill(0)
        assert self._stream is not None
        self._cuda.memset_async(device, 0, nbytes, self._stream)
        return binding

    def _new_context(self, with_addresses: bool = True) -> trt.IExecutionContext:
        """An execution context on the shared memory block, bound to this worker's profile."""
        assert self._memory is not None and self._stream is not None
        strategy = getattr(
            getattr(self._trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None
        )
        if strategy is not None:
            context = self._engine.create_execution_context(strategy)
        else:  # libraries without allocation strategies
            context = self._engine.create_execution_context_without_device_memory()
        if context is None:
            raise TensorRTError(
                f"{self._name}: create_execution_context returned None (out of memory, or "
                "TensorRT logged why)"
            )
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self._memory, self._memory_size)
        else:  # before TensorRT 10: a property, sized by the engine
            legacy: Any = context
            legacy.device_memory = self._memory
        if not context.set_optimization_profile_async(self._profile, self._stream):
            raise TensorRTError(
                f"{self._name}: set_optimization_profile_async({self._profile}) returned False "
                f"(the engine has {self._engine.num_optimization_profiles} profiles)"
            )
        if self._aux_streams:
            context.set_aux_streams(self._aux_streams)
        if with_addresses:
            self._set_addresses(context)
        return context

    def _set_addresses(self, context: Any) -> None:
        for name, binding in self._bindings.items():
            if not context.set_tensor_address(name, binding.device):
                raise TensorRTError(f"{self._name}: set_tensor_address('{name}') returned False")

    def _set_shapes(
        self, context: Any, current: dict[str, Shape], shapes: Mapping[str, Shape]
    ) -> bool:
        """Set the input shapes that differ from `current`; True if any did."""
        changed = False
        for name, shape in shapes.items():
            if current.get(name) == shape:
                continue
            if not context.set_input_shape(name, shape):
                low, _, high = self._ranges[name]
                raise _ShapeRefused(
                    f"{self._name}: set_input_shape('{name}', {list(shape)}) returned False; "
                    f"profile {self._profile} takes {list(low)} to {list(high)}"
                )
            current[name] = shape
            changed = True
        return changed

    def _output_shapes(self, context: Any) -> dict[str, Shape]:
        """Output shapes for the input shapes set; _ShapeRefused when TensorRT can't tell.

        At start (the profile's max shapes) that is a model trtserve cannot
        serve; later, with those checked, it is shapes the network cannot run.
        """
        try:
            unresolved = context.infer_shapes()
        except Exception as err:  # TensorRT logs why; some versions raise as well
            raise _ShapeRefused(f"{self._name}: infer_shapes raised {type(err).__name__}: "
                                f"{err}") from None
        if unresolved:
            raise _ShapeRefused(
                f"{self._name}: infer_shapes could not resolve {list(unresolved)}"
            )
        shapes = {t.name: dims_tuple(context.get_tensor_shape(t.name)) for t in self._outputs}
        for name, shape in shapes.items():
            if (self._batching and not shape) or any(d < 0 for d in shape):
                raise _ShapeRefused(
                    f"{self._name}: output '{name}' has shape {list(shape)}; data-dependent "
                    "output shapes are not supported"
                )
        return shapes

    def _enqueue(self, context: Any) -> None:
        assert self._stream is not None
        if not context.execute_async_v3(self._stream):
            raise TensorRTError(
                f"{self._name}: execute_async_v3 returned False (TensorRT logged why)"
            )

    # --- one batch --------------------------------------------------------------------

    def _bucket(self, rows: int) -> int | None:
        for bucket in self._buckets:
            if bucket >= rows:
                return bucket
        return None

    def run(self, inputs: Mapping[str, Sequence[np.ndarray]], rows: int,
            targets: Sequence[Targets] | None = None) -> BatchResult:
        if self._stream is None:
            raise TensorRTError(f"{self._name}: the executor is closed")
        missing = [t.name for t in self._inputs if t.name not in inputs]
        if missing:
            raise TensorRTError(f"{self._name}: batch lacks inputs {missing}")
        shapes: dict[str, Shape] = {}
        for tensor in self._inputs:
            parts = inputs[tensor.name]
            shape = (rows, *parts[0].shape[1:]) if self._batching else parts[0].shape
            low, _, high = self._ranges[tensor.name]
            if len(shape) != len(low) or any(
                not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)
            ):
                raise TensorRTError(
                    f"{self._name}: input '{tensor.name}' of shape {list(shape)} is outside "
                    f"profile {self._profile}'s range {list(low)} to {list(high)}"
                )
            shapes[tensor.name] = shape
        # Straight between where tensors lie and the device: tensors in device memory,
        # outputs with targets, or a lone request in page-locked memory (a pinned region
        # or arena) of direct_min_bytes or more, which needs no staging copy.
        direct = bool(targets) or any(isinstance(p, DeviceTensor)
                                      for parts in inputs.values() for p in parts) \
            or (all(len(parts) == 1 and isinstance(parts[0], PinnedHostArray)
                    for parts in inputs.values())
                and sum(parts[0].nbytes for parts in inputs.values()) >= self.direct_min_bytes)
        if not direct:
            for tensor in self._inputs:
                parts = inputs[tensor.name]
                view = self._bindings[tensor.name].host_view(shapes[tensor.name])
                if len(parts) == 1:
                    np.copyto(view, parts[0])
                else:
                    np.concatenate(parts, axis=0, out=view)

        try:
            if direct:
                return self._run_direct(inputs, shapes, rows, targets)
            return self._run(shapes, rows)
        except _ShapeRefused as err:
            # The plain context may hold the refused shapes: set every shape next time.
            self._plain_shapes.clear()
            given = {name: list(shape) for name, shape in shapes.items()}
            raise InputRejected(f"TensorRT cannot run input shapes {given}: {err}") from None

    def _pick_graph(self, shapes: Mapping[str, Shape], rows: int, bare: bool = False
                    ) -> tuple[_CapturedGraph | None, tuple[int, str] | None]:
        """The batch's graph (None: plain enqueue) and a capture failure to report.

        `bare`: the batch copies its own tensors (device memory, targets), so a
        graph that holds the copies will not do: one of the engine's work alone.
        """
        graph: _CapturedGraph | None = None
        failure: tuple[int, str] | None = None
        bucket = self._bucket(rows)
        if bucket is not None:
            padded = {name: (bucket, *shape[1:]) for name, shape in shapes.items()}
            key = tuple(padded[t.name] for t in self._inputs)
            graph = self._graphs.get(key)
            if bare:
                if graph is None or graph.with_io:
                    graph = None if key in self._capture_failures \
                        else self._bare_graph(bucket, key, padded)
            elif graph is None and key not in self._capture_failures:
                graph, reason = self._try_capture(bucket, key, padded)
                if graph is None:
                    failure = (bucket, reason)
        if failure is None and self._unreported:
            failure = self._unreported.pop(0)
        return graph, failure

    def _bare_graph(self, bucket: int, key: tuple[Shape, ...], shapes: Mapping[str, Shape]
                    ) -> _CapturedGraph | None:
        """A graph of the engine's work alone for this bucket (captured once), or None."""
        graph = self._bare_graphs.get(key)
        if graph is not None or key in self._bare_failures:
            return graph
        context = self._new_context()
        self._set_shapes(context, {}, shapes)
        output_shapes = self._output_shapes(context)
        self._enqueue(context)
        try:
            graph = self._record(context, shapes, output_shapes, with_io=False)
        except _CaptureFailed as err:
            self._bare_failures.add(key)
            log.warning("%s: no CUDA graph without copies for batch bucket %d; batches whose "
                        "tensors lie in device memory run plain enqueue: %s", self._name,
                        bucket, err)
            return None
        self._bare_graphs[key] = graph
        return graph

    def _run(self, shapes: Mapping[str, Shape], rows: int) -> BatchResult:
        cuda, stream = self._cuda, self._stream
        assert stream is not None
        graph, failure = self._pick_graph(shapes, rows)
        start, loaded, computed, done = self._events
        if graph is not None and graph.with_io:
            # One launch: H2D, the engine's work, D2H and the four events are its nodes
            # (counted with the runtime's copies, which count calls, not graph nodes).
            cuda.graph_launch(graph.graph_exec, stream)
            cuda.copies["graph_h2d"] += len(self._inputs)
            cuda.copies["graph_d2h"] += len(self._outputs)
            output_shapes = graph.output_shapes
        else:
            cuda.event_record(start, stream)
            self._copy_inputs(shapes)
            cuda.event_record(loaded, stream)
            if graph is not None:
                cuda.graph_launch(graph.graph_exec, stream)
                output_shapes = graph.output_shapes
            else:
                if self._set_shapes(self._plain, self._plain_shapes, shapes):
                    self._plain_outputs = self._output_shapes(self._plain)
                self._enqueue(self._plain)
                output_shapes = self._plain_outputs
            cuda.event_record(computed, stream)
            self._copy_outputs(output_shapes, rows)
            cuda.event_record(done, stream)
        cuda.event_synchronize(done)

        # One allocation holds every output of the batch.
        sizes = [self._output_bytes(t, output_shapes, rows) for t in self._outputs]
        offsets = []
        total = 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        block = np.empty(total, dtype=np.uint8)
        outputs = {}
        for tensor, offset, size in zip(self._outputs, offsets, sizes, strict=True):
            block[offset:offset + size] = self._bindings[tensor.name].host[:size]
            shape = output_shapes[tensor.name]
            if self._batching:
                shape = (rows, *shape[1:])
            outputs[tensor.name] = block[offset:offset + size].view(tensor.dtype).reshape(shape)
        return BatchResult(
            outputs=outputs,
            compute_s=cuda.event_elapsed_s(loaded, computed),
            graph_launch=graph is not None,
            capture_failure=failure,
            input_s=cuda.event_elapsed_s(start, loaded),
            output_s=cuda.event_elapsed_s(computed, done),
        )

    def _run_direct(self, inputs: Mapping[str, Sequence[np.ndarray]],
                    shapes: Mapping[str, Shape], rows: int,
                    targets: Sequence[Targets] | None) -> BatchResult:
        """A batch with tensors in device memory (DeviceTensor parts) or outputs with targets.

        A request alone in its batch, with no CUDA graph to replay, is bound where its
        tensors lie: `set_tensor_address` to a CUDA region's pointers, no copy at all.
        Otherwise each tensor is copied once, straight between where it lies and the
        worker's device buffers: device-to-device for a CUDA region, device-to-host
        into a host target, host-to-device from page-locked memory for a request
        alone; other input parts go through the staging buffer as on the plain path.
        """
        cuda, stream = self._cuda, self._stream
        assert stream is not None and self._plain is not None
        graph, failure = self._pick_graph(shapes, rows, bare=True)
        lone = len(next(iter(inputs.values()))) == 1
        bind = lone and graph is None
        rows_each = [p.shape[0] if self._batching else 1 for p in inputs[self._inputs[0].name]]
        avoided = 0
        addresses: dict[str, int] = {}
        start, loaded, computed, done = self._events
        cuda.event_record(start, stream)
        for tensor in self._inputs:
            parts, binding = inputs[tensor.name], self._bindings[tensor.name]
            if bind and isinstance(parts[0], DeviceTensor):
                addresses[tensor.name] = parts[0].pointer
                avoided += 1
                continue
            offset = 0
            for part in parts:
                nbytes = part.nbytes
                if isinstance(part, DeviceTensor):
                    cuda.memcpy_d2d_async(binding.device + offset, part.pointer, nbytes, stream)
                    avoided += 1
                elif lone and isinstance(part, PinnedHostArray) and part.flags.c_contiguous:
                    # Page-locked: DMA straight from where it lies, no staging copy.
                    cuda.memcpy_h2d_async(binding.device, part, nbytes, stream)
                    avoided += 1
                else:
                    staged = binding.host[offset:offset + nbytes]
                    np.copyto(staged.view(tensor.dtype).reshape(part.shape), part)
                    cuda.memcpy_h2d_async(binding.device + offset, staged, nbytes, stream)
                offset += nbytes
        cuda.event_record(loaded, stream)
        if graph is not None:
            cuda.graph_launch(graph.graph_exec, stream)
            output_shapes = graph.output_shapes
        else:
            if self._set_shapes(self._plain, self._plain_shapes, shapes):
                self._plain_outputs = self._output_shapes(self._plain)
            output_shapes = self._plain_outputs
            if bind and targets:
                for tensor in self._outputs:
                    target = targets[0].get(tensor.name)
                    if isinstance(target, DeviceTarget) and target.byte_size >= \
                            self._output_bytes(tensor, output_shapes, rows):
                        addresses[tensor.name] = target.pointer
            try:
                for name, pointer in addresses.items():
                    if not self._plain.set_tensor_address(name, pointer):
                        raise TensorRTError(f"{self._name}: set_tensor_address('{name}') to "
                                            "a shared-memory region returned False")
                self._enqueue(self._plain)
            finally:
                # TensorRT read the addresses at enqueue: the worker's buffers come back.
                for name in addresses:
                    self._plain.set_tensor_address(name, self._bindings[name].device)
        cuda.event_record(computed, stream)
        placed: dict[tuple[int, str], np.ndarray] = {}
        staged_parts: list[tuple[str, int, int]] = []  # (output, offset, bytes) to unstage
        for tensor in self._outputs:
            binding = self._bindings[tensor.name]
            shape = output_shapes[tensor.name]
            offset = 0
            for index, request_rows in enumerate(rows_each):
                own = (request_rows, *shape[1:]) if self._batching else shape
                nbytes = math.prod(own) * tensor.dtype.itemsize
                target = targets[index].get(tensor.name) if targets else None
                if target is not None and target.byte_size < nbytes:
                    target = None  # too small: the caller refuses it, naming the region
                if tensor.name in addresses and isinstance(target, DeviceTarget):
                    placed[(index, tensor.name)] = target.array(tensor.dtype, own)
                    avoided += 1
                elif isinstance(target, DeviceTarget):
                    cuda.memcpy_d2d_async(target.pointer, binding.device + offset, nbytes,
                                          stream)
                    placed[(index, tensor.name)] = target.array(tensor.dtype, own)
                    avoided += 1
                elif isinstance(target, HostTarget):
                    # Straight into the region: DMA when pinned; pageable, CUDA stages
                    # it itself (so no copy is avoided, but none is added either).
                    dest = target.array(tensor.dtype, own)
                    cuda.memcpy_d2h_async(dest, binding.device + offset, nbytes, stream)
                    placed[(index, tensor.name)] = dest
                    avoided += target.pinned
                else:
                    cuda.memcpy_d2h_async(binding.host[offset:], binding.device + offset,
                                          nbytes, stream)
                    staged_parts.append((tensor.name, offset, nbytes))
                offset += nbytes
        cuda.event_record(done, stream)
        cuda.event_synchronize(done)
        outputs = {}
        for tensor in self._outputs:
            shape = output_shapes[tensor.name]
            if self._batching:
                shape = (rows, *shape[1:])
            outputs[tensor.name] = np.empty(shape, dtype=tensor.dtype)
        for name, offset, nbytes in staged_parts:
            outputs[name].reshape(-1).view(np.uint8)[offset:offset + nbytes] = \
                self._bindings[name].host[offset:offset + nbytes]
        return BatchResult(
            outputs=outputs,
            compute_s=cuda.event_elapsed_s(loaded, computed),
            graph_launch=graph is not None,
            capture_failure=failure,
            input_s=cuda.event_elapsed_s(start, loaded),
            output_s=cuda.event_elapsed_s(computed, done),
            placed=placed,
            copies_avoided=avoided,
            io_path="bound" if addresses else "copied",
        )

    def _output_bytes(self, tensor: IOTensor, shapes: Mapping[str, Shape], rows: int) -> int:
        """Bytes of an output for `rows` rows (without batching: its full shape)."""
        shape = shapes[tensor.name]
        if self._batching:
            return rows * math.prod(shape[1:]) * tensor.dtype.itemsize
        return math.prod(shape) * tensor.dtype.itemsize

    def _copy_inputs(self, shapes: Mapping[str, Shape]) -> None:
        assert self._stream is not None
        for tensor in self._inputs:
            binding = self._bindings[tensor.name]
            nbytes = math.prod(shapes[tensor.name]) * tensor.dtype.itemsize
            self._cuda.memcpy_h2d_async(binding.device, binding.host, nbytes, self._stream)

    def _copy_outputs(self, shapes: Mapping[str, Shape], rows: int) -> None:
        assert self._stream is not None
        for tensor in self._outputs:
            binding = self._bindings[tensor.name]
            nbytes = self._output_bytes(tensor, shapes, rows)
            self._cuda.memcpy_d2h_async(binding.host, binding.device, nbytes, self._stream)

    # --- CUDA graphs ---------------------------------------------------------------------

    def _capture(self, key: tuple[Shape, ...], shapes: Mapping[str, Shape]) -> _CapturedGraph:
        """Capture a graph for one set of (padded) input shapes, on its own context.

        The graph holds the batch's copies and timing events too (one launch per batch,
        and busy time without host gaps); where CUDA refuses that, only the engine's
        work, with copies and events around the launch as for plain enqueue.
        """
        context = self._new_context()
        self._set_shapes(context, {}, shapes)
        output_shapes = self._output_shapes(context)
        # TensorRT does deferred work (allocation, shape-dependent setup) in the first
        # enqueue after a shape change; that work must not land in the graph.
        self._enqueue(context)
        with_io_failure = ""
        if self._graph_io:
            try:
                captured = self._record(context, shapes, output_shapes, with_io=True)
            except _CaptureFailed as err:
                with_io_failure = str(err)
                log.warning("%s: CUDA graph with copies and events refused (%s); capturing "
                            "the engine's work alone", self._name, err)
            else:
                self._graphs[key] = captured
                return captured
        try:
            captured = self._record(context, shapes, output_shapes, with_io=False)
        except _CaptureFailed as err:
            detail = f" (with copies and events: {with_io_failure})" if with_io_failure else ""
            raise _CaptureFailed(f"{err}{detail}") from None
        self._graphs[key] = captured
        return captured

    def _record(self, context: Any, shapes: Mapping[str, Shape],
                output_shapes: dict[str, Shape], with_io: bool) -> _CapturedGraph:
        cuda, stream = self._cuda, self._stream
        assert stream is not None
        start, loaded, computed, done = self._events
        try:
            cuda.begin_capture(stream)
        except CudaError as err:
            cuda.clear_error()
            raise _CaptureFailed(f"{err.name} beginning the capture") from None
        enqueued, problem = False, ""
        try:
            if with_io:
                cuda.event_record(start, stream, external=True)
                self._copy_inputs(shapes)
                cuda.event_record(loaded, stream, external=True)
            enqueued = bool(context.execute_async_v3(stream))
            if with_io and enqueued:
                cuda.event_record(computed, stream, external=True)
                self._copy_outputs(output_shapes, next(iter(shapes.values()))[0])
                cuda.event_record(done, stream, external=True)
        except CudaError as err:
            problem = f"{err.call} failed while capturing: {err.name}"
        except Exception as err:  # reported as the capture's failure; capture ends below
            problem = f"execute_async_v3 raised {type(err).__name__}: {err}"
        try:
            graph = cuda.end_capture(stream)
        except CudaError as err:
            pending = cuda.clear_error()
            if cuda.is_capturing(stream):
                raise TensorRTError(
                    f"{self._name}: stream still capturing after {err.name}"
                ) from err
            detail = problem or ("execute_async_v3 returned False" if not enqueued else "")
            raise _CaptureFailed(
                f"{err.name} ending the capture"
                + (f" ({detail})" if detail else "")
                + (f"; last error {pending}" if pending and pending != err.name else "")
            ) from None
        if problem or not enqueued:
            cuda.graph_destroy(graph)
            cuda.clear_error()
            raise _CaptureFailed(problem or "execute_async_v3 returned False during capture")
        try:
            graph_exec = cuda.graph_instantiate(graph)
        except CudaError as err:
            cuda.graph_destroy(graph)
            cuda.clear_error()
            raise _CaptureFailed(f"{err.name} instantiating the graph") from None
        return _CapturedGraph(context, graph, graph_exec, output_shapes, with_io)

    # --- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Free everything this executor made: graphs, contexts, buffers, events, streams.

        Waits for the worker's streams first (not the device). Every step is tried;
        the first failure is raised at the end. Calling it again does nothing.
        """
        cuda = self._cuda
        errors: list[BaseException] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as err:  # keep freeing the rest; raised below
                errors.append(err)

        for stream in (self._stream, *self._aux_streams):
            if stream is not None:
                attempt(functools.partial(cuda.stream_synchronize, stream))
        graphs, self._graphs = self._graphs, {}
        bare, self._bare_graphs = self._bare_graphs, {}
        for graph_exec, graph in [(g.graph_exec, g.graph)
                                  for g in (*graphs.values(), *bare.values())]:
            attempt(functools.partial(cuda.graph_exec_destroy, graph_exec))
            attempt(functools.partial(cuda.graph_destroy, graph))
        # TensorRT frees an execution context when its last reference goes.
        graphs.clear()
        bare.clear()
        self._plain = None
        bindings, self._bindings = self._bindings, {}
        for binding in bindings.values():
            attempt(functools.partial(cuda.free, binding.device))
            attempt(functools.partial(cuda.host_free, binding.host))
        bindings.clear()
        if self._memory is not None:
            attempt(functools.partial(cuda.free, self._memory))
            self._memory = None
        events, self._events = self._events, []
        for event in events:
            attempt(functools.partial(cuda.event_destroy, event))
        aux, self._aux_streams = self._aux_streams, []
        for stream in aux:
            attempt(functools.partial(cuda.stream_destroy, stream))
        if self._stream is not None:
            attempt(functools.partial(cuda.stream_destroy, self._stream))
            self._stream = None
        if errors:
            raise errors[0]


def _device_memory_size(engine: trt.ICudaEngine, profile: int) -> int:
    """Activation memory one context of this profile needs (the V2 APIs count the
    weight-streaming scratch too)."""
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return int(engine.get_device_memory_size_for_profile_v2(profile))
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)

"""The GPU stand-in: a TEST DOUBLE of a TensorRT engine that does real CUDA work.

TensorRT cannot be installed on the lent GPU machine, yet the executor's CUDA path
(streams, pinned buffers, events, graph capture, user-managed device memory, aux
streams) must run on real hardware. `StandinEngine` and `StandinContext` implement
the part of the TensorRT engine / execution-context API that `TrtExecutor` uses;
`execute_async_v3(stream)` launches a two-layer FP32 MLP

    y = relu(x @ w1 + b1) @ w2 + b2        (default 512 -> 2048 -> 512)

as CuPy `RawKernel`s on the given stream (`cupy.cuda.ExternalStream`). RawKernel
launches are capturable, so the executor's CUDA graphs really capture and replay
them (CuPy refuses cuBLAS during capture, hence hand-written kernels). The hidden
activations live in the context's user-managed device memory, the weights once
per engine, as with TensorRT.

With `trace_capacity`, every thread block of every launch appends (stream, start,
end) from the GPU's %globaltimer to a device buffer: the tests read which kernels
of which worker ran when, independently of the executor's events.

It is a double, never a backend: Stats show it as "gpu-standin-double", and no
number measured with it is a TensorRT number.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from trtserve.service.backends.base import LoadedModel
from trtserve.service.backends.tensorrt.cuda import CudaRuntime, runtime_module
from trtserve.service.backends.tensorrt.load import (
    EngineHandle,
    engine_spec,
    executor_factories,
    graph_buckets,
)
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.testing.servers import ServerThread, running_server
from trtserve.service.testing.trt_double import (
    DataType,
    ExecutionContextAllocationStrategy,
    TensorIOMode,
    trt_module,
)

LABEL = "gpu-standin-double"
INPUT, OUTPUT = "input", "output"
TILE = 16

_SOURCE = r"""
#define TILE 16

__device__ __forceinline__ long long globaltimer() {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// y[r, col] = act(sum_i x[r, i] * w[i, col] + b[col]) for the columns
// [col0, col0 + gridDim.x * TILE) and rows [0, rows). x: [rows, k], w: [k, n], y: [rows, n].
extern "C" __global__ void linear(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int rows, int k, int n, int col0, int relu,
    long long* trace, unsigned long long* trace_count, unsigned long long trace_capacity,
    long long tag)
{
    __shared__ float xs[TILE][TILE + 1];
    __shared__ float ws[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty;
    const int col = col0 + blockIdx.x * TILE + tx;
    long long start = 0;
    if (trace != nullptr && tx == 0 && ty == 0) start = globaltimer();
    float acc = 0.0f;
    for (int t = 0; t < k; t += TILE) {
        xs[ty][tx] = row < rows ? x[(size_t)row * k + t + tx] : 0.0f;
        ws[ty][tx] = w[(size_t)(t + ty) * n + col];
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) acc = fmaf(xs[ty][i], ws[i][tx], acc);
        __syncthreads();
    }
    if (row < rows) {
        const float v = acc + b[col];
        y[(size_t)row * n + col] = relu ? fmaxf(v, 0.0f) : v;
    }
    if (trace != nullptr) {
        __syncthreads();
        if (tx == 0 && ty == 0) {
            const unsigned long long slot = atomicAdd(trace_count, 1ULL);
            if (slot < trace_capacity) {
                trace[3 * slot] = tag;
                trace[3 * slot + 1] = start;
                trace[3 * slot + 2] = globaltimer();
            }
        }
    }
}
"""


def _ptr(value: int) -> np.uint64:
    return np.uint64(value)


class StandinEngine:
    """An "engine" of one MLP: input [batch, in_features] -> output [batch, out_features].

    `profiles` optimization profiles, each taking `batch` = (min, opt, max) rows.
    `num_aux_streams` > 0 splits the second layer's columns between the main stream
    and one aux stream (fork/join with events, capturable). `uncapturable` makes
    execute_async_v3 do an operation CUDA refuses during capture (a stream sync), so
    capture fails the way a non-capturable TensorRT engine's would. `host_weights=False`
    makes the weights on the GPU only (for stand-ins too large to make on the host
    quickly); `reference` then has nothing to compute with.
    """

    def __init__(
        self,
        in_features: int = 512,
        hidden: int = 2048,
        out_features: int = 512,
        batch: tuple[int, int, int] = (1, 32, 64),
        profiles: int = 1,
        num_aux_streams: int = 0,
        seed: int = 0,
        trace_capacity: int = 0,
        uncapturable: bool = False,
        device: int = 0,
        host_weights: bool = True,
    ) -> None:
        import cupy

        for name, size in (("in_features", in_features), ("hidden", hidden),
                           ("out_features", out_features)):
            if size % TILE:
                raise ValueError(f"{name} must be a multiple of {TILE}, got {size}")
        if num_aux_streams and out_features % (2 * TILE):
            raise ValueError(f"out_features must be a multiple of {2 * TILE} with aux streams")
        self._cupy = cupy
        self.device = device
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.batch = batch
        self.num_optimization_profiles = profiles
        self.num_aux_streams = num_aux_streams
        self.num_io_tensors = 2
        self.uncapturable = uncapturable
        shapes = ((in_features, hidden), (hidden,), (hidden, out_features), (out_features,))
        scales = (1 / math.sqrt(in_features), 0.1, 1 / math.sqrt(hidden), 0.1)
        with cupy.cuda.Device(device):
            # Weights live on the GPU once, shared by every context (as an engine's do).
            if host_weights:  # kept on the host too, for `reference`
                rng = np.random.default_rng(seed)
                self.w1, self.b1, self.w2, self.b2 = (
                    (rng.standard_normal(shape) * scale).astype(np.float32)
                    for shape, scale in zip(shapes, scales, strict=True))
                self._weights = [cupy.asarray(a) for a in (self.w1, self.b1, self.w2, self.b2)]
            else:  # large stand-ins for throughput only: made on the GPU, no reference
                gen = cupy.random.default_rng(seed)
                self._weights = [gen.standard_normal(shape, dtype=cupy.float32) * scale
                                 for shape, scale in zip(shapes, scales, strict=True)]
            self.kernel = cupy.RawKernel(_SOURCE, "linear")
            self.kernel.compile()  # now, not inside a capture or on a worker's first batch
            self.trace_capacity = trace_capacity
            self._trace = cupy.zeros((max(trace_capacity, 1), 3), dtype=cupy.int64)
            self._trace_count = cupy.zeros(1, dtype=cupy.uint64)
            cupy.cuda.Device(device).synchronize()
        self.contexts_created = 0
        self.aux_streams_seen: set[int] = set()  # every aux stream a context was given

    # --- the TensorRT engine API the executor uses ---------------------------------------

    def get_tensor_name(self, index: int) -> str:
        return (INPUT, OUTPUT)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == INPUT else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, self.in_features if name == INPUT else self.out_features)

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        if not 0 <= profile < self.num_optimization_profiles or name != INPUT:
            raise ValueError(f"no profile shape for {name!r} in profile {profile}")
        return [(b, self.in_features) for b in self.batch]

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        return self.batch[2] * self.hidden * 4  # the hidden activations

    def create_execution_context(self, strategy: Any) -> StandinContext:
        if strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
            raise ValueError("the stand-in supports user-managed device memory only")
        self.contexts_created += 1
        return StandinContext(self)

    # --- for tests ---------------------------------------------------------------------

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The same function in float64 on the CPU (engines made with host_weights)."""
        h = np.maximum(x.astype(np.float64) @ self.w1 + self.b1, 0.0)
        return h @ self.w2 + self.b2

    @property
    def tracing(self) -> bool:
        return self.trace_capacity > 0

    def trace_args(self, tag: int) -> tuple[Any, ...]:
        if not self.tracing:
            return (_ptr(0), _ptr(0), np.uint64(0), np.int64(tag))
        return (self._trace, self._trace_count, np.uint64(self.trace_capacity), np.int64(tag))

    def read_trace(self) -> np.ndarray:
        """Rows of (stream, start_ns, end_ns), one per thread block run since the last reset.

        Call it when the work is done (the executor has waited on its events).
        """
        with self._cupy.cuda.Device(self.device):
            count = int(self._trace_count.get()[0])
            return self._trace[: min(count, self.trace_capacity)].get()

    def reset_trace(self) -> None:
        with self._cupy.cuda.Device(self.device):
            self._trace_count.fill(0)
            self._cupy.cuda.Device(self.device).synchronize()

    def close(self) -> None:
        """Free the weights and trace buffers (after every context is gone)."""
        self._weights = []
        del self._trace, self._trace_count
        self._cupy.get_default_memory_pool().free_all_blocks()


class StandinContext:
    """An execution context of the stand-in: shapes, addresses, memory, one stream per call."""

    def __init__(self, engine: StandinEngine) -> None:
        self.engine = engine
        self.memory: tuple[int, int] | None = None
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.aux_streams: list[int] = []
        self._external: dict[int, Any] = {}
        cupy = engine._cupy
        self._fork = cupy.cuda.Event(disable_timing=True)
        self._join = cupy.cuda.Event(disable_timing=True)

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        if not 0 <= profile < self.engine.num_optimization_profiles:
            return False
        self.profile = profile
        self.shapes.clear()
        return True

    def set_aux_streams(self, streams: Sequence[int]) -> None:
        self.aux_streams = list(streams)
        self.engine.aux_streams_seen.update(self.aux_streams)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in (INPUT, OUTPUT):
            return False
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        low, _, high = self.engine.batch
        if self.profile is None or name != INPUT or len(shape) != 2 \
                or not low <= shape[0] <= high or shape[1] != self.engine.in_features:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> list[str]:
        return [] if INPUT in self.shapes else [INPUT]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        rows = self.shapes[INPUT][0] if INPUT in self.shapes else -1
        return (rows, self.engine.in_features if name == INPUT else self.engine.out_features)

    def _stream(self, handle: int) -> Any:
        stream = self._external.get(handle)
        if stream is None:
            # CuPy 14 deprecates ExternalStream for Stream.from_external, which wants an
            # object with __cuda_stream__; a raw handle is all TensorRT's API passes.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = self.engine._cupy.cuda.ExternalStream(handle, self.engine.device)
            self._external[handle] = stream
        return stream

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if self.profile is None or self.memory is None or INPUT not in self.shapes \
                or set(self.addresses) != {INPUT, OUTPUT}:
            return False
        rows = self.shapes[INPUT][0]
        hidden_ptr, size = self.memory
        if rows * engine.hidden * 4 > size:
            return False
        if engine.uncapturable and CudaRuntime(engine.device).is_capturing(stream_handle):
            # Illegal while capturing: CUDA refuses it and invalidates the capture, as it
            # does for an engine with non-capturable layers; TensorRT then returns False.
            runtime_module().cudaStreamSynchronize(stream_handle)
            return False
        w1, b1, w2, b2 = engine._weights
        row_blocks = -(-rows // TILE)
        block = (TILE, TILE, 1)
        main = self._stream(stream_handle)
        x, y, h = _ptr(self.addresses[INPUT]), _ptr(self.addresses[OUTPUT]), _ptr(hidden_ptr)
        trace = engine.trace_args(stream_handle)
        k1, n1, k2, n2 = engine.in_features, engine.hidden, engine.hidden, engine.out_features
        with main:
            engine.kernel((n1 // TILE, row_blocks, 1), block,
                          (x, w1, b1, h, np.int32(rows), np.int32(k1), np.int32(n1),
                           np.int32(0), np.int32(1), *trace))
        if self.aux_streams and engine.num_aux_streams:
            # Half the second layer's columns on an aux stream: fork, then join.
            aux = self._stream(self.aux_streams[0])
            half = n2 // 2
            self._fork.record(main)
            aux.wait_event(self._fork)
            with aux:
                engine.kernel((half // TILE, row_blocks, 1), block,
                              (h, w2, b2, y, np.int32(rows), np.int32(k2), np.int32(n2),
                               np.int32(half), np.int32(0), *trace))
            with main:
                engine.kernel((half // TILE, row_blocks, 1), block,
                              (h, w2, b2, y, np.int32(rows), np.int32(k2), np.int32(n2),
                               np.int32(0), np.int32(0), *trace))
            self._join.record(aux)
            main.wait_event(self._join)
        else:
            with main:
                engine.kernel((n2 // TILE, row_blocks, 1), block,
                              (h, w2, b2, y, np.int32(rows), np.int32(k2), np.int32(n2),
                               np.int32(0), np.int32(0), *trace))
        return True


# --- serving the stand-in through the real server --------------------------------------------


def standin_model(config: ModelConfig, engine: StandinEngine,
                  cuda: CudaRuntime | None = None) -> LoadedModel:
    """A LoadedModel of real TrtExecutors over the stand-in engine.

    The engine stays its creator's to close; unloading the model only drops the
    handle's reference.
    """
    spec = engine_spec(engine, config.name, config.batching)
    spec = dataclasses.replace(spec, backend=LABEL, platform="standin_double")
    handle = EngineHandle(engine)
    buckets = graph_buckets(config.graph_batch_sizes,
                            min(config.max_batch_size or spec.max_batch_size,
                                spec.max_batch_size))
    factories = executor_factories(handle, cuda or CudaRuntime(config.device), config.workers,
                                   buckets, config.cuda_graphs, trt_module, config.name,
                                   batching=spec.batching)
    return LoadedModel(spec=spec, factories=factories, close=handle.close)


def standin_config(name: str = "standin", **options: Any) -> ModelConfig:
    return ModelConfig(name=name, path=f"{name}.standin", backend="tensorrt", **options)


@contextmanager
def serving_standin(engine: StandinEngine, config: ModelConfig,
                    stats_window_s: float = 10.0, frontends: int = 1,
                    cuda: CudaRuntime | None = None,
                    server_options: Mapping[str, Any] | None = None
                    ) -> Iterator[ServerThread]:
    """The real gRPC server (frontends, batcher, scheduler, workers) serving the stand-in.

    `frontends` > 1: this thread's server is the engine process's (service/processes.py)
    and that many frontend processes serve gRPC on its port. `cuda`: the runtime every
    executor uses (its `copies` count their memcpy calls); by default one of their own.
    `server_options`: ServerConfig fields to set (say `frontend_hold_us`).
    """
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0,
                                 grace_period_s=10,
                                 stats_window_s=stats_window_s, **(server_options or {}))
    if frontends == 1:
        with running_server(server_config) as server:
            runtime = ModelRuntime(config, standin_model(config, engine, cuda), stats_window_s)
            server.call(server.server.models.add(runtime))
            yield server
        return
    from trtserve.service.processes import EngineServer

    server = ServerThread(server_config)
    server.server = EngineServer(server_config, frontends)
    server.start()
    try:
        runtime = ModelRuntime(config, standin_model(config, engine, cuda), stats_window_s)
        server.call(server.server.add_model(runtime))
        yield server
    finally:
        server.stop()

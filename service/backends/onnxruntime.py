"""ONNX Runtime on the CPU: the embedded default, so trtserve runs with no GPU.

Each worker owns one InferenceSession. Sessions share nothing but the model
file. By default the intra-op threads split the cores this process may use
between the workers, less one core for the event loop and gRPC, and the
threads sleep instead of spinning between operators. On a 16-core host,
sessions that took every core and spun served 0.46-0.52 of what they
computed in-process, and a quarter less than sessions that left one core
(docs/benchmarks-16core.md, section 7).

Inputs in a system shared-memory region (RegionArray views): a request alone in
its batch is fed to ONNX Runtime as the region's memory itself, no copy (counted
as copies avoided); in a batch of several, each request's rows are copied once
into the batch, as any input's are.

Outputs given a target (a system shared-memory region's range): for a request
alone in its batch whose output shape the model fixes (rows x static dims) and
whose outputs are large enough to pay for it (IOBINDING_MIN_BYTES), ONNX Runtime
writes the output straight into the target through an IOBinding; otherwise (a
batch of several requests, small outputs, an output whose shape is known only
once computed) the output is computed as usual and each request's rows are
copied into its target once.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from trtserve.service import cpus
from trtserve.service.backends.base import (
    BatchResult,
    HostTarget,
    LoadedModel,
    ModelSpec,
    ProfileSpec,
    RegionArray,
    Targets,
    WorkerInfo,
    check_unbatched_config,
    decide_batching,
)
from trtserve.service.config import ModelConfig
from trtserve.service.errors import ConfigError, InputRejected, ModelLoadError
from trtserve.service.tensors import TensorSpec

DEFAULT_MAX_BATCH = 64
# Outputs smaller than this are computed as usual and copied into their targets: an
# IOBinding costs ~7 us more than `run` per call, which only outputs of a few hundred
# kB win back (python -m benchmarks.ort_output_targets, 2 cores: 64 KiB 9.6 us copied
# vs 16.6 bound; 512 KiB 49.7 vs 32.9; 16 MiB 5.1 ms vs 1.8 ms).
IOBINDING_MIN_BYTES = 256 << 10

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(uint16)": "UINT16",
    "tensor(int32)": "INT32",
    "tensor(uint32)": "UINT32",
    "tensor(int64)": "INT64",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


def _spec(node: ort.NodeArg, model: str) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise ConfigError(f"model '{model}': tensor '{node.name}' has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    names = tuple(d if isinstance(d, str) and d else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape, names if any(names) else ())


def _ort_reason(error: Exception) -> str:
    """ONNX Runtime's message without its code prefix: '[ONNXRuntimeError] : 7 :
    INVALID_PROTOBUF : Load model from x failed:Protobuf parsing failed.'"""
    text = " ".join(str(error).split())
    _, sep, reason = text.partition(" failed:")
    reason = reason if sep else text.rsplit(" : ", 1)[-1]
    if "Protobuf parsing failed" in reason:
        return "not an ONNX model (protobuf parsing failed); check the file or re-export it"
    return reason


def default_threads(workers: int) -> int:
    """Intra-op threads per session: the usable cores (the affinity, capped by a CPU
    quota) less one, split between the workers."""
    return max(1, (cpus.usable() - 1) // workers)


class OrtExecutor:
    def __init__(self, path: str, threads: int, max_batch: int, spinning: bool = False,
                 memory_arena: bool = False, batching: bool = True) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # A spinning pool keeps its cores busy between operators and batches,
        # taking them from the event loop, gRPC and whatever runs beside the
        # server; sleeping costs a wake-up per parallel operator instead.
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        # Batches come one at a time per session; a parallel executor only adds overhead.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena grows to what the largest batch needed and keeps it for good (a
        # detector at 3200x3200 left gigabytes); without it tensors go back to malloc,
        # no slower on small batches (docs/reliability.md, "Memory").
        options.enable_cpu_mem_arena = memory_arena
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._output_specs = {o.name: _spec(o, path) for o in self._session.get_outputs()}
        self._batching = batching
        self.info = WorkerInfo(device="cpu", max_batch_size=max_batch, runs_on_any_thread=True)

    def run(self, inputs: Mapping[str, Sequence[np.ndarray]], rows: int,
            targets: Sequence[Targets] | None = None) -> BatchResult:
        start = time.perf_counter()
        feed = {
            name: parts[0] if len(parts) == 1 else np.concatenate(parts)
            for name, parts in inputs.items()
        }
        gathered = time.perf_counter()
        placed: dict[tuple[int, str], np.ndarray] = {}
        try:
            if targets is not None and len(targets) == 1 \
                    and self._bindable_bytes(targets[0], rows) >= IOBINDING_MIN_BYTES:
                outputs = self._run_bound(feed, rows, targets[0], placed)
            else:
                values = self._session.run(self._outputs, feed)
                outputs = dict(zip(self._outputs, values, strict=True))
        except (_ORT_INVALID_ARGUMENT, _ORT_FAIL) as err:
            reason = rejection(err)
            if reason is None:
                raise
            raise InputRejected(reason) from err
        done = time.perf_counter()
        bound_outputs = len(placed)
        if targets is not None:
            # Targets ONNX Runtime did not write: copied in here, once, as the caller
            # would have (no copy avoided, but the rows go straight to their region).
            copy_into_targets(outputs, targets, request_rows(inputs, self._batching),
                              self._batching, placed)
        read_in_place, copied_inputs = region_inputs(inputs)
        # Region tensors copied: inputs gathered into the batch, outputs not written by
        # ONNX Runtime itself (copied into their targets here, or by the caller).
        copied = copied_inputs + sum(map(len, targets or ())) - bound_outputs
        copies_avoided = read_in_place + bound_outputs
        return BatchResult(
            outputs=outputs,
            compute_s=done - gathered,
            input_s=gathered - start,
            output_s=time.perf_counter() - done,
            placed=placed,
            copies_avoided=copies_avoided,
            io_path="copied" if copied else ("bound" if copies_avoided else ""),
        )

    def _static_shape(self, name: str, rows: int) -> tuple[int, ...] | None:
        """An output's shape before running, where the model fixes it (else None)."""
        spec = self._output_specs[name]
        if spec.dtype == "BF16":  # numpy holds it as uint16, which ORT would refuse
            return None
        shape = list(spec.shape)
        if self._batching:
            if not shape:
                return None
            shape[0] = rows
        return tuple(shape) if all(d >= 0 for d in shape) else None

    def _bindable_bytes(self, targets: Targets, rows: int) -> int:
        """Bytes of the outputs ONNX Runtime could write straight into their targets."""
        total = 0
        for name, target in targets.items():
            shape = self._static_shape(name, rows) if name in self._output_specs else None
            if isinstance(target, HostTarget) and shape is not None:
                nbytes = math.prod(shape) * self._output_specs[name].np_dtype.itemsize
                if nbytes <= target.byte_size:
                    total += nbytes
        return total

    def _run_bound(self, feed: Mapping[str, np.ndarray], rows: int, targets: Targets,
                   placed: dict[tuple[int, str], np.ndarray]) -> dict[str, np.ndarray]:
        """One request: outputs with a host target and a known shape are written by ONNX
        Runtime straight into the target (IOBinding); the rest come back as usual."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._outputs:
            target = targets.get(name)
            shape = self._static_shape(name, rows)
            dtype = self._output_specs[name].np_dtype
            if isinstance(target, HostTarget) and shape is not None \
                    and math.prod(shape) * dtype.itemsize <= target.byte_size:
                array = target.array(dtype, shape)
                binding.bind_output(name, "cpu", 0, dtype, list(shape), array.ctypes.data)
                placed[(0, name)] = array
            else:
                binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: placed[(0, name)] if (0, name) in placed else value.numpy()
                for name, value in zip(self._outputs, values, strict=True)}

    def close(self) -> None:
        # InferenceSession has no close(); dropping the last reference frees it.
        del self._session


def region_inputs(inputs: Mapping[str, Sequence[np.ndarray]]) -> tuple[int, int]:
    """(region inputs ONNX Runtime reads where they lie, region inputs copied once).

    A request alone in its batch is fed as it is: ONNX Runtime wraps a C-contiguous
    numpy array of the input's type without copying it (read-only and unaligned
    views included; `python -m benchmarks.shared_memory` checks it), and copies
    one that is not contiguous. Parts of a batch of several are concatenated: one
    copy of each.
    """
    in_place = copied = 0
    for parts in inputs.values():
        for part in parts:
            if isinstance(part, RegionArray):
                if len(parts) == 1 and part.flags.c_contiguous:
                    in_place += 1
                else:
                    copied += 1
    return in_place, copied


def request_rows(inputs: Mapping[str, Sequence[np.ndarray]], batching: bool) -> list[int]:
    """Each request's rows in a batch, from its parts of the first input."""
    parts = next(iter(inputs.values()), [])
    return [p.shape[0] if batching and p.ndim else 1 for p in parts]


def copy_into_targets(outputs: Mapping[str, np.ndarray], targets: Sequence[Targets],
                      rows_each: Sequence[int], batching: bool,
                      placed: dict[tuple[int, str], np.ndarray]) -> None:
    """Copy each request's rows of each output into its host target, where it fits
    (one that does not is left to the caller, whose size check names the region)."""
    offset = 0
    for index, (request_targets, rows) in enumerate(zip(targets, rows_each, strict=True)):
        for name, target in request_targets.items():
            if (index, name) in placed or not isinstance(target, HostTarget):
                continue
            array = outputs[name]
            part = array[offset:offset + rows] if batching else array
            if part.nbytes > target.byte_size:
                continue
            dest = target.array(part.dtype, part.shape)
            np.copyto(dest, part)
            placed[(index, name)] = dest
        offset += rows


_ORT_INVALID_ARGUMENT = ort.capi.onnxruntime_pybind11_state.InvalidArgument
_ORT_FAIL = ort.capi.onnxruntime_pybind11_state.Fail
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. "
                       r"Name:'([^']*)' Status Message: (.*)", re.DOTALL)
# An allocation that failed inside a node is the process's trouble, not the input's.
_ORT_MEMORY = ("allocate", "bad_alloc", "out of memory")


def rejection(err: Exception) -> str | None:
    """Why ONNX Runtime refused a batch's input, or None when the failure is not the input's.

    ORT says INVALID_ARGUMENT for inputs it checks itself (rank, fixed
    dimensions) and for a kernel refusing its operands (an index out of range);
    a node that fails on the shapes it was given (a Reshape that does not
    divide) is FAIL "while running <Op> node". Neither leaves the session in a
    bad state: the next batch runs as if nothing happened. Other FAILs (an
    allocation, the session itself) and every other category (EP failure,
    RUNTIME_EXCEPTION) stay the worker's.
    """
    text = _ORT_PREFIX.sub("", str(err)).strip()
    node = _ORT_NODE.match(text)
    if node is not None:
        op, name, message = node.groups()
        # ORT_ENFORCE messages read "<file>:<line> <function> <condition> was false. <why>".
        message = message.split(" was false. ", 1)[-1]
        text = f"{op} node '{name}' failed: {message}"
    elif isinstance(err, _ORT_FAIL):
        return None
    if any(word in text.lower() for word in _ORT_MEMORY):
        return None
    return text


def load(config: ModelConfig) -> LoadedModel:
    """Read the model's IO once, then hand out one session factory per worker."""
    try:
        probe = ort.InferenceSession(config.path, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail...)
        raise ModelLoadError(config.name, config.path,
                             f"ONNX Runtime cannot load it: {_ort_reason(e)}") from e
    inputs = tuple(_spec(n, config.name) for n in probe.get_inputs())
    outputs = tuple(_spec(n, config.name) for n in probe.get_outputs())
    del probe
    batching = decide_batching(config.batching, inputs + outputs, config.name)
    if batching:
        max_batch = config.max_batch_size or DEFAULT_MAX_BATCH
    else:
        # Each request runs alone with its full shapes (Triton's max_batch_size 0):
        # a batch is one request, whatever its shapes.
        max_batch = 1
        check_unbatched_config(config)
    threads = config.intra_op_threads or default_threads(config.workers)
    spec = ModelSpec(
        backend="onnxruntime",
        platform="onnxruntime_onnx",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        profiles=(ProfileSpec(0),),
        batching=batching,
    )

    def factory() -> OrtExecutor:
        return OrtExecutor(config.path, threads, max_batch, config.intra_op_spinning,
                           config.cpu_memory_arena, batching)

    return LoadedModel(spec=spec, factories=[factory] * config.workers)

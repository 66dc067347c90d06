"""trtserve.v1 messages <-> numpy and the service's own records."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service import echo
from service.backends.base import ModelSpec
from service.engine.model import ModelRuntime
from service.engine.stats import Percentiles, WorkerStats
from service.errors import TensorError
from service.gen.trtserve.v1 import inference_pb2 as pb
from service.tensors import DTYPES, TensorSpec, decode, dtype_name, encode

# Wire enum <-> dtype name. The enum's names are DATA_TYPE_<NAME>.
_ENUM_TO_NAME = {value: name.removeprefix("DATA_TYPE_")
                 for name, value in pb.DataType.items() if name != "DATA_TYPE_UNSPECIFIED"}
_NAME_TO_ENUM = {name: value for value, name in _ENUM_TO_NAME.items()}
assert set(_NAME_TO_ENUM) == set(DTYPES), "proto DataType and service.tensors.DTYPES disagree"


def dtype_enum(name: str) -> int:
    return _NAME_TO_ENUM[name]


def decode_inputs(request: pb.InferRequest) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Inputs as read-only arrays over the message's bytes (no copy), and their dtypes."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for tensor in request.inputs:
        name = tensor.name
        if not name:
            raise TensorError("", "an input has an empty name")
        if name in arrays:
            raise TensorError(name, "appears more than once in the request")
        dtype = _ENUM_TO_NAME.get(tensor.dtype)
        if dtype is None:
            raise TensorError(name, _dtype_problem(tensor.dtype))
        arrays[name] = decode(name, dtype, tensor.shape, tensor.data)
        dtypes[name] = dtype
    return arrays, dtypes


def _dtype_problem(value: int) -> str:
    expected = f"expected one of {sorted(_NAME_TO_ENUM)}"
    if value == pb.DATA_TYPE_UNSPECIFIED:
        # The enum field holds 32 bits: a larger value on the wire reads as its low
        # 32 bits (2**40 as 0), so 0 does not prove the client sent 0.
        return ("dtype is DATA_TYPE_UNSPECIFIED (0): not set, or a value outside the enum's "
                f"32-bit range; {expected}")
    return f"dtype enum value {value} is not a known DataType; {expected}"


def encode_outputs(
    request: pb.InferRequest, wanted: Sequence[TensorSpec], outputs: dict[str, np.ndarray]
) -> pb.InferResponse:
    """The answer with the `wanted` outputs (`check_outputs`), in that order."""
    response = pb.InferResponse(model=request.model, id=request.id)
    for tensor_spec in wanted:
        array = outputs[tensor_spec.name]
        response.outputs.add(name=tensor_spec.name, dtype=_NAME_TO_ENUM[tensor_spec.dtype],
                             shape=array.shape, data=encode(array))
    return response


def check_outputs(request: pb.InferRequest, spec: ModelSpec) -> Sequence[TensorSpec]:
    """The outputs to answer with: those the request names, in its order, else every one.

    A TensorError, before execution, for a named output that does not exist or
    is named twice.
    """
    if not request.outputs:  # most requests: every output
        return spec.outputs
    wanted: list[TensorSpec] = []
    # Each output once, as KServe does: the n+1st name of a model with n outputs
    # is unknown or a repeat, so a long list is refused after n+1 names.
    for name in request.outputs:
        tensor_spec = spec.output(name)
        if tensor_spec is None:
            raise TensorError(name, f"unknown output; model '{echo.text(request.model)}' gives "
                              f"{sorted(t.name for t in spec.outputs)}")
        if tensor_spec in wanted:
            raise TensorError(name, "requested more than once")
        wanted.append(tensor_spec)
    return wanted


def _percentiles(p: Percentiles) -> pb.Percentiles:
    return pb.Percentiles(count=p.count, mean_us=p.mean_us, p50_us=p.p50_us, p90_us=p.p90_us,
                          p99_us=p.p99_us)


def worker_stats(stats: WorkerStats) -> pb.WorkerStats:
    utilization, window = stats.utilization()
    return pb.WorkerStats(
        index=stats.index, profile=stats.profile, device=stats.device, stream=stats.stream,
        stream_non_blocking=stats.stream_non_blocking, aux_streams=stats.aux_streams,
        requests=stats.requests, batches=stats.batches, inferences=stats.inferences,
        errors=stats.errors, batch_size_histogram=dict(stats.histogram),
        queue_time=_percentiles(stats.queue_time.summary()),
        compute_time=_percentiles(stats.compute_time.summary()),
        busy_seconds=stats.busy_s, utilization=utilization, window_seconds=window,
        in_flight_batches=stats.in_flight, graph_launches=stats.graph_launches,
        plain_enqueues=stats.plain_enqueues,
        capture_failures=[pb.CaptureFailure(batch_size=f.batch_size, reason=f.reason)
                          for f in stats.capture_failures],
        rebuilds=stats.rebuilds, healthy=stats.healthy, last_error=stats.last_error,
        min_batch_size=stats.min_batch_size, max_batch_size=stats.max_batch_size,
        inline_batches=stats.inline_batches, rejected=stats.rejected, state=stats.state,
        retry_in_seconds=stats.retry_in_s(), retries=stats.retries,
    )


def model_stats(model: ModelRuntime) -> pb.ModelStats:
    workers = [worker_stats(s) for s in model.worker_stats]
    from service.engine.stats import Samples

    queue, compute = Samples(), Samples()
    histogram: dict[int, int] = {}
    for s in model.worker_stats:
        queue.extend(s.queue_time)
        compute.extend(s.compute_time)
        for size, count in s.histogram.items():
            histogram[size] = histogram.get(size, 0) + count
    batches = sum(w.batches for w in workers)
    inferences = sum(w.inferences for w in workers)
    c = model.counters
    return pb.ModelStats(
        name=model.name, backend=model.spec.backend, queue_depth=model.queue_depth,
        requests=c.requests, batches=batches, inferences=inferences,
        errors=c.errors, rejected_queue_full=c.rejected_queue_full,
        deadline_exceeded=c.deadline_exceeded, cancelled=c.cancelled,
        batch_size_histogram=histogram,
        queue_time=_percentiles(queue.summary()), compute_time=_percentiles(compute.summary()),
        busy_seconds=sum(w.busy_seconds for w in workers),
        utilization=sum(w.utilization for w in workers) / max(len(workers), 1),
        window_seconds=max((w.window_seconds for w in workers), default=0.0),
        in_flight_batches=model.in_flight,
        graph_launches=sum(w.graph_launches for w in workers),
        plain_enqueues=sum(w.plain_enqueues for w in workers),
        workers=workers, mean_batch_size=inferences / batches if batches else 0.0,
        batching=model.spec.batching,
    )


def _tensor_metadata(t: TensorSpec) -> pb.TensorMetadata:
    # Enum fields take their value's name, which keeps the typed stubs happy.
    return pb.TensorMetadata(name=t.name, dtype=f"DATA_TYPE_{t.dtype}", shape=t.shape)


def model_metadata(model: ModelRuntime) -> pb.ModelMetadataResponse:
    spec = model.spec
    profiles = []
    for p in spec.profiles:
        workers = [w.index for w in model.workers if w.profile.index == p.index]
        ranges = [pb.ShapeRange(name=n, min=r[0], opt=r[1], max=r[2]) for n, r in p.ranges.items()]
        profiles.append(pb.Profile(index=p.index, inputs=ranges, workers=workers))
    return pb.ModelMetadataResponse(
        name=model.name, backend=spec.backend,
        inputs=[_tensor_metadata(t) for t in spec.inputs],
        outputs=[_tensor_metadata(t) for t in spec.outputs],
        min_batch_size=spec.min_batch_size if spec.batching else 0,
        max_batch_size=model.max_batch_size if spec.batching else 0,
        profiles=profiles,
        preferred_batch_sizes=model.policy.preferred_batch_sizes if spec.batching else (),
        max_queue_delay_us=model.config.max_queue_delay_us, workers=len(model.workers),
        batching=spec.batching,
    )


__all__ = ["check_outputs", "decode_inputs", "dtype_enum", "dtype_name", "encode_outputs",
           "model_metadata", "model_stats", "worker_stats"]

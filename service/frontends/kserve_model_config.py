"""A served model, described in KServe v2 / Triton terms: metadata, configuration, statistics.

Pure conversion from the engine's `ModelDescription` (spec, config, batching,
workers) and `ModelSnapshot` (statistics) to the messages of
`inference.GRPCInferenceService`; the servicer in kserve.py only asks the
engine for those and calls these.

The configuration says what trtserve really does with the model, in the shape
Triton publishes it, so that perf_analyzer, model_analyzer and tritonclient
read it unchanged:

- `max_batch_size` is 0 when the model does not batch (ModelSpec.batching:
  its tensors do not share a dynamic first dimension, or its config says
  `batching = false`); then `dims` are full shapes. Otherwise `dims` leave out the batch
  dimension, as Triton's do.
- `dynamic_batching` carries our preferred batch sizes, queue delay and queue
  bound (a full queue is refused: Triton's REJECT with max_queue_size).
- One `instance_group` per (device, optimization profile), `count` the
  workers in it. For TensorRT, `profile` names the one profile those workers
  own ("0", "1", ...), since each worker is one execution context on one
  profile.

Statistics follow Triton's counting: `inference_stats` count requests (every
request of a batch is charged the batch's compute times), `batch_stats` count
executions per batch size, durations are cumulative nanoseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.client.gen.inference import model_config_pb2 as mc
from trtserve.service.engine.api import ModelDescription, ModelSnapshot, StageTotals
from trtserve.service.tensors import TensorSpec


def config_dtype(datatype: str) -> str:
    """The model-config DataType name of a KServe datatype: the same name with a TYPE_
    prefix, except BYTES, which the config calls TYPE_STRING."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def batches(model: ModelDescription) -> bool:
    """Whether requests are batched along a leading dimension (ModelSpec.batching)."""
    return model.spec.batching


# --- metadata ----------------------------------------------------------------------


def _tensor_metadata(t: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.dtype, shape=t.shape)


def model_metadata(model: ModelDescription) -> pb.ModelMetadataResponse:
    """Name, version, platform and tensors; shapes include the batch dimension as -1."""
    spec = model.spec
    return pb.ModelMetadataResponse(
        name=model.name, versions=[model.version], platform=spec.platform,
        inputs=[_tensor_metadata(t) for t in spec.inputs],
        outputs=[_tensor_metadata(t) for t in spec.outputs],
    )


# --- configuration -------------------------------------------------------------------


def _dims(t: TensorSpec, batching: bool) -> list[int]:
    return list(t.shape[1:] if batching else t.shape)


def _gpu_of(device: str, configured: int) -> int | None:
    """The CUDA ordinal a worker runs on ("cuda:N"), None for the CPU."""
    if device.startswith("cpu"):
        return None
    ordinal = device.removeprefix("cuda:")
    return int(ordinal) if ordinal.isdigit() else configured


def _instance_groups(model: ModelDescription) -> list[mc.ModelInstanceGroup]:
    """One group per (device, profile), in worker order."""
    groups: dict[tuple[int | None, int], list[int]] = {}
    for index, worker in enumerate(model.workers):
        key = (_gpu_of(worker.device, model.config.device), worker.profile)
        groups.setdefault(key, []).append(index)
    tensorrt = model.spec.backend == "tensorrt"
    result = []
    for i, ((gpu, profile), workers) in enumerate(groups.items()):
        group = mc.ModelInstanceGroup(name=f"{model.name}_{i}",
                                      kind="KIND_CPU" if gpu is None else "KIND_GPU",
                                      count=len(workers))
        if gpu is not None:
            group.gpus.append(gpu)
        if tensorrt:
            group.profile.append(str(profile))
        result.append(group)
    return result


def model_config(model: ModelDescription) -> mc.ModelConfig:
    spec, config = model.spec, model.config
    batching = batches(model)
    result = mc.ModelConfig(
        name=model.name, platform=spec.platform, backend=spec.backend,
        max_batch_size=model.batching.max_batch_size if batching else 0,
        input=[mc.ModelInput(name=t.name, data_type=config_dtype(t.dtype),
                             dims=_dims(t, batching)) for t in spec.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=config_dtype(t.dtype),
                               dims=_dims(t, batching)) for t in spec.outputs],
        instance_group=_instance_groups(model),
        default_model_filename=Path(config.path).name,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
    )
    if batching:
        # Without batching every batch is one request, so no dynamic batcher is described.
        result.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=model.batching.preferred_batch_sizes,
            max_queue_delay_microseconds=config.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=config.max_queue_size),
        ))
    if spec.backend == "tensorrt":
        cuda = result.optimization.cuda
        # Graph buckets pad the batch dimension: a model that does not batch has none.
        cuda.graphs = config.cuda_graphs and batching
        if cuda.graphs:
            for size in config.graph_batch_sizes:
                cuda.graph_spec.add(batch_size=size)
    return result


# --- statistics ------------------------------------------------------------------------


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _duration(count: int, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=_ns(seconds))


def _sum_stages(stages: Iterable[StageTotals]) -> StageTotals:
    return sum(stages, StageTotals())


def model_statistics(model: ModelSnapshot) -> pb.ModelStatistics:
    workers = model.workers
    c = model.counters
    per_request = _sum_stages(w.request_stages for w in workers)
    sizes = sorted({size for w in workers for size in w.stages_by_batch_size})
    batch_stats = []
    for size in sizes:
        t = _sum_stages(w.stages_by_batch_size[size] for w in workers
                        if size in w.stages_by_batch_size)
        batch_stats.append(pb.InferBatchStatistics(
            batch_size=size, compute_input=_duration(t.count, t.input_s),
            compute_infer=_duration(t.count, t.infer_s),
            compute_output=_duration(t.count, t.output_s)))
    last = max((w.last_batch_unix_s for w in workers), default=0.0)
    return pb.ModelStatistics(
        name=model.name, version=model.version,
        last_inference=round(last * 1000),
        inference_count=sum(w.inferences for w in workers),
        execution_count=sum(w.batches for w in workers),
        inference_stats=pb.InferStatistics(
            success=_duration(c.success, c.success_s),
            # Refused for a full queue: failed at once, no time spent.
            fail=_duration(c.failure + c.rejected_queue_full, c.failure_s),
            queue=_duration(sum(w.queue_histogram.count for w in workers),
                            sum(w.queue_s_total for w in workers)),
            compute_input=_duration(per_request.count, per_request.input_s),
            compute_infer=_duration(per_request.count, per_request.infer_s),
            compute_output=_duration(per_request.count, per_request.output_s),
        ),
        batch_stats=batch_stats,
    )


__all__ = ["batches", "config_dtype", "model_config", "model_metadata", "model_statistics"]

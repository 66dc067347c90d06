"""What a system-region input costs the server: a request alone in its batch reaches
ONNX Runtime as the region's memory itself (no copy), over both protocols, and Stats
count it so. Real gRPC on loopback, real ONNX Runtime, a real POSIX region.

That ONNX Runtime itself does not copy a read-only numpy view it is fed is measured by
`python -m benchmarks.shared_memory` (the process's peak memory does not grow by the
input's size); the executor-level checks are in tests/backends/test_onnxruntime_targets.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from trtserve.client import Client
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.shared_memory import SystemRegion
from trtserve.service.config import ModelConfig, SharedMemoryConfig
from trtserve.service.testing.servers import ServerProcess, running_server, server_config

ROWS, FEATURES = 2, 64
IN_BYTES = ROWS * FEATURES * 4


@pytest.fixture(scope="module", params=["one process", "two frontend processes"])
def server(request, example_onnx):
    """One worker and no queue delay, so each request runs alone in its batch: served
    in one process, and by an engine behind two frontend processes (the engine maps
    the region; only the reference crosses the link)."""
    if request.param == "one process":
        config = server_config(ModelConfig(name="example", path=str(example_onnx),
                                           workers=1, max_batch_size=32,
                                           max_queue_delay_us=0),
                               shared_memory=SharedMemoryConfig(system_regions="in_place"))
        with running_server(config) as s:
            yield s
        return
    with ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2",
                        "--workers", "1", "--max-queue-delay-us", "0",
                        "--shm-system-regions", "in_place"]).serving() as process:
        yield process


def _model_counters(client: Client) -> tuple[int, int, int, int]:
    [model] = client.stats().models
    shm = model.shared_memory
    return shm.copies_avoided, shm.host_copies, shm.bound_batches, shm.copied_batches


def _kserve_infer(url: str, region: SystemRegion) -> None:
    request = kpb.ModelInferRequest(model_name="example")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[ROWS, FEATURES])
    tensor.parameters["shared_memory_region"].string_param = region.name
    tensor.parameters["shared_memory_offset"].int64_param = 0
    tensor.parameters["shared_memory_byte_size"].int64_param = IN_BYTES
    with grpc.insecure_channel(url) as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.outputs[0].name == "output" and response.raw_output_contents


@pytest.mark.parametrize("protocol", ["v1", "kserve"])
def test_a_lone_system_region_input_reaches_the_model_without_a_copy(server, protocol):
    with Client(server.url) as client, SystemRegion.create(IN_BYTES) as region:
        client.register_region(region)
        try:
            x = region.array(np.float32, (ROWS, FEATURES))
            x[:] = np.random.default_rng(0).standard_normal((ROWS, FEATURES))
            before = _model_counters(client)
            if protocol == "v1":
                client.infer("example", {"input": x})
            else:
                _kserve_infer(server.url, region)
            del x  # the region is unmapped on leaving: no view may outlive it
            after = _model_counters(client)
        finally:
            client.unregister_region()
    avoided, host_copies, bound, copied = (a - b for a, b in zip(after, before, strict=True))
    # The input was read where it lay (a copy avoided), nothing crossed host and
    # device, and the batch ran with no copy of a region tensor at all.
    assert (avoided, host_copies, bound, copied) == (1, 0, 1, 0)

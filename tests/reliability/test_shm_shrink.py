"""A client that shrinks its own shared-memory object while its requests use it.

Until session 24 the engine mapped a client's object and read and wrote it where
it lay: shrinking it mid-request (ftruncate) made the next touch of a page past the
new end SIGBUS, which killed the engine process and, with frontends, the whole
server. Now the engine reads and writes through the object's descriptor, so the
shrinking client's requests are answered or refused INVALID_ARGUMENT, and every
other client is served throughout. Real processes (`--frontends 2`), real POSIX
shared memory, real ONNX Runtime; requests large enough (2 MiB) that their copies
run on the engine's copy threads, and small ones copied on its loop.
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.client.shared_memory import SystemRegion
from trtserve.service.testing.onnx_models import offset_net
from trtserve.service.testing.servers import ServerProcess

FEATURES = 1024  # 4 KiB a row of FP32
LARGE_ROWS, SMALL_ROWS = 512, 4  # 2 MiB (past the loop's 1 MiB) and 16 KiB
TRIES = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model = offset_net(tmp_path_factory.mktemp("models") / "plus1.onnx", 1.0, FEATURES)
    with ServerProcess(["--model", f"plus1={model}", "--frontends", "2",
                        "--max-batch-size", "1024"]).serving() as process:
        yield process


def _region_request(region: str, rows: int) -> pb.InferRequest:
    nbytes = rows * FEATURES * 4
    return pb.InferRequest(model="plus1", inputs=[pb.Tensor(
        name="input", dtype=pb.DATA_TYPE_FP32, shape=[rows, FEATURES],
        region=pb.RegionRef(region=region, offset=0, byte_size=nbytes))],
        output_regions={"output": pb.RegionRef(region=region, offset=nbytes,
                                               byte_size=nbytes)})


def test_a_client_shrinking_its_object_mid_request_never_takes_the_engine_down(
        server: ServerProcess) -> None:
    size = 2 * LARGE_ROWS * FEATURES * 4
    answers: list[str] = []
    others: list[BaseException | None] = []
    stop = threading.Event()

    def other_client() -> None:
        """A client of its own connection, sending bytes, checking every answer."""
        with grpc.insecure_channel(server.url, options=[
                ("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            n = 0
            while not stop.is_set():
                x = np.full((SMALL_ROWS, FEATURES), n, np.float32)
                try:
                    response = stub.Infer(pb.InferRequest(model="plus1", inputs=[pb.Tensor(
                        name="input", dtype=pb.DATA_TYPE_FP32, shape=x.shape,
                        data=x.tobytes())]), timeout=30)
                    y = np.frombuffer(response.outputs[0].data, np.float32)
                    assert np.array_equal(y, np.full(x.size, n + 1, np.float32)), n
                    others.append(None)
                except BaseException as e:
                    others.append(e)
                n += 1

    with SystemRegion.create(size) as region, grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stub.RegisterSystemRegion(pb.RegisterSystemRegionRequest(
            name="shrinking", key=region.key, offset=0, byte_size=size), timeout=10)
        path = f"/dev/shm/{region.key.lstrip('/')}"
        helper = threading.Thread(target=other_client)
        helper.start()
        try:
            for i in range(TRIES):
                rows = LARGE_ROWS if i % 2 else SMALL_ROWS
                os.truncate(path, size)
                call = stub.Infer.future(_region_request("shrinking", rows), timeout=30)
                time.sleep(0.0005 * (i % 7))
                os.truncate(path, 0)  # the hostile (or buggy) client
                try:
                    call.result()
                    answers.append("OK")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
                    assert "region 'shrinking'" in e.details(), e.details()
                    answers.append("INVALID_ARGUMENT")
                assert server.proc.poll() is None, "the server exited"
        finally:
            stop.set()
            helper.join(60)
        os.truncate(path, size)
        stub.UnregisterRegion(pb.UnregisterRegionRequest(name="shrinking"), timeout=10)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="plus1"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    assert len(answers) == TRIES
    assert "INVALID_ARGUMENT" in answers  # the race was run, not missed every time
    failures = [e for e in others if e is not None]
    assert others and not failures, failures[:3]

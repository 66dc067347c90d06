"""Calls that end every way while their answers count in the unsent ledger: deadlines of
a few milliseconds, cancels, bad requests, streams cut mid-flight, over both protocols.
Afterwards nothing is held and a normal request is served.

It also guards a crash an adversarial run found: a stream's request tasks outlive their
call, and read the call's peer address once it had ended, which in grpc.aio reads freed
memory (SIGSEGV in 3 runs of 4 of this load, one process). The peer is now read when the
call starts. Real gRPC over loopback, real ONNX Runtime, a server in this process.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import numpy as np

from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.gen.trtserve.v1 import inference_pb2 as vpb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as vpb_grpc
from trtserve.service.config import ModelConfig
from trtserve.service.testing.onnx_models import expand_net
from trtserve.service.testing.servers import running_server, server_config

MIB = 1024 * 1024
SECONDS = 4.0


def _kserve(rows: int, request_id: str = "", bad: bool = False) -> kpb.ModelInferRequest:
    shape = [rows, 2] if bad else [rows, 1]
    return kpb.ModelInferRequest(
        model_name="expand", id=request_id,
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                       shape=shape)],
        raw_input_contents=[np.ones(shape, np.float32).tobytes()])


def _v1(rows: int, request_id: str = "") -> vpb.InferRequest:
    return vpb.InferRequest(model="expand", id=request_id, inputs=[vpb.Tensor(
        name="input", dtype=vpb.DATA_TYPE_FP32, shape=[rows, 1],
        data=np.ones((rows, 1), np.float32).tobytes())])


def _chaos(port: int, seed: int, end: float) -> None:
    r = random.Random(seed)
    while time.monotonic() < end:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1)]) as channel:
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            v1 = vpb_grpc.InferenceServiceStub(channel)
            for _ in range(r.randint(1, 6)):
                rows = r.choice([1, 2, 8])
                try:
                    match r.randrange(5):
                        case 0:
                            kserve.ModelInfer(_kserve(rows), timeout=r.uniform(0.001, 0.05))
                        case 1:
                            v1.Infer(_v1(rows), timeout=r.uniform(0.001, 0.05))
                        case 2:
                            future = kserve.ModelInfer.future(_kserve(rows), timeout=10)
                            time.sleep(r.uniform(0, 0.03))
                            future.cancel()
                        case 3:
                            stream = kserve.ModelStreamInfer(
                                iter([_kserve(rows, str(i), bad=i % 3 == 2)
                                      for i in range(r.randint(1, 10))]),
                                timeout=r.uniform(0.01, 0.3))
                            for _answer in stream:
                                if r.random() < 0.3:
                                    stream.cancel()
                                    break
                        case 4:
                            stream = v1.InferStream(
                                iter([_v1(rows, str(i)) for i in range(r.randint(1, 8))]),
                                timeout=r.uniform(0.01, 0.3))
                            for _answer in stream:
                                if r.random() < 0.3:
                                    stream.cancel()
                                    break
                except grpc.RpcError:
                    pass  # deadlines, cancels, bad requests and refusals are the point


def test_calls_ending_every_way_leave_nothing_held_and_the_server_serving(tmp_path):
    path = expand_net(tmp_path / "expand.onnx", 256 * 1024)  # 1 MiB answers per row
    config = server_config(ModelConfig(name="expand", path=str(path), workers=1,
                                       max_batch_size=8),
                           max_unsent_bytes=64 * MIB, max_unsent_bytes_per_connection=16 * MIB)
    with running_server(config) as s:
        end = time.monotonic() + SECONDS
        threads = [threading.Thread(target=_chaos, args=(s.server.port, seed, end))
                   for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        ledger = s.server.unsent
        deadline = time.monotonic() + 20
        while ledger.total and time.monotonic() < deadline:
            time.sleep(0.1)  # the last streams' tasks finish
        assert ledger.total == 0 and ledger.held("any") == 0
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}", options=[
                ("grpc.max_receive_message_length", -1)]) as channel:
            answer = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_kserve(2),
                                                                          timeout=30)
        values = np.frombuffer(answer.raw_output_contents[0], np.float32)
        assert values.size == 2 * 256 * 1024 and np.all(values == 1.0)

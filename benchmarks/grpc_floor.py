"""A no-op trtserve.v1 server: the floor that gRPC in Python sets for any server here.

`Infer` answers a fixed, pre-serialized response without decoding the request;
`InferStream` answers each request on the stream with the same response and
the request's id, one at a time; `ModelMetadata` describes one FP32 input.
Driving it with the same load generator as trtserve measures what the
client, the loopback transport and grpc.aio cost on their own, so the
benchmark can say which part of the end-to-end latency is trtserve's.

With `--onnx PATH`, `Infer` runs the model instead: it parses the request,
makes one ONNX Runtime call on the event loop (a session with the settings a
trtserve worker uses) and encodes the answer; no batcher, no checks, no
statistics. That is the least any server on grpc.aio can do for the model,
so its latency bounds what trtserve could reach at concurrency 1.

    python -m benchmarks.grpc_floor --port 8301 --width 64 --out-width 16
    python -m benchmarks.grpc_floor --port 8301 --onnx models/bench/light.onnx
    python -m benchmarks.grpc_floor --port 8301 --event-loop asyncio
    GRPC_EXPERIMENTS= python -m benchmarks.grpc_floor --port 8301   # gRPC's own defaults

It runs on the gRPC transport and event loop trtserve runs on
(service/grpc_tuning.py, `server.event_loop`), unless told otherwise.
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.backends.onnxruntime import OrtExecutor
from trtserve.service.config import EVENT_LOOPS
from trtserve.service.server import loop_factory


def run_model(path: str) -> Callable[[bytes], bytes]:
    """Request bytes -> answer bytes through one ONNX Runtime call, nothing else."""
    executor = OrtExecutor(path, threads=1, max_batch=64)

    def infer(raw: bytes) -> bytes:
        request = pb.InferRequest.FromString(raw)
        inputs = {t.name: [np.frombuffer(t.data, np.float32).reshape(tuple(t.shape))]
                  for t in request.inputs}
        rows = request.inputs[0].shape[0]
        answer = pb.InferResponse(model=request.model, id=request.id)
        for name, array in executor.run(inputs, rows).outputs.items():
            answer.outputs.add(name=name, dtype=pb.DATA_TYPE_FP32, shape=array.shape,
                               data=array.tobytes())
        return answer.SerializeToString()

    return infer


def handlers(width: int, out_width: int,
             model: Callable[[bytes], bytes] | None = None) -> grpc.GenericRpcHandler:
    metadata = pb.ModelMetadataResponse(
        name="floor", backend="none", max_batch_size=64,
        inputs=[pb.TensorMetadata(name="input", dtype=pb.DATA_TYPE_FP32, shape=[-1, width])],
        outputs=[pb.TensorMetadata(name="output", dtype=pb.DATA_TYPE_FP32,
                                   shape=[-1, out_width])])
    answer = pb.InferResponse(model="floor")
    answer.outputs.add(name="output", dtype=pb.DATA_TYPE_FP32, shape=[1, out_width],
                       data=np.zeros(out_width, np.float32).tobytes())
    answer_bytes = answer.SerializeToString()
    # An InferStreamResponse is its id field followed by its response field, so
    # the response part is serialized once and the id put in front per answer.
    stream_answer = pb.InferStreamResponse(response=answer).SerializeToString()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer_bytes if model is None else model(request)

    async def infer_stream(requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for raw in requests:
            request_id = pb.InferRequest.FromString(raw).id
            yield pb.InferStreamResponse(id=request_id).SerializeToString() + stream_answer

    async def model_metadata(request: pb.ModelMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return metadata

    return grpc.method_handlers_generic_handler("trtserve.v1.InferenceService", {
        "Infer": grpc.unary_unary_rpc_method_handler(infer),
        "InferStream": grpc.stream_stream_rpc_method_handler(infer_stream),
        "ModelMetadata": grpc.unary_unary_rpc_method_handler(
            model_metadata, request_deserializer=pb.ModelMetadataRequest.FromString,
            response_serializer=pb.ModelMetadataResponse.SerializeToString),
    })


async def serve(port: int, width: int, out_width: int, onnx: str | None = None) -> None:
    server = grpc.aio.server()
    model = run_model(onnx) if onnx else None
    server.add_generic_rpc_handlers((handlers(width, out_width, model),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc floor: serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8301)
    parser.add_argument("--width", type=int, default=64, help="input features per row")
    parser.add_argument("--out-width", type=int, default=16, help="output features per row")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="as trtserve's server.event_loop (default: uvloop where installed)")
    parser.add_argument("--onnx", metavar="PATH",
                        help="run this model in Infer (FP32 input 'input' of --width features, "
                             "output 'output' of --out-width) instead of a fixed answer")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(serve(args.port, args.width, args.out_width, args.onnx))


if __name__ == "__main__":
    main()

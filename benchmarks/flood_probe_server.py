"""A grpc.aio server that tells which calls reach Python, for benchmarks/deadline_flood.py.

`Infer` answers at once. A server interceptor counts every call that grpc.aio
hands to Python, and the handler every call it runs, each split by the
`x-valid: 1` metadata that deadline_flood's valid client sends. On SIGTERM it
prints the counts and exits. If a valid call answered CANCELLED was never
counted here, gRPC cancelled it before any Python code (ours or grpc.aio's
interceptors) could see it.

    python -m benchmarks.flood_probe_server --port 8302
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on (unless overridden).
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
import collections
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

VALID = ("x-valid", "1")
counts: collections.Counter[str] = collections.Counter()


class CountArrivals(grpc.aio.ServerInterceptor):
    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        valid = VALID in tuple(details.invocation_metadata or ())
        counts["valid_reached_python" if valid else "flood_reached_python"] += 1
        return await continuation(details)


class Answer(pb_grpc.InferenceServiceServicer):
    async def Infer(self, request: pb.InferRequest,
                    context: grpc.aio.ServicerContext) -> pb.InferResponse:
        valid = VALID in tuple(context.invocation_metadata() or ())
        counts["valid_handled" if valid else "flood_handled"] += 1
        return pb.InferResponse(model=request.model, id=request.id)


async def serve(port: int) -> None:
    server = grpc.aio.server(interceptors=[CountArrivals()])
    pb_grpc.add_InferenceServiceServicer_to_server(Answer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"flood probe: serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(json.dumps(dict(counts)), flush=True)
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8302)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()

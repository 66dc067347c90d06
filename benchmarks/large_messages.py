"""Where a large request's time goes in gRPC itself: a no-op grpc.aio server answering
2 bytes to a 4.9 MB request (a 3x640x640 FP32 image), with gRPC's HTTP/2 settings
varied on both ends, and the copies our decoding adds.

    python -m benchmarks.large_messages             # every variant
    python -m benchmarks.large_messages defaults    # one

The server runs on the transport trtserve runs on (service/grpc_tuning.py, uvloop).
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import asyncio
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np

SIZE = 3 * 640 * 640 * 4
METHOD = "/x.Y/Z"
Options = list[tuple[str, Any]]


def _serve(options: Options, port: list[int], ready: threading.Event,
           stop: threading.Event) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=[*options, ("grpc.max_receive_message_length", 1 << 28)])

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b"ok"

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "x.Y", {"Z": grpc.unary_unary_rpc_method_handler(handler)}),))
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(0)

    import uvloop

    uvloop.run(main())


def round_trip_ms(server_options: Options, client_options: Options, n: int = 150
                  ) -> tuple[float, float]:
    """(p50, p90) of one unary call carrying SIZE bytes, at concurrency 1."""
    port: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, args=(server_options, port, ready, stop),
                              daemon=True)
    thread.start()
    ready.wait()
    payload = np.random.default_rng(0).bytes(SIZE)
    channel = grpc.insecure_channel(f"127.0.0.1:{port[0]}", options=[
        *client_options, ("grpc.max_send_message_length", 1 << 28)])
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    for _ in range(20):
        call(payload)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call(payload)
        times.append(time.perf_counter() - start)
    channel.close()
    stop.set()
    thread.join(5)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 90) * 1e3)


WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 << 20)]
FRAMES = [("grpc.http2.max_frame_size", 16777215), ("grpc.http2.write_buffer_size", 8 << 20)]
VARIANTS: dict[str, Options] = {
    "defaults": [],
    "no BDP probe, 8 MB window": WINDOW,
    "8 MB window, BDP probe on": [("grpc.http2.lookahead_bytes", 8 << 20)],
    "16 MB frames, 8 MB write buffer": FRAMES,
    "all of the above": [*WINDOW, *FRAMES],
}


def decode_ms() -> dict[str, float]:
    """What trtserve's decoding of such a request costs: protobuf's copies."""
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

    x = np.random.default_rng(0).standard_normal((1, 3, 640, 640)).astype(np.float32)
    v1 = pb.InferRequest(model="m")
    v1.inputs.add(name="image", dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes())
    raw = v1.SerializeToString()
    ks = kpb.ModelInferRequest(model_name="m")
    ks.inputs.add(name="image", datatype="FP32", shape=x.shape)
    ks.raw_input_contents.append(x.tobytes())
    kraw = ks.SerializeToString()
    out = np.empty_like(x)

    def timed(f: Any, n: int = 100) -> float:
        f()
        start = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - start) / n * 1e3

    return {
        "v1: parse": timed(lambda: pb.InferRequest.FromString(raw)),
        "v1: parse + read the tensor's bytes": timed(
            lambda: pb.InferRequest.FromString(raw).inputs[0].data),
        "kserve: parse + read raw_input_contents": timed(
            lambda: kpb.ModelInferRequest.FromString(kraw).raw_input_contents[0]),
        "client: serialize a v1 request": timed(v1.SerializeToString),
        "one memcpy of the image (np.copyto)": timed(lambda: np.copyto(out, x)),
    }


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(VARIANTS)
    print(f"no-op unary round trip, {SIZE / 1e6:.1f} MB request, concurrency 1:")
    for name in names:
        options = VARIANTS[name]
        p50, p90 = round_trip_ms(options, options)
        print(f"  {name:34} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms", flush=True)
    print("decoding and copies:")
    for name, ms in decode_ms().items():
        print(f"  {name:40} {ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

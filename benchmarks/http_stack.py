"""Which async HTTP stack for KServe v2 REST, and what an HTTP infer costs next to gRPC.

1. `stacks`: the same tiny KServe-style infer handler (read the body, parse its JSON,
   answer 16 floats as JSON) on aiohttp and on Starlette under uvicorn (httptools
   parser, uvloop), each in its own process on one core's worth of event loop;
   a closed-loop aiohttp client in this process at concurrency 1 and 32.
   Starlette/uvicorn are not trtserve dependencies: give them with
   PYTHONPATH (e.g. `pip install --target /tmp/benchlib starlette uvicorn httptools`).
2. `trtserve`: `trtserve serve` on the example model; the same request over HTTP
   (JSON and binary tensors) and over KServe gRPC, same concurrencies.

    python -m benchmarks.http_stack stacks
    python -m benchmarks.http_stack trtserve

Numbers are requests per second and the median round trip; on a shared machine
compare them only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ANSWER = json.dumps({"model_name": "m", "model_version": "1", "outputs": [
    {"name": "output", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}).encode()
X = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
JSON_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                    "data": X.ravel().tolist()}]}).encode()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the two stacks, each run as `python -m benchmarks.http_stack serve-STACK PORT` ---------


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        json.loads(await request.body())
        return Response(ANSWER, media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


# --- load ------------------------------------------------------------------------------


async def closed_loop(call: Callable[[], Awaitable[None]], concurrency: int,
                      seconds: float) -> tuple[float, float]:
    """(requests per second, median round trip in µs) of `concurrency` callers."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    for _ in range(20):  # warm up connections
        await call()
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), statistics.median(latencies) * 1e6


async def http_load(url: str, body: bytes, headers: dict[str, str], concurrency: int,
                    seconds: float) -> tuple[float, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    # As tritonclient.http and perf_analyzer: no Accept-Encoding (aiohttp sends one).
    async with aiohttp.ClientSession(connector=connector,
                                     skip_auto_headers=("Accept-Encoding",)) as session:
        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status

        return await closed_loop(call, concurrency, seconds)


def _wait_http(port: int, path: str = "/v2/models/m/infer", timeout: float = 60) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=JSON_BODY), timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answers on port {port}")


def stacks(seconds: float) -> None:
    for stack in ("aiohttp", "starlette"):
        port = _free_port()
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.http_stack",
                                  f"serve-{stack}", str(port)], cwd=ROOT)
        try:
            _wait_http(port)
            for concurrency in (1, 32):
                rate, p50 = asyncio.run(http_load(
                    f"http://127.0.0.1:{port}/v2/models/m/infer", JSON_BODY, {}, concurrency,
                    seconds))
                print(f"{stack:10s} c={concurrency:<3d} {rate:8.0f} req/s  p50 {p50:7.0f} µs")
        finally:
            child.terminate()
            child.wait(30)


def trtserve(seconds: float) -> None:
    import tritonclient.grpc.aio as grpcclient

    from trtserve.service.example_model import write_example

    model = write_example(Path(tempfile.mkdtemp()) / "example.onnx")
    grpc_port, http_port = _free_port(), _free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "trtserve.service.cli", "serve", "--model", f"example={model}",
         "--workers", "1", "--port", str(grpc_port), "--metrics-port", "0",
         "--http-port", str(http_port), "--log-level", "WARNING"], cwd=ROOT)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    url = f"http://127.0.0.1:{http_port}/v2/models/example/infer"
    try:
        _wait_http(http_port, "/v2/models/example/infer")
        for concurrency in (1, 16):
            for name, body, headers in (
                    ("http json", JSON_BODY, {}),
                    ("http binary", header + X.tobytes(),
                     {"Inference-Header-Content-Length": str(len(header))})):
                rate, p50 = asyncio.run(http_load(url, body, headers, concurrency, seconds))
                print(f"{name:12s} c={concurrency:<3d} {rate:8.0f} req/s  p50 {p50:7.0f} µs")

            async def grpc_run(c: int = concurrency) -> tuple[float, float]:
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
                tensor = grpcclient.InferInput("input", [1, 64], "FP32")
                tensor.set_data_from_numpy(X)

                async def call() -> None:
                    await client.infer("example", [tensor])

                try:
                    return await closed_loop(call, c, seconds)
                finally:
                    await client.close()

            rate, p50 = asyncio.run(grpc_run())
            print(f"{'grpc kserve':12s} c={concurrency:<3d} {rate:8.0f} req/s  p50 {p50:7.0f} µs")
    finally:
        child.terminate()
        child.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["stacks", "trtserve", "serve-aiohttp",
                                         "serve-starlette"])
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.what == "serve-aiohttp":
        serve_aiohttp(args.port)
    elif args.what == "serve-starlette":
        serve_starlette(args.port)
    elif args.what == "stacks":
        stacks(args.seconds)
    else:
        trtserve(args.seconds)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

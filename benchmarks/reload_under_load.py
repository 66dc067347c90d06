"""Inference latency while a model is reloaded again and again, against a quiet baseline.

    .venv/bin/python -m benchmarks.reload_under_load [--clients 64] [--seconds 5]
        [--reload-every-s 0.5]

Starts `trtserve serve` (the example ONNX model, ONNX Runtime, 2 workers) as a
child process, then runs `--clients` concurrent unary callers for `--seconds`
twice: quiet, and while another caller reloads the model every
`--reload-every-s` (alternating two files with different weights). Reports
latency percentiles, errors (there should be none), and how long each reload
RPC took (load beside, switch, drain and stop of the old version). One JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trtserve.client import AsyncClient
from trtserve.client.errors import InferenceError
from trtserve.service.example_model import write_example

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service="example"),
                              timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


async def _run(url: str, clients: int, seconds: float, files: list[Path] | None,
               every_s: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    reloads: list[float] = []
    end = time.monotonic() + seconds
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)

    async def caller(c: AsyncClient) -> None:
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                await c.infer("example", {"input": x})
            except InferenceError as e:
                errors[e.code.name] = errors.get(e.code.name, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)

    async def reloader(c: AsyncClient, paths: list[Path]) -> None:
        i = 0
        while time.monotonic() + every_s < end:
            await asyncio.sleep(every_s)
            i += 1
            start = time.perf_counter()
            await c.reload_model("example", str(paths[i % 2]))
            reloads.append(time.perf_counter() - start)

    async with AsyncClient(url) as c:
        tasks = [caller(c) for _ in range(clients)]
        if files:
            tasks.append(reloader(c, files))
        await asyncio.gather(*tasks)
    ms = np.array(latencies) * 1e3
    result: dict[str, object] = {
        "requests": len(latencies), "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2)}
    if files:
        result["reloads"] = len(reloads)
        result["reload_ms_p50"] = round(float(np.median(reloads)) * 1e3, 1)
        result["reload_ms_max"] = round(max(reloads) * 1e3, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--reload-every-s", type=float, default=0.5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_example(Path(tmp) / f"example-{k}.onnx", seed=k) for k in (1, 2)]
        port = _free_port()
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "trtserve.service.cli", "serve", "--model",
             f"example={files[0]}",
             "--port", str(port), "--metrics-port", "0", "--workers", "2",
             "--log-level", "WARNING"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(port, proc)
            url = f"127.0.0.1:{port}"
            quiet = asyncio.run(_run(url, args.clients, args.seconds, None, 0))
            reloading = asyncio.run(_run(url, args.clients, args.seconds, files,
                                         args.reload_every_s))
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    print(json.dumps({"clients": args.clients, "seconds": args.seconds,
                      "quiet": quiet, "reloading": reloading}, indent=2))


if __name__ == "__main__":
    main()

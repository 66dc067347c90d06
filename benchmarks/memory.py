"""Resident memory of a `trtserve serve` process across rounds of large requests.

Starts the server as a child process serving a small convolutional ONNX model
with dynamic height and width, sends `--rounds` rounds of `--concurrency`
concurrent trtserve.v1 Infer calls of one 1x3xSIZExSIZE FP32 image each, and
prints the server's resident memory (psutil) after each round and after
`--idle-s` seconds idle. Extra arguments after `--` go to `trtserve serve`.

    .venv/bin/python -m benchmarks.memory --size 1024 --concurrency 8 --rounds 6 \
        -- --max-input-bytes 0 --max-request-bytes-in-flight 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

from trtserve.client import AsyncClient, InferenceError
from trtserve.service.testing.onnx_models import conv_net

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError("server exited early")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError("server did not become ready")


async def _round(url: str, image: np.ndarray, concurrency: int,
                 input_name: str) -> dict[str, int]:
    codes: dict[str, int] = {}
    async with AsyncClient(url, max_message_bytes=512 * MIB) as c:
        async def one() -> str:
            try:
                await c.infer("conv", {input_name: image}, timeout=120)
            except InferenceError as e:
                return e.code.name
            return "OK"

        for code in await asyncio.gather(*(one() for _ in range(concurrency))):
            codes[code] = codes.get(code, 0) + 1
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image height and width")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--input-name", default="image",
                        help="another name makes every request INVALID_ARGUMENT after decoding")
    parser.add_argument("serve_args", nargs="*", help="after --: more `trtserve serve` flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = conv_net(Path(tmp) / "conv.onnx", dynamic_spatial=True)
        port = _free_port()
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(
            [sys.executable, "-m", "trtserve.service.cli", "serve", "--model", f"conv={model}",
             "--port", str(port), "--metrics-port", "0", "--workers", str(args.workers),
             "--max-receive-message-bytes", str(512 * MIB), *args.serve_args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        url = f"127.0.0.1:{port}"
        try:
            _wait_ready(url, proc)
            server = psutil.Process(proc.pid)
            image = np.random.default_rng(0).standard_normal(
                (1, 3, args.size, args.size)).astype(np.float32)
            rss = [server.memory_info().rss / MIB]
            peak = [rss[0]]
            sampling = threading.Event()

            def sample() -> None:  # the peak, every 10 ms
                while not sampling.wait(0.01):
                    peak[0] = max(peak[0], server.memory_info().rss / MIB)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            report: dict[str, object] = {"image_mib": image.nbytes / MIB,
                                         "concurrency": args.concurrency,
                                         "serve_args": args.serve_args}
            codes: dict[str, int] = {}
            start = time.monotonic()
            for _ in range(args.rounds):
                for code, n in asyncio.run(_round(url, image, args.concurrency,
                                                                 args.input_name)).items():
                    codes[code] = codes.get(code, 0) + n
                rss.append(server.memory_info().rss / MIB)
            report["seconds"] = round(time.monotonic() - start, 1)
            sampling.set()
            sampler.join()
            report["peak_rss_mib"] = round(peak[0])
            time.sleep(args.idle_s)
            report.update(codes=codes, rss_mib=[round(r) for r in rss],
                          idle_rss_mib=round(server.memory_info().rss / MIB))
            print(json.dumps(report))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.seek(0)
            if proc.returncode:
                print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

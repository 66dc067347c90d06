"""Inference latency with and without a storm of Prometheus scrapers, in one run.

    .venv/bin/python -m benchmarks.scrape_storm                    # this checkout
    .venv/bin/python -m benchmarks.scrape_storm --server-root DIR  # another (e.g. older) one

Starts `trtserve serve` (the example ONNX model, ONNX Runtime, 1 worker) as a
child process with metrics on, then measures unary inference latency from
`--clients` concurrent callers for `--seconds`, three times: quiet, during a
storm of `--scrapers` scrapers each fetching /metrics in a loop (a new
connection per scrape, as a flood would), and quiet again. The scrapers run
in a separate process, so their own CPU does not slow the callers' process;
they do share the machine's cores with the server, as a storm would.
`--half-sent N` first opens N connections that each send half a request,
counts the server's threads, then completes all N at once and measures
inference latency right after (issue 15: 1,000 of them stalled inference
for 15 s). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from trtserve.client import AsyncClient, Client
from trtserve.service.example_model import write_example

ROOT = Path(__file__).resolve().parent.parent


def serving_env(root: str, tmp: Path) -> dict[str, str]:
    """The environment in which `python -m trtserve.service.cli` runs `root`'s checkout.

    This checkout's `trtserve.service` and `trtserve.client` are installed (editable), and
    a PYTHONPATH of `root` alone would still import them: another checkout's are reached
    through links shaped as installed (trtserve/service, trtserve/client), ahead on
    PYTHONPATH."""
    farm = tmp / "checkout" / "trtserve"
    farm.mkdir(parents=True)
    for part in ("service", "client"):
        (farm / part).symlink_to(Path(root).resolve() / part)
    return {**os.environ, "PYTHONPATH": str(farm.parent)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape_loop(port: int, threads: int, stop: mp.synchronize.Event,  # type: ignore[name-defined]
                 counts: mp.sharedctypes.Synchronized) -> None:  # type: ignore[name-defined]
    def one() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    with counts.get_lock():
                        counts.value += 1
            except OSError:
                time.sleep(0.001)
            finally:
                conn.close()

    workers = [threading.Thread(target=one, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


async def latencies(url: str, clients: int, seconds: float) -> list[float]:
    """Each call's seconds, from `clients` callers for `seconds` after a warm-up."""
    x = np.ones((1, 64), np.float32)
    out: list[float] = []

    async def caller(c: AsyncClient, end: float) -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            await c.infer("example", {"input": x}, timeout=60)
            out.append(time.perf_counter() - t)

    async with AsyncClient(url) as c:
        for _ in range(20):  # warm up
            await c.infer("example", {"input": x}, timeout=60)
        end = time.monotonic() + seconds  # after the warm-up, which a flood may slow
        await asyncio.gather(*(caller(c, end) for _ in range(clients)))
    return out


def summary(lat: list[float], seconds: float) -> dict[str, float]:
    a = np.array(lat) * 1e3
    return {"calls": len(lat), "calls_per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(service="example"),
                              timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


@contextlib.contextmanager
def example_server(server_root: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`trtserve serve` from `server_root`'s checkout, the example model and `flags`, as a
    child process: yields its URL and process once healthy, and stops it after."""
    with tempfile.TemporaryDirectory() as tmp:
        model = write_example(Path(tmp) / "example.onnx")
        env = serving_env(server_root, Path(tmp))
        port = free_port()
        with open(Path(tmp) / "server.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trtserve.service.cli", "serve",
                 "--model", f"example={model}", "--port", str(port), "--log-level", "WARNING",
                 *flags], cwd=server_root, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(port, proc)
                yield f"127.0.0.1:{port}", proc
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _half_sent(url: str, metrics_port: int, n: int, clients: int, seconds: float,
               server_pid: int) -> dict[str, object]:
    held = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            s = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
    time.sleep(2.0)  # the old server makes its threads as it accepts
    threads = psutil.Process(server_pid).num_threads()
    for s in held:
        with contextlib.suppress(OSError):
            s.sendall(b"\r\n")
    start = time.perf_counter()
    with Client(url) as c:  # the first call after they complete: the stall
        c.infer("example", {"input": np.ones((1, 64), np.float32)}, timeout=120)
    first_ms = round((time.perf_counter() - start) * 1e3, 1)
    latency = summary(asyncio.run(latencies(url, clients, seconds)), seconds)
    for s in held:
        s.close()
    return {"connections": len(held), "server_threads_while_held": threads,
            "first_call_after_completing_ms": first_ms, **latency}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-root", default=str(ROOT),
                   help="checkout whose `service` package serves (default: this one)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--scrapers", type=int, default=32)
    p.add_argument("--half-sent", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()

    metrics_port = free_port()
    with example_server(args.server_root, "--workers", "1",
                        "--metrics-port", str(metrics_port)) as (url, proc):
        result: dict[str, object] = {"server_root": args.server_root,
                                     "clients": args.clients, "scrapers": args.scrapers,
                                     "half_sent": args.half_sent, "seconds": args.seconds,
                                     "cpus": os.cpu_count(),
                                     "server_threads_quiet": psutil.Process(proc.pid).num_threads()}
        result["quiet_before"] = summary(
            asyncio.run(latencies(url, args.clients, args.seconds)), args.seconds)
        if args.half_sent:
            result["half_sent_completed"] = _half_sent(
                url, metrics_port, args.half_sent, args.clients, args.seconds, proc.pid)
        stop, counts = mp.Event(), mp.Value("q", 0)
        storm = mp.Process(target=_scrape_loop,
                           args=(metrics_port, args.scrapers, stop, counts), daemon=True)
        storm.start()
        time.sleep(1.0)  # let the storm build
        before = counts.value
        storm_lat = asyncio.run(latencies(url, args.clients, args.seconds))
        result["storm"] = {**summary(storm_lat, args.seconds),
                           "scrapes_per_s": round((counts.value - before) / args.seconds, 1)}
        result["server_threads_in_storm"] = psutil.Process(proc.pid).num_threads()
        stop.set()
        storm.join(40)
        result["quiet_after"] = summary(
            asyncio.run(latencies(url, args.clients, args.seconds)), args.seconds)
        print(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()

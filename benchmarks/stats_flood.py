"""Inference latency while clients flood Stats, set against the same while they flood Infer.

    python -m benchmarks.stats_flood [--frontends 2] [--flooders 256] [--seconds 5]
    python -m benchmarks.stats_flood --server-root DIR   # another (e.g. older) checkout

Starts `trtserve serve` (the example model on ONNX Runtime) with `--frontends`, then
measures one caller sending one Infer at a time for `--seconds`, four times: quiet; while
`--flooders` callers in another process call Stats in a loop over `--connections`
connections; while as many call Infer in a loop (the load any client may send: what a
Stats flood should cost no more than); quiet again. Prints a table: the caller's
calls/s and latency percentiles, the flood's calls/s, and the server's CPU (engine and
frontends) per flood call. The flood shares the machine's cores with the server, as it
would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import time

import psutil

from benchmarks.scrape_storm import ROOT, example_server, latencies, summary


def _flood(url: str, rpc: str, flooders: int, connections: int,
           stop: mp.synchronize.Event,
           calls: mp.sharedctypes.Synchronized) -> None:
    import grpc
    import numpy as np

    from trtserve.client.convert import infer_request
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    infer = infer_request("example", {"input": np.ones((1, 64), np.float32)}, [])

    async def flooder(stub: pb_grpc.InferenceServiceStub) -> None:
        while not stop.is_set():
            if rpc == "Stats":
                await stub.Stats(pb.StatsRequest(), timeout=60)
            else:
                await stub.Infer(infer, timeout=60)
            with calls.get_lock():
                calls.value += 1

    async def main() -> None:
        channels = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool",
                                                             1)])
                    for _ in range(connections)]
        stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
        await asyncio.gather(*(flooder(stubs[i % connections]) for i in range(flooders)))
        for c in channels:
            await c.close(grace=None)

    asyncio.run(main())


def _cpu_s(server: psutil.Process) -> float:
    """CPU seconds of the server's processes (the engine and its frontends)."""
    total = 0.0
    for p in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _measured(url: str, server: psutil.Process, seconds: float,
              flood: tuple[str, int, int] | None) -> dict[str, float]:
    """The lone caller's latencies, with a flood of (rpc, flooders, connections) beside it,
    and the server's CPU per flood call."""
    if flood is None:
        return summary(asyncio.run(latencies(url, 1, seconds)), seconds)
    stop, calls = mp.Event(), mp.Value("q", 0)
    flooding = mp.Process(target=_flood, args=(url, *flood, stop, calls), daemon=True)
    flooding.start()
    time.sleep(1.5)  # the flood builds
    before, cpu_before = calls.value, _cpu_s(server)
    result = summary(asyncio.run(latencies(url, 1, seconds)), seconds)
    flood_calls = calls.value - before
    result["flood_calls_per_s"] = round(flood_calls / seconds)
    # The lone caller's calls are in it too: few beside the flood's.
    result["server_ms_per_flood_call"] = round(
        (_cpu_s(server) - cpu_before) * 1e3 / max(flood_calls, 1), 3)
    stop.set()
    flooding.join(60)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-root", default=str(ROOT),
                   help="checkout whose `service` package serves (default: this one)")
    p.add_argument("--frontends", type=int, default=2)
    p.add_argument("--flooders", type=int, default=256)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()

    with example_server(args.server_root, "--metrics-port", "0", "--http-port", "0",
                        "--frontends", str(args.frontends)) as (url, proc):
        print(f"server: {args.server_root}, frontends {args.frontends}, "
              f"{os.cpu_count()} cores; one caller, one Infer at a time, "
              f"{args.seconds:g} s each")
        print(f"{'beside it':<24} {'calls/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'flood calls/s':>14} "
              f"{'server CPU ms/flood call':>25}")
        server = psutil.Process(proc.pid)
        for name, rpc in [("quiet", None), (f"{args.flooders} flooding Stats", "Stats"),
                          (f"{args.flooders} flooding Infer", "Infer"), ("quiet again", None)]:
            flood = None if rpc is None else (rpc, args.flooders, args.connections)
            r = _measured(url, server, args.seconds, flood)
            print(f"{name:<24} {r['calls_per_s']:>8} {r['p50_ms']:>8} {r['p90_ms']:>8} "
                  f"{r['p99_ms']:>8} {r['max_ms']:>8} {r.get('flood_calls_per_s', ''):>14} "
                  f"{r.get('server_ms_per_flood_call', ''):>25}", flush=True)

if __name__ == "__main__":
    main()

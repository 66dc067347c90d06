"""Valid calls during a flood of 1 ms-deadline calls: how many come back CANCELLED?

Starts `trtserve serve` with the example model, then two client processes:
one sends Infer calls with a 1 ms deadline in a loop (`--flood` at a time),
the other sends valid Infer calls without a deadline (`--valid` at a time)
until `--seconds` have passed. Prints, as JSON, the status codes each side
got and the server's Stats counters.

    python -m benchmarks.deadline_flood --seconds 10
    python -m benchmarks.deadline_flood --seconds 10 --grpc-experiments ''   # gRPC's defaults
    python -m benchmarks.deadline_flood --seconds 8 --server probe   # which calls reach Python

The server and both clients run with the same GRPC_EXPERIMENTS
(`--grpc-experiments`; default: service/grpc_tuning.py's setting).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path


def _load(url: str, deadline_s: float | None, concurrency: int, seconds: float,
          experiments: str, out: multiprocessing.Queue) -> None:
    os.environ["GRPC_EXPERIMENTS"] = experiments
    import grpc
    import numpy as np

    from trtserve.client.convert import infer_request
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    request = infer_request("example", {"input": np.ones((1, 64), np.float32)}, [])
    codes: collections.Counter[str] = collections.Counter()
    # Tags the valid calls, so that a server can tell them from the flood's.
    metadata = (("x-valid", "1"),) if deadline_s is None else None
    details: collections.Counter[str] = collections.Counter()

    async def worker(stub: pb_grpc.InferenceServiceStub, end: float) -> None:
        while time.monotonic() < end:
            try:
                await stub.Infer(request, timeout=deadline_s, metadata=metadata)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() == grpc.StatusCode.CANCELLED:
                    # Where the status came from: the server's trailers or the transport.
                    details[(e.debug_error_string() or "")[:200]] += 1

    async def main() -> None:
        async with grpc.aio.insecure_channel(url) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            end = time.monotonic() + seconds
            await asyncio.gather(*(worker(stub, end) for _ in range(concurrency)))

    asyncio.run(main())
    out.put({"codes": dict(codes), "cancelled_details": dict(details.most_common(5))})


_SERVERS = {"trtserve": "trtserve.service.cli", "floor": "benchmarks.grpc_floor",
            "probe": "benchmarks.flood_probe_server"}


def _stats(url: str) -> dict[str, int]:
    from trtserve.client import Client

    with Client(url) as c:
        model = c.stats("example").models[0]
    return {"requests": model.requests, "cancelled": model.cancelled,
            "deadline_exceeded": model.deadline_exceeded}


def _wait_serving(server: object) -> None:
    """Until an Infer call answers (the floor server has no health service)."""
    import grpc
    import numpy as np

    from trtserve.client.convert import infer_request
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    request = infer_request("example", {"input": np.ones((1, 64), np.float32)}, [])
    end = time.monotonic() + 60
    with grpc.insecure_channel(server.url) as channel:  # type: ignore[attr-defined]
        stub = pb_grpc.InferenceServiceStub(channel)
        while True:
            try:
                stub.Infer(request, timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    from trtserve.client import grpc_tuning

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flood", type=int, default=32, help="1 ms-deadline calls at a time")
    parser.add_argument("--valid", type=int, default=8, help="valid calls at a time")
    parser.add_argument("--flood-deadline-ms", type=float, default=1.0)
    parser.add_argument("--grpc-experiments", default=grpc_tuning.EXPERIMENTS)
    parser.add_argument("--server", choices=tuple(_SERVERS), default="trtserve",
                        help="floor: benchmarks/grpc_floor.py, a no-op grpc.aio server; "
                             "probe: benchmarks/flood_probe_server.py, which counts the "
                             "calls that reach Python")
    parser.add_argument("--max-pending-calls", type=int,
                        help="trtserve's server.max_pending_calls (default: its own; 0: "
                             "gRPC's own limit)")
    parser.add_argument("--max-concurrent-streams", type=int,
                        help="trtserve's server.max_concurrent_streams (default: its own, "
                             "1024; 0: gRPC's own, unlimited)")
    args = parser.parse_args(argv)

    os.environ["GRPC_EXPERIMENTS"] = args.grpc_experiments
    from trtserve.service.example_model import write_example
    from trtserve.service.testing.servers import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        model = write_example(Path(tmp) / "example.onnx")
        env = {"GRPC_EXPERIMENTS": args.grpc_experiments}
        flags = [] if args.max_pending_calls is None else \
            ["--max-pending-calls", str(args.max_pending_calls)]
        if args.max_concurrent_streams is not None:
            flags += ["--max-concurrent-streams", str(args.max_concurrent_streams)]
        server = ServerProcess(["--model", f"example={model}", *flags], env=env)
        if args.server != "trtserve":
            server.terminate()
            server._start([_SERVERS[args.server], "--port", str(server.port)], env)
        try:
            _wait_serving(server)
            ctx = multiprocessing.get_context("spawn")
            out: multiprocessing.Queue = ctx.Queue()
            procs = [ctx.Process(target=_load, args=(server.url, deadline, n, args.seconds,
                                                     args.grpc_experiments, out))
                     for deadline, n in ((args.flood_deadline_ms / 1e3, args.flood),
                                         (None, args.valid))]
            for p in procs:
                p.start()
            results = [out.get(timeout=args.seconds + 120) for _ in procs]
            for p in procs:
                p.join()
            stats = _stats(server.url) if args.server == "trtserve" else None
        finally:
            rc, log = server.terminate()
    # Which result is which: the flood's codes hold DEADLINE_EXCEEDED.
    flood, valid = sorted(results, key=lambda r: -r["codes"].get("DEADLINE_EXCEEDED", 0))
    total = sum(valid["codes"].values())
    print(json.dumps({
        "grpc_experiments": args.grpc_experiments,
        "flood": flood, "valid": valid,
        "valid_cancelled_pct": round(100 * valid["codes"].get("CANCELLED", 0) / max(total, 1), 3),
        "server": args.server,
        "server_stats": stats,
        "server_exit": rc,
        "server_log_tail": log.splitlines()[-8:],
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

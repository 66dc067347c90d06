"""`benchmarks.shared_memory --cuda-region`: the GPU stand-in, bytes path vs a CUDA region.

Serves the GPU stand-in (service/testing/gpu_standin.py: a TEST DOUBLE of a TensorRT
engine doing real CUDA work through the real TensorRT executor; no number here is a
TensorRT number) in this process, and drives it with `trtserve-client bench` in another
process (cudaIpcOpenMemHandle refuses a handle of its own process) at each concurrency,
once with the tensors in the request (bytes) and once in a CUDA region registered by the
client (`--shared-memory cuda`: input uploaded once, output written into the region).

Per run it prints requests/s and p50 from the client, and two kinds of evidence of where
the bytes went, both per request:

- Stats (the model's shared-memory counters): copies avoided, host copies, and batches
  whose tensors were bound by address (no copy) or copied once device-to-device;
- the executor's own CUDA calls: cudaMemcpyAsync calls by kind (H2D, D2H, D2D) counted
  by the CudaRuntime every worker uses, plus the H2D/D2H copy nodes of the CUDA graphs
  it launched (a graph holding the copies counts them per launch).

    python -m benchmarks.shared_memory --cuda-region                 # graphs on and off
    python -m benchmarks.shared_memory --cuda-region --cuda-graphs off --duration 5
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from trtserve.service.testing.servers import ROOT

MODEL = "standin"


@dataclass(frozen=True)
class Run:
    graphs: bool
    mode: str  # "none" (bytes) or "cuda"
    concurrency: int
    rps: float
    p50_ms: float
    errors: int
    requests: int  # answered by the model during the run, warm-up included
    copies: Counter[str]
    shm: Any  # pb.ModelSharedMemoryStats, difference over the run
    graph_launches: int


def _bench(url: str, mode: str, concurrency: int, rows: int, duration_s: float,
           warmup_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "trtserve.client.cli", "bench", "--model", MODEL, "--url", url,
               "--concurrency", str(concurrency), "--batch-rows", str(rows),
               "--duration", str(duration_s), "--warmup", str(warmup_s),
               "--shared-memory", mode, "--json", "--quiet"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=duration_s + warmup_s + 120)
    if done.returncode != 0:
        raise RuntimeError(f"bench failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)["results"][0]
    return result


def _model_stats(url: str) -> Any:
    from trtserve.client.client import Client

    with Client(url) as c:
        [model] = c.stats(MODEL).models
    return model


def _shm_diff(after: Any, before: Any) -> Any:
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

    fields = ("input_bytes", "output_bytes", "copies_avoided", "host_copies", "bound_batches",
              "copied_batches")
    return pb.ModelSharedMemoryStats(**{f: getattr(after.shared_memory, f)
                                        - getattr(before.shared_memory, f) for f in fields})


def measure(graphs: bool, concurrency: tuple[int, ...], dims: tuple[int, int, int], rows: int,
            workers: int, duration_s: float, warmup_s: float) -> list[Run]:
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime
    from trtserve.service.testing.gpu_standin import StandinEngine, serving_standin, standin_config

    in_features, hidden, out_features = dims
    max_rows = rows * max(concurrency)
    engine = StandinEngine(in_features, hidden, out_features,
                           batch=(1, max(1, max_rows // 2), max_rows), host_weights=False)
    cuda = CudaRuntime(0)
    # No queue delay: at concurrency 1 every request is alone in its batch (the bound
    # path); at 8, batches form from what queued meanwhile (copied once, on the device).
    config = standin_config(MODEL, workers=workers, max_queue_delay_us=0,
                            cuda_graphs=graphs, inline_below_us=0)
    runs: list[Run] = []
    try:
        with serving_standin(engine, config, cuda=cuda) as server:
            for mode in ("none", "cuda"):
                for c in concurrency:
                    before, copies_before = _model_stats(server.url), Counter(cuda.copies)
                    result = _bench(server.url, mode, c, rows, duration_s, warmup_s)
                    after = _model_stats(server.url)
                    copies = Counter(cuda.copies)
                    copies.subtract(copies_before)
                    runs.append(Run(graphs, mode, c, result["throughput_rps"],
                                    result["latency_ms"]["p50"], sum(result["errors"].values()),
                                    after.requests - before.requests, copies,
                                    _shm_diff(after, before),
                                    after.graph_launches - before.graph_launches))
    finally:
        engine.close()
    return runs


def report(runs: list[Run], dims: tuple[int, int, int], rows: int, device: str) -> None:
    in_features, _, out_features = dims
    print(f"GPU stand-in (a test double, not TensorRT) on {device}: {rows} rows x "
          f"{in_features} FP32 in ({rows * in_features * 4 / 1e3:.0f} kB), {rows} x "
          f"{out_features} out; counts are per request (warm-up included)")
    print(f"{'graphs':6} {'tensors':7} {'conc':>4} {'req/s':>9} {'p50 ms':>7} {'err':>4} | "
          f"{'H2D':>5} {'D2H':>5} {'D2D':>5} {'gH2D':>5} {'gD2H':>5} | {'avoided':>7} "
          f"{'host':>5} {'bound%':>6} {'copied%':>7}")
    for r in runs:
        n = max(r.requests, 1)
        batches = max(r.shm.bound_batches + r.shm.copied_batches, 1)
        label = "bytes" if r.mode == "none" else "cuda"
        print(f"{'on' if r.graphs else 'off':6} {label:7} {r.concurrency:>4} {r.rps:>9.1f} "
              f"{r.p50_ms:>7.3f} {r.errors:>4} | {r.copies['h2d'] / n:>5.2f} "
              f"{r.copies['d2h'] / n:>5.2f} {r.copies['d2d'] / n:>5.2f} "
              f"{r.copies['graph_h2d'] / n:>5.2f} {r.copies['graph_d2h'] / n:>5.2f} | "
              f"{r.shm.copies_avoided / n:>7.2f} {r.shm.host_copies / n:>5.2f} "
              f"{100 * r.shm.bound_batches / batches:>6.0f} "
              f"{100 * r.shm.copied_batches / batches:>7.0f}")
    for graphs in sorted({r.graphs for r in runs}):
        by = {(r.mode, r.concurrency): r for r in runs if r.graphs == graphs}
        for c in sorted({r.concurrency for r in runs}):
            b, s = by.get(("none", c)), by.get(("cuda", c))
            if b and s and b.rps and s.p50_ms:
                print(f"graphs {'on' if graphs else 'off'} c={c}: cuda/bytes requests/s "
                      f"x{s.rps / b.rps:.2f}, p50 bytes/cuda x{b.p50_ms / s.p50_ms:.2f}")


def main(concurrency: tuple[int, ...], graphs: str, dims: tuple[int, int, int], rows: int,
         workers: int, duration_s: float, warmup_s: float) -> int:
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime

    modes = {"on": (True,), "off": (False,), "both": (False, True)}[graphs]
    runs = [run for g in modes
            for run in measure(g, concurrency, dims, rows, workers, duration_s, warmup_s)]
    report(runs, dims, rows, CudaRuntime(0).device_name())
    return 0

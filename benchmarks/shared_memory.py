"""Issue 16's benchmark: a camera-sized image through gRPC bytes vs system shared memory.

Serves a CPU model that reads a 3x640x640 FP32 image (4.9 MB) and answers its
mean (so the model costs little and the transport shows), then drives it with
`trtserve-client bench` at concurrency 1 and 8, once with the image in the
request (bytes path) and once in a registered POSIX shared-memory region
(`--shared-memory system`; the 4-byte answer goes into the region too). Prints
a table of requests/s and latency, the ratios the issue targets (system shared
memory >= 5x the requests/s at concurrency 8, p50 at concurrency 1 >= 5x lower),
and for scale: the model alone in ONNX Runtime and one memcpy of the image.

    python -m benchmarks.shared_memory                     # both protocols, 4 workers
    python -m benchmarks.shared_memory --protocol v1 --duration 5 --workers 2
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.cpu.harness import trtserve
from trtserve.client.bench import BenchConfig, Level, run
from trtserve.client.bench.config import LevelResult

SHAPE = (3, 640, 640)


def mean_model(path: Path) -> Path:
    """[N, 3, 640, 640] FP32 -> [N] FP32, the mean of each image."""
    node = helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0)
    graph = helper.make_graph(
        [node], "image_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def model_alone_us(path: Path, repeats: int = 200) -> float:
    """p50 of one ONNX Runtime call on one image, in microseconds."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def memcpy_us(repeats: int = 200) -> float:
    x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    out = np.empty_like(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(out, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def measure(url: str, protocol: str, shared_memory: str, concurrency: tuple[int, ...],
            duration_s: float, warmup_s: float) -> list[LevelResult]:
    config = BenchConfig(url=url, model="mean", protocol=protocol,
                         levels=tuple(Level("closed", c) for c in concurrency),
                         duration_s=duration_s, warmup_s=warmup_s,
                         shared_memory=shared_memory)
    return run(config, progress=False).results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("v1", "kserve", "both"), default="both")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    protocols = ("v1", "kserve") if args.protocol == "both" else (args.protocol,)

    with tempfile.TemporaryDirectory() as tmp:
        path = mean_model(Path(tmp) / "mean.onnx")
        alone, copy = model_alone_us(path), memcpy_us()
        rows: list[tuple[str, str, LevelResult]] = []
        with trtserve("mean", path, Path(tmp), workers=args.workers, max_batch=8,
                      delay_us=0) as served:
            for protocol in protocols:
                for mode in ("none", "system"):
                    for result in measure(served.url, protocol, mode, concurrency,
                                          args.duration, args.warmup):
                        rows.append((protocol, mode, result))
    print(f"model alone (ONNX Runtime, 1 image): p50 {alone:.0f} us; memcpy of the image "
          f"({np.prod(SHAPE) * 4 / 1e6:.1f} MB): {copy:.0f} us; server: {args.workers} workers")
    print(f"{'protocol':9} {'tensors':8} {'conc':>5} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7}")
    for protocol, mode, r in rows:
        label = "bytes" if mode == "none" else "shm"
        print(f"{protocol:9} {label:8} {int(r.load):>5} {r.throughput_rps:>9.1f} "
              f"{r.latency_ms['p50']:>8.2f} {r.latency_ms['p99']:>8.2f} "
              f"{sum(r.errors.values()):>7}")
    for protocol in protocols:
        by = {(m, int(r.load)): r for p, m, r in rows if p == protocol}
        for c in concurrency:
            b, s = by.get(("none", c)), by.get(("system", c))
            if b and s and b.throughput_rps and s.latency_ms["p50"]:
                speedup = s.throughput_rps / b.throughput_rps
                faster = b.latency_ms["p50"] / s.latency_ms["p50"]
                print(f"{protocol} c={c}: shm/bytes requests/s x{speedup:.1f}, "
                      f"p50 bytes/shm x{faster:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 16's benchmark: a camera-sized image through gRPC bytes vs system shared memory.

Serves a CPU model that reads a 3x640x640 FP32 image (4.9 MB) and answers its
mean (so the model costs little and the transport shows), then drives it with
`trtserve-client bench` at concurrency 1 and 8, once with the image in the
request (bytes path) and once in a registered POSIX shared-memory region
(`--shared-memory system`; the 4-byte answer goes into the region too). Prints
a table of requests/s and latency, the ratios the issue targets (system shared
memory >= 5x the requests/s at concurrency 8, p50 at concurrency 1 >= 5x lower),
and for scale: the model alone in ONNX Runtime (reading the image from cache, as
a loop does, and with the image out of cache, as a served region's image is),
one memcpy of the image, and whether the server's ONNX Runtime executor copies a
lone request's region input (the process's peak memory while it runs on a
393 MB region view: it does not grow).

    python -m benchmarks.shared_memory                     # both protocols, 4 workers
    python -m benchmarks.shared_memory --protocol v1 --duration 5 --workers 2

The shared-memory rows run once per way the server reads system regions
(`--system-regions both`, the default): `copy` (pread/pwrite, the server's default)
and `in_place` (mapped, no copy).

`--cuda-region` (a GPU machine): the GPU stand-in served through the real TensorRT
executor, bytes path vs a CUDA region, with the evidence that a CUDA-region request
makes no host copy (benchmarks/cuda_region.py says what is counted):

    python -m benchmarks.shared_memory --cuda-region --duration 5
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


def model_cold_us(path: Path, repeats: int = 200) -> float:
    """As model_alone_us, with the image out of the CPU's caches before each call.

    The loop above reads the same image back to back, so it comes from cache; a
    served image written into a region once (as the benchmark and perf_analyzer
    do) has been pushed out of the caches by the time the next request reads it
    (gRPC, Python and the client run in between), so this is the model's cost in
    the served shared-memory path.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    flush = np.ones(64 << 20, np.uint8)  # larger than this machine's L2 and most L3s
    times = []
    for _ in range(repeats):
        flush += 1
        start = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def ort_input_growth_mb(path: Path, images: int = 80) -> tuple[float, float]:
    """(MB the peak memory grew while the server's ONNX Runtime executor ran a lone
    request on a region view of `images` images, their size in MB).

    The view is the one the engine hands the executor (RegionRegistry.lease over a
    real /dev/shm object: read-only, mapped); a growth near 0 means ONNX Runtime
    read it where it lies, near the size that it copied it.
    """
    import resource
    from multiprocessing import shared_memory

    from trtserve.service.backends.onnxruntime import OrtExecutor
    from trtserve.service.config import SharedMemoryConfig
    from trtserve.service.engine.api import RegionRef, TensorIn
    from trtserve.service.engine.regions import RegionRegistry

    shape = (images, *SHAPE)
    nbytes = int(np.prod(shape)) * 4
    executor = OrtExecutor(str(path), threads=1, max_batch=images)
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    # The executor reading a mapped region where it lies ("in_place"; by default the
    # engine reads the object through its descriptor and the executor gets a copy).
    registry = RegionRegistry(SharedMemoryConfig(system_regions="in_place"))
    try:
        client_side = np.frombuffer(shm.buf, np.float32)
        client_side[:] = 1.0  # the client's pages are resident before the baseline
        registry.register_system("check", shm.name, 0, nbytes)
        ref = {"image": TensorIn("FP32", shape, RegionRef("check", 0, nbytes))}
        with registry.lease(ref, {}) as lease:
            view = lease.arrays["image"]
            np.add.reduce(view, axis=None)  # the server's mapping resident too
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            executor.run({"image": [view]}, images)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            del view
        del client_side
    finally:
        registry.close()
        executor.close()
        shm.close()
        shm.unlink()
    return (after - before) / 1024, nbytes / 1e6  # ru_maxrss is in KiB on Linux


def memcpy_us(repeats: int = 200) -> float:
    x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    out = np.empty_like(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(out, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def region_read_cold_us(path: Path, repeats: int = 100) -> tuple[float, float]:
    """(p50 of the server's copy of one image out of a system region, p50 of that copy
    and the model run on it), in microseconds, with the caches flushed before each, as a
    served region's image is out of cache when its request comes.

    The copy is `SystemRegion.read` (pread on the object's descriptor), what the server
    does by default (`system_regions = "copy"`); compare model_cold_us (the model reading
    the image where it lies, as `in_place` does) and memcpy_us.
    """
    from multiprocessing import shared_memory

    import onnxruntime as ort

    from trtserve.service.engine.api import RegionRef
    from trtserve.service.engine.regions import SystemRegion

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nbytes = int(np.prod(SHAPE)) * 4
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    region = None
    try:
        client_side = np.frombuffer(shm.buf, np.float32)
        client_side[:] = 1.0
        del client_side
        region = SystemRegion("cold", shm.name, 0, nbytes)
        ref = RegionRef("cold", 0, nbytes)
        flush = np.ones(64 << 20, np.uint8)
        read, read_and_run = [], []
        for _ in range(repeats):
            flush += 1
            start = time.perf_counter()
            image = region.read(ref, np.dtype(np.float32), (1, *SHAPE))
            read.append(time.perf_counter() - start)
            flush += 1
            start = time.perf_counter()
            image = region.read(ref, np.dtype(np.float32), (1, *SHAPE))
            session.run(None, {"image": image})
            read_and_run.append(time.perf_counter() - start)
    finally:
        if region is not None:
            region.close()
        shm.close()
        shm.unlink()
    return float(np.median(read) * 1e6), float(np.median(read_and_run) * 1e6)


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
    parser.add_argument("--system-regions", choices=("copy", "in_place", "both"),
                        default="both",
                        help="how the server reads system regions (--shm-system-regions): "
                             "copy (the default: pread/pwrite), in_place (mapped), or a "
                             "server of each")
    parser.add_argument("--cuda-region", action="store_true",
                        help="GPU: the stand-in, bytes path vs a CUDA region")
    parser.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="both",
                        help="--cuda-region: serve with CUDA graphs on, off, or both runs")
    parser.add_argument("--dims", default="4096,1024,4096",
                        help="--cuda-region: the stand-in's in,hidden,out features")
    parser.add_argument("--rows", type=int, default=8,
                        help="--cuda-region: rows per request")
    args = parser.parse_args(argv)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    if args.cuda_region:
        from benchmarks import cuda_region

        a, b, c = (int(d) for d in args.dims.split(","))
        return cuda_region.main(concurrency, args.cuda_graphs, (a, b, c), args.rows,
                                args.workers, args.duration, args.warmup)
    protocols = ("v1", "kserve") if args.protocol == "both" else (args.protocol,)

    with tempfile.TemporaryDirectory() as tmp:
        path = mean_model(Path(tmp) / "mean.onnx")
        alone, cold, copy = model_alone_us(path), model_cold_us(path), memcpy_us()
        read_cold, read_and_run_cold = region_read_cold_us(path)
        grew, checked = ort_input_growth_mb(path)
        rows: list[tuple[str, str, LevelResult]] = []
        modes = ("copy", "in_place") if args.system_regions == "both" else (args.system_regions,)
        for server_mode in modes:
            with trtserve("mean", path, Path(tmp), workers=args.workers, max_batch=8,
                          delay_us=0, extra=("--shm-system-regions", server_mode)) as served:
                for protocol in protocols:
                    paths = ("none", "system") if server_mode == modes[0] else ("system",)
                    for mode in paths:
                        for result in measure(served.url, protocol, mode, concurrency,
                                              args.duration, args.warmup):
                            label = "bytes" if mode == "none" else f"shm {server_mode}"
                            rows.append((protocol, label, result))
    print(f"model alone (ONNX Runtime, 1 image): p50 {alone:.0f} us from cache, {cold:.0f} us "
          f"with the image out of cache; memcpy of the image ({np.prod(SHAPE) * 4 / 1e6:.1f} "
          f"MB): {copy:.0f} us; server: {args.workers} workers")
    print(f"the server's copy of the image out of a region (pread, `copy` mode), out of "
          f"cache: p50 {read_cold:.0f} us; that copy and the model on it: "
          f"{read_and_run_cold:.0f} us (in_place: the model alone out of cache, {cold:.0f} us)")
    print(f"a lone region request's input in the server's ONNX Runtime executor: peak memory "
          f"grew {grew:.0f} MB for a {checked:.0f} MB input "
          f"({'copied' if grew > checked / 2 else 'read where it lies, no copy'})")
    print(f"{'protocol':9} {'tensors':13} {'conc':>5} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7}")
    for protocol, label, r in rows:
        print(f"{protocol:9} {label:13} {int(r.load):>5} {r.throughput_rps:>9.1f} "
              f"{r.latency_ms['p50']:>8.2f} {r.latency_ms['p99']:>8.2f} "
              f"{sum(r.errors.values()):>7}")
    for protocol in protocols:
        by = {(m, int(r.load)): r for p, m, r in rows if p == protocol}
        for server_mode in modes:
            for c in concurrency:
                b, s = by.get(("bytes", c)), by.get((f"shm {server_mode}", c))
                if b and s and b.throughput_rps and s.latency_ms["p50"]:
                    speedup = s.throughput_rps / b.throughput_rps
                    faster = b.latency_ms["p50"] / s.latency_ms["p50"]
                    print(f"{protocol} c={c}, shm {server_mode}: shm/bytes requests/s "
                          f"x{speedup:.1f}, p50 bytes/shm x{faster:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

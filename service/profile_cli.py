"""`trtserve profile`: a backend alone, in-process, batch size by batch size.

    trtserve profile --model example=models/example.onnx --batch-sizes 1,8,32,64 --workers 2

No gRPC, no batcher: each of `--workers` threads builds its own executor
(an ONNX Runtime session, or a TensorRT context on its stream) exactly as a
serving worker does, and runs batches back to back, all workers at once, the
way trtexec runs an engine. For each batch size it reports throughput and
latency per batch; from those it recommends `max_batch_size` and preferred
batch sizes. These are the "raw" numbers that served throughput is compared
with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from service.arg_types import name_path, size_list
from service.config import ModelConfig
from service.tensors import DTYPES, TensorSpec

# max_batch_size: the smallest batch reaching this share of the best throughput.
NEAR_PEAK = 0.95
# Preferred sizes must reach at least this share of the best throughput.
PREFERRED_FLOOR = 0.80


def random_array(dtype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data of a wire dtype: normal floats, small integers, random booleans."""
    if dtype == "BF16":
        from service.tensors import fp32_to_bf16

        return fp32_to_bf16(rng.standard_normal(shape).astype(np.float32))
    np_dtype = DTYPES[dtype]
    if np_dtype.kind == "f":
        return rng.standard_normal(shape).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 100, shape).astype(np_dtype)


@dataclass
class SizeResult:
    batch_size: int
    workers: int
    batches: int  # completed inside the window, all workers
    window_s: float
    rows_per_s: float
    batches_per_s: float
    latency_ms: dict[str, float]  # wall time of one executor.run: mean, p50, p90, p95, p99, max
    compute_ms: dict[str, float]  # the backend's own compute time (BatchResult.compute_s)


@dataclass
class Recommendation:
    max_batch_size: int
    preferred_batch_sizes: list[int]
    peak_rows_per_s: float
    reason: str


@dataclass
class ProfileReport:
    model: str
    path: str
    backend: str
    workers: int
    intra_op_threads: int
    duration_s: float
    warmup_s: float
    results: list[SizeResult] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    recommendation: Recommendation | None = None


def latency_summary_ms(seconds: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p95, p99 and max of durations in seconds, as milliseconds."""
    if seconds.size == 0:
        return {k: math.nan for k in ("mean", "p50", "p90", "p95", "p99", "max")}
    ms = seconds * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def sample_inputs(specs: Sequence[TensorSpec], rows: int, sample_shapes: dict[str, tuple[int, ...]],
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of `rows` rows; dynamic non-batch dims come from `sample_shapes`."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for t in specs:
        rest = sample_shapes.get(t.name, t.shape[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"input '{t.name}' has dynamic dimensions {list(t.shape)}; give "
                             f"one row's shape with --sample-shape {t.name}=D,D,...")
        arrays[t.name] = random_array(t.dtype, (rows, *rest), rng)
    return arrays


class _Runner:
    """One thread owning one executor, running what the main thread asks for."""

    def __init__(self, index: int, factory: Callable[[], Any]) -> None:
        self.index = index
        self._factory = factory
        self._work: tuple[dict[str, list[np.ndarray]], int, float, float, float] | None = None
        self._go = threading.Event()
        self._done = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self.records: list[tuple[float, float, float]] = []  # (start, end, compute_s)
        self._thread = threading.Thread(target=self._main, name=f"profile-{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._done.wait()
        self._done.clear()
        if self.error is not None:
            raise self.error

    def run(self, inputs: dict[str, list[np.ndarray]], rows: int, start: float,
            warm_end: float, end: float) -> None:
        self._work = (inputs, rows, start, warm_end, end)
        self.records = []
        self._go.set()

    def wait(self) -> None:
        self._done.wait()
        self._done.clear()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(30)

    def _main(self) -> None:
        try:
            executor = self._factory()
        except BaseException as e:  # handed to the main thread by start()
            self.error = e
            self._done.set()
            return
        self._done.set()
        try:
            while True:
                self._go.wait()
                self._go.clear()
                if self._stop or self._work is None:
                    return
                inputs, rows, start, warm_end, end = self._work
                while time.monotonic() < start:
                    time.sleep(max(0.0, start - time.monotonic()))
                try:
                    while (t0 := time.monotonic()) < end:
                        result = executor.run(inputs, rows)
                        t1 = time.monotonic()
                        if warm_end <= t1 <= end:
                            self.records.append((t0, t1, result.compute_s))
                except BaseException as e:
                    self.error = e
                self._done.set()
        finally:
            executor.close()


def profile(config: ModelConfig, batch_sizes: Sequence[int], duration_s: float = 3.0,
            warmup_s: float = 1.0, sample_shapes: dict[str, tuple[int, ...]] | None = None,
            on_result: Callable[[SizeResult], None] | None = None) -> ProfileReport:
    """Measure `config`'s backend at each batch size with `config.workers` executors at once."""
    from service.backends.onnxruntime import default_threads
    from service.engine.repository import load_backend

    loaded = load_backend(config)
    spec = loaded.spec
    threads = config.intra_op_threads
    if spec.backend == "onnxruntime" and not threads:
        threads = default_threads(config.workers)  # what each session was given
    report = ProfileReport(model=config.name, path=config.path, backend=spec.backend,
                           workers=len(loaded.factories),
                           intra_op_threads=threads,
                           duration_s=duration_s, warmup_s=warmup_s)
    runners = [_Runner(i, f) for i, f in enumerate(loaded.factories)]
    try:
        for r in runners:
            r.start()
        for size in sorted(set(batch_sizes)):
            why = _cannot_run(spec, size)
            if why:
                report.skipped[size] = why
                continue
            arrays = sample_inputs(spec.inputs, size, sample_shapes or {}, seed=size)
            inputs = {name: [a] for name, a in arrays.items()}
            start = time.monotonic() + 0.05
            warm_end, end = start + warmup_s, start + warmup_s + duration_s
            for r in runners:
                r.run(inputs, size, start, warm_end, end)
            for r in runners:
                r.wait()
            records = [rec for r in runners for rec in r.records]
            wall = np.array([b - a for a, b, _ in records])
            compute = np.array([c for _, _, c in records])
            result = SizeResult(
                batch_size=size, workers=len(runners), batches=len(records),
                window_s=duration_s, rows_per_s=len(records) * size / duration_s,
                batches_per_s=len(records) / duration_s, latency_ms=latency_summary_ms(wall),
                compute_ms=latency_summary_ms(compute))
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        for r in runners:
            r.close()
        loaded.close()
    report.recommendation = recommend(report.results)
    return report


def _cannot_run(spec: Any, size: int) -> str:
    if size < spec.min_batch_size or size > spec.max_batch_size:
        return (f"outside the model's batch range {spec.min_batch_size}.."
                f"{spec.max_batch_size}")
    return ""


def recommend(results: Sequence[SizeResult], latency_budget_ms: float | None = None
              ) -> Recommendation | None:
    """max_batch_size: the smallest batch within 5% of the best throughput (and, with a
    budget, whose p99 fits it). Preferred sizes: up to that, those that beat both
    measured neighbours on throughput (a smaller batch can win when it stays in cache)
    and reach 80% of the best, plus max_batch_size itself."""
    usable = [r for r in results if r.batches > 0 and (
        latency_budget_ms is None or r.latency_ms["p99"] <= latency_budget_ms)]
    if not usable:
        return None
    usable.sort(key=lambda r: r.batch_size)
    peak = max(r.rows_per_s for r in usable)
    best = next(r for r in usable if r.rows_per_s >= NEAR_PEAK * peak)
    preferred = {best.batch_size}
    for i, r in enumerate(usable):
        if r.batch_size > best.batch_size or r.rows_per_s < PREFERRED_FLOOR * peak:
            continue
        left = usable[i - 1].rows_per_s if i > 0 else -1.0
        right = usable[i + 1].rows_per_s if i + 1 < len(usable) else -1.0
        if r.rows_per_s >= left and r.rows_per_s >= right:
            preferred.add(r.batch_size)
    budget = f" with p99 <= {latency_budget_ms:g} ms" if latency_budget_ms is not None else ""
    reason = (f"batch {best.batch_size} reaches {best.rows_per_s / peak:.0%} of the best "
              f"throughput measured{budget} ({peak:,.0f} rows/s); larger batches add "
              "latency for at most 5% more throughput")
    return Recommendation(best.batch_size, sorted(preferred), peak, reason)


# --- output ----------------------------------------------------------------------------------

COLUMNS = ("batch", "rows/s", "batches/s", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
           "compute p50 ms")


def _row(r: SizeResult) -> list[str]:
    lat = r.latency_ms
    return [str(r.batch_size), f"{r.rows_per_s:,.0f}", f"{r.batches_per_s:,.1f}",
            *(f"{lat[k]:.3f}" for k in ("mean", "p50", "p90", "p95", "p99")),
            f"{r.compute_ms['p50']:.3f}"]


def table(report: ProfileReport) -> str:
    threads = f", intra-op threads {report.intra_op_threads}" if report.intra_op_threads else ""
    lines = [f"profile of '{report.model}' ({report.backend}, {report.path}): "
             f"{report.workers} worker(s) running at once{threads}, "
             f"{report.warmup_s:g}s warm-up + {report.duration_s:g}s per batch size"]
    rows = [list(COLUMNS), *(_row(r) for r in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    lines.append("latency: wall time of one batch on one worker; rows/s: all workers together")
    for size, why in report.skipped.items():
        lines.append(f"skipped batch {size}: {why}")
    rec = report.recommendation
    if rec is not None:
        sizes = ",".join(str(s) for s in rec.preferred_batch_sizes)
        lines.append(f"recommended: max_batch_size = {rec.max_batch_size}, "
                     f"preferred_batch_sizes = {sizes}")
        lines.append(f"  because {rec.reason}")
        lines.append(f"  trtserve serve --model {report.model}={report.path} "
                     f"--workers {report.workers} --max-batch-size {rec.max_batch_size} "
                     f"--preferred-batch-sizes {sizes}")
    return "\n".join(lines)


def to_json(report: ProfileReport) -> str:
    data = asdict(report)
    data["skipped"] = {str(k): v for k, v in report.skipped.items()}
    return json.dumps(data, indent=2)


# --- command line ----------------------------------------------------------------------------


def _sample_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D,D,... (one row's shape), got {text!r}")
    return name, shape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure a backend alone, in-process, per batch size",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=name_path, metavar="NAME=PATH")
    p.add_argument("--batch-sizes", type=size_list, metavar="N,N,...",
                   help="default: powers of two up to the model's maximum batch")
    p.add_argument("--workers", type=int, default=ModelConfig.workers,
                   help="executors running at once, as `serve --workers` (default %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per size")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per size")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads per session (0: as serve, the usable cores "
                        "less one, split between the workers)")
    p.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction, default=False,
                   help="ONNX Runtime threads spin waiting for work (default no, as serve)")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (TensorRT)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sample-shape", action="append", type=_sample_shape, default=[],
                   metavar="NAME=D,D,...",
                   help="one row's shape of an input with dynamic non-batch dimensions")
    p.add_argument("--latency-budget-ms", type=float,
                   help="recommend only batch sizes whose p99 fits this budget")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_profile)


def _batch_range(config: ModelConfig) -> tuple[int, int]:
    from service.engine.repository import load_backend

    loaded = load_backend(config)
    try:
        return loaded.spec.min_batch_size, loaded.spec.max_batch_size
    finally:
        loaded.close()


def _powers_of_two(low: int, top: int) -> tuple[int, ...]:
    sizes, s = [], 1
    while s < top:
        if s >= low:
            sizes.append(s)
        s *= 2
    return (*sizes, top)


def run_profile(args: argparse.Namespace) -> int:
    from service.errors import ConfigError

    name, path = args.model
    try:
        config = ModelConfig(name=name, path=path, backend=args.backend, workers=args.workers,
                             intra_op_threads=args.intra_op_threads,
                             intra_op_spinning=args.intra_op_spinning, device=args.device,
                             cuda_graphs=args.cuda_graphs)
        low, top = _batch_range(config)
        sizes = args.batch_sizes or _powers_of_two(low, top)
        if config.resolved_backend == "onnxruntime" and low != top and max(sizes) > top:
            # A dynamic batch dimension: ONNX Runtime takes any size; lift the default cap.
            config = dataclasses.replace(config, max_batch_size=max(sizes))
    except ConfigError as e:
        print(f"trtserve profile: {e}", file=sys.stderr)
        return 2

    def progress(r: SizeResult) -> None:
        if not args.json:
            print(f"  batch {r.batch_size}: {r.rows_per_s:,.0f} rows/s, "
                  f"p50 {r.latency_ms['p50']:.3f} ms", file=sys.stderr, flush=True)

    try:
        report = profile(config, sizes, args.duration, args.warmup,
                         dict(args.sample_shape), progress)
    except ValueError as e:
        print(f"trtserve profile: {e}", file=sys.stderr)
        return 2
    if args.latency_budget_ms is not None:
        report.recommendation = recommend(report.results, args.latency_budget_ms)
    print(to_json(report) if args.json else table(report))
    return 0

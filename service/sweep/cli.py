"""The `trtserve profile` command: arguments in, a sweep run, its report printed."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import trtserve.service.sweep
from trtserve.client.arg_types import name_path, size_list
from trtserve.service.config import ModelConfig
from trtserve.service.sweep.report import SizeResult, recommend, table, to_json
from trtserve.service.sweep.runner import sweep


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
    # `sweep`: the same command under a name that no TensorRT optimization profile shares.
    p = sub.add_parser("profile", aliases=["sweep"],
                       help="measure a backend alone, in-process, per batch size",
                       description=trtserve.service.sweep.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.set_defaults(func=run_command)


def _batch_range(config: ModelConfig) -> tuple[int, int]:
    from trtserve.service.engine.repository import load_backend

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


def run_command(args: argparse.Namespace) -> int:
    from trtserve.service.errors import ConfigError

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
        report = sweep(config, sizes, args.duration, args.warmup,
                         dict(args.sample_shape), progress)
    except ValueError as e:
        print(f"trtserve profile: {e}", file=sys.stderr)
        return 2
    if args.latency_budget_ms is not None:
        report.recommendation = recommend(report.results, args.latency_budget_ms)
    print(to_json(report) if args.json else table(report))
    return 0

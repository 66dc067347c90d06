"""`trtserve build` and `trtserve inspect`: build a TensorRT engine from ONNX, describe one.

`service.cli` calls `register(subparsers)`; each subcommand's `func` takes the parsed
arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

from service.backends.trt_build import (
    BuildError,
    BuildOptions,
    OptionError,
    ShapeRange,
    build_engine,
    default_batch_opt,
    describe_engine,
    manifest_path,
)

# BuildOptions fields whose flag is not simply --field-name.
_FLAG_FOR_FIELD = {"shapes": "--shape"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `build` and `inspect` subcommands."""
    build = subparsers.add_parser(
        "build",
        help="build a TensorRT engine from an ONNX model",
        description="Build a TensorRT engine from an ONNX model, with one optimization "
        "profile per worker, and write a JSON manifest next to it (ENGINE.json).",
    )
    build.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX model")
    build.add_argument(
        "-o", "--output", type=Path, required=True, metavar="MODEL.engine", help="engine to write"
    )
    build.add_argument(
        "--profiles",
        type=int,
        default=1,
        metavar="N",
        help="optimization profiles, one per worker (default 1)",
    )
    build.add_argument(
        "--batch",
        type=_batch_range,
        metavar="MIN:OPT:MAX",
        help="range of dimension 0 of every input; MIN:MAX picks OPT as a multiple of 32",
    )
    build.add_argument(
        "--shape",
        type=_shape_range,
        action="append",
        default=[],
        metavar="NAME=MIN:OPT:MAX",
        help="range of an input with other dynamic dimensions, each shape like 1x3x224x224 "
        "(repeatable)",
    )
    build.add_argument(
        "--max-aux-streams",
        type=int,
        metavar="K",
        help="auxiliary streams TensorRT may use within one inference (0: single stream)",
    )
    build.add_argument("--fp16", action="store_true", help="allow FP16 kernels, where offered")
    build.add_argument("--bf16", action="store_true", help="allow BF16 kernels, where offered")
    build.add_argument(
        "--strongly-typed", action="store_true", help="take every precision from the model"
    )
    build.add_argument("--builder-optimization-level", type=int, metavar="L", help="0 to 5")
    build.add_argument(
        "--avg-timing-iterations", type=int, metavar="N", help="timing runs per tactic"
    )
    build.add_argument(
        "--timing-cache",
        type=Path,
        metavar="PATH",
        help="timing cache to load if present and save after the build",
    )
    build.add_argument(
        "--mps-percentage",
        type=int,
        metavar="P",
        help="build with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=P (needs a running MPS daemon)",
    )
    build.add_argument("--workspace-mib", type=int, metavar="M", help="builder workspace limit")
    build.set_defaults(func=functools.partial(_run_build, build))

    inspect = subparsers.add_parser(
        "inspect",
        help="describe a TensorRT engine",
        description="Show an engine's IO tensors, profiles, aux streams and layers (fused "
        "ones marked): from the engine where a GPU can load it, else from its manifest.",
    )
    inspect.add_argument("engine", type=Path, metavar="MODEL.engine")
    inspect.set_defaults(func=_run_inspect)


def _batch_range(text: str) -> tuple[int, int, int]:
    """MIN:OPT:MAX, or MIN:MAX / MIN::MAX to let OPT default to a multiple of 32."""
    parts = text.split(":")
    try:
        numbers = [int(p) if p else None for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX integers, got {text!r}") from None
    if len(numbers) == 2:
        numbers.insert(1, None)
    low, opt, high = numbers if len(numbers) == 3 else (None, None, None)
    if low is None or high is None:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX or MIN:MAX, got {text!r}")
    return low, opt if opt is not None else default_batch_opt(low, high), high


def _shape_range(text: str) -> tuple[str, ShapeRange]:
    """NAME=MIN:OPT:MAX with each shape written like 1x3x224x224."""
    name, sep, ranges = text.partition("=")
    shapes = ranges.split(":")
    if not sep or not name or len(shapes) != 3:
        raise argparse.ArgumentTypeError(
            f"expected NAME=MIN:OPT:MAX (shapes like 1x3x224x224), got {text!r}"
        )
    try:
        low, opt, high = (tuple(int(d) for d in shape.split("x")) for shape in shapes)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shapes must be integers joined by 'x' (like 1x3x224x224), got {text!r}"
        ) from None
    return name, (low, opt, high)


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BuildOptions:
    shapes: dict[str, ShapeRange] = {}
    for name, shape_range in args.shape:
        if name in shapes:
            parser.error(f"argument --shape: {name!r} given more than once")
        shapes[name] = shape_range
    try:
        return BuildOptions(
            profiles=args.profiles,
            batch=args.batch,
            shapes=shapes,
            max_aux_streams=args.max_aux_streams,
            fp16=args.fp16,
            bf16=args.bf16,
            strongly_typed=args.strongly_typed,
            builder_optimization_level=args.builder_optimization_level,
            avg_timing_iterations=args.avg_timing_iterations,
            timing_cache=args.timing_cache,
            mps_percentage=args.mps_percentage,
            workspace_mib=args.workspace_mib,
        )
    except OptionError as err:
        flag = _FLAG_FOR_FIELD.get(err.field.split("[")[0], "--" + err.field.replace("_", "-"))
        parser.error(f"argument {flag}: {err.detail}")  # exits with status 2


def _run_build(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    options = _options(parser, args)
    started = time.perf_counter()
    try:
        manifest = build_engine(args.model, args.output, options)
    except (BuildError, RuntimeError) as err:
        print(f"trtserve build: error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    library = manifest["library"]
    aux = manifest["aux_streams"]
    cache = manifest["timing_cache"]
    print(f"built {args.output} in {seconds:.2f} s with {library['name']} {library['version']}")
    print(f"  profiles       {len(manifest['profiles'])}")
    for name, shapes in manifest["profiles"][0]["inputs"].items():
        low, opt, high = ("x".join(map(str, shapes[k])) for k in ("min", "opt", "max"))
        print(f"    {name}: min {low}  opt {opt}  max {high}")
    count = aux["num_aux_streams"]
    requested = aux["max_aux_streams"]
    print(
        f"  aux streams    {'unknown (engine not loaded here)' if count is None else count}"
        f", max_aux_streams {'library default' if requested is None else requested}"
    )
    if cache is None:
        print("  timing cache   not used")
    else:
        print(
            f"  timing cache   {'hit' if cache['hit'] else 'miss'} ({cache['path']}: "
            f"{cache['bytes_before'] or 0} -> {cache['bytes_after']} bytes)"
        )
    print(f"  fused layers   {len(manifest['fused_layers'])}")
    for setting, why in manifest["settings"]["unavailable"].items():
        print(f"  not applied    {setting}: {why}")
    print(f"  manifest       {manifest_path(args.output)}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        print(describe_engine(args.engine))
    except (BuildError, RuntimeError, FileNotFoundError) as err:
        print(f"trtserve inspect: error: {err}", file=sys.stderr)
        return 1
    return 0

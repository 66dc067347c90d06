"""`trtserve-client bench`: its flags, the config they make, and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from trtserve.client.arg_types import name_value, positive_numbers
from trtserve.client.bench.config import PROTOCOLS, BenchConfig, Level
from trtserve.client.bench.processes import run
from trtserve.client.bench.recorder import ARRIVALS
from trtserve.client.bench.report import table, to_csv, to_json


def register(sub: argparse._SubParsersAction) -> None:
    # The package's docstring is the command's --help text; imported here, as
    # the package imports this module.
    from trtserve.client import bench

    p = sub.add_parser("bench", help="measure throughput and latency under load",
                       description=bench.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="HOST:PORT (default: the top-level --url, else 127.0.0.1:8001)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="v1",
                   help="trtserve.v1 Infer, or KServe v2 ModelInfer (Triton, PyTriton, trtserve)")
    p.add_argument("--concurrency", type=positive_numbers, metavar="N,N,...",
                   help="closed loop: requests kept outstanding, one level each "
                        "(default 1,8,64,256 when no --rate)")
    p.add_argument("--rate", type=positive_numbers, metavar="R,R,...",
                   help="open loop: R requests/s (spaced as --arrivals says), one level each")
    p.add_argument("--streaming", action="store_true",
                   help="send over the protocol's bidirectional stream (InferStream, "
                        "ModelStreamInfer), answers matched by request id, instead of one "
                        "call per request")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the load (use more when one is busy)")
    p.add_argument("--connections", type=int, default=1,
                   help="gRPC connections per client process, requests spread over them in "
                        "turn (a server with --frontends N is spread over by connection)")
    p.add_argument("--batch-rows", type=int, default=1, help="rows per request")
    p.add_argument("--input", action="append", type=name_value, default=[],
                   metavar="NAME=FILE.npy", help="an input from a .npy file; repeatable")
    p.add_argument("--shape", action="append", type=name_value, default=[], metavar="NAME=D,D,...",
                   help="full shape of an input with dynamic non-batch dimensions")
    p.add_argument("--max-outstanding", type=int, default=10_000,
                   help="open loop: requests in flight per process at most; an arrival past "
                        "it is not sent and counts as dropped (0: no cap, every arrival is "
                        "sent)")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson",
                   help="open loop: poisson (exponential gaps, as independent clients "
                        "arrive) or even (exactly 1/R apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-memory", choices=("none", "system", "cuda"), default="none",
                   help="put inputs and outputs in registered shared-memory regions (system: "
                        "POSIX shared memory; cuda: device memory, needs a GPU) and send "
                        "only references, as perf_analyzer --shared-memory does")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of the table")
    out.add_argument("--csv", action="store_true", help="print CSV instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    levels = [Level("closed", v) for v in (args.concurrency or ())]
    levels += [Level("open", v) for v in (args.rate or ())]
    if not levels:
        levels = [Level("closed", v) for v in (1, 8, 64, 256)]
    if any(lv.mode == "closed" and lv.value != int(lv.value) for lv in levels):
        raise ValueError("--concurrency takes whole numbers")
    token_file = getattr(args, "token_file", None)
    ca = getattr(args, "tls_ca", None)
    try:
        shapes = tuple((n, tuple(int(d) for d in v.split(","))) for n, v in args.shape)
    except ValueError:
        raise ValueError(f"--shape takes NAME=D,D,... with integers, got {args.shape}") from None
    return BenchConfig(
        url=getattr(args, "url", None) or "127.0.0.1:8001", model=args.model,
        levels=tuple(levels), protocol=args.protocol, duration_s=args.duration,
        warmup_s=args.warmup, processes=args.processes, connections=args.connections,
        streaming=args.streaming, batch_rows=args.batch_rows,
        input_files=tuple(args.input), shapes=shapes,
        timeout_s=getattr(args, "timeout", None) or 60.0,
        max_outstanding=args.max_outstanding or None, arrivals=args.arrivals,
        seed=args.seed,
        token=Path(token_file).read_text().strip() if token_file else None,
        tls=bool(getattr(args, "tls", False)),
        root_certificates=Path(ca).read_bytes() if ca else None,
        shared_memory=args.shared_memory)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        report = run(config, progress=not args.quiet)
    except ValueError as e:
        print(f"trtserve-client bench: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"trtserve-client bench: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"trtserve-client bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(to_json(report))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(table(report))
    return 0

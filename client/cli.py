"""`trtserve-client`: infer, stats, metadata, health checks and model control from the shell."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from trtserve.client.client import Client, InferenceError, KServeClient
from trtserve.client.convert import dtype_label
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.random_data import random_array
from trtserve.client.version import version

# What a shell reports for a command killed by SIGPIPE: 128 + 13.
SIGPIPE_EXIT = 128 + signal.SIGPIPE

C = TypeVar("C", Client, KServeClient)


def _connect(kind: type[C], args: argparse.Namespace) -> C:
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return kind(args.url, token=token, root_certificates=root, tls=args.tls)


def _client(args: argparse.Namespace) -> Client:
    return _connect(Client, args)


def _kserve_client(args: argparse.Namespace) -> KServeClient:
    return _connect(KServeClient, args)


# The size of a dynamic dimension (other than the batch) in made-up input, where no
# TensorRT profile gives an opt shape: a multiple of 32, as the strided
# convolutions and reshapes of vision models need (at 1 a YOLO or OCR model
# refuses the input), and small enough to be quick. `--shape` chooses another.
DEFAULT_DYNAMIC_DIM = 64

Shapes = dict[str, list[int]]


def parse_shape(item: str) -> tuple[str, list[int]]:
    """`NAME=1x3x640x640` -> ('NAME', [1, 3, 640, 640]); ValueError saying what is wrong."""
    name, sep, dims = item.partition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d < 0 for d in shape):
        raise ValueError(f"--shape {item!r}: expected NAME=DIMS such as image=1x3x640x640")
    return name, shape


def random_inputs(md: pb.ModelMetadataResponse, rows: int, seed: int = 0,
                  shapes: Shapes | None = None) -> dict[str, np.ndarray]:
    """Random data of the model's shapes; `shapes` (full shapes, by input) chosen by the caller.

    The batch dimension gets `rows`; other dynamic dimensions the opt shape of
    the first TensorRT profile, else DEFAULT_DYNAMIC_DIM. A model that does not
    batch (metadata `batching` false, max_batch_size 0) takes its full shapes:
    `rows` does not apply.
    """
    opt = {r.name: list(r.opt) for r in md.profiles[0].inputs} if md.profiles else {}
    return _random_arrays([(t.name, dtype_label(t.dtype), list(t.shape)) for t in md.inputs],
                          md.max_batch_size > 0, rows, seed, shapes or {}, opt)


def random_kserve_inputs(md: kpb.ModelMetadataResponse, rows: int, seed: int = 0,
                         shapes: Shapes | None = None) -> dict[str, np.ndarray]:
    """Like random_inputs, from KServe metadata: a leading -1 is the batch dimension."""
    tensors = [(t.name, t.datatype, list(t.shape)) for t in md.inputs]
    batched = all(shape and shape[0] == -1 for _, _, shape in tensors)
    return _random_arrays(tensors, batched, rows, seed, shapes or {}, {})


def _random_arrays(tensors: list[tuple[str, str, list[int]]], batched: bool, rows: int,
                   seed: int, shapes: Shapes, opt: Shapes) -> dict[str, np.ndarray]:
    names = [name for name, _, _ in tensors]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ValueError(f"--shape names {unknown}, but the model's inputs are {names}")
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, dtype_name, dims in tensors:
        shape = shapes.get(name)
        if shape is None:
            shape = [rows if i == 0 and batched else
                     d if d > 0 else
                     opt[name][i] if len(opt.get(name, ())) == len(dims) else
                     DEFAULT_DYNAMIC_DIM
                     for i, d in enumerate(dims)]
        elif len(shape) != len(dims) or any(0 <= d != s for d, s in zip(dims, shape, strict=True)):
            raise ValueError(f"--shape {name}={'x'.join(map(str, shape))}: the model takes "
                             f"{name} of shape {dims} (-1: any size)")
        inputs[name] = random_array(dtype_name, shape, rng)
    return inputs


def cmd_infer(args: argparse.Namespace) -> int:
    inputs = {}
    for item in args.input or []:
        name, _, path = item.partition("=")
        inputs[name] = np.load(path)
    shapes = dict(parse_shape(item) for item in args.shape or [])
    # Random BF16 inputs are uint16 bit patterns: labelled BF16, or they go as UINT16.
    dtypes: dict[str, str] = {}
    if args.protocol == "kserve":
        with _kserve_client(args) as k:
            if not inputs:
                kmd = k.metadata(args.model)
                inputs = random_kserve_inputs(kmd, args.rows, args.seed, shapes)
                dtypes = {t.name: "BF16" for t in kmd.inputs if t.datatype == "BF16"}
            outputs = k.infer(args.model, inputs, timeout=args.timeout, dtypes=dtypes)
    else:
        with _client(args) as c:
            if not inputs:
                md = c.metadata(args.model)
                inputs = random_inputs(md, args.rows, args.seed, shapes)
                dtypes = {t.name: "BF16" for t in md.inputs if dtype_label(t.dtype) == "BF16"}
            outputs = c.infer(args.model, inputs, timeout=args.timeout, dtypes=dtypes)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        for name, array in outputs.items():
            np.save(Path(args.output_dir) / f"{name}.npy", array)
    if args.json:
        print(json.dumps({n: {"dtype": str(a.dtype), "shape": list(a.shape),
                              "data": a.tolist()} for n, a in outputs.items()}))
    else:
        for name, array in outputs.items():
            print(f"{name}: dtype={array.dtype} shape={list(array.shape)}")
            print(np.array2string(array, threshold=20, precision=4))
    return 0


def _stats_table(response: pb.StatsResponse) -> str:
    lines = []
    for m in response.models:
        batching = "" if m.batching else ", not batching: one request per execution"
        lines.append(f"model {m.name} ({m.backend}{batching}): requests={m.requests} "
                     f"batches={m.batches} rows={m.inferences} "
                     f"mean_batch={m.mean_batch_size:.2f} errors={m.errors} "
                     f"queue_depth={m.queue_depth} util={m.utilization:.1%}")
        lines.append(f"  queue p50/p99 = {m.queue_time.p50_us:.0f}/{m.queue_time.p99_us:.0f} us"
                     f"   compute p50/p99 = {m.compute_time.p50_us:.0f}/"
                     f"{m.compute_time.p99_us:.0f} us   rejected={m.rejected_queue_full} "
                     f"deadline={m.deadline_exceeded} cancelled={m.cancelled}")
        header = (f"  {'worker':>6} {'profile':>7} {'device':>8} {'stream':>14} {'aux':>3} "
                  f"{'batches':>8} {'rows':>8} {'busy s':>8} {'util':>6} {'graphs':>7} "
                  f"{'plain':>7} {'inline':>7} {'errors':>6} {'healthy':>7}")
        lines.append(header)
        for w in m.workers:
            lines.append(
                f"  {w.index:>6} {w.profile:>7} {w.device:>8} {w.stream or '-':>14} "
                f"{w.aux_streams:>3} {w.batches:>8} {w.inferences:>8} {w.busy_seconds:>8.3f} "
                f"{w.utilization:>6.1%} {w.graph_launches:>7} {w.plain_enqueues:>7} "
                f"{w.inline_batches:>7} {w.errors:>6} {'yes' if w.healthy else 'NO':>7}")
            if not w.healthy:
                retry = f", next rebuild in {w.retry_in_seconds:.1f} s" \
                    if w.state == "backing_off" else ""
                lines.append(f"         {w.state}{retry} (retries: {w.retries}): "
                             f"{w.last_error}")
            if w.rejected:
                lines.append(f"         inputs the backend refused: {w.rejected}")
            for f in w.capture_failures:
                lines.append(f"         graph capture failed at batch {f.batch_size}: {f.reason}")
        sizes = sorted(m.batch_size_histogram.items())
        lines.append("  batch sizes: " + ", ".join(f"{k}x{v}" for k, v in sizes))
    if response.frontends:
        lines.append(f"frontends: {len(response.frontends)} processes")
        lines.append(f"  {'frontend':>8} {'pid':>8} {'requests':>10} {'in flight':>9} "
                     f"{'cpu s':>9} {'req/frame':>9} {'open files':>10}")
        for row in response.frontends:
            per_frame = row.requests / row.request_frames if row.request_frames else 0.0
            lines.append(f"  {row.index:>8} {row.pid:>8} {row.requests:>10} "
                         f"{row.in_flight:>9} {row.cpu_seconds:>9.2f} {per_frame:>9.2f} "
                         f"{row.open_files:>10}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        response = c.stats(args.model)
    if args.json:
        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
    else:
        print(_stats_table(response))
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    with _client(args) as c:
        md = c.metadata(args.model)
    described = MessageToDict(md, preserving_proto_field_name=True)
    # Printed even when false (proto3 leaves out default values): a model that does
    # not batch takes full shapes, and the reader needs to know which this is.
    described["batching"] = md.batching
    print(json.dumps(described, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    with _kserve_client(args) as k:
        config = k.config(args.model, timeout=args.timeout)
    print(json.dumps(MessageToDict(config, preserving_proto_field_name=True), indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _client(args) as c:
        stub = health_pb2_grpc.HealthStub(c._channel)
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=args.service or ""),
                                timeout=args.timeout or 5)
        except grpc.RpcError as e:
            details = e.details() or ""
            if e.code() == grpc.StatusCode.NOT_FOUND and not details:
                # grpc.health.v1 says NOT_FOUND with no message for a name it does not know.
                details = (f"the server knows no service or model named '{args.service}' "
                           "(health --service takes a model name or a gRPC service)")
            raise InferenceError(e.code(), details or "no details from the server") from None
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    print(f"{args.service or 'server'}: {name}")
    return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1


def _state_line(state: pb.ModelState) -> str:
    version = f"version {state.version}" if state.version else "never loaded"
    line = f"{state.name}: {state.state}, {version}, {state.path}"
    return f"{line} ({state.reason})" if state.reason else line


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            states = c.list_models(timeout=args.timeout)
        elif args.action == "load":
            states = [c.load_model(args.model, args.path, timeout=args.timeout)]
        elif args.action == "unload":
            states = [c.unload_model(args.model, timeout=args.timeout)]
        else:
            states = [c.reload_model(args.model, args.path, timeout=args.timeout)]
    if args.json:
        print(json.dumps([MessageToDict(s, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
                          for s in states], indent=2))
    else:
        for state in states:
            print(_state_line(state))
    return 0


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str
         ) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trtserve-client", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT of the server")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server with")
    parser.add_argument("--timeout", type=float, default=None, help="per-call deadline (s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "infer", cmd_infer, "run one inference")
    p.add_argument("--model", required=True)
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="an input from a .npy file; repeatable (default: random data)")
    p.add_argument("--shape", action="append", metavar="NAME=1x3x640x640",
                   help="full shape of a random input; repeatable (default: the batch "
                   "dimension --rows, other dynamic dimensions the TensorRT profile's opt "
                   f"shape, else {DEFAULT_DYNAMIC_DIM})")
    p.add_argument("--rows", type=int, default=1, help="rows of random input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="also save each output as NAME.npy here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--protocol", choices=("v1", "kserve"), default="v1",
                   help="trtserve.v1 (default) or KServe v2 (works with Triton too)")

    p = _add(sub, "stats", cmd_stats, "usage of every model, worker and stream")
    p.add_argument("--model", default="")
    p.add_argument("--json", action="store_true")

    p = _add(sub, "metadata", cmd_metadata, "a model's inputs, outputs and profiles")
    p.add_argument("--model", required=True)

    p = _add(sub, "config", cmd_config, "a model's Triton-style configuration (KServe v2)")
    p.add_argument("--model", required=True)

    p = _add(sub, "health", cmd_health, "readiness through grpc.health.v1 (exit 0 if SERVING)")
    p.add_argument("--service", default="", help="a model name or service; empty: the server")

    p = _add(sub, "models", cmd_models, "list, load, unload or reload models (model control)")
    actions = p.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every model the server knows, and its state")
    listing.add_argument("--json", action="store_true")
    for action, help in (("load", "load a model (a loaded one is reloaded)"),
                         ("unload", "stop serving a model; its accepted requests are answered"),
                         ("reload", "serve a new version of a loaded model, switched atomically")):
        a = actions.add_parser(action, help=help)
        a.add_argument("model")
        if action != "unload":
            a.add_argument("--path", default="",
                           help="model file on the server's host (default: the model's own)")
        a.add_argument("--json", action="store_true")

    try:
        from trtserve.client import bench
    except ImportError:  # the bench tool's optional dependencies are missing
        pass
    else:
        bench.register(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (InferenceError, ValueError) as e:
        print(f"trtserve-client: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`... | head`): stop quietly, as a command killed by SIGPIPE
        # would. Python's own flush of stdout at exit must not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    except OSError as e:  # a file named on the command line: --token-file, --input, --tls-ca
        print(f"trtserve-client: {e.filename}: {e.strerror}" if e.filename
              else f"trtserve-client: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

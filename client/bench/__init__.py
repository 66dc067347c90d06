"""`trtserve-client bench`: a load generator for trtserve.v1 and KServe v2 servers.

    trtserve-client bench --model example --concurrency 1,8,64,256 --duration 10
    trtserve-client bench --model example --rate 500,1000 --protocol kserve --processes 2
    trtserve-client bench --model example --concurrency 1,64 --streaming

Closed loop (`--concurrency`): that many requests are always outstanding;
each answer sends the next. Open loop (`--rate`): requests leave at Poisson
arrival times whatever the server does, and latency counts from the moment a
request was due, so a client that falls behind shows up in the numbers
instead of hiding (no coordinated omission).

Each load level warms up, then measures for `--duration` seconds: a request
counts when it completes inside the window. Load comes from `--processes`
client processes (each one asyncio loop with one gRPC channel), and the
report says how much CPU each used, so a client-bound run is visible.

Requests are serialized once up front and sent as raw bytes, and answers
are not parsed (one probe answer is, before the run), so the client spends
its time on gRPC alone. A process whose share of a closed-loop level is a
single stream (concurrency 1) uses gRPC's blocking client in a thread, which
costs less per call than asyncio's, so that level measures the server rather
than the client. The load processes run gRPC's C core with the settings the
server runs with (service/grpc_tuning.py; they inherit GRPC_EXPERIMENTS), and
the report names them.

`--streaming` sends the requests over the protocol's bidirectional stream
(trtserve.v1 InferStream, KServe ModelStreamInfer) instead of one call each,
matching answers by request id: closed loop keeps up to 64 requests in flight
per stream, open loop puts one process's arrivals on one stream. A stream
spares both sides gRPC's per-call work, so it is how a client that wants
throughput (or the last bit of latency) should call a Python server.
"""

# The package, in the order a run goes:
#   config.py     levels, the run's config, the results
#   channels.py   gRPC channels, call metadata, each protocol's Infer method
#   requests.py   the model's inputs, serialized requests, the probe; server Stats
#   processes.py  the parent: client processes, each level, merging, progress
#   recorder.py   a client process's window, what it saw, a precise sleeper
#   load.py       one client process: closed loop, single stream, open loop
#   streams.py    the same loads over a bidirectional stream (--streaming)
#   report.py     machine info; the table, JSON and CSV
#   cli.py        the flags, the config they make, the command

from trtserve.client import grpc_tuning  # noqa: F401  # sets GRPC_EXPERIMENTS for the load processes
from trtserve.client.bench import streams
from trtserve.client.bench.channels import KSERVE_INFER, V1_INFER
from trtserve.client.bench.cli import cmd_bench, config_from_args, register
from trtserve.client.bench.config import (
    CLIENT_BUSY,
    PROTOCOLS,
    BenchConfig,
    BenchReport,
    Level,
    LevelResult,
    TensorInfo,
)
from trtserve.client.bench.load import Call
from trtserve.client.bench.processes import run
from trtserve.client.bench.report import COLUMNS, machine_info, table, to_csv, to_json
from trtserve.client.bench.requests import (
    concrete_shape,
    encode_request,
    make_inputs,
    model_inputs,
    prepare,
    server_batches,
)

__all__ = [
    "CLIENT_BUSY",
    "COLUMNS",
    "KSERVE_INFER",
    "PROTOCOLS",
    "V1_INFER",
    "BenchConfig",
    "BenchReport",
    "Call",
    "Level",
    "LevelResult",
    "TensorInfo",
    "cmd_bench",
    "concrete_shape",
    "config_from_args",
    "encode_request",
    "machine_info",
    "make_inputs",
    "model_inputs",
    "prepare",
    "register",
    "run",
    "server_batches",
    "streams",
    "table",
    "to_csv",
    "to_json",
]

"""Issue 18's frontends rows alone, short: one process against N frontend processes.

    python -m benchmarks.frontends_rows gpu [--seconds 5] [--frontends 8] [--engine-cpus 1]
    python -m benchmarks.frontends_rows bound [--seconds 5] [--frontends 8]
    python -m benchmarks.frontends_rows cpu [--counts 1,8] [--seconds 3] [--rounds 3]
                                            [--engine-cpus N] [--engine-spin-us US]
    python -m benchmarks.frontends_rows once [--rows 8] [--frontends 8] [--connections 4]
                                             [--workers 4] [--clients 256] [--processes 8]
                                             [--hold-us US] [--switch-us US]
                                             [--direct-min-bytes N] [--tag NAME]
                                             [--event-loop L] [--inline-below-us US]
                                             [--frontend-nice N] [--engine-cpus N]
                                             [--engine-spin-us US]

`gpu`: the GPU stand-in's light model (512->2048->512; NOT TensorRT), served as in
`benchmarks.gpu_standin` section 3 (4 workers, 32 clients a client process, 4 gRPC
connections each), by one process and by N frontends: at 1 row per request with 256, 512
and 1024 clients (the ratio at each, and of the two sides' capacities: the most each
serves at any of the three), and at 8 rows with 256; served/raw where the frontends serve
the most (raw: 4 executors driven directly at that run's mean batch). With
`--engine-cpus N` the frontends' runs give the engine the host's last N cores
(`server.engine_cpus`) and keep the frontends and the client processes on the rest.
The same functions as `benchmarks.gpu_standin`, without its other sections, for a machine
lent for minutes.
`bound`: the GPU-bound stand-in (4096->524288->4096, NOT TensorRT) at 1 row per request,
256 clients, by one process and by N frontends: served/raw for each (target >= 0.9; raw:
4 executors driven directly at that run's mean batch).
`cpu`: `benchmarks.cpu`'s frontends step (model `light`, the bundled example's shape)
for the given counts only: requests/s at concurrency 512 and p50 at concurrency 1. With
`--rounds R` the counts alternate R times (1, 8, 1, 8, ...), and the c=1 cost of each count
is given per round against the baseline of the same round, then as the median and range
of those R differences: on a shared host one round's difference is within its noise.
`--engine-cpus N` gives the engine of the N > 1 counts the host's last N cores (ONNX
Runtime's threads run there too).
`once`: one served run of the `gpu` kind, printed as one line of JSON with the path of the
`trtserve.service` package it ran: to compare two trees in one sitting, alternate runs with
each tree's checkout first on PYTHONPATH (docs/processes-measured.md, "Session 14").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from benchmarks.placement import ANYWHERE, Placement

# The `gpu` rows' loads at 1 row, in clients (32 a client process).
CLIENTS = (256, 512, 1024)


def gpu(seconds: float, frontends: int, engine_cpus: int = 0) -> None:
    from benchmarks import gpu_standin as g
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime

    cuda = CudaRuntime(0)
    cuda.set_device()
    light = g.light_engine()
    # The frontends' runs only: one process on one core would serve less.
    placed = Placement(engine_cpus=engine_cpus)
    # (frontends, rows per request, clients): 32 clients a client process, 4 gRPC
    # connections each. 1 row at three loads, since a closed loop of 256 clients leaves
    # N frontends short of what they can serve (docs/processes-measured.md, "Session 16"): each
    # side's capacity is the most it serves at any of them.
    runs = [(count, 1, clients) for clients in CLIENTS for count in (1, frontends)]
    runs += [(1, 8, 256), (frontends, 8, 256)]
    got: dict[tuple[int, int, int], dict[str, float]] = {}
    try:
        for count, rows, clients in runs:
            began = time.monotonic()
            r = g.served_throughput(light, 4, clients, clients // 32, seconds,
                                    rows_per_request=rows, frontends=count, connections=4,
                                    placement=placed if count > 1 else ANYWHERE)
            got[count, rows, clients] = r
            side = "1 process" if count == 1 else f"{frontends} frontends" + (
                f" (engine on {engine_cpus} core{'s' if engine_cpus > 1 else ''} of its own)"
                if engine_cpus else "")
            print(f"{side}, {rows} row{'s' if rows > 1 else ''}, {clients} clients",
                  json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
            # Wall time, so that a slow step shows (stderr: not a result).
            print(f"  served run: {time.monotonic() - began:.1f} s", file=sys.stderr,
                  flush=True)
        # served/raw where the frontends serve the most: raw once, at that run's mean
        # batch (in session 17 a raw run after each served run made every run take about
        # 2 minutes, for a cause not found).
        best = got[frontends, 1, best_load({c: got[frontends, 1, c] for c in CLIENTS})]
        began = time.monotonic()
        raw = g.raw_throughput(light, cuda, 4, max(1, round(best["mean_batch"])), seconds=1.0)
        print(f"  raw run: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        best["raw_rows_per_s"] = raw["rows_per_s"]
        best["served_raw"] = best["rows_per_s"] / raw["rows_per_s"]
    finally:
        light.close()
    print(summary(frontends, {c: got[1, 1, c] for c in CLIENTS},
                  {c: got[frontends, 1, c] for c in CLIENTS}, got[1, 8, 256],
                  got[frontends, 8, 256]))


def bound(seconds: float, frontends: int) -> None:
    from benchmarks import gpu_standin as g
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime

    cuda = CudaRuntime(0)
    cuda.set_device()
    heavy = g.heavy_engine()
    try:
        for count in (1, frontends):
            r = g.served_throughput(heavy, 4, 256, 8, seconds, rows_per_request=1,
                                    frontends=count, connections=4)
            raw = g.raw_throughput(heavy, cuda, 4, max(1, round(r["mean_batch"])))
            side = "1 process" if count == 1 else f"{count} frontends"
            print(f"GPU-bound, {side}, 1 row, 256 clients: {r['rows_per_s']:,.0f} rows/s, "
                  f"mean batch {r['mean_batch']:.1f}, raw {raw['rows_per_s']:,.0f} rows/s, "
                  f"served/raw {r['rows_per_s'] / raw['rows_per_s']:.2f} (target 0.9)  "
                  "[stand-in, not TensorRT]", json.dumps({k: round(v, 3) for k, v in r.items()}),
                  flush=True)
    finally:
        heavy.close()


def best_load(results: Mapping[int, Mapping[str, float]]) -> int:
    """The load (clients) at which a side served the most requests/s: its capacity."""
    return max(results, key=lambda c: results[c]["requests_per_s"])


def summary(frontends: int, one: Mapping[int, Mapping[str, float]],
            many: Mapping[int, Mapping[str, float]], one8: Mapping[str, float],
            many8: Mapping[str, float]) -> str:
    """The `gpu` rows' ratios: 1 row at each load (clients -> served_throughput's result;
    the frontends' result at their best load has served_raw too), the two sides'
    capacities (each side's best load, which need not be the same), and 8 rows."""
    best_one, best_many = one[best_load(one)], many[best_load(many)]
    at = ", ".join(f"{c} clients {many[c]['requests_per_s'] / one[c]['requests_per_s']:.2f}x"
                   for c in sorted(one))
    return (f"{frontends} frontends / 1 process, 1 row, requests/s: {at}; capacity (the "
            f"most each serves at any load) {best_many['requests_per_s']:,.0f} / "
            f"{best_one['requests_per_s']:,.0f} = "
            f"{best_many['requests_per_s'] / best_one['requests_per_s']:.2f}x (target 8x), "
            f"served/raw there {best_many['served_raw']:.2f} (target 0.5); 8 rows, rows/s: "
            f"{many8['rows_per_s'] / one8['rows_per_s']:.2f}x (target 5x)  "
            f"[stand-in, not TensorRT]")


def once(seconds: float, rows: int, frontends: int, connections: int, workers: int,
         tag: str, clients: int = 256, processes: int = 8, hold_us: int | None = None,
         switch_us: int | None = None, direct_min_bytes: int | None = None,
         event_loop: str | None = None, inline_below_us: int | None = None,
         placement: Placement = ANYWHERE, engine_spin_us: int | None = None) -> None:
    from benchmarks import gpu_standin as g
    from trtserve import service
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime
    from trtserve.service.backends.tensorrt.executor import TrtExecutor

    if direct_min_bytes is not None:  # the engine runs in this process
        TrtExecutor.direct_min_bytes = direct_min_bytes

    options: dict[str, object] = {}
    if hold_us is not None:
        options["frontend_hold_us"] = hold_us
    if event_loop is not None:
        options["event_loop"] = event_loop
    if engine_spin_us is not None:
        options["engine_spin_us"] = engine_spin_us
    CudaRuntime(0).set_device()
    light = g.light_engine()
    try:
        r = g.served_throughput(light, workers, clients, processes, seconds,
                                rows_per_request=rows, frontends=frontends,
                                connections=connections,
                                server_options=options,
                                switch_interval_s=None if switch_us is None
                                else switch_us / 1e6, placement=placement,
                                inline_below_us=inline_below_us)
    finally:
        light.close()
    print(json.dumps({"tag": tag, "tree": next(iter(service.__path__)), "rows": rows,
                      "frontends": frontends, "connections": connections,
                      "workers": workers, "clients": clients, "processes": processes,
                      "hold_us": hold_us, "switch_us": switch_us,
                      "event_loop": event_loop or "auto", "loop": _loop_name(event_loop),
                      "inline_below_us": inline_below_us,
                      "frontend_nice": placement.frontend_nice,
                      "engine_cpus": placement.engine_cpus,
                      "engine_spin_us": engine_spin_us,
                      "direct_min_bytes": TrtExecutor.direct_min_bytes,
                      **{k: round(v, 3) for k, v in r.items()}}),
          flush=True)


def _loop_name(event_loop: str | None) -> str:
    """The event loop the server runs for this `server.event_loop` choice."""
    from trtserve.service.server import loop_factory

    return "asyncio" if loop_factory(event_loop or "auto") is None else "uvloop"


def cpu(counts: list[int], seconds: float, rounds: int = 1, engine_cpus: int = 0,
        engine_spin_us: int | None = None) -> None:
    from benchmarks.cpu import cli, experiments
    from benchmarks.cpu.config import Options

    models, logs = cli.models_and_logs()
    opts = Options(duration_s=seconds, warmup_s=1.0, rounds=rounds, pytriton=False,
                   pytriton_python="", install_pytriton=False, out=Path("/dev/null"),
                   json_out=None, only={"frontends"})
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in
             Placement(engine_cpus=engine_cpus).server_options().items()]
    if engine_spin_us is not None:
        flags.append(f"--engine-spin-us={engine_spin_us}")
    rows = experiments.frontends(opts, models, logs, counts, flags)["rounds"]
    for i, row in enumerate(rows):
        base = row[str(counts[0])]
        for n in counts:
            r = row[str(n)]
            print(f"round {i + 1}, frontends {n}: req/s c=512 {r['req_per_s']:.0f} "
                  f"({r['req_per_s'] / base['req_per_s']:.2f}x), p50 c=1 {r['p50_ms_c1']:.3f} "
                  f"ms ({(r['p50_ms_c1'] - base['p50_ms_c1']) * 1000:+.0f} us), server cores "
                  f"{r['server_cpu']:.2f}, client CPU max {max(r['client_cpu']):.2f}, "
                  f"errors {r['errors']}", flush=True)
    for n in counts[1:]:
        cost = [(row[str(n)]['p50_ms_c1'] - row[str(counts[0])]['p50_ms_c1']) * 1000
                for row in rows]
        ratio = [row[str(n)]['req_per_s'] / row[str(counts[0])]['req_per_s'] for row in rows]
        print(f"frontends {n} against {counts[0]}, {len(rows)} rounds: c=1 cost median "
              f"{statistics.median(cost):+.0f} us (range {min(cost):+.0f} to {max(cost):+.0f}); "
              f"req/s c=512 median {statistics.median(ratio):.2f}x "
              f"(range {min(ratio):.2f}-{max(ratio):.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("gpu", "bound", "cpu", "once"))
    parser.add_argument("--seconds", type=float, help="measured seconds per run "
                        "(default: 5 for gpu, 3 for cpu)")
    parser.add_argument("--frontends", type=int, default=8, help="gpu, bound, once: frontend "
                        "processes (1: one process)")
    parser.add_argument("--rows", type=int, default=8, help="once: rows per request")
    parser.add_argument("--connections", type=int, default=4, help="once: gRPC connections "
                        "per client process (8 processes, 256 clients)")
    parser.add_argument("--workers", type=int, default=4, help="once: the model's workers")
    parser.add_argument("--tag", default="", help="once: a name for the run's line")
    parser.add_argument("--clients", type=int, default=256, help="once: clients in all "
                        "(each keeps one request in flight)")
    parser.add_argument("--processes", type=int, default=8, help="once: client processes "
                        "the clients are spread over")
    parser.add_argument("--hold-us", type=int, help="once: server.frontend_hold_us "
                        "(default: the server's)")
    parser.add_argument("--switch-us", type=int, help="once: the engine process's GIL "
                        "switch interval (sys.setswitchinterval; default: Python's 5000)")
    parser.add_argument("--direct-min-bytes", type=int, help="once: "
                        "TrtExecutor.direct_min_bytes (a lone pinned request below it is "
                        "staged; default: the executor's own, 256 KiB)")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                        help="once: server.event_loop, for the engine and the frontends "
                        "(default: the server's, uvloop where installed)")
    parser.add_argument("--frontend-nice", type=int, help="once: run every frontend "
                        "thread at this nice value (an experiment: the engine first when "
                        "the cores are contended)")
    parser.add_argument("--engine-cpus", type=int, default=0, help="the engine on the "
                        "host's last N cores (server.engine_cpus) in the frontends' runs, "
                        "the frontends on the rest; gpu, once: the client processes too "
                        "(default: no pinning)")
    parser.add_argument("--engine-spin-us", type=int, help="once, cpu: server.engine_spin_us "
                        "(the engine polls for the next request once a frontend is idle; "
                        "cpu: the N > 1 counts; default: the server's, auto)")
    parser.add_argument("--inline-below-us", type=int, help="once: the model's "
                        "inline_below_us (a batch that ran faster is quick: run on the "
                        "loop when alone, held behind quick batches in flight; default 100)")
    parser.add_argument("--counts", default="1,8", help="cpu: frontend counts, the first "
                        "the baseline")
    parser.add_argument("--rounds", type=int, default=1, help="cpu: alternate the counts "
                        "this many times and give the median of the rounds' differences")
    args = parser.parse_args()
    if args.what == "gpu":
        gpu(args.seconds or 5.0, args.frontends, args.engine_cpus)
    elif args.what == "bound":
        bound(args.seconds or 5.0, args.frontends)
    elif args.what == "once":
        once(args.seconds or 5.0, args.rows, args.frontends, args.connections, args.workers,
             args.tag, args.clients, args.processes, args.hold_us, args.switch_us,
             args.direct_min_bytes, args.event_loop, args.inline_below_us,
             Placement(args.frontend_nice, args.engine_cpus), args.engine_spin_us)
    else:
        cpu([int(n) for n in args.counts.split(",")], args.seconds or 3.0, args.rounds,
            args.engine_cpus, args.engine_spin_us)


if __name__ == "__main__":
    main()

"""The steps of a run: each measures one comparison and returns its numbers as a dict
(what --json saves and render.py turns into Markdown)."""

from __future__ import annotations

import contextlib
import cProfile
import io
import math
import os
import pstats
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks.cpu.config import DELAY_US, MAX_BATCH, PY, WORKERS, Options
from benchmarks.cpu.harness import (
    Child,
    Run,
    Served,
    bench,
    free_port,
    pytriton,
    pytriton_env,
    rel,
    say,
    stats,
    trtserve,
    wait_ready,
)
from trtserve.client.bench import BenchConfig, Level
from trtserve.client.bench import run as run_bench
from trtserve.service.backends.onnxruntime import default_threads
from trtserve.service.config import ModelConfig
from trtserve.service.cpus import usable as usable_cores
from trtserve.service.sweep.runner import sweep as profile


def served_over_raw(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    """Served rows/s at concurrency 128 over the backend alone at the batch size formed."""
    out: dict[str, Any] = {"rounds": {}, "commands": []}
    # The default delay, and one long enough for a client's burst of re-sent
    # requests to gather (a heavy batch costs ~100 ms; 5 ms is 5% of it).
    # The last row sends the same load over InferStream (one stream per 64
    # requests in flight) instead of one call per request.
    for name, delay, streaming in (("heavy", DELAY_US, False), ("heavy", 5000, False),
                                   ("medium", DELAY_US, False), ("heavy", DELAY_US, True)):
        row = f"{name}, delay {delay} us" + (", InferStream" if streaming else "")
        out["rounds"][row] = [
            _served_and_raw(opts, name, models[name], log_dir, row, i, out["commands"],
                            delay=delay, streaming=streaming)
            for i in range(opts.rounds)]
    return out


def _served_and_raw(opts: Options, name: str, path: Path, log_dir: Path, row: str,
                    round_index: int, commands: list[str], delay: int = DELAY_US,
                    streaming: bool = False, threads: int = 0,
                    spinning: bool = False) -> dict[str, Any]:
    """One round of served over raw: the server at concurrency 128, then the backend alone."""
    say(f"served over raw: {row}, round {round_index + 1}")
    flags = [*(["--intra-op-threads", str(threads)] if threads else []),
             *(["--intra-op-spinning"] if spinning else [])]
    with trtserve(name, path, log_dir, delay_us=delay, extra=flags) as served:
        run = bench(served, opts, Level("closed", 128), streaming=streaming)
        s = stats(served)
        histogram = dict(sorted(s.batch_size_histogram.items()))
    batch = round(run.result.server_mean_batch or MAX_BATCH)
    config = ModelConfig(name=name, path=str(path), workers=WORKERS, max_batch_size=MAX_BATCH,
                         intra_op_threads=threads, intra_op_spinning=spinning)
    raw = profile(config, [batch], opts.duration_s, opts.warmup_s).results[0]
    if round_index == 0:
        commands += [
            served.command, run.command,
            f"trtserve profile --model {name}={rel(str(path))} --workers {WORKERS} "
            f"--batch-sizes {batch} --duration {opts.duration_s:g} --warmup {opts.warmup_s:g}"
            + "".join(f" {f}" for f in flags)]
    return {
        "served_rows_per_s": run.result.rows_per_s,
        "mean_batch": run.result.server_mean_batch, "profiled_batch": batch,
        "raw_rows_per_s": raw.rows_per_s,
        "ratio": run.result.rows_per_s / raw.rows_per_s if raw.rows_per_s else math.nan,
        "p50_ms": run.result.latency_ms["p50"], "p99_ms": run.result.latency_ms["p99"],
        "client_cpu": run.result.client_cpu, "server_cpu": run.server_cpu,
        "raw_batch_ms": raw.latency_ms["p50"], "histogram": histogram,
        "errors": run.result.errors,
    }


def threads(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    """Served over raw on `heavy` as ONNX Runtime's threads and spinning vary."""
    cores = usable_cores()
    out: dict[str, Any] = {"cores": cores, "rounds": {}, "commands": []}
    if cores < 4:
        # Every setting but "spinning" would be one thread per session, and a
        # one-thread session has no pool to spin.
        out["skipped"] = (f"{cores} usable cores: every setting is one thread per session "
                          "here ([benchmarks-16core.md](benchmarks-16core.md) has 16)")
        return out
    auto = default_threads(WORKERS)
    for label, count, spinning in (
            (f"default: {auto} per session (usable cores less one), sleeping", 0, False),
            (f"{auto} per session, spinning", auto, True),
            (f"{cores // WORKERS} per session (every core), spinning", cores // WORKERS, True),
            ("1 per session", 1, False)):
        out["rounds"][label] = [
            _served_and_raw(opts, "heavy", models["heavy"], log_dir, f"threads: {label}", i,
                            out["commands"], threads=count, spinning=spinning)
            for i in range(opts.rounds)]
    return out


FRONTEND_CONNECTIONS = 4  # per client process


def frontend_counts(cores: int) -> list[int]:
    """1, 2, 4, 8 frontend processes, up to the usable cores (at least 1 and 2)."""
    return [n for n in (1, 2, 4, 8) if n <= max(2, cores)]


def frontends(opts: Options, models: dict[str, Path], log_dir: Path,
              counts: list[int] | None = None,
              many_flags: Sequence[str] = ()) -> dict[str, Any]:
    """`light` with `frontends = N`: requests/s at concurrency 512 (client processes
    enough to keep up) and p50 at concurrency 1, each N against N = 1 in the same round;
    `counts`: these N only (default 1, 2, 4 and 8, up to the usable cores);
    `many_flags`: `trtserve serve` flags for N > 1 only (say `--engine-cpus 15`: one
    process keeps every core)."""
    counts = counts or frontend_counts(usable_cores())
    clients = max(2, usable_cores() // 2)
    out: dict[str, Any] = {"counts": counts, "client_processes": clients,
                           "connections": FRONTEND_CONNECTIONS, "rounds": [], "commands": []}
    for i in range(opts.rounds):
        row: dict[str, Any] = {}
        for n in counts:
            say(f"frontends: {n}, round {i + 1}")
            with trtserve("light", models["light"], log_dir,
                          extra=["--frontends", str(n), *(many_flags if n > 1 else ())]
                          ) as served:
                c1 = bench(served, opts, Level("closed", 1), tree=True)
                # Several connections per client process: the kernel spreads connections,
                # not requests, over the frontends.
                many = bench(served, opts, Level("closed", 512), tree=True, processes=clients,
                             connections=FRONTEND_CONNECTIONS)
            row[str(n)] = {"req_per_s": many.result.throughput_rps,
                           "p50_ms_c512": many.result.latency_ms["p50"],
                           "client_cpu": many.result.client_cpu,
                           "server_cpu": many.server_cpu,
                           "p50_ms_c1": c1.result.latency_ms["p50"],
                           "errors": sum(many.result.errors.values())
                           + sum(c1.result.errors.values())}
            if i == 0:
                out["commands"] += [served.command, c1.command, many.command]
        out["rounds"].append(row)
    return out


def batching_gain(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": [], "commands": []}
    for i in range(opts.rounds):
        row = {}
        for label, max_batch in (("batching", MAX_BATCH), ("max_batch_size 1", 1)):
            say(f"batching gain: {label}, round {i + 1}")
            with trtserve("heavy", models["heavy"], log_dir, max_batch=max_batch) as served:
                run = bench(served, opts, Level("closed", 64))
            row[label] = {"rows_per_s": run.result.rows_per_s,
                          "p50_ms": run.result.latency_ms["p50"],
                          "p99_ms": run.result.latency_ms["p99"],
                          "mean_batch": run.result.server_mean_batch,
                          "errors": run.result.errors}
            if i == 0:
                out["commands"] += [served.command, run.command]
        out["rounds"].append(row)
    return out


def against_pytriton(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": [1, 16, 128], "models": {}, "commands": [], "setup": []}
    if not opts.pytriton:
        out["skipped"] = "--no-pytriton"
        return out
    env = pytriton_env(opts, out["setup"])
    if isinstance(env, str):
        out["skipped"] = env
        say(f"PyTriton cannot run: {env}")
        return out
    python, variables = env
    # The README's delay at every level; then, at concurrency 1 only, no delay on
    # either side, since the delay alone sets much of the latency there.
    variants = (("light", DELAY_US, out["levels"]), ("light", 0, [1]),
                ("heavy", DELAY_US, out["levels"]))
    for name, delay, levels in variants:
        rows: dict[str, Any] = {"levels": levels}
        first = name == "light" and delay == DELAY_US
        for i in range(opts.rounds):
            for server in ("trtserve", "PyTriton"):
                say(f"against PyTriton: {name}, delay {delay} us, on {server}, "
                     f"round {i + 1}")
                try:
                    context = (trtserve(name, models[name], log_dir, delay_us=delay)
                               if server == "trtserve" else
                               pytriton(python, variables, name, models[name], log_dir, delay))
                    with context as served:
                        if i == 0:
                            rows.setdefault("rss", {})[server] = served.child.rss(
                                tree=server == "PyTriton")
                        if i == 0 and first:
                            out["commands"] += [f"# {server}", served.command]
                        for c in levels:
                            run = bench(served, opts, Level("closed", c), protocol="kserve",
                                        tree=server == "PyTriton")
                            rows.setdefault(f"{server} c={c}", {"rounds": []})["rounds"].append(
                                {"rps": run.result.throughput_rps,
                                 "p50_ms": run.result.latency_ms["p50"],
                                 "p99_ms": run.result.latency_ms["p99"],
                                 "errors": run.result.errors,
                                 "client_cpu": run.result.client_cpu,
                                 "server_cpu": run.server_cpu})
                            if i == 0 and first:
                                out["commands"].append(run.command)
                except RuntimeError as e:
                    out["skipped"] = f"{server} failed: {e}"
                    say(out["skipped"])
                    return out
        out["models"][f"{name}, delay {delay} us"] = rows
    return out


# The no-op server three ways, client and server alike: gRPC as shipped on
# asyncio's loop; trtserve's transport settings (service/grpc_tuning.py) on
# asyncio's loop; and both settings trtserve runs with (the floor it is held to).
FLOORS = (  # label, GRPC_EXPERIMENTS (None: trtserve's), event loop, over InferStream
    ("gRPC defaults, asyncio loop", "", "asyncio", False),
    ("trtserve's gRPC settings, asyncio loop", None, "asyncio", False),
    ("trtserve's gRPC settings, uvloop (as trtserve runs)", None, "auto", False),
    ("the same, over InferStream (`--streaming`)", None, "auto", True),
)
UNARY_FLOOR, STREAM_FLOOR = FLOORS[2][0], FLOORS[3][0]
# The same server running `light` in its Infer handler and nothing else
# (grpc_floor --onnx): the least a grpc.aio server can spend on that model.
LEAN_FLOOR = "the same, running `light` in `Infer` (parse, one ONNX Runtime call, encode)"


@contextlib.contextmanager
def _grpc_experiments(value: str | None) -> Iterator[None]:
    """GRPC_EXPERIMENTS for the processes started inside (None: leave as it is)."""
    if value is None:
        yield
        return
    saved = os.environ.get("GRPC_EXPERIMENTS")
    os.environ["GRPC_EXPERIMENTS"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["GRPC_EXPERIMENTS"]
        else:
            os.environ["GRPC_EXPERIMENTS"] = saved


def floor(opts: Options, log_dir: Path, experiments: str | None, event_loop: str,
          streaming: bool = False, onnx: Path | None = None) -> Run:
    """One closed-loop run at concurrency 1 against the no-op server (or the lean one)."""
    from trtserve.client.bench import model_inputs

    port = free_port()
    cmd = [PY, "-m", "benchmarks.grpc_floor", "--port", str(port), "--event-loop", event_loop]
    if onnx is not None:
        cmd += ["--onnx", str(onnx)]
    with _grpc_experiments(experiments):
        child = Child(f"grpc-floor-{event_loop}-{port}", cmd, log_dir)
        try:
            served = Served(child, f"127.0.0.1:{port}", "floor",
                            "python -m benchmarks.grpc_floor")
            probe = BenchConfig(url=served.url, model="floor", levels=(Level("closed", 1),))

            def ready() -> bool:
                with grpc.insecure_channel(probe.url) as channel:
                    return bool(model_inputs(channel, probe))

            wait_ready(child, ready, 60, "grpc floor")
            run = bench(served, opts, Level("closed", 1), streaming=streaming)
        finally:
            child.stop()
    prefix = "GRPC_EXPERIMENTS= " if experiments == "" else ""
    lean = f" --onnx {rel(str(onnx))}" if onnx is not None else ""
    run.command = (f"{prefix}python -m benchmarks.grpc_floor --port {port} --event-loop "
                   f"{event_loop}{lean}\n{prefix}{run.command}")
    return run


def overhead(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    """p50 at concurrency 1 minus the backend's time, and the no-op gRPC floor."""
    out: dict[str, Any] = {"delays": {}, "floors": {}, "commands": []}
    for i in range(opts.rounds):
        for label, experiments, event_loop, streaming in FLOORS:
            say(f"overhead: no-op gRPC server, {label}, round {i + 1}")
            run = floor(opts, log_dir, experiments, event_loop, streaming)
            out["floors"].setdefault(label, []).append(run.result.latency_ms["p50"])
            if i == 0:
                out["commands"] += run.command.split("\n")
        say(f"overhead: the lean server running light, round {i + 1}")
        run = floor(opts, log_dir, None, "auto", onnx=models["light"])
        out["floors"].setdefault(LEAN_FLOOR, []).append(run.result.latency_ms["p50"])
        if i == 0:
            out["commands"] += run.command.split("\n")
        # The "inline off" rows run every batch on a worker's thread, as before
        # inline_below_us: what the two thread hand-offs cost, in the same run.
        for delay, protocol, streaming, inline in (
                (0, "v1", False, True), (0, "kserve", False, True), (0, "v1", True, True),
                (0, "kserve", True, True), (0, "v1", False, False), (0, "v1", True, False),
                (DELAY_US, "v1", False, True), (DELAY_US, "kserve", False, True)):
            way = protocol + (" stream" if streaming else "") + ("" if inline else ", inline off")
            say(f"overhead: delay {delay} us over {way}, round {i + 1}")
            extra = () if inline else ("--inline-below-us", "0")
            with trtserve("light", models["light"], log_dir, delay_us=delay,
                          extra=extra) as served:
                run = bench(served, opts, Level("closed", 1), protocol=protocol,
                            streaming=streaming)
                s = stats(served)
            out["delays"].setdefault(f"{delay}/{way}", []).append({
                "p50_ms": run.result.latency_ms["p50"],
                "compute_p50_us": s.compute_time.p50_us,
                "queue_p50_us": s.queue_time.p50_us,
                "client_cpu": run.result.client_cpu,
            })
            if i == 0:
                out["commands"] += [served.command, run.command]
    return out


def memory(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": {}, "commands": [],
                           "model_mb": models["heavy"].stat().st_size / 2**20}
    for workers in (1, 2, 4):
        say(f"memory: {workers} worker(s)")
        with trtserve("heavy", models["heavy"], log_dir, workers=workers) as served:
            time.sleep(1.0)
            idle = served.child.rss()
            run = bench(served, opts, Level("closed", 64))
            time.sleep(0.5)
            after = served.child.rss()
        out["workers"][workers] = {"idle": idle, "load": run.server_rss_max, "after": after}
        out["commands"].append(served.command)
    return out


def loop_profile(opts: Options, models: dict[str, Path]) -> dict[str, Any]:
    """cProfile of the server's event-loop thread while it serves concurrency 64."""
    from trtserve.service.testing.servers import running_server, server_config

    say("profile of the event loop under load")
    config = server_config(ModelConfig(name="light", path=str(models["light"]),
                                       workers=WORKERS, max_queue_delay_us=DELAY_US))
    prof = cProfile.Profile()
    with running_server(config) as server:
        settings = BenchConfig(url=server.url, model="light", levels=(Level("closed", 64),),
                               duration_s=opts.duration_s, warmup_s=opts.warmup_s)
        run_bench(settings, progress=False)  # warm
        server.loop.call_soon_threadsafe(prof.enable)
        result = run_bench(settings, progress=False).results[0]
        done = threading.Event()

        def disable() -> None:
            prof.disable()
            done.set()

        server.loop.call_soon_threadsafe(disable)
        done.wait(10)
    stream = io.StringIO()
    st = pstats.Stats(prof, stream=stream)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_, calls, tottime, _cum, _) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][2])[:15]:  # type: ignore[attr-defined]
        where = rel(filename).replace(str(Path(os.__file__).parent) + "/", "")
        rows.append({"function": f"{func} ({Path(where).name}:{line})" if line else func,
                     "calls_per_request": calls / max(result.requests, 1),
                     "share": tottime / total if total else 0.0})
    return {"rows": rows, "rps": result.throughput_rps,
            "mean_batch": result.server_mean_batch}

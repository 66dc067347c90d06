"""`make bench`: trtserve's serving benchmarks on the CPU (ONNX Runtime), in one go.

    .venv/bin/python -m benchmarks.cpu            # everything, ~16 minutes
    .venv/bin/python -m benchmarks.cpu --quick    # a smoke run with short windows

It writes the models it needs under models/bench/, starts every server as a
child process on loopback, drives each with `trtserve-client bench` (the
library behind it), and writes the results between the markers of
docs/benchmarks.md, with the commands that reproduce each number, the
machine and the date. Every comparison is a ratio taken within this one run,
so the noise of a shared machine hits both sides alike; each is repeated
(`--rounds`) and every round is reported.

1. Served over raw: served throughput (gRPC, dynamic batching) over the same
   backend in-process (`trtserve profile`) at the batch size the server formed.
2. Dynamic batching gain at concurrency 64: batching on vs max_batch_size 1.
3. Against PyTriton (Triton + a Python model holding the same ONNX Runtime
   session, with Triton's dynamic batcher), both over KServe v2.
4. Service overhead at concurrency 1: p50 end-to-end minus the backend's own
   time, split into what gRPC in Python costs anyway (a no-op server,
   benchmarks/grpc_floor.py) and what trtserve adds.
5. Memory: server resident memory idle and under load, per worker.
6. Where the event loop's time goes under load (cProfile of the loop thread).
7. Many cores: served over raw as ONNX Runtime's intra-op threads and
   spinning vary (on machines with 4 or more usable cores).
8. One engine, N frontend processes (`--frontends N`): requests/s at high
   concurrency and p50 at concurrency 1, against N = 1 in the same round.

PyTriton runs in its own virtual environment (default /tmp/pytriton-venv,
created with a Python 3.12 from pyenv when missing): its Triton server copies
the Python-backend stub built for the interpreter that runs PyTriton
(python_backend_stubs/<major.minor>), and that stub links libpython, so the
interpreter's LIBDIR goes on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import glob
import io
import json
import math
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from client.bench import BenchConfig, Level, LevelResult, machine_info
from client.bench import run as run_bench
from service.backends.onnxruntime import default_threads, usable_cores
from service.config import ModelConfig
from service.example_model import write_example
from service.sweep.runner import sweep as profile

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PYTRITON_VENV = Path("/tmp/pytriton-venv")

# The models, written in code (service.example_model.make_mlp): FP32 MLPs with a
# dynamic batch dimension. "heavy": a batch of 64 costs on the order of 100 ms
# on two cores; "medium": about a third of that; "light": the bundled example.
MODELS = {
    "heavy": {"in_features": 1024, "hidden": 4096, "out_features": 16, "layers": 8},
    "medium": {"in_features": 1024, "hidden": 4096, "out_features": 16, "layers": 4},
    "light": {"in_features": 64, "hidden": 256, "out_features": 16, "layers": 2},
}
WORKERS = 2
MAX_BATCH = 64
DELAY_US = 500  # a typical opportunistic-batching delay; the server default is 0


@dataclass
class Options:
    duration_s: float
    warmup_s: float
    rounds: int
    pytriton: bool
    pytriton_python: str
    install_pytriton: bool
    out: Path
    json_out: Path | None
    only: set[str]
    render_only: list[Path] | None = None


# --- child processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A server process we started, its output in a log file; stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self, tree: bool = False) -> int:
        total = 0
        for p in (self.tree() if tree else [self.ps]):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def cpu_s(self, tree: bool = False) -> float:
        total = 0.0
        for p in (self.tree() if tree else [self.ps]):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(10)
        # PyTriton's Triton server and stubs live in the same session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _wait(child: Child, ready: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not child.alive():
            raise RuntimeError(f"{what} exited early:\n{child.tail()}")
        with contextlib.suppress(grpc.RpcError):
            if ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f}s:\n{child.tail()}")


@dataclass
class Served:
    child: Child
    url: str
    model: str
    command: str


@contextlib.contextmanager
def trtserve(model: str, path: Path, log_dir: Path, workers: int = WORKERS,
             max_batch: int = MAX_BATCH, delay_us: int = DELAY_US,
             extra: Sequence[str] = ()) -> Iterator[Served]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    flags = ["--model", f"{model}={path}", "--workers", str(workers), "--max-batch-size",
             str(max_batch), "--max-queue-delay-us", str(delay_us), *extra]
    child = Child(f"trtserve-{model}-w{workers}-b{max_batch}-d{delay_us}-{port}",
                  [PY, "-m", "service.cli", "serve", "--port", str(port), "--metrics-port", "0",
                   "--http-port", "0",
                   "--log-level", "WARNING", *flags], log_dir)
    url = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def ready() -> bool:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return bool(status.status == health_pb2.HealthCheckResponse.SERVING)

            _wait(child, ready, 180, "trtserve")
        yield Served(child, url, model, "trtserve serve " + " ".join(_rel(f) for f in flags))
    finally:
        child.stop()


def _rel(text: str) -> str:
    return text.replace(str(ROOT) + "/", "")


def kserve_ready(url: str, model: str) -> Any:
    from service.gen.inference import grpc_service_pb2 as kpb
    from service.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    channel = grpc.insecure_channel(url)
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    def ready() -> bool:
        return bool(stub.ModelReady(kpb.ModelReadyRequest(name=model), timeout=1).ready)

    return ready


# --- PyTriton's environment ---------------------------------------------------------------------


def _python312() -> str | None:
    found = sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))
    if found:
        return found[-1]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["python3.12", "-c", "import sys; print(sys.executable)"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out or None
    return None


def pytriton_env(opts: Options, log: list[str]) -> tuple[str, dict[str, str]] | str:
    """(interpreter, environment) to run PyTriton with, or why it cannot run."""
    python = opts.pytriton_python
    if not Path(python).exists():
        if not opts.install_pytriton:
            return f"{python} does not exist (run without --no-install to create it)"
        base = _python312()
        if base is None:
            return "no Python 3.12 interpreter found (pyenv or PATH) for PyTriton's stub"
        venv = Path(python).parent.parent
        log.append(f"created {venv} with {base}; pip install nvidia-pytriton onnxruntime numpy")
        steps = [[base, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                  "nvidia-pytriton", "onnxruntime", "numpy"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                return f"`{' '.join(step)}` failed: {done.stderr.strip()[-800:]}"
    probe = subprocess.run(
        [python, "-c", "import sys, sysconfig, pytriton; print(sysconfig.get_config_var("
                       "'LIBDIR')); print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        return f"PyTriton does not import under {python}: {probe.stderr.strip()[-800:]}"
    libdir, version = probe.stdout.split()
    if not list(Path(libdir).glob(f"libpython{version}*.so*")):
        return f"{libdir} holds no libpython{version}.so, which PyTriton's stub links"
    paths = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    # Triton's gRPC runs as shipped: not with the transport settings trtserve's
    # processes inherit from service/grpc_tuning.py (empty = gRPC's defaults).
    return python, {"LD_LIBRARY_PATH": ":".join(paths), "PYTHONUNBUFFERED": "1",
                    "GRPC_EXPERIMENTS": ""}


@contextlib.contextmanager
def pytriton(python: str, env: dict[str, str], model: str, path: Path, log_dir: Path,
             delay_us: int = DELAY_US) -> Iterator[Served]:
    port, http, metrics = free_port(), free_port(), free_port()
    flags = ["--name", model, "--instances", str(WORKERS), "--max-batch-size", str(MAX_BATCH),
             "--max-queue-delay-us", str(delay_us)]
    child = Child(f"pytriton-{model}-{port}",
                  [python, "benchmarks/pytriton_server.py", str(path), *flags,
                   "--grpc-port", str(port), "--http-port", str(http),
                   "--metrics-port", str(metrics)], log_dir, env)
    url = f"127.0.0.1:{port}"
    try:
        _wait(child, kserve_ready(url, model), 300, "PyTriton")
        command = (f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH'].split(':')[0]} {python} "
                   f"benchmarks/pytriton_server.py {_rel(str(path))} " + " ".join(flags))
        yield Served(child, url, model, command)
    finally:
        child.stop()


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One bench level against one server, with the server's CPU and memory meanwhile."""

    result: LevelResult
    server_cpu: float  # cores used by the server (its process tree) over the level
    server_rss_max: int
    command: str


def bench(served: Served, opts: Options, level: Level, protocol: str = "v1",
          tree: bool = False, processes: int = 1, streaming: bool = False) -> Run:
    config = BenchConfig(url=served.url, model=served.model, levels=(level,), protocol=protocol,
                         duration_s=opts.duration_s, warmup_s=opts.warmup_s,
                         processes=processes, streaming=streaming)
    peak = [served.child.rss(tree)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], served.child.rss(tree))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0, t0 = served.child.cpu_s(tree), time.monotonic()
    try:
        (result,) = run_bench(config, progress=False).results
    finally:
        stop.set()
        sampler.join()
    cpu = (served.child.cpu_s(tree) - cpu0) / (time.monotonic() - t0)
    flag = "--concurrency" if level.mode == "closed" else "--rate"
    command = (f"trtserve-client --url {served.url} bench --model {served.model} "
               f"--protocol {protocol} {flag} {level.value:g} --duration {opts.duration_s:g} "
               f"--warmup {opts.warmup_s:g}" + (f" --processes {processes}"
                                                  if processes > 1 else "")
               + (" --streaming" if streaming else ""))
    return Run(result, cpu, peak[0], command)


def stats(served: Served) -> Any:
    from service.gen.trtserve.v1 import inference_pb2 as pb
    from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served.url) as channel:
        return pb_grpc.InferenceServiceStub(channel).Stats(pb.StatsRequest(model=served.model),
                                                            timeout=10).models[0]


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


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
    _say(f"served over raw: {row}, round {round_index + 1}")
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
            f"trtserve profile --model {name}={_rel(str(path))} --workers {WORKERS} "
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


def frontend_counts(cores: int) -> list[int]:
    """1, 2, 4, 8 frontend processes, up to the usable cores (at least 1 and 2)."""
    return [n for n in (1, 2, 4, 8) if n <= max(2, cores)]


def frontends(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    """`light` with `frontends = N`: requests/s at concurrency 512 (client processes
    enough to keep up) and p50 at concurrency 1, each N against N = 1 in the same round."""
    counts = frontend_counts(usable_cores())
    clients = max(2, usable_cores() // 2)
    out: dict[str, Any] = {"counts": counts, "client_processes": clients, "rounds": [],
                           "commands": []}
    for i in range(opts.rounds):
        row: dict[str, Any] = {}
        for n in counts:
            _say(f"frontends: {n}, round {i + 1}")
            with trtserve("light", models["light"], log_dir,
                          extra=["--frontends", str(n)]) as served:
                c1 = bench(served, opts, Level("closed", 1), tree=True)
                many = bench(served, opts, Level("closed", 512), tree=True, processes=clients)
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
            _say(f"batching gain: {label}, round {i + 1}")
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
        _say(f"PyTriton cannot run: {env}")
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
                _say(f"against PyTriton: {name}, delay {delay} us, on {server}, "
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
                    _say(out["skipped"])
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
    from client.bench import model_inputs

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

            _wait(child, ready, 60, "grpc floor")
            run = bench(served, opts, Level("closed", 1), streaming=streaming)
        finally:
            child.stop()
    prefix = "GRPC_EXPERIMENTS= " if experiments == "" else ""
    lean = f" --onnx {_rel(str(onnx))}" if onnx is not None else ""
    run.command = (f"{prefix}python -m benchmarks.grpc_floor --port {port} --event-loop "
                   f"{event_loop}{lean}\n{prefix}{run.command}")
    return run


def overhead(opts: Options, models: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    """p50 at concurrency 1 minus the backend's time, and the no-op gRPC floor."""
    out: dict[str, Any] = {"delays": {}, "floors": {}, "commands": []}
    for i in range(opts.rounds):
        for label, experiments, event_loop, streaming in FLOORS:
            _say(f"overhead: no-op gRPC server, {label}, round {i + 1}")
            run = floor(opts, log_dir, experiments, event_loop, streaming)
            out["floors"].setdefault(label, []).append(run.result.latency_ms["p50"])
            if i == 0:
                out["commands"] += run.command.split("\n")
        _say(f"overhead: the lean server running light, round {i + 1}")
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
            _say(f"overhead: delay {delay} us over {way}, round {i + 1}")
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
        _say(f"memory: {workers} worker(s)")
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
    from service.testing.servers import running_server, server_config

    _say("profile of the event loop under load")
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
        where = _rel(filename).replace(str(Path(os.__file__).parent) + "/", "")
        rows.append({"function": f"{func} ({Path(where).name}:{line})" if line else func,
                     "calls_per_request": calls / max(result.requests, 1),
                     "share": tottime / total if total else 0.0})
    return {"rows": rows, "rps": result.throughput_rps,
            "mean_batch": result.server_mean_batch}


# --- the document -------------------------------------------------------------------------------


def _med(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _fmt_rounds(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def bench_machine() -> dict[str, Any]:
    """What the rendered page says of the machine, read where the numbers are measured
    (`--render` may run elsewhere)."""
    return {**machine_info(), "memory_gib": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(), "onnxruntime": _version("onnxruntime"),
            "numpy": np.__version__, "uvloop": _version("uvloop"),
            "threads": default_threads(WORKERS)}


def render(results: dict[str, Any], opts: Options, machine: dict[str, Any], began: str,
           seconds: float, generated: str | None = None) -> str:
    lines = [
        generated or f"Generated by {_command_line(opts)} on {began}, in "
                     f"{seconds / 60:.1f} minutes.",
        "",
        f"- Machine: {machine['cpu'] or 'unknown CPU'}, {machine['cpus']} cores, "
        f"{machine.get('memory_gib', math.nan):.0f} GiB; {machine.get('platform', '?')}",
        f"- Python {machine['python']}, grpcio {machine['grpcio']}, onnxruntime "
        f"{machine.get('onnxruntime', '?')}, numpy {machine.get('numpy', '?')}",
        f"- gRPC: trtserve, the no-op server and the load generator run with "
        f"`GRPC_EXPERIMENTS={machine.get('grpc_experiments', '')}` (service/grpc_tuning.py) "
        f"and trtserve on uvloop {machine.get('uvloop', '?')}; PyTriton's Triton runs gRPC "
        "as shipped.",
        "- Backend: **ONNX Runtime on the CPU** (CPUExecutionProvider). Every server, the load "
        "generator and the in-process baseline share these cores.",
        f"- Each level: {opts.warmup_s:g} s warm-up, then {opts.duration_s:g} s measured; "
        f"{opts.rounds} round(s) of each comparison, every round shown (a / b).",
        f"- Servers: {WORKERS} workers (ONNX Runtime sessions, {machine.get('threads', '?')} "
        f"intra-op thread(s) each, not spinning), max_batch_size {MAX_BATCH}, max_queue_delay_us "
        f"{DELAY_US} unless a row says otherwise; 1 row per request.",
        "- Models (written by benchmarks/cpu.py with `service.example_model.make_mlp`, FP32, "
        "dynamic batch): " + "; ".join(
            f"`{n}` = {MODELS[n]['layers']} Gemm layers, {MODELS[n]['in_features']} in, "
            f"{MODELS[n]['hidden']} hidden" for n in MODELS),
        "",
    ]
    lines += _render_served(results.get("served_over_raw"))
    lines += _render_gain(results.get("batching_gain"))
    lines += _render_pytriton(results.get("pytriton"))
    lines += _render_overhead(results.get("overhead"))
    lines += _render_memory(results.get("memory"))
    lines += _render_profile(results.get("loop_profile"))
    lines += _render_threads(results.get("threads"))
    lines += _render_frontends(results.get("frontends"))
    for key, why in (results.get("failed") or {}).items():
        lines += [f"**Step `{key}` failed**: {why}", ""]
    return "\n".join(lines)


def _command_line(opts: Options) -> str:
    """The command that measured these numbers, as Markdown (`make bench` for the defaults)."""
    flags = []
    if set(opts.only) != set(STEPS):
        flags.append("--only " + ",".join(s for s in STEPS if s in opts.only))
    if opts.rounds != 2:
        flags.append(f"--rounds {opts.rounds}")
    if opts.duration_s != 8.0:
        flags.append(f"--duration {opts.duration_s:g}")
    if opts.warmup_s != 2.0:
        flags.append(f"--warmup {opts.warmup_s:g}")
    if not opts.pytriton and "pytriton" in opts.only:
        flags.append("--no-pytriton")
    if not flags:
        return "`make bench` (`.venv/bin/python -m benchmarks.cpu`)"
    return "`python -m benchmarks.cpu " + " ".join(flags) + "`"


def _version(module: str) -> str:
    with contextlib.suppress(Exception):
        return str(__import__(module).__version__)
    return "?"


def _commands(commands: Sequence[str]) -> list[str]:
    return ["", "```sh", *commands, "```", ""] if commands else [""]


def _render_served(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["### 1. Served over raw (target >= 0.85)", "",
             "Served: closed loop, concurrency 128, through gRPC (trtserve.v1) with dynamic "
             "batching, one call per request (`Infer`), or over `InferStream` where the row "
             "says so (`bench --streaming`: the same 128 requests in flight on two streams). "
             "Raw: `trtserve profile`, the same backend with the same workers running "
             "at once in-process, at the server's mean batch size (from Stats).", "",
             *_served_table("model", data["rounds"])]
    lines += ["", "Batch sizes the server formed (first round): share of batches of 1-8 rows, "
              "9-32, 33-63 and exactly 64: " + "; ".join(
                  f"{n}: {_buckets(r[0]['histogram'])}" for n, r in data["rounds"].items() if r)]
    return lines + _commands(data["commands"])


def _served_table(first: str, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [f"| {first} | served rows/s | mean batch | raw rows/s at that batch | served/raw | "
             "p50 / p99 ms | client CPU | server CPU (cores) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rounds in rows.items():
        ratio = _med([r["ratio"] for r in rounds])
        lines.append(
            f"| {name} | {_fmt_rounds([r['served_rows_per_s'] for r in rounds], '{:,.0f}')} | "
            f"{_fmt_rounds([r['mean_batch'] or 0 for r in rounds], '{:.1f}')} | "
            f"{_fmt_rounds([r['raw_rows_per_s'] for r in rounds], '{:,.0f}')} | "
            f"{_fmt_rounds([r['ratio'] for r in rounds])} (median {ratio:.2f}) | "
            f"{rounds[0]['p50_ms']:.1f} / {rounds[0]['p99_ms']:.1f} | "
            f"{_fmt_rounds([max(r['client_cpu']) for r in rounds], '{:.0%}')} | "
            f"{_fmt_rounds([r['server_cpu'] for r in rounds])} | {_verdict(ratio >= 0.85)} |")
    return lines


def _render_threads(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["### 7. Many cores: ONNX Runtime's threads and the serving path (model `heavy`)",
             ""]
    if data.get("skipped"):
        return [*lines, f"Not measured: {data['skipped']}.", ""]
    lines += [f"Served over raw as in section 1 (concurrency 128, delay {DELAY_US} us, "
              f"{WORKERS} workers), with {data['cores']} usable cores and the intra-op "
              "threads per session and their spinning set as each row says, on both sides.",
              "", *_served_table("intra-op threads", data["rounds"])]
    return lines + _commands(data["commands"])


def _buckets(histogram: dict[Any, int]) -> str:
    counts = {int(k): v for k, v in histogram.items()}
    total = sum(counts.values()) or 1
    edges = ((1, 8), (9, 32), (33, MAX_BATCH - 1), (MAX_BATCH, MAX_BATCH))
    return " / ".join(f"{sum(v for k, v in counts.items() if lo <= k <= hi) / total:.0%}"
                      for lo, hi in edges)


def _render_gain(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    rounds = data["rounds"]
    on = [r["batching"] for r in rounds]
    off = [r["max_batch_size 1"] for r in rounds]
    gain = [a["rows_per_s"] / b["rows_per_s"] if b["rows_per_s"] else math.nan
            for a, b in zip(on, off, strict=True)]
    lines = ["### 2. Dynamic batching gain (model `heavy`, concurrency 64)", "",
             "| setting | rows/s | mean batch | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for label, rs in (("batching on (max_batch_size 64)", on), ("max_batch_size 1", off)):
        lines.append(f"| {label} | {_fmt_rounds([r['rows_per_s'] for r in rs], '{:,.0f}')} | "
                     f"{_fmt_rounds([r['mean_batch'] or 0 for r in rs], '{:.1f}')} | "
                     f"{_fmt_rounds([r['p50_ms'] for r in rs], '{:.1f}')} | "
                     f"{_fmt_rounds([r['p99_ms'] for r in rs], '{:.1f}')} |")
    cost = [a["p50_ms"] / b["p50_ms"] for a, b in zip(on, off, strict=True)]
    lines += ["", f"Gain: {_fmt_rounds(gain)}x throughput (median {_med(gain):.2f}x); latency "
              f"cost at p50: {_fmt_rounds(cost)}x "
              "(batching on over off; below 1 means batching also lowered latency, because the "
              "queue drains faster)."]
    return lines + _commands(data["commands"])


def _render_frontends(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    rounds = data["rounds"]
    lines = ["### 8. One engine, N frontend processes (model `light`)", "",
             f"`trtserve serve --frontends N` (docs/processes.md): requests/s at concurrency "
             f"512 from {data['client_processes']} client processes, and p50 at concurrency 1; "
             "ratios against N = 1 in the same round.", "",
             "| frontends | req/s (c=512) | vs 1 | server cores | p50 ms (c=1) | c=1 p50 cost "
             "us | errors |", "|---|---|---|---|---|---|---|"]
    for n in data["counts"]:
        rows = [r[str(n)] for r in rounds]
        ratio = [r[str(n)]["req_per_s"] / r["1"]["req_per_s"] if r["1"]["req_per_s"]
                 else math.nan for r in rounds]
        cost = [(r[str(n)]["p50_ms_c1"] - r["1"]["p50_ms_c1"]) * 1000 for r in rounds]
        lines.append(
            f"| {n} | {_fmt_rounds([r['req_per_s'] for r in rows], '{:,.0f}')} | "
            f"{_fmt_rounds(ratio)}x | {_fmt_rounds([r['server_cpu'] for r in rows], '{:.2f}')}"
            f" | {_fmt_rounds([r['p50_ms_c1'] for r in rows], '{:.3f}')} | "
            f"{_fmt_rounds(cost, '{:+.0f}')} | {sum(r['errors'] for r in rows)} |")
    return [*lines, "", *_commands(data["commands"])]


def _render_pytriton(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["### 3. Against PyTriton (KServe v2, same load generator)", ""]
    if data.get("setup"):
        lines += [f"Setup: {s}" for s in data["setup"]] + [""]
    if data.get("skipped") and not data["models"]:
        return [*lines, f"Not measured: {data['skipped']}", ""]
    if data.get("skipped"):
        lines += [f"Stopped early: {data['skipped']}", ""]
    lines += ["Both serve the same ONNX file with the same ONNX Runtime settings: trtserve with "
              f"{WORKERS} workers, PyTriton with {WORKERS} model instances (each its own "
              f"session); max batch {MAX_BATCH}; the max queue delay the first column names, on "
              "both. Targets: higher throughput at every concurrency, and p50 at concurrency 1 "
              "at least 3x lower. Server CPU: cores the server's process tree used over the "
              "level (PyTriton: its process, Triton's server and the Python stubs).", "",
              "| model | concurrency | trtserve req/s | PyTriton req/s | throughput ratio | "
              "trtserve p50 ms | PyTriton p50 ms | p50 ratio | server CPU cores (ours vs "
              "theirs) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in data["models"].items():
        for c in rows.get("levels", data["levels"]):
            ours, theirs = rows.get(f"trtserve c={c}"), rows.get(f"PyTriton c={c}")
            if not ours or not theirs:
                continue
            a = [r["rps"] for r in ours["rounds"]]
            b = [r["rps"] for r in theirs["rounds"]]
            pa = [r["p50_ms"] for r in ours["rounds"]]
            pb = [r["p50_ms"] for r in theirs["rounds"]]
            thr = _med(a) / _med(b) if _med(b) else math.nan
            lat = _med(pb) / _med(pa) if _med(pa) else math.nan
            ok = thr > 1 and (c != 1 or lat >= 3)
            cpu = (f"{_fmt_rounds([r['server_cpu'] for r in ours['rounds']], '{:.1f}')} vs "
                   f"{_fmt_rounds([r['server_cpu'] for r in theirs['rounds']], '{:.1f}')}")
            lines.append(f"| {name} | {c} | {_fmt_rounds(a, '{:,.0f}')} | "
                         f"{_fmt_rounds(b, '{:,.0f}')} | {thr:.2f}x | {_fmt_rounds(pa)} | "
                         f"{_fmt_rounds(pb)} | {lat:.2f}x lower | {cpu} | {_verdict(ok)} |")
    rss = {n: r.get("rss", {}) for n, r in data["models"].items()}
    lines += ["", "Resident memory when idle (PyTriton: its process, Triton's server and the "
              "Python stubs together): " + "; ".join(
                  f"{n}: trtserve {_mb(r.get('trtserve', 0))}, PyTriton "
                  f"{_mb(r.get('PyTriton', 0))}" for n, r in rss.items())]
    return lines + _commands(data["commands"])


def _render_overhead(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    floors = data["floors"]
    lines = ["### 4. Service overhead at concurrency 1 (model `light`; target < 300 us)", "",
             "Overhead = p50 end-to-end minus the backend's own p50 time for that batch "
             "(Stats compute_time). The no-op server (benchmarks/grpc_floor.py: grpc.aio "
             "answering a fixed response, no decoding), driven by the same client, gives the "
             "part that the Python gRPC stack and the client cost on their own. It runs four "
             "ways, the client always with the same gRPC settings as the server; the fourth "
             "sends its requests over one InferStream, as `bench --streaming` does. The last "
             "row is the same server running `light` in its `Infer` handler with nothing "
             "around it (`--onnx`: no batcher, no checks, no statistics): the least any "
             "grpc.aio server can spend on this model per call.", "",
             "| no-op server and client | p50 us | vs gRPC defaults |", "|---|---|---|"]
    base = _med(floors[FLOORS[0][0]])
    for label, rounds in floors.items():
        lines.append(f"| {label} | {_fmt_rounds([f * 1e3 for f in rounds], '{:.0f}')} | "
                     f"{_med(rounds) / base:.2f}x |")
    lines += ["", "| max_queue_delay_us / protocol | p50 end-to-end us | backend p50 us | "
             "queue p50 us | overhead us | of which gRPC floor us | trtserve's own us | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for key, rounds in data["delays"].items():
        e2e = _med([r["p50_ms"] for r in rounds]) * 1e3
        compute = _med([r["compute_p50_us"] for r in rounds])
        queue = _med([r["queue_p50_us"] for r in rounds])
        over = e2e - compute
        delay, protocol = key.split("/")
        # Stream rows against the stream's floor, call rows against a call's.
        floor = _med(floors.get(STREAM_FLOOR if "stream" in protocol else UNARY_FLOOR,
                                [math.nan])) * 1e3
        lines.append(f"| {delay} / {protocol} | "
                     f"{_fmt_rounds([r['p50_ms'] * 1e3 for r in rounds], '{:.0f}')} | "
                     f"{compute:.0f} | {queue:.0f} | {over:.0f} | {floor:.0f} | "
                     f"{over - floor:.0f} | {_verdict(over < 300)} |")
    lean, call = floors.get(LEAN_FLOOR), data["delays"].get("0/v1")
    if lean and call:
        # The lean server's backend call is trtserve's (same session settings).
        compute = _med([r["compute_p50_us"] for r in call])
        bound = _med(lean) * 1e3 - compute
        lines += ["", f"The lean server's p50 less trtserve's backend p50 ({compute:.0f} us): "
                  f"**{bound:.0f} us**, the overhead of a call with nothing but the model in "
                  f"it; {'under' if bound < 300 else 'over'} the 300 us target before "
                  "trtserve's batcher, checks and statistics add anything. trtserve's "
                  f"`0 / v1` row is {(_med([r['p50_ms'] for r in call]) - _med(lean)) * 1e3:.0f}"
                  " us above it."]
    lines += ["", f"With max_queue_delay_us {DELAY_US} (a typical batching delay; the "
              "server's default is 0) a request alone waits out the delay for company that never "
              "comes at concurrency 1; the queue "
              "column shows it. Delay 0 is what a latency-bound deployment would set."]
    return lines + _commands(data["commands"])


def _render_memory(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    rows = data["workers"]
    lines = ["### 5. Memory (model `heavy`, "
             f"{data['model_mb']:,.0f} MiB of weights on disk)", "",
             "| workers | RSS idle | RSS under load (max, concurrency 64) | RSS after load |",
             "|---|---|---|---|"]
    for w, r in rows.items():
        lines.append(f"| {w} | {_mb(r['idle'])} | {_mb(r['load'])} | {_mb(r['after'])} |")
    keys = sorted(rows)
    if len(keys) >= 2:
        lo, hi = keys[0], keys[-1]
        per_idle = (rows[hi]["idle"] - rows[lo]["idle"]) / (hi - lo)
        per_load = (rows[hi]["load"] - rows[lo]["load"]) / (hi - lo)
        base = rows[lo]["idle"] - lo * per_idle
        lines += ["", f"Per worker: {_mb(int(per_idle))} idle, {_mb(int(per_load))} under load "
                  f"(slope from {lo} to {hi} workers); the rest, {_mb(int(base))}, is the "
                  "process itself (Python, gRPC, numpy, ONNX Runtime)."]
    return lines + _commands(data["commands"])


def _render_profile(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["### 6. Where the event loop's time goes (now)", "",
             f"cProfile of the server's event-loop thread, model `light`, concurrency 64 "
             f"({data['rps']:,.0f} req/s under the profiler, mean batch "
             f"{data['mean_batch'] or 0:.1f}); self time, top 15.", "",
             "| function | calls per request | share of loop-thread time |", "|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| `{r['function']}` | {r['calls_per_request']:.2f} | {r['share']:.1%} |")
    return [*lines, ""]


def write_doc(body: str, path: Path) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    else:
        text = f"# Benchmarks (CPU, ONNX Runtime)\n\n{BEGIN}\n{body}\n{END}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- main ---------------------------------------------------------------------------------------

STEPS = ("served", "gain", "pytriton", "overhead", "memory", "profile", "threads",
         "frontends")


def parse(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, one round")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 8)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per level (default 2)")
    p.add_argument("--rounds", type=int, help="repeats of each comparison (default 2)")
    p.add_argument("--no-pytriton", action="store_true", help="skip the PyTriton comparison")
    p.add_argument("--pytriton-python", default=str(PYTRITON_VENV / "bin" / "python"),
                   help="interpreter with nvidia-pytriton installed (default %(default)s)")
    p.add_argument("--no-install", action="store_true",
                   help="do not create PyTriton's virtual environment when it is missing")
    p.add_argument("--only", default=",".join(STEPS),
                   help=f"comma-separated steps to run, of {','.join(STEPS)}")
    p.add_argument("--out", type=Path, default=DOC, help="document to write (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write every number as JSON here (after "
                                            "each step)")
    p.add_argument("--render", type=Path, metavar="JSON", nargs="+",
                   help="only rewrite the document from --json files of earlier runs (several: "
                        "their steps together, as separate runs measured them)")
    a = p.parse_args(argv)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    if only - set(STEPS):
        p.error(f"--only: unknown steps {sorted(only - set(STEPS))}; known: {STEPS}")
    return Options(
        duration_s=a.duration or (2.0 if a.quick else 8.0),
        warmup_s=a.warmup if a.warmup is not None else (0.5 if a.quick else 2.0),
        rounds=a.rounds or (1 if a.quick else 2), pytriton=not a.no_pytriton,
        pytriton_python=a.pytriton_python, install_pytriton=not a.no_install, out=a.out,
        json_out=a.json, only=only, render_only=a.render)


def write_models(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, shape in MODELS.items():
        path = directory / f"{name}.onnx"
        if not path.exists():
            write_example(path, **shape)
        paths[name] = path
    return paths


RENDER = {
    "served_over_raw": _render_served,
    "batching_gain": _render_gain,
    "pytriton": _render_pytriton,
    "overhead": _render_overhead,
    "memory": _render_memory,
    "loop_profile": _render_profile,
    "threads": _render_threads,
    "frontends": _render_frontends,
}


def _saved_options(saved: dict[str, Any], out: Path, only: set[str]) -> Options:
    was = saved["options"]
    return Options(was["duration_s"], was["warmup_s"], was["rounds"], was["pytriton"],
                   was["pytriton_python"], was["install_pytriton"], out, None, only)


def render_saved(runs: list[dict[str, Any]], out: Path) -> str:
    """The page for saved runs; several are shown together, each step from its own run."""
    results: dict[str, Any] = {"failed": {}}
    lines = []
    for saved in runs:
        shown = _saved_options(saved, out, set(saved["options"]["only"]))
        results.update({k: v for k, v in saved["results"].items() if k != "failed"})
        results["failed"].update(saved["results"].get("failed") or {})
        lines.append(f"{_command_line(shown)} on {saved['began']}, in "
                     f"{saved['seconds'] / 60:.1f} minutes")
    first = runs[0]
    every_step = {s for saved in runs for s in saved["options"]["only"]}
    generated = None if len(runs) == 1 else \
        "Generated by separate runs on one machine: " + "; ".join(lines) + "."
    return render(results, _saved_options(first, out, every_step), first["machine"],
                  first["began"], first["seconds"], generated)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.render_only is not None:
        body = render_saved([json.loads(p.read_text()) for p in opts.render_only], opts.out)
        write_doc(body, opts.out)
        print(body)
        return 0
    began = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.monotonic()
    models = write_models(ROOT / "models" / "bench")
    log_dir = ROOT / "build" / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    steps = {
        "served": ("served_over_raw", lambda: served_over_raw(opts, models, log_dir)),
        "gain": ("batching_gain", lambda: batching_gain(opts, models, log_dir)),
        "pytriton": ("pytriton", lambda: against_pytriton(opts, models, log_dir)),
        "overhead": ("overhead", lambda: overhead(opts, models, log_dir)),
        "memory": ("memory", lambda: memory(opts, models, log_dir)),
        "profile": ("loop_profile", lambda: loop_profile(opts, models)),
        "threads": ("threads", lambda: threads(opts, models, log_dir)),
        "frontends": ("frontends", lambda: frontends(opts, models, log_dir)),
    }
    machine = bench_machine()
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for step, (key, func) in steps.items():
        if step not in opts.only:
            continue
        try:
            results[key] = func()
        except Exception as e:  # one broken step must not lose the others' numbers
            failed[key] = f"{type(e).__name__}: {e}"
            _say(f"step {step} failed: {failed[key]}")
            continue
        print("\n".join(RENDER[key](results[key])), file=sys.stderr, flush=True)
        if opts.json_out:
            _save(opts.json_out, machine, opts, results, began, time.monotonic() - start)
    results["failed"] = failed
    seconds = time.monotonic() - start
    body = render(results, opts, machine, began, seconds)
    write_doc(body, opts.out)
    if opts.json_out:
        _save(opts.json_out, machine, opts, results, began, seconds)
    print(body)
    _say(f"wrote {opts.out} (server logs in {_rel(str(log_dir))})")
    return 1 if failed else 0


def _save(path: Path, machine: dict[str, Any], opts: Options, results: dict[str, Any],
          began: str, seconds: float) -> None:
    options = {**asdict(opts), "only": sorted(opts.only)}
    path.write_text(json.dumps({"machine": machine, "options": options, "began": began,
                                "seconds": seconds, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())


"""The processes a run starts: trtserve and PyTriton servers (with PyTriton's virtual
environment), and the load generator driving them."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks.cpu.config import DELAY_US, MAX_BATCH, PY, ROOT, WORKERS, Options
from trtserve.client.bench import BenchConfig, Level, LevelResult
from trtserve.client.bench import run as run_bench

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


def wait_ready(child: Child, ready: Any, timeout: float, what: str) -> None:
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
             extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Iterator[Served]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    flags = ["--model", f"{model}={path}", "--workers", str(workers), "--max-batch-size",
             str(max_batch), "--max-queue-delay-us", str(delay_us), *extra]
    child = Child(f"trtserve-{model}-w{workers}-b{max_batch}-d{delay_us}-{port}",
                  [PY, "-m", "trtserve.service.cli", "serve", "--port", str(port),
                   "--metrics-port", "0",
                   "--http-port", "0",
                   "--log-level", "WARNING", *flags], log_dir, env)
    url = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def ready() -> bool:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return bool(status.status == health_pb2.HealthCheckResponse.SERVING)

            wait_ready(child, ready, 180, "trtserve")
        yield Served(child, url, model, "trtserve serve " + " ".join(rel(f) for f in flags))
    finally:
        child.stop()


def rel(text: str) -> str:
    return text.replace(str(ROOT) + "/", "")


def kserve_ready(url: str, model: str) -> Any:
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc

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
        wait_ready(child, kserve_ready(url, model), 300, "PyTriton")
        command = (f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH'].split(':')[0]} {python} "
                   f"benchmarks/pytriton_server.py {rel(str(path))} " + " ".join(flags))
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
          tree: bool = False, processes: int = 1, streaming: bool = False,
          connections: int = 1) -> Run:
    config = BenchConfig(url=served.url, model=served.model, levels=(level,), protocol=protocol,
                         duration_s=opts.duration_s, warmup_s=opts.warmup_s,
                         processes=processes, streaming=streaming, connections=connections)
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
               + (f" --connections {connections}" if connections > 1 else "")
               + (" --streaming" if streaming else ""))
    return Run(result, cpu, peak[0], command)


def stats(served: Served) -> Any:
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served.url) as channel:
        return pb_grpc.InferenceServiceStub(channel).Stats(pb.StatsRequest(model=served.model),
                                                            timeout=10).models[0]


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

"""The engine process's cost per request across the link (issue 18's next ceiling).

    python benchmarks/engine_loop.py [TREE ...] [--rounds 3]

Drives a real engine process (`EngineHost` over a `LocalEngine`, ONNX Runtime,
model `offset_net`: output = input + 1, 1 worker) through the real link
(socketpair, protobuf frames, memfd arenas) from `RemoteEngine` clients in the
benchmark's own process, as frontend processes would, and prints for each
scenario:

- `engine us/req`: the engine process's CPU (user + system, every thread, from
  /proc) per request;
- `loop us/req`: the CPU of its main thread (the event loop: the ceiling when
  the engine serves many frontends) per request;
- `p50 us`: the round trip at concurrency 1 (`c1` rows only);
- `req/s`: what the load rows served (bound here by this 2-core machine, where
  the clients share the cores: read the CPU columns, not this).

Scenarios: `c1` (one client, one request at a time; half the requests) and `load` (2 links, 64
requests in flight in all), each with a small tensor (1 row of 4 floats:
inline in the frame) and a large one (1 row of 4096 floats, 16 KiB: through
the arenas).

The GPU path's shape (issue 18: 8 frontends, 256 clients, batches on worker
threads) has its own scenarios, 1 row of 512 FP32 in and out (2 KiB, inline in
the frames), each at `2x64` (2 links, 64 in flight) and `8x32` (8 links, 32 in
flight on each: 256, few requests per frame):

- `ort inline`: ONNX Runtime (`offset_net`, 1 worker), quick batches run on the loop;
- `ort thread`: the same model with `inline_below_us = 0`: every batch goes to
  the worker's thread and comes back with `call_soon_threadsafe`;
- `trt thread`: the real `TrtExecutor` (4 workers, one profile of 1-64 rows, CUDA
  graphs per bucket) over the CPU doubles of TensorRT and the CUDA runtime
  (service/testing/trt_double.py: y = 2x + 1 in host memory): what the engine's
  loop does for a TensorRT model (it never runs a batch inline; quick batches
  wait for the one in flight) with the executor's own Python on the worker
  threads, as on the GPU host; only the kernels and copies are host memcpy.

`req/frame` is requests per frame the engine read, `replies/frame` replies per frame it
wrote (over every link), `req/batch` the mean batch, `loop switches/req` the event-loop
thread's context switches (voluntary and not, from /proc: its waits for the GIL and for
the sockets) per request.

Each TREE (default: this one) is run as it is, in fresh processes (its
`service` package first on sys.path), so that two trees (say, main and a
branch) are compared in one run: rounds interleave the trees, and the table
gives each figure's median over rounds and its spread (min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ARENA_BYTES = 64 << 20
LINKS = 8
# name -> (model, links, requests in flight in all, spread[, rows per request: 1]); "c1": one
# at a time on link 0.
# Spread: the clients of a link send over that many loop iterations, not all in the one
# that brought their replies, so that a frame carries few requests, as each of 8 frontend
# processes sends them when its own clients' calls arrive.
SCENARIOS = {
    "c1 small": ("small", 1, 1, 1), "c1 large": ("large", 1, 1, 1),
    "load small": ("small", 2, 64, 1), "load large": ("large", 2, 64, 1),
    "ort inline 2x64": ("ort512", 2, 64, 1), "ort inline 8x32": ("ort512", 8, 256, 32),
    "ort thread 2x64": ("ort512t", 2, 64, 1), "ort thread 8x32": ("ort512t", 8, 256, 32),
    "trt thread 2x64": ("trt512", 2, 64, 1), "trt thread 8x32": ("trt512", 8, 256, 32),
    # The same load with full frames: what frames of one request cost.
    "trt thread 8x32 full": ("trt512", 8, 256, 1),
    # 8 rows per request (16 KiB each way: through the arenas), as issue 18's 8-row row.
    "trt thread 8x32 rows8": ("trt512", 8, 256, 32, 8),
    "trt thread 8x32 rows8 full": ("trt512", 8, 256, 1, 8),
}
# model -> (features, backend, workers, inline_below_us)
MODELS = {"small": (4, "ort", 1, 100), "large": (4096, "ort", 1, 100),
          "ort512": (512, "ort", 1, 100), "ort512t": (512, "ort", 1, 0),
          "trt512": (512, "trt", 4, 100)}
TRT_MAX_BATCH = 64
_TICKS = os.sysconf("SC_CLK_TCK")


def _use_tree(tree: str) -> None:
    """Import `trtserve.service` and `trtserve.client` from TREE (a link farm of its own)."""
    farm = Path(tempfile.mkdtemp(prefix="engine-loop-farm-")) / "trtserve"
    farm.mkdir()
    for package in ("service", "client"):
        (farm / package).symlink_to(Path(tree).resolve() / package)
    sys.path.insert(0, str(farm.parent))


def _switches(path: str) -> int:
    """Context switches of a thread so far (voluntary and not), from its /proc status."""
    with open(path, "rb") as f:
        return sum(int(line.split()[1]) for line in f if b"ctxt_switches:" in line)


def _cpu_s(path: str) -> float:
    with open(path, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --- the engine process ------------------------------------------------------------------

async def _trt_double(name: str, features: int, workers: int) -> Any:
    """A TensorRT model on the CPU doubles, served by the real TrtExecutor."""
    from trtserve.service.backends.base import LoadedModel
    from trtserve.service.backends.tensorrt.load import (
        EngineHandle,
        engine_spec,
        executor_factories,
        graph_buckets,
    )
    from trtserve.service.config import ModelConfig
    from trtserve.service.engine.model import ModelRuntime
    from trtserve.service.testing.trt_double import HostCudaRuntime, RecordingEngine, trt_module

    cuda = HostCudaRuntime()
    # The doubles log every call for tests; here only the last few are kept, lest the
    # garbage collector walk a list that grows for the whole run.
    cuda.log = collections.deque(maxlen=64)  # type: ignore[assignment]
    trt = RecordingEngine(cuda, features, profiles=((1, TRT_MAX_BATCH // 2, TRT_MAX_BATCH),))
    handle = EngineHandle(trt)
    config = ModelConfig(name=name, path=f"{name}.engine", backend="tensorrt",
                         workers=workers)
    loaded = LoadedModel(engine_spec(trt, name),
                         executor_factories(handle, cuda, workers,
                                            graph_buckets((), TRT_MAX_BATCH), True, trt_module,
                                            name), handle.close)
    return ModelRuntime(config, loaded)


async def _engine(args: argparse.Namespace) -> None:
    from trtserve.service.config import ModelConfig, ServerConfig
    from trtserve.service.engine.host import EngineHost
    from trtserve.service.engine.local import LocalEngine
    from trtserve.service.engine.repository import ModelRepository
    from trtserve.service.ipc.shm import Arena

    repository = ModelRepository()
    for name, path in json.loads(args.models).items():
        features, backend, workers, inline_below_us = MODELS[name]
        if backend == "trt":
            await repository.add(await _trt_double(name, features, workers))
        else:
            await repository.load(ModelConfig(name=name, path=path, workers=workers,
                                              inline_below_us=inline_below_us))
    host = EngineHost(LocalEngine(repository), ServerConfig())
    closed = []
    for i, (link_fd, in_fd, out_fd) in enumerate(zip(args.link_fds, args.in_fds, args.out_fds,
                                                      strict=True)):
        sock = socket.socket(fileno=link_fd)
        sock.setblocking(False)
        port = await host.attach(i, os.getppid(), sock, Arena(in_fd, ARENA_BYTES),
                                 Arena(out_fd, ARENA_BYTES))
        closed.append(port.closed)
    for model in (*MODELS, ""):
        host.set_health(model, True)
    # As `trtserve serve` sets the process up (where the tree does: server.gc_gen0_threshold).
    from trtserve.service import memory
    if hasattr(memory, "tune_collector"):
        memory.tune_collector(ServerConfig().gc_gen0_threshold)
    await asyncio.gather(*closed)
    await repository.stop()


# --- the clients (as frontends) ----------------------------------------------------------

async def _clients(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import numpy as np

    from trtserve.service.engine.api import InferRequest, TensorIn
    from trtserve.service.engine.remote import RemoteEngine
    from trtserve.service.ipc.shm import Arena
    from trtserve.service.testing.onnx_models import offset_net

    scenarios = [k for k in SCENARIOS if not args.only or any(o in k for o in args.only)]
    models = {SCENARIOS[k][0] for k in scenarios}
    tmp = Path(tempfile.mkdtemp())
    paths = {m: str(offset_net(tmp / f"{m}.onnx", 1.0, MODELS[m][0]))
             if MODELS[m][1] == "ort" else "" for m in sorted(models)}
    remotes: list[Any] = []
    fds: dict[str, list[int]] = {"link": [], "in": [], "out": []}
    keep = []
    for i in range(LINKS):
        inputs, outputs = Arena.create(f"in-{i}", ARENA_BYTES), Arena.create(f"out-{i}",
                                                                              ARENA_BYTES)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds["link"].append(theirs.fileno())
        fds["in"].append(inputs.fd)
        fds["out"].append(outputs.fd)
        keep.append((ours, theirs, inputs, outputs))
    command = [sys.executable, str(HERE), "--engine", args.tree, "--models", json.dumps(paths)]
    for key in ("link", "in", "out"):
        command += [f"--{key}-fds", *map(str, fds[key])]
    proc = subprocess.Popen(command, pass_fds=[fd for v in fds.values() for fd in v],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for ours, theirs, inputs, outputs in keep:
        theirs.close()
        ours.setblocking(False)
        remote = RemoteEngine(inputs, outputs)
        config = await remote.connect(ours)
        # As a frontend process sets it up (where the tree has it).
        if hasattr(remote, "spin_s"):
            # A tree before "auto" has an int here and no resolved_ property.
            remote.spin_s = getattr(config, "resolved_frontend_spin_us",
                                    config.frontend_spin_us) / 1e6
            # getattr: a tree from before the hold is measured with this script too.
            remote.hold_s = getattr(config, "frontend_hold_us", 0) / 1e6
        remotes.append(remote)
    while not all(r.ready(m) for r in remotes for m in models):
        await asyncio.sleep(0.01)

    input_names = {m: "x" if MODELS[m][1] == "trt" else "input" for m in models}
    # One array per (model, rows), made once: this process's CPU is not measured, but
    # a client slowed by an allocation per request changes how requests fill frames.
    arrays: dict[tuple[str, int], Any] = {}

    def request(model: str, rows: int = 1) -> Any:
        array = arrays.get((model, rows))
        if array is None:
            array = arrays[(model, rows)] = np.ones((rows, MODELS[model][0]), np.float32)
        return InferRequest(model=model, inputs={input_names[model]: TensorIn(
            "FP32", array.shape, array)})

    process = f"/proc/{proc.pid}/stat"
    main_thread = f"/proc/{proc.pid}/task/{proc.pid}/stat"
    main_status = f"/proc/{proc.pid}/task/{proc.pid}/status"
    results: dict[str, dict[str, float]] = {}
    for key in scenarios:
        model, links, in_flight, spread, *more = SCENARIOS[key]
        rows = more[0] if more else 1
        c1 = key.startswith("c1")
        n = args.requests // 2 if c1 else args.requests
        # Warm up (the batcher, the arenas' rings, the backends' first runs, graphs).
        for remote in remotes[:links]:
            await asyncio.gather(*(remote.infer(request(model, rows)) for _ in range(50)))
        frames0 = sum(r._link.frames_out for r in remotes)
        replies0 = sum(r._link.frames_in for r in remotes)
        batches0 = await _batches(remotes[0], model)
        switches0 = _switches(main_status)
        cpu0, loop0, t0 = _cpu_s(process), _cpu_s(main_thread), time.perf_counter()
        latencies: list[float] = []
        if c1:
            remote = remotes[0]
            for _ in range(n):
                start = time.perf_counter()
                await remote.infer(request(model, rows))
                latencies.append(time.perf_counter() - start)
        else:
            left = n

            async def client(remote: Any, model: str, iterations: int, rows: int) -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    for _ in range(iterations):
                        await asyncio.sleep(0)
                    await remote.infer(request(model, rows))

            await asyncio.gather(*(client(remotes[i % links], model, (i // links) % spread, rows)
                                   for i in range(in_flight)))
        elapsed = time.perf_counter() - t0
        cpu, loop = _cpu_s(process) - cpu0, _cpu_s(main_thread) - loop0
        switches = _switches(main_status) - switches0
        batches = await _batches(remotes[0], model) - batches0
        frames = sum(r._link.frames_out for r in remotes) - frames0
        replies = sum(r._link.frames_in for r in remotes) - replies0
        results[key] = {
            "engine us/req": cpu / n * 1e6, "loop us/req": loop / n * 1e6,
            "p50 us": statistics.median(latencies) * 1e6 if latencies else float("nan"),
            "req/s": n / elapsed, "req/frame": n / max(frames, 1),
            "replies/frame": n / max(replies, 1), "loop switches/req": switches / n,
            "req/batch": n / max(batches, 1)}
    for remote in remotes:
        remote.close()
    await asyncio.to_thread(proc.wait, 30)  # the engine exits when its links close
    return results


async def _batches(remote: Any, model: str) -> int:
    """Batches the model's workers have run so far (the engine's Stats)."""
    (snapshot,) = (await remote.stats(model)).models
    return sum(w.batches for w in snapshot.workers)


# --- the comparison ----------------------------------------------------------------------

COLUMNS = ("engine us/req", "loop us/req", "p50 us", "req/s", "req/frame", "replies/frame",
           "loop switches/req", "req/batch")


def _run_tree(tree: str, requests: int, only: list[str]) -> dict[str, dict[str, float]]:
    out = subprocess.run([sys.executable, str(HERE), "--clients", tree, "--requests",
                          str(requests), *(["--only", *only] if only else [])],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{tree}: the benchmark failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", default=[str(HERE.parent.parent)])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=20000, help="per load scenario (c1: half)")
    p.add_argument("--only", nargs="*", default=[],
                   help="the scenarios whose names contain any of these, e.g. 'trt' '8x32'")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--clients", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    for key in ("link", "in", "out"):
        p.add_argument(f"--{key}-fds", type=int, nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine or args.clients:
        args.tree = args.engine or args.clients
        _use_tree(args.tree)
        from trtserve.service.server import loop_factory
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            if args.engine:
                profile = os.environ.get("ENGINE_LOOP_PROFILE")  # a path: cProfile's stats
                if profile:
                    import cProfile
                    with cProfile.Profile(time.thread_time) as profiler:
                        runner.run(_engine(args))
                    profiler.dump_stats(profile)
                else:
                    runner.run(_engine(args))
            else:
                print(json.dumps(runner.run(_clients(args))))
        return
    runs: dict[str, list[dict[str, dict[str, float]]]] = {t: [] for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            runs[tree].append(_run_tree(tree, args.requests, args.only))
    print(f"{'tree':<28} {'scenario':<16}" + "".join(f" {c:>20}" for c in COLUMNS))
    for tree, rounds in runs.items():
        for key in rounds[0]:
            cells = []
            for column in COLUMNS:
                values = [r[key][column] for r in rounds]
                digits = 2 if column == "loop switches/req" else 0
                cells.append(f"{statistics.median(values):>8.{max(digits, 1)}f} "
                             f"({min(values):.{digits}f}-{max(values):.{digits}f})")
            print(f"{tree[-28:]:<28} {key:<16}" + "".join(f" {c:>20}" for c in cells))


if __name__ == "__main__":
    main()

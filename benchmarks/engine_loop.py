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

Each TREE (default: this one) is run as it is, in fresh processes that import
its `trtserve.service` and `trtserve.client` (its folders service/ and client/,
whatever trtserve is installed), so that two trees (say, main and a branch) are
compared in one run: rounds interleave the trees, and the table
gives each figure's median over rounds and its spread (min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
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
LINKS = 2
IN_FLIGHT = 64
SCENARIOS = (("c1", "small"), ("c1", "large"), ("load", "small"), ("load", "large"))
FEATURES = {"small": 4, "large": 4096}
_TICKS = os.sysconf("SC_CLK_TCK")


def _use_tree(tree: str) -> None:
    """Import `trtserve.service` and `trtserve.client` from `tree`, whatever is installed.

    The packages are namespaced (`trtserve.service` is the folder service/), so the
    tree's folders are linked into a package `trtserve` of a fresh folder that goes
    first on sys.path; the installed trtserve (an editable install of another tree)
    is not used.
    """
    farm = Path(tempfile.mkdtemp(prefix="engine-loop-tree-")) / "trtserve"
    farm.mkdir()
    for part in ("service", "client"):
        (farm / part).symlink_to(Path(tree).resolve() / part, target_is_directory=True)
    atexit.register(shutil.rmtree, farm.parent, True)
    sys.path.insert(0, str(farm.parent))


def _cpu_s(path: str) -> float:
    with open(path, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --- the engine process ------------------------------------------------------------------

async def _engine(args: argparse.Namespace) -> None:
    from trtserve.service.config import ModelConfig, ServerConfig
    from trtserve.service.engine.host import EngineHost
    from trtserve.service.engine.local import LocalEngine
    from trtserve.service.engine.repository import ModelRepository
    from trtserve.service.ipc.shm import Arena

    repository = ModelRepository()
    for name, path in (("small", args.small), ("large", args.large)):
        await repository.load(ModelConfig(name=name, path=path, workers=1))
    host = EngineHost(LocalEngine(repository), ServerConfig())
    closed = []
    for i, (link_fd, in_fd, out_fd) in enumerate(zip(args.link_fds, args.in_fds, args.out_fds,
                                                      strict=True)):
        sock = socket.socket(fileno=link_fd)
        sock.setblocking(False)
        port = await host.attach(i, os.getppid(), sock, Arena(in_fd, ARENA_BYTES),
                                 Arena(out_fd, ARENA_BYTES))
        closed.append(port.closed)
    for model in ("small", "large", ""):
        host.set_health(model, True)
    await asyncio.gather(*closed)
    await repository.stop()


# --- the clients (as frontends) ----------------------------------------------------------

async def _clients(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import numpy as np

    from trtserve.service.engine.api import InferRequest, TensorIn
    from trtserve.service.engine.remote import RemoteEngine
    from trtserve.service.ipc.shm import Arena
    from trtserve.service.testing.onnx_models import offset_net

    tmp = Path(tempfile.mkdtemp())
    paths = {k: str(offset_net(tmp / f"{k}.onnx", 1.0, n)) for k, n in FEATURES.items()}
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
    command = [sys.executable, str(HERE), "--engine", args.tree, "--small", paths["small"],
               "--large", paths["large"]]
    for key in ("link", "in", "out"):
        command += [f"--{key}-fds", *map(str, fds[key])]
    proc = subprocess.Popen(command, pass_fds=[fd for v in fds.values() for fd in v],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for ours, theirs, inputs, outputs in keep:
        theirs.close()
        ours.setblocking(False)
        remote = RemoteEngine(inputs, outputs)
        await remote.connect(ours)
        remotes.append(remote)
    while not all(r.ready("small") and r.ready("large") for r in remotes):
        await asyncio.sleep(0.01)

    arrays = {k: np.ones((1, n), np.float32) for k, n in FEATURES.items()}

    def request(kind: str) -> Any:
        return InferRequest(model=kind, inputs={"input": TensorIn("FP32", (1, FEATURES[kind]),
                                                                  arrays[kind])})

    process = f"/proc/{proc.pid}/stat"
    main_thread = f"/proc/{proc.pid}/task/{proc.pid}/stat"
    results: dict[str, dict[str, float]] = {}
    only = os.environ.get("ENGINE_LOOP_ONLY")  # one scenario, e.g. "c1 large", to profile
    for mode, kind in SCENARIOS:
        if only and f"{mode} {kind}" != only:
            continue
        n = args.requests if mode == "load" else args.requests // 2
        # Warm up (the batcher, the arenas' rings, ONNX Runtime's first runs).
        await asyncio.gather(*(remotes[0].infer(request(kind)) for _ in range(50)))
        cpu0, loop0, t0 = _cpu_s(process), _cpu_s(main_thread), time.perf_counter()
        latencies: list[float] = []
        if mode == "c1":
            remote = remotes[0]
            for _ in range(n):
                start = time.perf_counter()
                await remote.infer(request(kind))
                latencies.append(time.perf_counter() - start)
        else:
            left = n

            async def client(remote: Any, kind: str) -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await remote.infer(request(kind))

            await asyncio.gather(*(client(remotes[i % LINKS], kind) for i in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - t0
        cpu, loop = _cpu_s(process) - cpu0, _cpu_s(main_thread) - loop0
        results[f"{mode} {kind}"] = {
            "engine us/req": cpu / n * 1e6, "loop us/req": loop / n * 1e6,
            "p50 us": statistics.median(latencies) * 1e6 if latencies else float("nan"),
            "req/s": n / elapsed}
    for remote in remotes:
        remote.close()
    await asyncio.to_thread(proc.wait, 30)  # the engine exits when its links close
    return results


# --- the comparison ----------------------------------------------------------------------

COLUMNS = ("engine us/req", "loop us/req", "p50 us", "req/s")


def _run_tree(tree: str, requests: int) -> dict[str, dict[str, float]]:
    out = subprocess.run([sys.executable, str(HERE), "--clients", tree, "--requests",
                          str(requests)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{tree}: the benchmark failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", default=[str(HERE.parent.parent)])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=20000, help="per load scenario (c1: half)")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--clients", help=argparse.SUPPRESS)
    p.add_argument("--small", help=argparse.SUPPRESS)
    p.add_argument("--large", help=argparse.SUPPRESS)
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
            runs[tree].append(_run_tree(tree, args.requests))
    print(f"{'tree':<28} {'scenario':<11}" + "".join(f" {c:>22}" for c in COLUMNS))
    for tree, rounds in runs.items():
        for mode, kind in SCENARIOS:
            key = f"{mode} {kind}"
            if key not in rounds[0]:  # not run (ENGINE_LOOP_ONLY)
                continue
            cells = []
            for column in COLUMNS:
                values = [r[key][column] for r in rounds]
                cells.append(f"{statistics.median(values):>8.1f} ({min(values):.0f}-"
                             f"{max(values):.0f})")
            print(f"{tree[-28:]:<28} {key:<11}" + "".join(f" {c:>22}" for c in cells))


if __name__ == "__main__":
    main()

"""What a request costs the server at concurrency 1 without the network, in one tree.

Runs the trtserve.v1 and KServe servicers' `_infer` (decode, validate, batch, run
inline, encode) on `example` (ONNX Runtime, 1 worker, 1 row of 64) and prints the
median over rounds of each round's p50. To compare two trees (say, main and a
branch), run it once per tree, alternately, from any directory:

    python benchmarks/seam_cost.py /path/to/tree-a
    python benchmarks/seam_cost.py /path/to/tree-b

Each tree is imported as it is (its `service` package first on sys.path); trees
from before the engine seam (frontends built from a repository) work too.
docs/reliability.md ("The engine seam") has the numbers it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


async def _measure(rounds: int, per_round: int) -> dict[str, float]:
    import numpy as np

    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
    from trtserve.service.config import ModelConfig
    from trtserve.service.example_model import write_example
    from trtserve.service.limits import ByteBudget

    try:
        repository_module = importlib.import_module("trtserve.service.engine.repository")
    except ImportError:  # a tree from before the engine package
        repository_module = importlib.import_module("service.repository")
    v1_module = importlib.import_module("trtserve.service.frontends.v1")
    kserve_module = importlib.import_module("trtserve.service.frontends.kserve")

    model = Path(tempfile.mkdtemp()) / "example.onnx"
    write_example(model)
    repository = repository_module.ModelRepository()
    await repository.load(ModelConfig(name="example", path=str(model), workers=1))
    budget = ByteBudget(0)
    v1: Any
    kserve: Any
    try:
        local = importlib.import_module("trtserve.service.engine.local")
        engine = local.LocalEngine(repository, budget)
        v1, kserve = v1_module.InferenceService(engine), kserve_module.KServeInferenceService(
            engine)
    except ImportError:  # frontends built from the repository
        v1 = v1_module.InferenceService(repository, budget)
        kserve = kserve_module.KServeInferenceService(repository, budget=budget)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    request = pb.InferRequest(model="example", id="1")
    request.inputs.add(name="input", dtype=pb.DATA_TYPE_FP32, shape=[1, 64], data=x.tobytes())
    krequest = kpb.ModelInferRequest(model_name="example", id="1")
    krequest.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    krequest.raw_input_contents.append(x.tobytes())
    calls = {"v1": lambda: v1._infer(request, None),
             "kserve": lambda: kserve._infer(krequest, None)}
    p50s: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(per_round):
            await call()
    for _ in range(rounds):
        for name, call in calls.items():
            took = []
            for _ in range(per_round):
                start = time.perf_counter()
                await call()
                took.append(time.perf_counter() - start)
            p50s[name].append(statistics.median(took) * 1e6)
    await repository.stop()
    return {name: statistics.median(values) for name, values in p50s.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="the checkout whose service package to time")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    result = asyncio.run(_measure(args.rounds, args.per_round))
    print(f"{args.tree}: " + "  ".join(f"{name} p50 {us:.1f} us" for name, us in result.items()))


if __name__ == "__main__":
    main()

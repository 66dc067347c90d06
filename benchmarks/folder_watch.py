"""How long a model put into the repository folder takes to serve, by watch interval.

    .venv/bin/python -m benchmarks.folder_watch [--intervals 0.1,0.5,1] [--models 5]

For each interval, serves a temporary repository folder (`server.model_repository`,
`server.model_watch_interval_s`) in this process over real gRPC, then puts
`--models` new models into it one after another, each written under a hidden name
and renamed into place (the way the docs recommend), and times from the rename
until `ListModels` says READY. The watch acts once two looks one interval apart
agree, so expect one to two intervals plus the load (a small ONNX model here).
Prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from trtserve.client.client import Client
from trtserve.service.testing.onnx_models import offset_net
from trtserve.service.testing.servers import running_server, server_config


def _time_to_ready(root: Path, interval_s: float, models: int, model: bytes) -> list[float]:
    times = []
    config = server_config(model_repository=str(root), model_watch_interval_s=interval_s)
    with running_server(config) as server, Client(server.url) as client:
        for i in range(models):
            name = f"m{i}"
            folder = root / name / "1"
            folder.mkdir(parents=True)
            staged = folder / ".model.onnx.partial"
            staged.write_bytes(model)
            start = time.monotonic()
            os.replace(staged, folder / "model.onnx")
            while {m.name: m.state for m in client.list_models()}.get(name) != "READY":
                time.sleep(0.002)
            times.append(time.monotonic() - start)
    for i in range(models):
        shutil.rmtree(root / f"m{i}")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--intervals", default="0.1,0.5,1",
                   help="watch intervals in seconds, comma-separated")
    p.add_argument("--models", type=int, default=5, help="models put in, per interval")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = offset_net(Path(tmp) / "plus1.onnx", 1.0).read_bytes()
        root = Path(tmp) / "repository"
        root.mkdir()
        print(f"{'interval s':>10} {'models':>6} {'min s':>7} {'median s':>8} {'max s':>7}")
        for interval in (float(x) for x in args.intervals.split(",")):
            times = sorted(_time_to_ready(root, interval, args.models, model))
            print(f"{interval:>10.2f} {len(times):>6} {times[0]:>7.2f} "
                  f"{times[len(times) // 2]:>8.2f} {times[-1]:>7.2f}")


if __name__ == "__main__":
    main()

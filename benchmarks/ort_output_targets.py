"""ONNX Runtime writing a request's output into its destination vs returning it and copying.

What the executor does for an output that goes to a system shared-memory region: for
a request alone in its batch, ONNX Runtime writes the output straight into the region
through an IOBinding (`OrtExecutor.run` with a HostTarget); the alternative is the plain
`run`, which returns a fresh array, then one copy into the region (what the engine did
before executors took destinations, and what it still does in a batch of several).
The model adds a constant to its input (y = x + 3), so the output's bytes dominate.
Prints the p50 of each, per output size, measured in one run:

    python -m benchmarks.ort_output_targets
    python -m benchmarks.ort_output_targets --sizes 64K,1M,16M --repeats 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from trtserve.service.backends.base import HostTarget
from trtserve.service.backends.onnxruntime import OrtExecutor
from trtserve.service.testing.onnx_models import offset_net

ROWS = 4


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _p50_us(run: object, repeats: int) -> float:
    assert callable(run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16K,256K,4M,16M",
                        help="output bytes per request (K, M suffixes)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"{'output':>8} {'run + copy us':>14} {'into target us':>15} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.sizes.split(","):
            nbytes = _size(text)
            features = max(1, nbytes // (ROWS * 4))
            path = offset_net(Path(tmp) / f"plus_{features}.onnx", 3.0, features)
            ex = OrtExecutor(str(path), threads=1, max_batch=ROWS)
            x = np.random.default_rng(0).standard_normal((ROWS, features)).astype(np.float32)
            region = np.zeros(x.nbytes, np.uint8)
            target = [{"output": HostTarget(region)}]

            def copied(ex: OrtExecutor = ex, x: np.ndarray = x,
                       region: np.ndarray = region) -> None:
                out = ex.run({"input": [x]}, ROWS).outputs["output"]
                region[:] = out.reshape(-1).view(np.uint8)

            def placed(ex: OrtExecutor = ex, x: np.ndarray = x,
                       target: list = target) -> None:  # type: ignore[type-arg]
                ex.run({"input": [x]}, ROWS, target)

            for warm in (copied, placed):
                _p50_us(warm, 5)
            a, b = _p50_us(copied, args.repeats), _p50_us(placed, args.repeats)
            print(f"{text:>8} {a:>14.1f} {b:>15.1f} {a / b:>6.2f}")
            ex.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

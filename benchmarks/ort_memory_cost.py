"""What the memory settings cost per batch: ONNX Runtime's CPU arena, glibc's mmap threshold.

Runs one ONNX Runtime session (one thread) in this process on the bundled
example MLP and on a small convolutional model at several sizes, and prints
the median of three timings per size. The setting is per process, so each
runs in its own process:

    for mode in arena default mmap4; do
        .venv/bin/python -m benchmarks.ort_memory_cost $mode; done

`arena`: ONNX Runtime's CPU arena on, glibc as it comes (trtserve before the
memory limits); `default`: arena off, glibc as it comes (trtserve's default);
`mmap4`: arena off, `malloc_mmap_threshold_bytes = 4 MiB`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trtserve.service.example_model import write_example
from trtserve.service.memory import tune_malloc
from trtserve.service.testing.onnx_models import conv_net

MODES = ("arena", "default", "mmap4")


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "default"
    if mode not in MODES:
        print(f"mode: one of {MODES}", file=sys.stderr)
        return 2
    if mode == "mmap4":
        tune_malloc(4 * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        example = str(write_example(Path(tmp) / "example.onnx"))
        conv = str(conv_net(Path(tmp) / "conv.onnx", dynamic_spatial=True))
        cases = [("example", example, (1, 64)), ("example", example, (64, 64)),
                 ("conv", conv, (1, 3, 64, 64)), ("conv", conv, (1, 3, 224, 224)),
                 ("conv", conv, (8, 3, 224, 224)), ("conv", conv, (1, 3, 512, 512))]
        for label, path, shape in cases:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.enable_cpu_mem_arena = mode == "arena"
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            runs = max(3, min(3000, int(2e6 / x.size)))
            session.run(None, {name: x})
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(runs):
                    session.run(None, {name: x})
                times.append((time.perf_counter() - start) / runs * 1e6)
            print(f"{mode:8s} {label:8s} {list(shape)!s:18s} {sorted(times)[1]:10.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

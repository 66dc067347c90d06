"""Writes the bundled example model: a small MLP with a dynamic batch dimension.

Generated in code so nothing large lives in git:
`python -m trtserve.service.example_model models/example.onnx`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def make_mlp(
    in_features: int = 64,
    hidden: int = 256,
    out_features: int = 16,
    layers: int = 2,
    seed: int = 0,
) -> onnx.ModelProto:
    """An MLP (Gemm+Relu per hidden layer, then Gemm), FP32, batch dimension dynamic."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, width = INPUT_NAME, in_features
    for i in range(layers):
        last = i == layers - 1
        out_w = out_features if last else hidden
        w = (rng.standard_normal((width, out_w)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(out_w) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        gemm_out = OUTPUT_NAME if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"]))
            prev = f"relu{i}"
        width = out_w
    graph = helper.make_graph(
        nodes,
        "example_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", out_features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # IR 8 keeps the model loadable by older ONNX Runtime and TensorRT parsers.
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_example(path: str | Path, **kwargs: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(make_mlp(**kwargs), str(path))
    return path


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "models/example.onnx"
    print(f"wrote {write_example(target)}")


if __name__ == "__main__":
    main()

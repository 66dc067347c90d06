"""Small ONNX models written in code for the tests, so nothing binary lives in git.

Every model has a dynamic batch dimension named "batch", opset 17 and IR version 8
(the newest IR that older ONNX Runtime and TensorRT parsers still load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtserve.service.example_model import write_example

OPSET = 17
IR_VERSION = 8

CONV_INPUT = "image"
CONV_OUTPUT = "logits"


def _save(model: onnx.ModelProto, path: str | Path) -> Path:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _conv3x3(inputs: list[str], name: str) -> onnx.NodeProto:
    """A 3x3 Conv with bias and 'same' padding; its output tensor is named like the node."""
    return helper.make_node(
        "Conv", inputs, [name], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )


def mlp(
    path: str | Path,
    in_features: int = 32,
    hidden: int = 64,
    out_features: int = 8,
    seed: int = 0,
) -> Path:
    """Gemm+Relu then Gemm: input [batch, in_features] -> output [batch, out_features], FP32.

    The bundled example's generator, smaller by default.
    """
    return write_example(path, in_features=in_features, hidden=hidden,
                         out_features=out_features, layers=2, seed=seed)


def conv_net(
    path: str | Path,
    channels: int = 3,
    height: int = 16,
    width: int = 16,
    classes: int = 10,
    seed: int = 0,
    dynamic_spatial: bool = False,
    spatial_names: tuple[str, str] = ("height", "width"),
) -> Path:
    """Two Conv(+bias)+Relu blocks, GlobalAveragePool, Flatten, Gemm.

    Input [batch, channels, height, width] -> output [batch, classes], FP32. The Conv
    nodes carry a bias and feed a Relu, the pattern TensorRT fuses into one kernel,
    so the builder has fusions to report. With `dynamic_spatial`, height and width are
    dynamic too, named `spatial_names`, for builds that need shape ranges (exporters
    often write ("?", "?"); one name for both says they are equal).
    """
    rng = np.random.default_rng(seed)
    c1, c2 = 8, 16
    inits = [
        numpy_helper.from_array(_weights(rng, (c1, channels, 3, 3), channels * 9), "conv0_w"),
        numpy_helper.from_array(_weights(rng, (c1,), 1) * 0.1, "conv0_b"),
        numpy_helper.from_array(_weights(rng, (c2, c1, 3, 3), c1 * 9), "conv1_w"),
        numpy_helper.from_array(_weights(rng, (c2,), 1) * 0.1, "conv1_b"),
        numpy_helper.from_array(_weights(rng, (c2, classes), c2), "fc_w"),
        numpy_helper.from_array(_weights(rng, (classes,), 1) * 0.1, "fc_b"),
    ]
    nodes = [
        _conv3x3([CONV_INPUT, "conv0_w", "conv0_b"], "conv0"),
        helper.make_node("Relu", ["conv0"], ["relu0"], name="relu0"),
        _conv3x3(["relu0", "conv1_w", "conv1_b"], "conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [CONV_OUTPUT], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [
            helper.make_tensor_value_info(
                CONV_INPUT,
                TensorProto.FLOAT,
                ["batch", channels, *spatial_names]
                if dynamic_spatial
                else ["batch", channels, height, width],
            )
        ],
        [helper.make_tensor_value_info(CONV_OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


VAD_INPUTS = ("audio", "state", "sr")
VAD_OUTPUTS = ("prob", "new_state")


def vad(path: str | Path, seed: int = 0) -> Path:
    """A voice-activity model shaped like the real one, whose batch is not one axis.

    Inputs: audio [N, 512] FP32, a recurrent state [2, N, 128] FP32 (its batch on
    axis 1) and a scalar sample rate [] INT64. Outputs: prob [N, 1] and the new
    state [2, N, 128]. prob = sigmoid(audio @ w + sr * 1e-5); new_state =
    tanh(0.5 * state + mean(audio, axis 1)), so every input reaches an output.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_weights(rng, (512, 1), 512), "w"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "sr_scale"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["audio", "w"], ["logit"]),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sr_f", "sr_scale"], ["sr_term"]),
        helper.make_node("Add", ["logit", "sr_term"], ["biased"]),
        helper.make_node("Sigmoid", ["biased"], ["prob"]),
        helper.make_node("ReduceMean", ["audio"], ["level"], axes=[1], keepdims=1),  # [N, 1]
        helper.make_node("Unsqueeze", ["level", "axis0"], ["level3"]),  # [1, N, 1]
        helper.make_node("Mul", ["state", "half"], ["decayed"]),
        helper.make_node("Add", ["decayed", "level3"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["new_state"]),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 512]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 128]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "N", 128])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


OCR_INPUT = "image"
OCR_OUTPUT = "logits"


def ctc_ocr(path: str | Path, classes: int = 40, seed: int = 0) -> Path:
    """A CTC OCR model fixed at batch 1 whose output comes out in another shape than declared.

    Input [1, 1, 64, W] FP32 (W dynamic). The output is declared [1, seqlen] but
    comes out [W, 1, classes], as the real model's does (ONNX Runtime only
    warns): mean over the height, time first, then a projection to the classes.
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_weights(rng, (1, classes), 1), "proj")]
    nodes = [
        helper.make_node("ReduceMean", [OCR_INPUT], ["column"], axes=[2], keepdims=0),  # [1,1,W]
        helper.make_node("Transpose", ["column"], ["time_major"], perm=[2, 0, 1]),  # [W,1,1]
        helper.make_node("MatMul", ["time_major", "proj"], [OCR_OUTPUT]),  # [W,1,classes]
    ]
    graph = helper.make_graph(
        nodes, "ctc_ocr",
        [helper.make_tensor_value_info(OCR_INPUT, TensorProto.FLOAT, [1, 1, 64, "W"])],
        [helper.make_tensor_value_info(OCR_OUTPUT, TensorProto.FLOAT, [1, "seqlen"])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


TILES_INPUT = "image"
TILES_OUTPUT = "tiles"
TILE_PIXELS = 1024


def tiled_net(path: str | Path) -> Path:
    """Image [batch, 1, height, width] -> tiles [batch, pixels / 1024, 1024], doubled, FP32.

    Height and width are dynamic, so validation accepts any size, but the
    Reshape into tiles of 1024 pixels works only when height x width is a
    multiple of 1024 (32x32, 64x64, 640x640; not 1x1, 3x3 or 321x321): a model
    that fails on some dynamic sizes, as real vision models do (a YOLO model at
    321x321, an OCR detector at 333x517).
    """
    tile = numpy_helper.from_array(np.array([0, -1, TILE_PIXELS], np.int64), "tile_shape")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Reshape", [TILES_INPUT, "tile_shape"], ["flat_tiles"], name="tile"),
        helper.make_node("Mul", ["flat_tiles", "two"], [TILES_OUTPUT], name="double"),
    ]
    graph = helper.make_graph(
        nodes, "tiled_net",
        [helper.make_tensor_value_info(TILES_INPUT, TensorProto.FLOAT,
                                       ["batch", 1, "height", "width"])],
        [helper.make_tensor_value_info(TILES_OUTPUT, TensorProto.FLOAT,
                                       ["batch", "tiles", TILE_PIXELS])],
        [tile, two],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


LOOKUP_INPUT = "ids"
LOOKUP_OUTPUT = "vectors"
LOOKUP_ROWS = 10
LOOKUP_WIDTH = 8


def lookup_table() -> np.ndarray:
    """The embedding table of `lookup_net`: row i holds 8 copies of i + 0.5."""
    return np.repeat(np.arange(LOOKUP_ROWS, dtype=np.float32)[:, None] + 0.5, LOOKUP_WIDTH, 1)


def lookup_net(path: str | Path, ids: int = 4) -> Path:
    """Ids INT64 [batch, ids] -> vectors [batch, ids, 8] from a table of 10 rows (Gather).

    An id outside [-10, 9] makes the Gather fail: a failure that follows one
    request's values, so it can share a batch with good requests of the same shape.
    """
    table = numpy_helper.from_array(lookup_table(), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", LOOKUP_INPUT], [LOOKUP_OUTPUT], name="lookup")],
        "lookup_net",
        [helper.make_tensor_value_info(LOOKUP_INPUT, TensorProto.INT64, ["batch", ids])],
        [helper.make_tensor_value_info(LOOKUP_OUTPUT, TensorProto.FLOAT,
                                       ["batch", ids, LOOKUP_WIDTH])],
        [table],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def offset_net(path: str | Path, offset: float, features: int = 4) -> Path:
    """input [batch, features] FP32 -> output = input + `offset`: two files with different
    offsets are two versions of one model whose answers tell which one ran."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", features])
    constant = numpy_helper.from_array(np.full((1, features), offset, np.float32), "offset")
    graph = helper.make_graph([helper.make_node("Add", ["input", "offset"], ["output"])],
                              "offset", [x], [y], [constant])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _save(model, path)


FOLD_INPUT = "values"
FOLD_OUTPUT = "pairs"
FOLD_WIDTH = 16


def folding_net(path: str | Path) -> Path:
    """values [batch, n] -> pairs [batch, 2, 8], FP32: a Reshape to [-1, 2, 8].

    `n` is dynamic, so validation accepts any width, but only n = 16 gives one row
    of output per row of input: at n = 32 the Reshape *succeeds* with twice the rows
    (at n = 8, half), so the model answers with another batch size than it was given.
    Slicing such an output by rows would hand requests each other's answers.
    """
    shape = numpy_helper.from_array(np.array([-1, 2, 8], np.int64), "pair_shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", [FOLD_INPUT, "pair_shape"], [FOLD_OUTPUT], name="fold")],
        "folding_net",
        [helper.make_tensor_value_info(FOLD_INPUT, TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info(FOLD_OUTPUT, TensorProto.FLOAT, ["batch", 2, 8])],
        [shape],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def expand_net(path: str | Path, width: int) -> Path:
    """input [batch, 1] FP32 -> output [batch, width], every element the row's input: a few
    bytes in, `width` * 4 bytes out per row (for answers far larger than requests)."""
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "width")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["input", "width"], ["output"])],
        "expand_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        [shape],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)

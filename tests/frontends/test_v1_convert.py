"""trtserve.v1 answers: which outputs, in which order, and a named output that does not exist."""

import numpy as np
import pytest

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.backends.base import ModelSpec
from trtserve.service.engine.api import InferResult, TensorOut
from trtserve.service.errors import TensorError
from trtserve.service.frontends.v1_convert import check_outputs, encode_outputs
from trtserve.service.tensors import TensorSpec

SPEC = ModelSpec("onnxruntime", "onnxruntime_onnx", (TensorSpec("x", "FP32", (-1, 2)),),
                 (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1, 1))), 8)
OUTPUTS = {"a": np.arange(4, dtype=np.float32).reshape(2, 2),
           "b": np.array([[7], [9]], dtype=np.int64)}


def _answer(*names: str) -> pb.InferResponse:
    """What trtserve.v1 answers: the outputs the engine picks (wanted_outputs), encoded."""
    request = pb.InferRequest(model="m", id="r", outputs=list(names))
    result = InferResult("m", "1", {t.name: TensorOut(t.dtype, OUTPUTS[t.name].shape,
                                                      OUTPUTS[t.name])
                                    for t in check_outputs(request, SPEC)})
    return encode_outputs(request, result)


def test_no_named_output_answers_every_output_in_the_models_order():
    response = _answer()
    assert response.id == "r" and [t.name for t in response.outputs] == ["a", "b"]
    b = response.outputs[1]
    assert b.dtype == pb.DATA_TYPE_INT64 and list(b.shape) == [2, 1]
    assert np.frombuffer(b.data, np.int64).tolist() == [7, 9]


def test_named_outputs_are_answered_alone_and_in_the_requests_order():
    assert [t.name for t in _answer("b").outputs] == ["b"]
    assert [t.name for t in _answer("b", "a").outputs] == ["b", "a"]


def test_an_output_the_model_lacks_is_refused_by_name_before_execution():
    request = pb.InferRequest(model="m", outputs=["a", "nope"])
    with pytest.raises(TensorError, match=r"nope.*unknown output.*'a', 'b'"):
        check_outputs(request, SPEC)

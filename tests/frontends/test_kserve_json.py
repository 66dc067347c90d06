"""kserve_json: HTTP bodies of KServe v2 (JSON tensors, Triton's binary extension) and
protobuf messages written as Triton's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.client.gen.inference import model_config_pb2 as mc
from trtserve.service.engine.api import InferResult, RegionRef, TensorOut
from trtserve.service.errors import InvalidArgument, TensorError
from trtserve.service.frontends import kserve_json as kjson


def _body(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_json_data_of_every_family_decodes_to_its_dtype():
    request = kjson.parse_infer(_body(
        {"name": "h", "shape": [2], "datatype": "FP16", "data": [0.5, 1]},
        {"name": "b", "shape": [1, 2], "datatype": "BOOL", "data": [[True, False]]},
        {"name": "u", "shape": [2], "datatype": "UINT8", "data": [0, 255]},
        {"name": "e", "shape": [0, 3], "datatype": "INT32", "data": []},
    ), None)
    arrays = {name: t.data for name, t in request.inputs.items()}
    assert arrays["h"].dtype == np.float16 and arrays["h"].tolist() == [0.5, 1.0]
    assert arrays["b"].dtype == np.bool_ and arrays["b"].shape == (1, 2)
    assert arrays["u"].dtype == np.uint8 and arrays["u"].tolist() == [0, 255]
    assert arrays["e"].shape == (0, 3)


@pytest.mark.parametrize(("tensor", "problem"), [
    ({"name": "t", "shape": [2], "datatype": "BF16", "data": [1, 2]}, "binary data"),
    ({"name": "t", "shape": [2], "datatype": "UINT8", "data": [0, 256]}, "not UINT8"),
    ({"name": "t", "shape": [2], "datatype": "BOOL", "data": [1, 0]}, "not BOOL"),
    ({"name": "t", "shape": [2, 2], "datatype": "FP32", "data": [[1], [2, 3]]}, "ragged"),
    ({"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}, "not supported"),
    ({"name": "t", "shape": [-1], "datatype": "FP32", "data": []}, "negative"),
    ({"name": "t", "shape": [1], "datatype": "FP32", "data": [1],
      "parameters": {"shared_memory_region": "r"}}, "shared_memory_byte_size is required"),
    ({"name": "t", "shape": [1], "datatype": "FP32", "data": [1],
      "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}},
     "shared_memory_region' and also 'data'"),
    ({"name": "t", "shape": [1], "datatype": "FP32",
      "parameters": {"shared_memory_offset": 4}}, "without shared_memory_region"),
])
def test_bad_json_tensors_name_the_tensor(tensor, problem):
    with pytest.raises(TensorError, match=problem) as err:
        kjson.parse_infer(_body(tensor), None)
    assert err.value.tensor == "t"


def test_binary_inputs_are_read_in_order_without_copies():
    a, b = np.arange(4, dtype=np.float32), np.arange(3, dtype=np.int64)
    header = _body({"name": "a", "shape": [4], "datatype": "FP32",
                    "parameters": {"binary_data_size": a.nbytes}},
                   {"name": "j", "shape": [1], "datatype": "INT8", "data": [7]},
                   {"name": "b", "shape": [3], "datatype": "INT64",
                    "parameters": {"binary_data_size": b.nbytes}})
    body = header + a.tobytes() + b.tobytes()
    request = kjson.parse_infer(body, kjson.header_length(str(len(header)), len(body)))
    np.testing.assert_array_equal(request.inputs["a"].data, a)
    np.testing.assert_array_equal(request.inputs["b"].data, b)
    assert request.inputs["j"].data.tolist() == [7]
    assert not request.inputs["a"].data.flags.owndata  # a view of the body


def test_checks_see_names_and_shapes_before_data_is_decoded():
    seen = []

    def check(tensors):
        seen.extend((t.name, t.shape) for t in tensors)
        raise TensorError("x", "refused first")

    with pytest.raises(TensorError, match="refused first"):
        kjson.parse_infer(_body({"name": "x", "shape": [2], "datatype": "FP32",
                                 "data": [1, "not a number"]}), None, check=check)
    assert seen == [("x", (2,))]


def test_outputs_plan_follows_binary_data_output_and_refuses_bf16_as_json():
    outputs = {"y": "FP32", "z": "BF16"}
    default = kjson.parse_infer(_body(parameters={"binary_data_output": True}), None)
    assert kjson.plan_outputs(default, outputs) == (
        kjson.RequestedOutput("y", True), kjson.RequestedOutput("z", True))
    mixed = kjson.parse_infer(_body(outputs=[{"name": "z"},
                                             {"name": "y", "parameters": {"binary_data": True}}],
                                    parameters={"binary_data_output": True}), None)
    assert [(o.name, o.binary) for o in kjson.plan_outputs(mixed, outputs)] == \
        [("z", True), ("y", True)]
    as_json = kjson.parse_infer(_body(outputs=[{"name": "z"}]), None)
    with pytest.raises(TensorError, match="BF16 has no JSON form"):
        kjson.plan_outputs(as_json, outputs)


def test_encoded_answer_puts_binary_outputs_after_the_json_header():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = np.array([True, False])
    result = InferResult("m", "1", {"y": TensorOut("FP32", (2, 3), y),
                                    "z": TensorOut("BOOL", (2,), z)})
    parts, length = kjson.encode_infer("id-9", result, (kjson.RequestedOutput("y", True),
                                                        kjson.RequestedOutput("z", False)))
    body = b"".join(parts)
    header = json.loads(body[:length])
    assert header["id"] == "id-9" and header["model_version"] == "1"
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert header["outputs"][1]["data"] == [True, False]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(2, 3), y)
    _, none = kjson.encode_infer("", result, (kjson.RequestedOutput("z", False),))
    assert none is None


@pytest.mark.parametrize("value", ["-1", "abc", "1000"])
def test_a_bad_header_length_is_refused(value):
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length"):
        kjson.header_length(value, 999)


def test_messages_are_written_as_triton_writes_them():
    config = mc.ModelConfig(name="m", max_batch_size=0, input=[
        mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[-1, 2**40])])
    written = kjson.message_json(config)
    assert written["max_batch_size"] == 0  # a default, still written
    assert written["input"][0]["dims"] == [-1, 2**40]  # int64 as numbers, not strings
    assert written["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" not in written  # an unset choice of a oneof stays out
    assert written["optimization"]["priority"] == "PRIORITY_DEFAULT"  # unset: defaults
    stats = pb.ModelStatistics(name="m", inference_count=5, inference_stats=pb.InferStatistics(
        success=pb.StatisticDuration(count=1, ns=2)))
    assert kjson.message_json(stats)["inference_stats"]["queue"] == {"count": 0, "ns": 0}
    params = pb.ModelInferResponse(parameters={"k": pb.InferParameter(int64_param=3)})
    assert kjson.message_json(params)["parameters"] == {"k": {"int64_param": 3}}


def test_region_tensors_become_references_and_region_outputs_are_described():
    request = kjson.parse_infer(_body({"name": "t", "shape": [2], "datatype": "FP32",
                                       "parameters": {"shared_memory_region": "r",
                                                      "shared_memory_offset": 8,
                                                      "shared_memory_byte_size": 8}}), None)
    assert request.inputs["t"].data == RegionRef("r", 8, 8)
    parsed = kjson.parse_infer(json.dumps({"inputs": [], "outputs": [
        {"name": "o", "parameters": {"shared_memory_region": "out",
                                     "shared_memory_byte_size": 4, "binary_data": False}}]}
                   ).encode(), None)
    # BF16 has no JSON form, but a region output needs none.
    plan = kjson.plan_outputs(parsed, {"o": "BF16"})
    assert kjson.output_regions(plan) == {"o": RegionRef("out", 0, 4)}
    result = InferResult("m", "1", {"o": TensorOut("BF16", (2,), RegionRef("out", 0, 4))})
    parts, length = kjson.encode_infer("", result, plan)
    assert length is None
    [output] = json.loads(parts[0])["outputs"]
    # Described only, as Triton answers (perf_analyzer reads binary_data_size from any
    # output that carries parameters).
    assert output == {"name": "o", "datatype": "BF16", "shape": [2]}


def test_a_cuda_handle_in_base64_with_line_breaks_is_read():
    """Triton's C++ client (perf_analyzer) encodes with libb64, which breaks lines every
    72 characters; a strict decoder refused every CUDA region it registered."""
    import base64

    handle = bytes(range(64))
    encoded = base64.b64encode(handle).decode()
    wrapped = encoded[:72] + "\n" + encoded[72:] + "\n"
    raw, device, size = kjson.cuda_register({"raw_handle": {"b64": wrapped},
                                             "device_id": 0, "byte_size": 128})
    assert (raw, device, size) == (handle, 0, 128)


def test_non_finite_floats_travel_as_triton_writes_and_reads_them():
    # Triton's JSON (rapidjson with kParseNanAndInfFlag / kWriteNanAndInfFlag) reads and
    # writes the bare tokens NaN, Infinity and -Infinity; tritonclient.http parses them.
    request = kjson.parse_infer(
        b'{"inputs":[{"name":"x","shape":[3],"datatype":"FP32",'
        b'"data":[NaN,Infinity,-Infinity]}]}', None)
    x = request.inputs["x"].data
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf
    y = np.array([np.nan, np.inf, -np.inf], np.float32)
    result = InferResult("m", "1", {"y": TensorOut("FP32", (3,), y)})
    parts, _ = kjson.encode_infer("", result, (kjson.RequestedOutput("y", False),))
    body = b"".join(parts)
    assert b'"data":[NaN,Infinity,-Infinity]' in body
    rapidjson = pytest.importorskip("rapidjson")  # tritonclient.http's parser
    [output] = rapidjson.loads(body)["outputs"]
    assert np.isnan(output["data"][0]) and output["data"][1:] == [np.inf, -np.inf]


def test_a_float_past_its_range_is_inf_without_a_warning_and_long_integers_are_refused():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning went to stderr per request
        request = kjson.parse_infer(_body(
            {"name": "f", "shape": [2], "datatype": "FP32", "data": [1e39, -1e39]},
            {"name": "h", "shape": [1], "datatype": "FP16", "data": [1e6]}), None)
    assert request.inputs["f"].data.tolist() == [np.inf, -np.inf]
    assert request.inputs["h"].data.tolist() == [np.inf]
    with pytest.raises(InvalidArgument, match="more than 4300 digits"):
        kjson.parse_infer(b'{"inputs":[{"name":"i","shape":[1],"datatype":"INT64","data":['
                          + b"9" * 4301 + b"]}]}", None)


def test_uint64_data_mixing_small_and_past_2_63_keeps_every_value():
    # numpy makes [0, 2**64 - 1] float64 (no integer type holds both signs' ranges).
    request = kjson.parse_infer(_body(
        {"name": "u", "shape": [3], "datatype": "UINT64", "data": [0, 2**64 - 1, 2**63]}), None)
    assert request.inputs["u"].data.tolist() == [0, 2**64 - 1, 2**63]
    for bad in ([-1, 2**64 - 1], [2**64, 1], [0.5, 2**64 - 1]):
        with pytest.raises(TensorError, match="not UINT64"):
            kjson.parse_infer(_body(
                {"name": "u", "shape": [2], "datatype": "UINT64", "data": bad}), None)

"""trtserve.service.frontends.kserve_convert against the real tritonclient.

Requests are built by tritonclient (InferInput.set_data_from_numpy,
InferRequestedOutput, its own request builder and its own message classes)
and our responses are read back by tritonclient's InferResult. tritonclient's
side runs in a child interpreter and only serialized messages cross over:
exactly what travels on the wire between a tritonclient user and trtserve.
(tests/frontends/test_tritonclient.py drives a live server with tritonclient
in this process, which trtserve's private descriptor pool allows.)
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.service.engine.api import RegionRef, TensorOut
from trtserve.service.errors import InvalidArgument
from trtserve.service.frontends.kserve_convert import (
    KSERVE_DATATYPES,
    TensorError,
    check_requested_outputs,
    decode_inputs,
    encode_outputs,
    output_regions,
    to_kserve_datatype,
    to_numpy_dtype,
)

# ---------------------------------------------------------------------------
# The tritonclient side, run in a child interpreter. It reads (job, payload)
# pickled on stdin and writes the result pickled on stdout. BF16 crosses as
# uint16 bit patterns; tritonclient itself wants ml_dtypes.bfloat16 arrays.
# ---------------------------------------------------------------------------

_TRITONCLIENT_SIDE = r'''
import pickle, sys
import ml_dtypes
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

def as_triton(datatype, array):
    return array.view(ml_dtypes.bfloat16) if datatype == "BF16" else array

def raw_request(case):
    inputs = []
    for name, datatype, array in case["inputs"]:
        infer_input = tc.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(as_triton(datatype, array))
        inputs.append(infer_input)
    outputs = None
    if case.get("outputs") is not None:
        outputs = []
        for name, binary in case["outputs"]:
            requested = tc.InferRequestedOutput(name)
            if binary is not None:
                requested._get_tensor().parameters["binary_data"].bool_param = binary
            outputs.append(requested)
    request = _get_inference_request(
        model_name="m", inputs=inputs, model_version="", request_id="req-1",
        outputs=outputs, sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=None, parameters=None)
    return request.SerializeToString()

def typed_request(case):
    request = service_pb2.ModelInferRequest(model_name="m")
    for name, datatype, array, field in case["inputs"]:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        getattr(tensor.contents, field).extend(array.ravel().tolist())
    return request.SerializeToString()

def read_response(data):
    response = service_pb2.ModelInferResponse.FromString(data)
    result = tc.InferResult(response)
    read = {"model_name": response.model_name, "model_version": response.model_version,
            "id": response.id, "order": [o.name for o in response.outputs], "outputs": {}}
    for index, output in enumerate(response.outputs):
        entry = {"datatype": output.datatype, "shape": list(output.shape)}
        if index < len(response.raw_output_contents):
            array = result.as_numpy(output.name)
            entry["raw"] = array.view(np.uint16) if output.datatype == "BF16" else array
        else:
            entry["typed"] = {field.name: list(values)
                              for field, values in output.contents.ListFields()}
        read["outputs"][output.name] = entry
    return read

job, payload = pickle.load(sys.stdin.buffer)
work = {"raw_requests": raw_request, "typed_requests": typed_request,
        "read_responses": read_response}[job]
pickle.dump([work(item) for item in payload], sys.stdout.buffer)
'''


def tritonclient(job: str, payload: list[Any]) -> list[Any]:
    done = subprocess.run([sys.executable, "-c", _TRITONCLIENT_SIDE],
                          input=pickle.dumps((job, payload)), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    result: list[Any] = pickle.loads(done.stdout)
    assert len(result) == len(payload)
    return result


# ---------------------------------------------------------------------------
# Data: every supported datatype, with its extremes.
# ---------------------------------------------------------------------------

SUPPORTED = [d for d in KSERVE_DATATYPES if d != "BYTES"]
TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random data of `datatype` whose first elements are the type's extremes."""
    rng = np.random.default_rng(seed)
    dtype = to_numpy_dtype(datatype)
    count = int(np.prod(shape))
    if datatype == "BOOL":
        flat = rng.integers(0, 2, count).astype(bool)
    elif datatype == "BF16":
        # Bit patterns of real bfloat16 values: the top halves of FP32 ones.
        values = np.concatenate([[np.inf, -np.inf, -0.0, 3.0e38],
                                 rng.standard_normal(count)])[:count].astype(np.float32)
        flat = (values.view(np.uint32) >> 16).astype(np.uint16)
    elif dtype.kind == "f":
        finfo = np.finfo(dtype)
        specials = np.array([finfo.max, finfo.min, finfo.tiny, -0.0, np.inf, -np.inf], dtype)
        flat = np.concatenate([specials, rng.standard_normal(count).astype(dtype)])[:count]
    else:
        info = np.iinfo(dtype)
        edges = np.array([info.min, info.max, 0], dtype)
        randoms = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        flat = np.concatenate([edges, randoms])[:count]
    return flat.astype(dtype).reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # Bit-for-bit: NaN payloads and -0.0 included.
    assert actual.tobytes() == expected.tobytes(), f"{what}: data differs"


def raw_request(*inputs: tuple[str, str, np.ndarray]) -> pb.ModelInferRequest:
    """A raw-contents request built with our own classes, for error cases."""
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, array in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


# ---------------------------------------------------------------------------
# Datatype table
# ---------------------------------------------------------------------------


def test_datatype_table_covers_the_protocol() -> None:
    for datatype in SUPPORTED:
        dtype = to_numpy_dtype(datatype)
        assert dtype.byteorder in ("=", "<", "|")
        expected = "UINT16" if datatype == "BF16" else datatype
        assert to_kserve_datatype(dtype) == expected
    assert to_numpy_dtype("BF16") == np.dtype(np.uint16)
    with pytest.raises(ValueError, match="BYTES"):
        to_numpy_dtype("BYTES")
    with pytest.raises(ValueError, match="unknown datatype 'FLOAT32'"):
        to_numpy_dtype("FLOAT32")
    with pytest.raises(ValueError):
        to_kserve_datatype(np.complex64)


# ---------------------------------------------------------------------------
# Decoding requests built by tritonclient
# ---------------------------------------------------------------------------


def test_raw_inputs_from_tritonclient_every_datatype() -> None:
    shapes = [(2, 3), (), (0, 4), (1, 2, 3, 2)]
    cases = [(datatype, shape) for datatype in SUPPORTED for shape in shapes]
    built = tritonclient("raw_requests", [
        {"inputs": [("x", datatype, sample(datatype, shape))]} for datatype, shape in cases])
    for (datatype, shape), data in zip(cases, built, strict=True):
        request = pb.ModelInferRequest.FromString(data)
        assert len(request.raw_input_contents) == 1  # tritonclient sends raw
        arrays = decode_inputs(request)
        assert list(arrays) == ["x"]
        assert_same(arrays["x"], sample(datatype, shape), f"{datatype}{list(shape)}")
        # Zero-copy: a read-only view over the request's bytes, not a copy.
        assert not arrays["x"].flags.owndata
        assert not arrays["x"].flags.writeable


def test_raw_inputs_from_tritonclient_several_tensors_keep_their_order() -> None:
    inputs = [("b", "FP16", sample("FP16", (4, 2), 1)),
              ("a", "INT64", sample("INT64", (4,), 2)),
              ("c", "BF16", sample("BF16", (4, 8), 3))]
    (data,) = tritonclient("raw_requests", [{"inputs": inputs}])
    arrays = decode_inputs(pb.ModelInferRequest.FromString(data))
    assert list(arrays) == ["b", "a", "c"]
    for name, _, expected in inputs:
        assert_same(arrays[name], expected, name)


def test_typed_inputs_from_tritonclient_messages_every_typed_datatype() -> None:
    shapes = [(3, 5), (), (2, 0)]
    cases = [(datatype, shape) for datatype in TYPED_FIELD for shape in shapes]
    built = tritonclient("typed_requests", [
        {"inputs": [("t", datatype, sample(datatype, shape, 7), TYPED_FIELD[datatype])]}
        for datatype, shape in cases])
    for (datatype, shape), data in zip(cases, built, strict=True):
        request = pb.ModelInferRequest.FromString(data)
        assert not request.raw_input_contents
        arrays = decode_inputs(request)
        assert_same(arrays["t"], sample(datatype, shape, 7), f"typed {datatype}{list(shape)}")


# ---------------------------------------------------------------------------
# Encoding responses read by tritonclient
# ---------------------------------------------------------------------------


def test_raw_outputs_read_by_tritonclient_every_datatype() -> None:
    shapes = [(4, 3), (), (0, 2)]
    cases = [(datatype, shape) for datatype in SUPPORTED for shape in shapes]
    request = pb.ModelInferRequest(model_name="m")  # no requested outputs: all of them
    responses = []
    for datatype, shape in cases:
        outputs = {"y": sample(datatype, shape, 11)}
        response = encode_outputs(request, outputs, "m", "1", "req-9",
                                  datatypes={"y": datatype})
        responses.append(response.SerializeToString())
    for (datatype, shape), read in zip(cases, tritonclient("read_responses", responses),
                                       strict=True):
        assert (read["model_name"], read["model_version"], read["id"]) == ("m", "1", "req-9")
        entry = read["outputs"]["y"]
        assert entry["datatype"] == datatype
        assert entry["shape"] == list(shape)
        assert_same(entry["raw"], sample(datatype, shape, 11), f"output {datatype}{list(shape)}")


def test_outputs_tritonclient_cannot_send_as_is() -> None:
    # Big-endian and non-contiguous arrays from a backend still reach the
    # client as the right little-endian, row-major values.
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    outputs = {"be": values.astype(">f4"), "t": values.T, "s": values[:, ::2]}
    response = encode_outputs(pb.ModelInferRequest(), outputs, "m", "", "")
    (read,) = tritonclient("read_responses", [response.SerializeToString()])
    assert read["order"] == ["be", "t", "s"]  # nothing requested: all, in the model's order
    assert_same(read["outputs"]["be"]["raw"], values, "big-endian")
    assert_same(read["outputs"]["t"]["raw"], np.ascontiguousarray(values.T), "transposed")
    assert_same(read["outputs"]["s"]["raw"], np.ascontiguousarray(values[:, ::2]), "strided")


def test_ml_dtypes_bfloat16_output_is_sent_as_bf16() -> None:
    # A backend may hand back ml_dtypes.bfloat16 arrays (numpy's bfloat16 of
    # choice); they go out as BF16 with the same bits as the uint16 form.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = sample("BF16", (2, 3), 17)
    response = encode_outputs(pb.ModelInferRequest(), {"y": bits.view(ml_dtypes.bfloat16)},
                              "m", "", "")
    assert response.outputs[0].datatype == "BF16"
    assert response.raw_output_contents[0] == bits.tobytes()


def test_requested_outputs_subset_order_and_binary_false_through_tritonclient() -> None:
    model_outputs = {
        "probs": sample("FP32", (2, 5), 1),
        "labels": sample("INT64", (2,), 2),
        "mask": sample("BOOL", (2, 5), 3),
        "half": sample("FP16", (2, 5), 4),
        "small": sample("UINT8", (2, 3), 5),
    }
    x = ("x", "FP32", sample("FP32", (2, 5)))
    built = tritonclient("raw_requests", [
        # A subset, in an order unlike the model's.
        {"inputs": [x], "outputs": [("half", None), ("probs", None)]},
        # binary_data false on two outputs, explicit true on one.
        {"inputs": [x], "outputs": [("labels", False), ("half", True), ("mask", False),
                                    ("small", False)]},
    ])
    subset_request, typed_request = (pb.ModelInferRequest.FromString(b) for b in built)
    subset = encode_outputs(subset_request, model_outputs, "m", "3", subset_request.id)
    typed = encode_outputs(typed_request, model_outputs, "m", "3", typed_request.id)
    read_subset, read_typed = tritonclient(
        "read_responses", [subset.SerializeToString(), typed.SerializeToString()])

    assert read_subset["order"] == ["half", "probs"]
    assert read_subset["id"] == "req-1"
    for name in ("half", "probs"):
        assert_same(read_subset["outputs"][name]["raw"], model_outputs[name], name)

    # Raw outputs come first so raw_output_contents[i] still belongs to outputs[i].
    assert read_typed["order"] == ["half", "labels", "mask", "small"]
    assert len(typed.raw_output_contents) == 1
    assert_same(read_typed["outputs"]["half"]["raw"], model_outputs["half"], "half")
    assert read_typed["outputs"]["labels"]["typed"] == {
        "int64_contents": model_outputs["labels"].tolist()}
    assert read_typed["outputs"]["mask"]["typed"] == {
        "bool_contents": model_outputs["mask"].ravel().tolist()}
    assert read_typed["outputs"]["small"]["typed"] == {
        "uint_contents": model_outputs["small"].ravel().tolist()}
    assert read_typed["outputs"]["small"]["shape"] == [2, 3]


def test_typed_outputs_decode_back_through_our_own_reader() -> None:
    # Typed output contents have the same layout as typed input contents, so
    # decode_inputs reads them back: a round trip for every typed datatype.
    for datatype in TYPED_FIELD:
        expected = sample(datatype, (3, 4), 13)
        request = pb.ModelInferRequest()
        request.outputs.add(name="y").parameters["binary_data"].bool_param = False
        response = encode_outputs(request, {"y": expected}, "m", "", "",
                                  datatypes={"y": datatype})
        assert not response.raw_output_contents
        out = response.outputs[0]
        echo = pb.ModelInferRequest()
        echo.inputs.add(name="y", datatype=out.datatype, shape=out.shape).contents.CopyFrom(
            out.contents)
        assert_same(decode_inputs(echo)["y"], expected, f"typed output {datatype}")


# ---------------------------------------------------------------------------
# Request errors: each a TensorError naming the tensor
# ---------------------------------------------------------------------------


def expect_error(request: pb.ModelInferRequest, tensor: str, words: str) -> None:
    with pytest.raises(TensorError) as caught:
        decode_inputs(request)
    assert caught.value.tensor == tensor, str(caught.value)
    assert words in str(caught.value), str(caught.value)
    # The frontends answer every InvalidArgument with INVALID_ARGUMENT.
    assert isinstance(caught.value, InvalidArgument)


F32 = np.zeros((2, 2), np.float32)


def test_mixing_raw_and_typed_contents() -> None:
    request = raw_request(("a", "FP32", F32), ("b", "FP32", F32))
    request.inputs[1].contents.fp32_contents.extend([0.0] * 4)
    expect_error(request, "b", "also uses raw_input_contents")


def test_fewer_raw_blobs_than_inputs_names_the_first_without_data() -> None:
    request = raw_request(("a", "FP32", F32), ("b", "FP32", F32))
    request.inputs.add(name="c", datatype="FP32", shape=[2, 2])
    expect_error(request, "c", "3 inputs but 2 raw_input_contents")


def test_more_raw_blobs_than_inputs() -> None:
    request = raw_request(("a", "FP32", F32))
    request.raw_input_contents.append(b"\0" * 16)
    expect_error(request, "", "2 raw_input_contents entries but only 1 inputs")


@pytest.mark.parametrize(("datatype", "nbytes"), [("FP32", 15), ("FP32", 17), ("FP16", 16),
                                                  ("INT64", 16), ("BF16", 4), ("BOOL", 5)])
def test_raw_byte_length_must_match_shape_and_datatype(datatype: str, nbytes: int) -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    request.raw_input_contents.append(b"\0" * nbytes)
    expect_error(request, "x", f"{nbytes} bytes of data")


def test_typed_element_count_must_match_shape() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT32", shape=[2, 3]).contents.int_contents.extend(
        range(5))
    expect_error(request, "x", "contents.int_contents has 5 elements, but shape [2, 3] needs 6")


def test_typed_contents_in_the_wrong_field() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp64_contents.extend(
        [1.0, 2.0])
    expect_error(request, "x", "belongs in contents.fp32_contents, but contents.fp64_contents")


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_has_no_typed_form(datatype: str) -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="h", datatype=datatype, shape=[1]).contents.fp32_contents.append(1.0)
    expect_error(request, "h", "can only be sent in raw_input_contents")


@pytest.mark.parametrize(("datatype", "value"), [("INT8", 128), ("INT8", -129),
                                                 ("INT16", 40000), ("UINT8", 256),
                                                 ("UINT16", 65536)])
def test_narrow_typed_integers_must_fit(datatype: str, value: int) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="n", datatype=datatype, shape=[2])
    field = TYPED_FIELD[datatype]
    getattr(tensor.contents, field).extend([0, value])
    expect_error(request, "n", f"outside the {datatype} range")


def test_input_without_any_data() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[3])
    expect_error(request, "x", "has no data")


@pytest.mark.parametrize("raw", [True, False])
def test_negative_dimension(raw: bool) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    if raw:
        request.raw_input_contents.append(b"\0" * 16)
    else:
        tensor.contents.fp32_contents.extend([0.0] * 4)
    expect_error(request, "x", "shape [-1, 4] has a negative dimension")


@pytest.mark.parametrize("datatype", ["FLOAT32", "fp32", "", "STRING"])
def test_unknown_datatype(datatype: str) -> None:
    expect_error(raw_request(("x", datatype, F32)), "x", f"unknown datatype {datatype!r}")


def test_bytes_is_refused_as_unsupported() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="s", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\x03\0\0\0abc")
    expect_error(request, "s", "BYTES (strings) is not supported")


def test_duplicate_input_names() -> None:
    expect_error(raw_request(("x", "FP32", F32), ("x", "FP32", F32)), "x",
                 "more than once")


def test_empty_input_name() -> None:
    expect_error(raw_request(("a", "FP32", F32), ("", "FP32", F32)), "", "input #1 has an "
                 "empty name")


def test_shared_memory_input_becomes_a_region_reference() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.parameters["shared_memory_region"].string_param = "region0"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    tensor.parameters["shared_memory_offset"].int64_param = 32
    assert decode_inputs(request) == {"x": RegionRef("region0", 32, 16)}


def test_raw_contents_count_only_inputs_outside_shared_memory() -> None:
    # As tritonclient sends them: the shared-memory input has no raw entry.
    request = raw_request(("a", "FP32", F32), ("b", "FP32", F32))
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    del request.raw_input_contents[0]
    decoded = decode_inputs(request)
    assert decoded["a"] == RegionRef("r", 0, 16)
    np.testing.assert_array_equal(decoded["b"], F32)


def test_a_malformed_region_reference_is_named_before_the_raw_contents_count() -> None:
    # The region named with an int64_param: the count of raw entries is off too (the
    # client sent one for every other input), but the parameter is what is wrong.
    request = raw_request(("a", "FP32", F32), ("b", "FP32", F32))
    request.inputs[0].parameters["shared_memory_region"].int64_param = 7
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    expect_error(request, "a", "must be a non-empty string_param")


@pytest.mark.parametrize(("params", "words"), [
    ({"shared_memory_region": ("string_param", "r")}, "shared_memory_byte_size is required"),
    ({"shared_memory_region": ("string_param", ""), "shared_memory_byte_size":
      ("int64_param", 16)}, "must be a non-empty string_param"),
    ({"shared_memory_region": ("string_param", "r"), "shared_memory_byte_size":
      ("int64_param", -1)}, "shared_memory_byte_size is -1"),
    ({"shared_memory_region": ("string_param", "r"), "shared_memory_byte_size":
      ("string_param", "16")}, "must be an int64_param or uint64_param"),
    ({"shared_memory_byte_size": ("int64_param", 16)}, "set without shared_memory_region"),
])
def test_bad_shared_memory_parameters(params: dict[str, tuple[str, object]],
                                      words: str) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    for key, (kind, value) in params.items():
        setattr(tensor.parameters[key], kind, value)
    expect_error(request, "x", words)


# ---------------------------------------------------------------------------
# Response errors
# ---------------------------------------------------------------------------

OUTPUTS: dict[str, np.ndarray] = {"y": np.zeros((2, 2), np.float32), "h": np.zeros(2, np.float16)}


def requesting(*names: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    for name in names:
        request.outputs.add(name=name)
    return request


def expect_output_error(request: pb.ModelInferRequest, tensor: str, words: str) -> None:
    for check in (lambda: check_requested_outputs(request, OUTPUTS.keys(),
                                                  {"y": "FP32", "h": "FP16"}),
                  lambda: encode_outputs(request, OUTPUTS, "m", "", "")):
        with pytest.raises(TensorError) as caught:
            check()
        assert caught.value.tensor == tensor, str(caught.value)
        assert words in str(caught.value), str(caught.value)


def test_unknown_requested_output() -> None:
    expect_output_error(requesting("y", "z"), "z", "not an output of this model; its outputs "
                        "are ['h', 'y']")


def test_output_requested_twice() -> None:
    expect_output_error(requesting("y", "y"), "y", "requested more than once")


def test_classification_is_refused() -> None:
    request = requesting("y")
    request.outputs[0].parameters["classification"].int64_param = 3
    expect_output_error(request, "y", "classification extension is not supported")


def test_shared_memory_output_is_described_with_an_empty_raw_entry() -> None:
    # As Triton answers: every output has a raw entry, so clients index by position.
    request = requesting("h", "y")
    request.outputs[1].parameters["shared_memory_region"].string_param = "r"
    request.outputs[1].parameters["shared_memory_byte_size"].int64_param = 16
    assert output_regions(request) == {"y": RegionRef("r", 0, 16)}
    outputs = {"y": TensorOut("FP32", (2, 2), RegionRef("r", 0, 16)), "h": OUTPUTS["h"]}
    response = encode_outputs(request, outputs, "m", "", "", datatypes={"y": "FP32"})
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("h", "FP16", [2]), ("y", "FP32", [2, 2])]
    assert list(response.raw_output_contents) == [OUTPUTS["h"].tobytes(), b""]


def test_binary_data_must_be_a_bool() -> None:
    request = requesting("y")
    request.outputs[0].parameters["binary_data"].string_param = "false"
    expect_output_error(request, "y", "binary_data must be a bool_param")


def test_fp16_output_cannot_be_typed() -> None:
    request = requesting("h")
    request.outputs[0].parameters["binary_data"].bool_param = False
    expect_output_error(request, "h", "FP16 has no typed contents field")


def test_server_side_dtype_mistakes_are_not_client_errors() -> None:
    # A backend producing the wrong dtype is a server bug: TypeError, which the
    # frontends answer with a generic INTERNAL, not INVALID_ARGUMENT.
    request = pb.ModelInferRequest()
    with pytest.raises(TypeError, match="'y' is declared FP32 but its array is float64"):
        encode_outputs(request, {"y": np.zeros(2)}, "m", "", "", datatypes={"y": "FP32"})
    with pytest.raises(TypeError, match="'c' has dtype complex64"):
        encode_outputs(request, {"c": np.zeros(2, np.complex64)}, "m", "", "")
    with pytest.raises(TypeError, match="declared BF16"):
        encode_outputs(request, {"y": np.zeros(2, np.float16)}, "m", "", "",
                       datatypes={"y": "BF16"})

"""Hostile messages at the protocol edge, over real gRPC to a real server.

Malformed protobuf is INVALID_ARGUMENT, on unary calls and on streams, without a
traceback in the log; a request of many tensors or dimensions is refused by the
first thing wrong with it, before anything is decoded; client strings echoed in
errors are shortened, so the status always reaches the client; and a few
smaller mistakes get the right answer (issue 15, items 3, 7, 8 and 10).

Each case runs against one process and against frontend processes (`--frontends
2`, what `frontends = auto` gives on a host of more than 2 cores): the frontends
decode and refuse, so whatever reaches the engine across the link is well formed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tests.doubles.controlled import expected
from tests.reliability.controlled_server import ControlledServerProcess
from tests.reliability.harness import Served, model_stats, serve_controlled
from trtserve.client.convert import infer_request
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service import echo
from trtserve.service.frontends.malformed import COUNT_FROM_BYTES, MAX_FIELDS

MODEL = "controlled"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
V1 = "/trtserve.v1.InferenceService/"
KSERVE = "/inference.GRPCInferenceService/"
LONG = 20_000  # characters: over gRPC's 16 KB hard limit on a status message
# Well under that limit, whatever the client sent.
SHORT_MESSAGE = 2 * echo.ECHO_CHARS + 600
X = np.arange(16, dtype=np.float32).reshape(2, 8)


@pytest.fixture(scope="module", params=["one process", "2 frontends"])
def served(request: pytest.FixtureRequest
           ) -> Iterator[tuple[Served | ControlledServerProcess, grpc.Channel]]:
    if request.param == "one process":
        with serve_controlled(MODEL, max_queue_delay_us=0) as s, \
                grpc.insecure_channel(s.url) as channel:
            yield s, channel
        return
    process = ControlledServerProcess("--frontends", "2", "--max-queue-delay-us", "0",
                                      "--max-batch-size", "32")
    with process.serving(), grpc.insecure_channel(process.url) as channel:
        yield process, channel


def no_traceback(server: Served | ControlledServerProcess,
                 caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged as an error or with a traceback: in this process's log records, or
    in everything the server processes printed."""
    if isinstance(server, ControlledServerProcess):
        output = server.output()
        assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
    else:
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def refusal(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)  # type: ignore[operator]
    return err.value.code(), err.value.details() or ""


def still_serving(channel: grpc.Channel) -> None:
    response = pb_grpc.InferenceServiceStub(channel).Infer(infer_request(MODEL, {"x": X}),
                                                           timeout=10)
    (y,) = response.outputs
    np.testing.assert_array_equal(np.frombuffer(y.data, np.float32).reshape(2, 8), expected(X))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# --- item 8: malformed protobuf -------------------------------------------------------------

GOOD_V1 = infer_request(MODEL, {"x": X}).SerializeToString()
MODEL_FIELD = pb.InferRequest.DESCRIPTOR.fields_by_name["model"].number
MALFORMED = {
    "garbage": b"\xff\xff\xff\xff\xff",
    "truncated": GOOD_V1[:-7],
    # A string field (the model name, field 1 of both requests) that is not UTF-8.
    "invalid_utf8": _field(MODEL_FIELD, b"contr\xffolled"),
}
METHODS = {
    "v1 Infer": (V1 + "Infer", "trtserve.v1.InferRequest"),
    "v1 Stats": (V1 + "Stats", "trtserve.v1.StatsRequest"),
    "kserve ModelInfer": (KSERVE + "ModelInfer", "inference.ModelInferRequest"),
    "kserve ModelReady": (KSERVE + "ModelReady", "inference.ModelReadyRequest"),
    "health Check": ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
}


@pytest.mark.parametrize("payload", sorted(MALFORMED))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_malformed_unary_request_is_invalid_argument_without_a_traceback(
        served, caplog, method, payload):
    _, channel = served
    path, message_type = METHODS[method]
    data = MALFORMED[payload]
    with caplog.at_level(logging.DEBUG):
        code, message = refusal(channel.unary_unary(path), data)
    assert code == INVALID, message
    assert f"malformed {message_type} message" in message
    assert f"{len(data)} bytes" in message
    no_traceback(served[0], caplog)
    still_serving(channel)


def _stream_v1(channel: grpc.Channel, messages: list[bytes]
               ) -> tuple[list[pb.InferStreamResponse], grpc.RpcError]:
    call = channel.stream_stream(V1 + "InferStream")
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for data in call(iter(messages), timeout=30):
            answers.append(pb.InferStreamResponse.FromString(data))
    return answers, err.value


def test_a_malformed_message_ends_a_v1_stream_after_answering_those_before_it(served, caplog):
    """Every request read before the malformed one is answered; then INVALID_ARGUMENT
    naming its position. A later request is never read (the client is out of step)."""
    _, channel = served
    requests = [infer_request(MODEL, {"x": X * k}, request_id=f"r{k}") for k in range(3)]
    messages = [r.SerializeToString() for r in requests]
    with caplog.at_level(logging.DEBUG):
        answers, error = _stream_v1(channel, [*messages[:2], MALFORMED["garbage"], messages[2]])
    assert error.code() == INVALID, error.details()
    assert "malformed trtserve.v1.InferRequest message (message #3 on this stream)" in \
        (error.details() or "")
    assert sorted(a.id for a in answers) == ["r0", "r1"]
    for answer in answers:
        k = int(answer.id[1:])
        (y,) = answer.response.outputs
        np.testing.assert_array_equal(np.frombuffer(y.data, np.float32).reshape(2, 8),
                                      expected(X * k))
    no_traceback(served[0], caplog)
    still_serving(channel)


def test_a_malformed_message_ends_a_kserve_stream_after_answering_those_before_it(served):
    _, channel = served
    good = kpb.ModelInferRequest(model_name=MODEL, id="k0")
    good.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    good.raw_input_contents.append(X.tobytes())
    call = channel.stream_stream(KSERVE + "ModelStreamInfer")
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for data in call(iter([good.SerializeToString(), MALFORMED["invalid_utf8"]]), timeout=30):
            answers.append(kpb.ModelStreamInferResponse.FromString(data))
    assert err.value.code() == INVALID, err.value.details()
    assert "malformed inference.ModelInferRequest message (message #2 on this stream)" in \
        (err.value.details() or "")
    assert [(a.error_message, a.infer_response.id) for a in answers] == [("", "k0")]


# --- item 3: many tensors, many dimensions ---------------------------------------------------

# Tensors or names: many, yet under the limit on fields (malformed.MAX_FIELDS), so
# that trtserve's own checks are what refuses them.
MANY = 2_000


def test_v1_many_tensors_are_refused_by_the_first_unknown_name_before_any_is_decoded(served):
    """The extra tensors would all decode (empty FP32); the last one would not.
    Refused by its name, the first extra is the answer: nothing after it was read."""
    s, channel = served
    request = infer_request(MODEL, {"x": X})
    for i in range(MANY):
        request.inputs.add(name=f"extra{i}", dtype=pb.DATA_TYPE_FP32, shape=[0], data=b"")
    request.inputs.add(name="last", dtype=12345, shape=[1], data=b"")
    before = model_stats(s.url).requests
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer, request)
    assert code == INVALID
    assert "tensor 'extra0': unknown input" in message, message
    assert model_stats(s.url).requests == before  # refused before the engine
    if isinstance(s, Served):
        assert s.controls.malformed == []
    still_serving(channel)


def test_kserve_many_tensors_are_refused_by_the_first_unknown_name_before_any_is_decoded(
        served):
    _, channel = served
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 8]).contents.fp32_contents.extend(
        X.ravel().tolist())
    for i in range(MANY):
        request.inputs.add(name=f"extra{i}", datatype="FP32", shape=[0])
    request.inputs.add(name="last", datatype="NOT_A_TYPE", shape=[1])
    code, message = refusal(kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)
    assert code == INVALID
    assert "tensor 'extra0': unknown input" in message, message


def test_a_repeated_input_is_refused_before_the_rest_is_read(served):
    _, channel = served
    request = infer_request(MODEL, {"x": X})
    for _ in range(MANY):
        request.inputs.append(request.inputs[0])
    request.inputs.add(name="x", dtype=12345)
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer, request)
    assert code == INVALID
    assert "tensor 'x': appears more than once" in message, message


# Dimensions: many, yet under the limit on fields (a shape of n bytes counts n / 10).
DIMS = 100_000


def test_v1_a_shape_of_many_dimensions_is_invalid_and_its_message_is_short(served):
    _, channel = served
    request = infer_request(MODEL, {"x": X})
    request.inputs[0].shape.extend([1] * DIMS)
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer, request)
    assert code == INVALID, message
    assert f"{DIMS + 2} dimensions" in message and "the model takes 2" in message
    assert len(message) < SHORT_MESSAGE


def test_kserve_a_shape_of_many_dimensions_is_invalid_and_its_message_is_short(served):
    _, channel = served
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[2] + [1] * DIMS)
    request.raw_input_contents.append(X.tobytes())
    code, message = refusal(kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)
    assert code == INVALID, message
    assert f"{DIMS + 1} dimensions" in message
    assert len(message) < SHORT_MESSAGE


def test_a_shape_of_two_million_dimensions_is_refused_unparsed(served):
    """Every one-byte dimension would parse into an int64 of its own: the message is
    refused by its field count, before grpc parses it (docs/reliability.md)."""
    _, channel = served
    request = infer_request(MODEL, {"x": X})
    request.inputs[0].shape.extend([1] * 2_000_000)
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer, request)
    assert code == INVALID, message
    assert f"more than {MAX_FIELDS} fields" in message
    still_serving(channel)


def test_many_outputs_are_refused_by_the_first_repeat(served):
    _, channel = served
    request = infer_request(MODEL, {"x": X})
    request.outputs.extend(["y"] * MANY)
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer, request)
    assert code == INVALID
    assert "tensor 'y': requested more than once" in message


def test_a_message_of_too_many_fields_is_refused_unparsed(served, caplog):
    """A million empty tensors: refused after MAX_FIELDS of them were counted."""
    _, channel = served
    inputs = pb.InferRequest.DESCRIPTOR.fields_by_name["inputs"].number
    data = pb.InferRequest(model=MODEL).SerializeToString() + _field(inputs, b"") * 1_000_000
    with caplog.at_level(logging.DEBUG):
        code, message = refusal(channel.unary_unary(V1 + "Infer"), data)
    assert code == INVALID, message
    assert f"malformed trtserve.v1.InferRequest message: its {len(data)} bytes hold more " \
        f"than {MAX_FIELDS} fields" in message
    no_traceback(served[0], caplog)
    still_serving(channel)


def test_too_many_fields_in_a_kserve_stream_end_it_after_the_answers_before(served):
    _, channel = served
    good = kpb.ModelInferRequest(model_name=MODEL, id="k0")
    good.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    good.raw_input_contents.append(X.tobytes())
    flood = kpb.ModelInferRequest(model_name=MODEL)
    flood.parameters["p"].bool_param = True
    entry = flood.SerializeToString()[len(kpb.ModelInferRequest(
        model_name=MODEL).SerializeToString()):]
    call = channel.stream_stream(KSERVE + "ModelStreamInfer")
    answers = []
    flood_bytes = entry * (COUNT_FROM_BYTES // len(entry) + 1)  # 4 fields an entry
    assert len(flood_bytes) // len(entry) * 4 > MAX_FIELDS
    with pytest.raises(grpc.RpcError) as err:
        for data in call(iter([good.SerializeToString(), flood_bytes]), timeout=30):
            answers.append(kpb.ModelStreamInferResponse.FromString(data))
    assert err.value.code() == INVALID, err.value.details()
    assert "(message #2 on this stream)" in (err.value.details() or "")
    assert f"more than {MAX_FIELDS} fields" in (err.value.details() or "")
    assert [a.infer_response.id for a in answers] == ["k0"]


def test_a_large_request_of_few_fields_is_served(served):
    """Counting fields is for messages of COUNT_FROM_BYTES or more: a real one passes."""
    _, channel = served
    x = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    request = infer_request(MODEL, {"x": x})
    request.id = "i" * COUNT_FROM_BYTES
    assert request.ByteSize() > COUNT_FROM_BYTES
    response = pb_grpc.InferenceServiceStub(channel).Infer(request, timeout=10)
    (y,) = response.outputs
    np.testing.assert_array_equal(np.frombuffer(y.data, np.float32).reshape(16, 8), expected(x))
    assert response.id == request.id


# --- item 7: long client strings ---------------------------------------------------------------


def _long(prefix: str) -> str:
    return prefix + "a" * (LONG - len(prefix))


def _v1(model: str = MODEL, tensor: str = "x", output: str | None = None) -> pb.InferRequest:
    request = pb.InferRequest(model=model)
    request.inputs.add(name=tensor, dtype=pb.DATA_TYPE_FP32, shape=[2, 8], data=X.tobytes())
    if output is not None:
        request.outputs.append(output)
    return request


def _kserve(model: str = MODEL, version: str = "", tensor: str = "x", datatype: str = "FP32",
            output: str | None = None) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=tensor, datatype=datatype, shape=[2, 8])
    request.raw_input_contents.append(X.tobytes())
    if output is not None:
        request.outputs.add(name=output)
    return request


LONG_STRINGS = {
    "v1 model": ("v1", _v1(model=_long("m")), NOT_FOUND, "model 'maaa"),
    "v1 input": ("v1", _v1(tensor=_long("t")), INVALID, "tensor 'taaa"),
    "v1 output": ("v1", _v1(output=_long("o")), INVALID, "tensor 'oaaa"),
    "kserve model": ("kserve", _kserve(model=_long("m")), NOT_FOUND, "model 'maaa"),
    "kserve version": ("kserve", _kserve(version=_long("v")), NOT_FOUND, "version 'vaaa"),
    "kserve input": ("kserve", _kserve(tensor=_long("t")), INVALID, "tensor 'taaa"),
    "kserve datatype": ("kserve", _kserve(datatype=_long("D")), INVALID, "datatype 'Daaa"),
    "kserve output": ("kserve", _kserve(output=_long("o")), INVALID, "tensor 'oaaa"),
}


@pytest.mark.parametrize("case", sorted(LONG_STRINGS))
def test_a_long_client_string_is_shortened_in_the_error(served, case):
    """Echoed in full, 20,000 characters overflow the status trailer and the client
    sees RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead."""
    _, channel = served
    protocol, request, want, start = LONG_STRINGS[case]
    call = (pb_grpc.InferenceServiceStub(channel).Infer if protocol == "v1"
            else kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer)
    code, message = refusal(call, request)
    assert code == want, message
    assert start in message and f"... ({LONG} characters)" in message
    assert len(message) < SHORT_MESSAGE


def test_a_long_version_on_model_ready_is_not_ready(served):
    _, channel = served
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    ready = stub.ModelReady(kpb.ModelReadyRequest(name=MODEL, version=_long("v")), timeout=10)
    assert ready.ready is False


# --- item 10: trivia ----------------------------------------------------------------------------


def test_v1_an_output_named_twice_is_refused_as_kserve_does(served):
    _, channel = served
    code, message = refusal(pb_grpc.InferenceServiceStub(channel).Infer,
                            infer_request(MODEL, {"x": X}, outputs=["y", "y"]))
    assert code == INVALID
    assert "tensor 'y': requested more than once" in message


def test_statistics_of_an_unknown_version_of_every_model_reads_right(served):
    _, channel = served
    code, message = refusal(kpb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics,
                            kpb.ModelStatisticsRequest(version="7"))
    assert code == NOT_FOUND
    assert message.startswith("no model has version '7';"), message


def test_a_dtype_beyond_32_bits_is_not_reported_as_the_value_zero(served):
    """2**40 on the wire reads as 0 (the enum field keeps 32 bits): the message
    must not claim the client sent 0."""
    s, channel = served
    tensor = pb.Tensor(name="x", shape=[2, 8], data=X.tobytes()).SerializeToString()
    dtype_field = pb.Tensor.DESCRIPTOR.fields_by_name["dtype"].number
    tensor += _varint(dtype_field << 3) + _varint(2**40)
    inputs_field = pb.InferRequest.DESCRIPTOR.fields_by_name["inputs"].number
    data = pb.InferRequest(model=MODEL).SerializeToString() + _field(inputs_field, tensor)
    code, message = refusal(channel.unary_unary(V1 + "Infer"), data)
    assert code == INVALID, message
    assert "DATA_TYPE_UNSPECIFIED (0)" in message and "32-bit" in message, message
    assert "dtype enum value 0 " not in message
    assert model_stats(s.url).errors == 0

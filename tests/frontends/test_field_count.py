"""field_count.exceeds: every field at every depth, packed arrays once, any bytes answered."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.frontends.field_count import exceeds

K = kpb.ModelInferRequest.DESCRIPTOR
V1 = pb.InferRequest.DESCRIPTOR


def fields(data: bytes, descriptor) -> int:
    """The count `exceeds` arrives at: the smallest limit it does not exceed."""
    limit = 0
    while exceeds(data, descriptor, limit):
        limit += 1
    return limit


def test_every_field_counts_at_every_depth():
    request = kpb.ModelInferRequest(model_name="m", id="abc")  # 2
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])  # 1 + 3
    tensor.parameters["p"].bool_param = True  # an entry, its key and value, the bool: 4
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])  # contents + one packed: 2
    request.outputs.add(name="y")  # 2
    request.raw_input_contents.append(b"\0" * 1000)  # 1
    data = request.SerializeToString()
    assert fields(data, K) == 2 + 4 + 4 + 2 + 2 + 1


def test_a_packed_array_counts_once_whatever_its_length():
    request = kpb.ModelInferRequest(model_name="m")  # 1
    tensor = request.inputs.add(name="x", datatype="FP32")  # 3
    tensor.contents.fp32_contents.extend([1.0] * 100_000)  # contents + the packed array: 2
    assert fields(request.SerializeToString(), K) == 1 + 3 + 2


def test_dimensions_count_as_fields_one_per_ten_bytes():
    """Shapes are the one packed array counted by its length: a varint is 1-10 bytes."""
    request = pb.InferRequest(model="m")  # 1
    request.inputs.add(name="x", shape=[1] * 100_000)  # 1 + name 1 + shape 1 + 10,000
    assert fields(request.SerializeToString(), V1) == 1 + 3 + 10_000
    k = kpb.ModelInferRequest()
    k.inputs.add(shape=[2**62] * 1_000)  # 9 bytes each: 900, more than a tenth
    assert fields(k.SerializeToString(), K) == 1 + 1 + 900


def test_fields_past_the_limit_are_never_read():
    """A limit of 10 on a million tensors answers after 11 of them."""
    data = pb.InferRequest(model="m").SerializeToString() + b"\x1a\x00" * 1_000_000
    assert exceeds(data, V1, 10)
    assert not exceeds(data[:12], V1, 10)


def test_unknown_fields_count_too():
    unknown = b"\xf8\x07\x01" * 50  # field 127, a varint, which InferRequest lacks
    assert fields(unknown, V1) == 50


@settings(max_examples=300, derandomize=True)
@given(data=st.binary(max_size=200), limit=st.integers(1, 20))
def test_any_bytes_get_an_answer_that_a_smaller_limit_keeps(data, limit):
    """Garbage never raises, and a count over `limit` is over any smaller limit."""
    for descriptor in (V1, K):
        if exceeds(data, descriptor, limit):
            assert exceeds(data, descriptor, limit - 1)


def test_truncated_or_nonsense_encodings_are_left_to_the_parser():
    good = pb.InferRequest(model="m", inputs=[pb.Tensor(name="x", shape=[1, 2])])
    data = good.SerializeToString()
    for cut in range(1, len(data)):
        assert not exceeds(data[:cut], V1, 100)
    assert not exceeds(b"\x0b\x0c", V1, 100)  # a group: left to the parser
    assert not exceeds(b"\x0f\x00", V1, 100)  # wire type 7 does not exist

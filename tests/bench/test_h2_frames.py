"""benchmarks/h2_frames.py: the frame counts that docs/benchmarks.md quotes per request.

The parser must count the same frames however the reads cut the byte stream,
and the proxy, put between a real client and a real trtserve, must forward
every byte (the answer is right) and see what a unary call is on the wire.
"""

import struct

import grpc
import numpy as np
import pytest

from benchmarks.h2_frames import PREFACE, Direction, FrameParser, FrameProxy
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    length = len(payload)
    return struct.pack(">BHBBI", length >> 16, length & 0xFFFF, kind, flags, stream) + payload


# A client's side of one call: preface, SETTINGS, HEADERS, DATA (END_STREAM), then a
# connection WINDOW_UPDATE and a PING on their own.
CALL = (frame(4, 0, 0, b"\0\x03\0\0\0\x64") + frame(1, 0x4, 1, b"h" * 70)
        + frame(0, 0x1, 1, b"d" * 300))
CONTROL = frame(8, 0, 0, b"\0\0\x01\0") + frame(6, 0, 0, b"p" * 8)


def parse(chunks: list[bytes]) -> Direction:
    seen = Direction()
    parser = FrameParser(seen, preface=True)
    for chunk in chunks:
        parser.feed(chunk)
    return seen


@pytest.mark.parametrize("cut", [1, 7, 9, 64, 10_000])
def test_counts_do_not_depend_on_how_reads_cut_the_stream(cut):
    stream = PREFACE + CALL + CONTROL
    seen = parse([stream[i:i + cut] for i in range(0, len(stream), cut)])
    assert seen.frames == {"SETTINGS": 1, "HEADERS": 1, "DATA": 1, "WINDOW_UPDATE": 1,
                           "PING": 1}
    assert seen.payload_bytes["DATA"] == 300 and seen.payload_bytes["HEADERS"] == 70
    assert seen.wire_bytes == len(stream) and seen.reads == -(-len(stream) // cut)


def test_a_read_of_flow_control_frames_alone_is_counted_as_such():
    seen = parse([PREFACE + CALL, CONTROL, frame(0, 0, 1, b"x") + CONTROL])
    assert seen.reads == 3 and seen.control_reads == 1


def test_trailers_are_the_headers_that_end_the_stream():
    seen = parse([PREFACE, frame(1, 0x4, 1, b"a" * 40), frame(0, 0, 1, b"d"),
                  frame(1, 0x5, 1, b"t" * 15)])
    assert seen.frames["HEADERS"] == 2 and seen.trailers == 1 and seen.trailer_bytes == 15


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1))
    with running_server(config) as s:
        yield s


def test_the_proxy_forwards_a_call_and_sees_its_frames(server):
    proxy = FrameProxy(server.url)
    proxy.start()
    try:
        x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        request = kpb.ModelInferRequest(model_name="example", id="through")
        request.inputs.add(name="input", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(proxy.url) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelReady(kpb.ModelReadyRequest(name="example"), timeout=10)
            proxy.reset()  # the connection's setup behind us: one call from here
            response = stub.ModelInfer(request, timeout=10)
        got = proxy.snapshot()
    finally:
        proxy.stop()
    assert response.id == "through" and list(response.outputs[0].shape) == [2, 16]
    sent = got["server"]
    # Response headers, one message, trailers: a unary answer on the wire.
    assert sent.frames["HEADERS"] == 2 and sent.frames["DATA"] == 1 and sent.trailers == 1
    assert sent.payload_bytes["DATA"] >= 2 * 16 * 4
    assert got["client"].frames["HEADERS"] == 1 and got["client"].frames["DATA"] >= 1

"""Answers a client does not read are bounded by connection and by process
(frontends/unsent.py): an answer past the bound is not sent, its request is answered
RESOURCE_EXHAUSTED, and other connections are served meanwhile.

The bookkeeping alone first, then a real server over real gRPC: a client that opens a
stream, sends its requests and does not read its answers for a while, as a client
whose receive window stays shut does.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import socket
import time

import grpc
import numpy as np
import pytest

from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.service.config import ModelConfig
from trtserve.service.errors import ResourceExhausted
from trtserve.service.frontends.unsent import (
    TRACK_FROM_BYTES,
    UnsentAnswers,
    UnsentLimits,
    expected_answer_bytes,
)
from trtserve.service.testing.onnx_models import expand_net
from trtserve.service.testing.servers import free_port, running_server, server_config

MIB = 1024 * 1024


def test_a_connection_holding_its_limit_runs_nothing_more_and_its_answers_stop_at_twice():
    ledger = UnsentAnswers(UnsentLimits(per_connection=4 * MIB, total=1024 * MIB))
    assert ledger.hold("a", TRACK_FROM_BYTES - 1) is None  # small answers are not counted
    first = ledger.hold("a", 6 * MIB)  # past the limit: the connection held nothing
    assert first is not None and ledger.held("a") == 6 * MIB
    with pytest.raises(ResourceExhausted, match=r"not run.*max_unsent_bytes_per_connection"):
        ledger.check("a")
    ledger.check("b")  # another connection: its own allowance
    second = ledger.hold("a", 2 * MIB)  # a request admitted before: up to twice the limit
    assert second is not None
    with pytest.raises(ResourceExhausted, match=r"not sent.*max_unsent_bytes_per_connection"):
        ledger.hold("a", MIB)
    assert (ledger.refused_requests, ledger.refused_answers) == (1, 1)
    first()
    first()  # a second release gives nothing back twice
    assert ledger.held("a") == 2 * MIB and ledger.total == 2 * MIB
    ledger.check("a")
    second()
    assert ledger.held("a") == 0 and ledger.total == 0


def test_past_the_process_limit_large_requests_wait_whoever_sends_them():
    # Many connections holding a little each (an adversarial run spread 40 MiB over 20
    # connections): a fair share would let them past a normal client; the process's
    # limit holds for every connection, as max_request_bytes_in_flight does for inputs.
    ledger = UnsentAnswers(UnsentLimits(per_connection=1024 * MIB, total=10 * MIB))
    for i in range(10):
        ledger.hold(f"spread-{i}", MIB)
    with pytest.raises(ResourceExhausted, match=r"not run.*max_unsent_bytes\); try again"):
        ledger.check("new")
    # Answers of requests let in before may take it to twice the limit, no further.
    assert ledger.hold("running", 9 * MIB) is not None
    with pytest.raises(ResourceExhausted, match=r"not sent.*max_unsent_bytes:"):
        ledger.hold("running", 2 * MIB)
    assert ledger.hold("small", TRACK_FROM_BYTES - 1) is None  # small answers: never refused


def test_a_reservation_counts_at_most_one_sendable_answer():
    # A model may declare an output far larger than it gives ([batch, 2**38] giving
    # [batch, 4] in an adversarial run): more than max_send_message_bytes is refused
    # anyway, so no running request counts for more.
    ledger = UnsentAnswers(UnsentLimits(per_connection=64 * MIB, total=1024 * MIB,
                                        max_answer=8 * MIB))
    reserved = ledger.reserve("a", 1 << 40)
    assert reserved is not None and ledger.total == 8 * MIB
    reserved()
    assert ledger.total == 0


WIDTH = 256 * 1024  # 1 MiB of FP32 per row
REQUESTS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = expand_net(tmp_path_factory.mktemp("expand") / "expand.onnx", WIDTH)
    config = server_config(
        ModelConfig(name="expand", path=str(path), workers=1, max_batch_size=8),
        max_unsent_bytes_per_connection=4 * MIB,
        # The stream's own limit out of the way: the connection's is under test.
        max_unsent_bytes_per_stream=1024 * MIB)
    with running_server(config) as s:
        yield s


def _request(value: float, request_id: str) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(
        model_name="expand", id=request_id,
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                       shape=[1, 1])],
        raw_input_contents=[np.array([[value]], np.float32).tobytes()])


def _channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", -1), ("grpc.use_local_subchannel_pool", 1),
        # No window growth: what the client has not read stays in the server.
        ("grpc.http2.bdp_probe", 0)])


def _served(stub: kpb_grpc.GRPCInferenceServiceStub) -> int:
    stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="expand"), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_a_stream_that_does_not_read_gets_errors_past_its_connections_limit(server):
    port = server.server.port
    with _channel(port) as slow, _channel(port) as other:
        watcher = kpb_grpc.GRPCInferenceServiceStub(other)
        before = _served(watcher)
        requests: queue.Queue[kpb.ModelInferRequest | None] = queue.Queue()
        for i in range(REQUESTS):
            requests.put(_request(float(i + 1), str(i)))
        stream = kpb_grpc.GRPCInferenceServiceStub(slow).ModelStreamInfer(
            iter(requests.get, None), timeout=60)
        ledger = server.server.unsent
        refused_before = ledger.refused_requests

        def decided() -> int:  # requests run, or refused without running
            return _served(watcher) - before + ledger.refused_requests - refused_before

        deadline = time.monotonic() + 30
        while decided() < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.05)  # their answers wait for the client
        assert decided() == REQUESTS
        assert ledger.total >= 4 * MIB  # what the window did not take is held here
        # Another connection is served while that one holds its answers.
        answer = watcher.ModelInfer(_request(-1.0, "other"), timeout=10)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32)[0] == -1.0
        requests.put(None)
        answers = list(stream)
    assert len(answers) == REQUESTS
    refused = [a for a in answers if a.error_message]
    served = [a.infer_response for a in answers if not a.error_message]
    assert refused and served
    for a in refused:
        assert "max_unsent_bytes_per_connection" in a.error_message, a.error_message
    for response in served:  # each answer its own request's: every element its value
        values = np.frombuffer(response.raw_output_contents[0], np.float32)
        assert values.size == WIDTH and np.all(values == float(response.id) + 1)
    assert {a.infer_response.id for a in answers} >= {r.id for r in served}
    # Once read, the connection's allowance is back: nothing is held for it.
    assert ledger.total == 0


def test_at_the_default_limits_a_client_that_reads_is_never_refused(tmp_path):
    path = expand_net(tmp_path / "expand.onnx", WIDTH)
    config = server_config(ModelConfig(name="expand", path=str(path), workers=1,
                                       max_batch_size=8))
    with running_server(config) as s, _channel(s.server.port) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(
            iter([_request(float(i), str(i)) for i in range(REQUESTS)]), timeout=60))
        futures = [stub.ModelInfer.future(_request(float(i), str(i)), timeout=60)
                   for i in range(REQUESTS)]
        for i, future in enumerate(futures):
            values = np.frombuffer(future.result().raw_output_contents[0], np.float32)
            assert np.all(values == float(i))
        ledger = s.server.unsent
        assert (ledger.refused_requests, ledger.refused_answers) == (0, 0)
    assert len(answers) == REQUESTS
    assert not [a.error_message for a in answers if a.error_message]


class _Context:
    """A double of grpc.aio's servicer context: only its peer and done callbacks (the
    ledger's calls on a real one are covered by the server tests below)."""

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.callbacks: list = []

    def peer(self) -> str:
        return self._peer

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)


def test_answers_of_requests_still_running_count_so_a_burst_is_refused():
    sent: list[int] = []
    ledger = UnsentAnswers(UnsentLimits(per_connection=4 * MIB, total=1024 * MIB),
                           on_sent=sent.append)
    context = _Context("ipv4:127.0.0.1:5000")
    connection = ledger.connection(context.peer)
    reservations = []
    for _ in range(4):  # sent at once: none has an answer yet
        connection.check()
        reservations.append(connection.reserve(MIB))
    with pytest.raises(ResourceExhausted, match="not run"):
        connection.check()
    assert connection.reserve(TRACK_FROM_BYTES - 1) is None
    for reserved in reservations:  # each answer in turn: the reservation becomes the hold
        reserved()
        ledger.hold_call(context, connection, MIB)
    assert ledger.held(context.peer()) == 4 * MIB and len(context.callbacks) == 4
    assert sent == []  # reservations given back are no answers sent
    for callback in context.callbacks:  # gRPC is done with each call
        callback(None)
    assert ledger.total == 0 and sent == [MIB] * 4  # each told once (the server trims)


def test_expected_answer_bytes_follow_the_declared_shapes():
    from trtserve.service.backends.base import ModelSpec
    from trtserve.service.tensors import TensorSpec

    spec = ModelSpec(
        backend="onnxruntime", platform="onnxruntime_onnx", max_batch_size=8,
        inputs=(TensorSpec("x", "FP32", (-1, 1)),),
        outputs=(TensorSpec("wide", "FP32", (-1, 1000)), TensorSpec("half", "FP16", (-1, 10)),
                 TensorSpec("ragged", "FP32", (-1, -1))))

    class Wire:
        def __init__(self, shape):
            self.name, self.shape = "x", shape

    assert expected_answer_bytes(spec, [Wire((3, 1))], ()) == (3 * 1000 * 4 + 3 * 10 * 2,
                                                                False)
    assert expected_answer_bytes(spec, [Wire((5, 1))], ()).bytes == 5 * (4000 + 20)  # cached
    assert expected_answer_bytes(spec, [Wire((3, 1))], {"wide"}).bytes == 3 * 10 * 2
    # More rows than the model takes is refused later: counted as its most.
    assert expected_answer_bytes(spec, [Wire((10**12, 1))], ()).bytes == 8 * (4000 + 20)
    assert expected_answer_bytes(spec, [], ()).bytes == 0
    exact = dataclasses.replace(spec, outputs=spec.outputs[:2])
    small = expected_answer_bytes(exact, [Wire((1, 1))], ())
    assert small == (4020, True) and not small.may_be_large  # not weighed once answered
    assert expected_answer_bytes(spec, [Wire((1, 1))], ()).may_be_large  # "ragged" may be


def _http_infer(port: int, rows: int) -> bytes:
    x = np.ones((rows, 1), np.float32)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": [rows, 1], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    body = header + x.tobytes()
    return (f"POST /v2/models/expand/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_http_answers_a_client_does_not_read_count_against_the_process(tmp_path):
    # An adversarial run: 60 HTTP connections each asking for a 64 MiB answer and never
    # reading took two frontends to 3.8 and 4.1 GiB.
    path = expand_net(tmp_path / "expand.onnx", WIDTH)
    config = server_config(ModelConfig(name="expand", path=str(path), workers=1,
                                       max_batch_size=8),
                           http_port=free_port(), max_unsent_bytes=16 * MIB)
    with running_server(config) as s:
        port, ledger = s.server.http_port, s.server.unsent
        silent = []
        for held in (8 * MIB, 16 * MIB):  # two connections that never read
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(_http_infer(port, 8))
            silent.append(sock)
            deadline = time.monotonic() + 30
            while ledger.total < held and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ledger.total >= held
        with socket.create_connection(("127.0.0.1", port)) as third:
            third.sendall(_http_infer(port, 8))
            answer = third.recv(65536)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b"max_unsent_bytes" in answer
        for sock in silent:
            sock.close()
        deadline = time.monotonic() + 30
        while ledger.total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.total == 0
        with socket.create_connection(("127.0.0.1", port)) as fourth:
            fourth.sendall(_http_infer(port, 1))
            assert fourth.recv(64).startswith(b"HTTP/1.1 200")

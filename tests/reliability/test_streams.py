"""Streams: backpressure on clients that do not read, and unique ids in flight.

The server runs as its own process (`trtserve serve`, the example ONNX model)
so that psutil measures its memory alone. Each stalled-client test is bounded
in time (writes stop once one waits `STALL_S`, or after `SENT` requests) and
in memory (a fixed number of requests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from trtserve.client import Client
from trtserve.client.convert import infer_request
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.testing.servers import ServerProcess

IN_FLIGHT = 64  # server.max_in_flight_per_stream for these tests
UNSENT_BYTES = 4 * 1024 * 1024  # server.max_unsent_bytes_per_stream
STALL_S = 3.0  # a write that waits this long: the server stopped reading
LONG_ID = "i" * 64 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(example_onnx: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("streams") / "trtserve.toml"
    # "slow": the example model, but each batch waits 300 ms for company, so that
    # requests written back to back are all in flight at once.
    config.write_text(f"[server]\nmax_in_flight_per_stream = {IN_FLIGHT}\n"
                      f"max_unsent_bytes_per_stream = {UNSENT_BYTES}\n"
                      f"[[models]]\nname = 'slow'\npath = '{example_onnx}'\n"
                      "max_queue_delay_us = 300000\n")
    with ServerProcess(["--config", str(config), "--model", f"example={example_onnx}"]
                       ).serving() as proc:
        yield proc


def executed(url: str) -> int:
    """Requests the example model has accepted, once no more arrive (an earlier
    test's stalled stream may still be finishing its requests in flight)."""
    with Client(url) as c:
        count = c.stats("example").models[0].requests
        while True:
            time.sleep(0.3)
            now = c.stats("example").models[0].requests
            if now == count:
                return count
            count = now


def rss(server: ServerProcess) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def v1_request(request_id: str, model: str = "example") -> pb.InferRequest:
    request = infer_request(model, {"input": np.ones((1, 64), np.float32)}, [])
    request.id = request_id
    return request


def kserve_request(request_id: str, model: str = "example") -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
    return kpb.ModelInferRequest(model_name=model, id=request_id, inputs=[tensor],
                                 raw_input_contents=[np.ones((1, 64), np.float32).tobytes()])


def open_stream(url: str, protocol: str, channel: grpc.aio.Channel) -> Any:
    if protocol == "v1":
        return pb_grpc.InferenceServiceStub(channel).InferStream()
    return kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()


def make_request(protocol: str, request_id: str, model: str = "example") -> Any:
    return (v1_request(request_id, model) if protocol == "v1"
            else kserve_request(request_id, model))


async def send_without_reading(server: ServerProcess, protocol: str, id_prefix: str,
                               sent: int) -> tuple[int, int, int]:
    """Write up to `sent` requests (unique ids) on one stream, never reading.

    Returns how many were written, and, measured while the stream is still open
    (the server frees what it holds once the call ends), the requests the server
    executed and its RSS growth. The client's receive window stays at HTTP/2's
    initial 64 KiB (no BDP probing, which would grow it to megabytes): answers
    that fit in it are sent while the client never reads, so it decides how many
    the server runs beyond its bound.
    """
    before, rss_before = await asyncio.to_thread(executed, server.url), rss(server)
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(server.url, options=options) as channel:
        call = open_stream(server.url, protocol, channel)
        written = 0
        for i in range(sent):
            try:
                await asyncio.wait_for(call.write(make_request(protocol, f"{id_prefix}{i}")),
                                       STALL_S)
            except TimeoutError:
                break  # the server stopped reading: the bound holds
            written += 1
        ran = await asyncio.to_thread(executed, server.url) - before
        grown = rss(server) - rss_before
        call.cancel()
        return written, ran, grown


@pytest.mark.parametrize("protocol", ["v1", "kserve"])
@pytest.mark.parametrize("long_id", [False, True], ids=["short-id", "64KiB-id"])
def test_a_client_that_never_reads_cannot_make_the_server_execute_or_hold_more(
        server: ServerProcess, protocol: str, long_id: bool):
    sent = 2_000 if long_id else 20_000
    written, ran, grown = asyncio.run(send_without_reading(
        server, protocol, LONG_ID if long_id else "", sent))
    # Today's code read and ran all of them, holding every answer.
    # The bound, plus the answers the client's 64 KiB window took before it closed
    # (about 300 short answers; none of 128 KiB), plus the writes in the pipe.
    assert ran <= IN_FLIGHT + 1_000, f"{ran} requests executed"
    assert grown < 48 * MIB, f"server RSS grew {grown / MIB:.0f} MiB"
    if long_id:  # 2,000 x 64 KiB does not fit in gRPC's windows: the writes stall
        assert written < sent, f"the server read all {sent} requests of a client that never reads"
        # The bytes bound counts answers, which exist only once their requests ran:
        # requests read while none had answered yet may all run (up to the request
        # bound; seen on a loaded machine: 40 and 64 of 64), but the server then stops
        # reading, and what it holds stays within the bytes bound (RSS above).
        assert ran <= IN_FLIGHT + 4, f"{ran} requests executed"
    # The server still serves, the stalled stream's work done or dropped.
    with Client(server.url) as c:
        assert c.infer("example", {"input": np.ones((1, 64), np.float32)}, timeout=10)


async def _stream_answers(url: str, protocol: str, ids: list[str]) -> list[Any]:
    async with grpc.aio.insecure_channel(url) as channel:
        call = open_stream(url, protocol, channel)
        for request_id in ids:
            await call.write(make_request(protocol, request_id, "slow"))
        await call.done_writing()
        return [answer async for answer in call]


def test_a_duplicate_id_in_flight_is_invalid_and_the_stream_carries_on(server: ServerProcess):
    # Written back to back to the slow model: all in flight at once.
    answers = asyncio.run(_stream_answers(server.url, "v1", ["a", "a", "a", "b", "", ""]))
    assert len(answers) == 6
    ok = [a.id for a in answers if a.WhichOneof("result") == "response"]
    refused = [a for a in answers if a.WhichOneof("result") == "error"]
    assert sorted(ok) == ["", "", "a", "b"], ok  # empty ids may repeat
    assert [a.id for a in refused] == ["a", "a"]
    for a in refused:
        assert a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "already in flight" in a.error.message


def test_kserve_duplicate_ids_and_every_answer_is_final(server: ServerProcess):
    answers = asyncio.run(_stream_answers(server.url, "kserve", ["a", "a", "b"]))
    assert len(answers) == 3
    refused = [a for a in answers if a.error_message]
    assert [a.infer_response.id for a in refused] == ["a"]
    assert "already in flight" in refused[0].error_message
    for a in answers:  # errors too (docs/protocols.md)
        assert a.infer_response.parameters["triton_final_response"].bool_param


def test_a_kserve_error_answer_is_final(server: ServerProcess):
    bad = kserve_request("x")
    bad.model_name = "nope"

    async def run() -> list[kpb.ModelStreamInferResponse]:
        async with grpc.aio.insecure_channel(server.url) as channel:
            call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await call.write(bad)
            await call.done_writing()
            return [answer async for answer in call]

    [answer] = asyncio.run(run())
    assert "nope" in answer.error_message
    assert answer.infer_response.parameters["triton_final_response"].bool_param


def test_an_id_may_be_reused_once_its_answer_has_come(server: ServerProcess):
    async def run() -> list[pb.InferStreamResponse]:
        async with grpc.aio.insecure_channel(server.url) as channel:
            call = pb_grpc.InferenceServiceStub(channel).InferStream()
            answers = []
            for _ in range(20):
                await call.write(v1_request("same"))
                answers.append(await call.read())
            await call.done_writing()
            return answers

    answers = asyncio.run(run())
    assert [a.WhichOneof("result") for a in answers] == ["response"] * 20

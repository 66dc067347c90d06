"""Clients flooding Stats, across two frontends: everyone is answered, and rightly.

Overlapping Stats calls share one snapshot (service/engine/shared_calls.py), in each
frontend and in the engine, so a flood cannot queue snapshots ahead of other clients'
requests; callers that leave (deadline) must not take the shared answer from the ones
that stay. What a flood costs a client sending one request at a time is a benchmark
(`python -m benchmarks.stats_flood`; docs/reliability.md, "Stats under a flood"). Real server
(`trtserve serve` as a child process), real sockets.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from trtserve.client import AsyncClient
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.testing.servers import ServerProcess

FLOODERS = 84
HASTY = 12
SECONDS = 2.0


async def _flood(url: str, end: float) -> tuple[int, int]:
    """(Stats answered, Stats past their deadline) from FLOODERS callers on 4 connections,
    and HASTY callers on a fifth with a deadline too short for an answer to come in time.

    The hasty ones reset a stream every half millisecond: gRPC's overload protection may
    refuse their connection new streams (REFUSED_STREAM: UNAVAILABLE) while the streams
    they reset still count against server.max_concurrent_streams, as it does a rapid-reset
    flood. Only their own connection: every other caller is answered."""
    answered = expired = 0

    async def flooder(stub: pb_grpc.InferenceServiceStub) -> None:
        nonlocal answered
        while time.monotonic() < end:
            response = await stub.Stats(pb.StatsRequest(), timeout=30)
            assert [m.name for m in response.models] == ["example"]
            assert len(response.frontends) == 2
            answered += 1

    async def hasty(stub: pb_grpc.InferenceServiceStub) -> None:
        nonlocal expired
        while time.monotonic() < end:
            try:
                await stub.Stats(pb.StatsRequest(), timeout=0.0005)
            except grpc.aio.AioRpcError as e:
                assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.UNAVAILABLE), e
                expired += 1
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.01)

    # A connection each (gRPC's channels of one process otherwise share one).
    channels = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(5)]
    stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
    try:
        await asyncio.gather(*(flooder(stubs[i % 4]) for i in range(FLOODERS)),
                             *(hasty(stubs[4]) for _ in range(HASTY)))
    finally:
        for c in channels:
            await c.close(grace=None)
    return answered, expired


async def _infers(url: str, session: ort.InferenceSession, end: float) -> int:
    rng = np.random.default_rng(0)
    done = 0
    async with AsyncClient(url) as c:
        while time.monotonic() < end or done < 20:
            x = rng.standard_normal((1 + done % 4, 64)).astype(np.float32)
            out = await c.infer("example", {"input": x}, timeout=30)
            (want,) = session.run(None, {"input": x})
            np.testing.assert_allclose(out["output"], want, rtol=1e-5, atol=1e-5)
            done += 1
    return done


def test_a_stats_flood_leaves_every_call_answered_and_the_totals_right(
        example_onnx: Path) -> None:
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2"])

    async def run() -> tuple[tuple[int, int], int, int]:
        end = time.monotonic() + SECONDS
        flood, infers = await asyncio.gather(_flood(server.url, end),
                                             _infers(server.url, session, end))
        async with AsyncClient(server.url) as c:
            (model,) = (await c.stats("example", timeout=30)).models
        return flood, infers, model.requests

    with server.serving():
        (answered, expired), infers, requests = asyncio.run(run())
    assert answered > FLOODERS and expired > 0
    assert requests == infers  # every Infer counted once, whatever the flood

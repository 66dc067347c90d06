"""Clients flooding Stats, across two frontends: everyone is answered, and rightly.

Overlapping Stats calls share one snapshot (service/engine/shared_calls.py), in each
frontend and in the engine, so a flood cannot queue snapshots ahead of other clients'
requests; callers that leave (deadline) must not take the shared answer from the ones
that stay. What a flood costs a client sending one request at a time is a benchmark
(`python -m benchmarks.stats_flood`; docs/reliability.md, "Stats"). Real server
(`trtserve serve` as a child process), real sockets.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from trtserve.client import AsyncClient, InferenceError
from trtserve.service.testing.servers import ServerProcess

FLOODERS = 96
SECONDS = 2.0


async def _flood(url: str, end: float) -> tuple[int, int]:
    """(Stats answered, Stats past their deadline) from FLOODERS callers on 4 connections,
    one in eight with a deadline too short for an answer to come in time."""
    answered = expired = 0

    async def flooder(client: AsyncClient, i: int) -> None:
        nonlocal answered, expired
        while time.monotonic() < end:
            try:
                response = await client.stats(timeout=0.0005 if i % 8 == 0 else 30)
            except InferenceError as e:
                assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED, e
                expired += 1
                continue
            assert [m.name for m in response.models] == ["example"]
            assert len(response.frontends) == 2
            answered += 1

    clients = [AsyncClient(url) for _ in range(4)]
    try:
        await asyncio.gather(*(flooder(clients[i % 4], i) for i in range(FLOODERS)))
    finally:
        for c in clients:
            await c.close()
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

"""The engine's poll for the next frame (`server.engine_spin_us`): once a frontend has
nothing in flight, the engine's loop keeps a callback ready until any frontend's next
frame or the budget; never with a budget of 0.

A real EngineHost over a LocalEngine (the example model on ONNX Runtime) and a real
RemoteEngine on one event loop, through a real socketpair."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.api import InferRequest, TensorIn
from trtserve.service.engine.host import EngineHost
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.ipc.shm import Arena

ARENA_BYTES = 1 << 20


@pytest.fixture
async def linked(example_onnx: Path
                 ) -> AsyncIterator[Callable[[int], asyncio.Future[tuple[EngineHost,
                                                                         RemoteEngine]]]]:
    """Make an engine with `engine_spin_us` and a frontend linked to it."""
    repository = ModelRepository()
    await repository.load(ModelConfig(name="example", path=str(example_onnx), workers=1,
                                      max_queue_delay_us=0))
    remotes: list[RemoteEngine] = []

    async def make(spin_us: int) -> tuple[EngineHost, RemoteEngine]:
        host = EngineHost(LocalEngine(repository), ServerConfig(engine_spin_us=spin_us))
        inputs, outputs = Arena.create("in", ARENA_BYTES), Arena.create("out", ARENA_BYTES)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        await host.attach(0, os.getpid(), ours, inputs, outputs)
        remote = RemoteEngine(Arena(os.dup(inputs.fd), ARENA_BYTES),
                              Arena(os.dup(outputs.fd), ARENA_BYTES))
        remote.spin_s = 0.0  # only the engine polls here
        await remote.connect(theirs)
        host.set_health("example", True)
        await asyncio.sleep(0.05)  # the pushed health arrives
        remotes.append(remote)
        return host, remote

    yield make  # type: ignore[misc]
    for remote in remotes:
        remote.close()
    await repository.stop()


def _request() -> InferRequest:
    x = np.ones((1, 64), np.float32)
    return InferRequest(model="example", inputs={"input": TensorIn("FP32", x.shape, x)})


async def _polls(host: EngineHost) -> bool:
    """Whether the engine's loop is polling, seen from the loop between its passes."""
    await asyncio.sleep(0)
    return host._spinning


async def test_after_a_frontends_last_reply_the_engine_polls_until_the_budget(linked) -> None:
    host, remote = await linked(50_000)
    assert not await _polls(host)  # nothing answered yet
    await remote.infer(_request())
    assert await _polls(host)
    await asyncio.sleep(0.15)  # past the 50 ms budget, no frame since
    assert not await _polls(host)


async def test_the_next_frame_ends_the_poll(linked) -> None:
    host, remote = await linked(100_000)
    host.spin_s = 10.0  # past what the setting allows: here only a frame can end it
    await remote.infer(_request())
    assert await _polls(host)
    await remote.stats()  # a control frame; no request, so no new poll after it
    assert not await _polls(host)
    await remote.infer(_request())  # answered: the frontend is idle again
    assert await _polls(host)


async def test_a_budget_of_zero_never_polls(linked) -> None:
    host, remote = await linked(0)
    for _ in range(3):
        await remote.infer(_request())
        assert not await _polls(host)

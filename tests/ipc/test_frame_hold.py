"""Frames held while the engine has a backlog (remote.py `_hold`, link.py `outgoing`).

The link's side: a frame asked for with `hold_s` is written once that passes, or at
the end of the loop iteration in which a message that may not wait joins it; the
engine stamps every frame it writes with whether a model has a backlog. End to end:
a RemoteEngine over the real link to an EngineHost serving the controlled double
(one worker, its batches held at a gate), so the backlog is made, not simulated.
"""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np

from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model, expected
from trtserve.service.config import ServerConfig
from trtserve.service.engine.api import InferRequest, TensorIn
from trtserve.service.engine.host import EngineHost
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.ipc.link import open_link
from trtserve.service.ipc.shm import Arena

ARENA_BYTES = 1 << 20


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_held_frame_waits_its_hold_unless_a_message_that_cannot_wait_joins_it():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    received: list[object] = []
    stamped: list[object] = []
    sender = await open_link(ours, lambda f: None, lambda e: None, before_write=stamped.append)
    await open_link(theirs, received.append, lambda e: None)
    try:
        sender.outgoing(60.0).cancels.append(1)
        await _turns()
        assert sender.frames_out == 0  # held
        sender.outgoing(60.0).cancels.append(2)  # joins the held frame, still held
        await _turns()
        assert sender.frames_out == 0
        sender.outgoing().cancels.append(3)  # may not wait: the frame goes now
        await _turns()
        assert sender.frames_out == 1
        await asyncio.sleep(0.05)
        assert [list(f.cancels) for f in received] == [[1, 2, 3]]
        assert len(stamped) == 1
        sender.outgoing(0.02).cancels.append(4)  # a short hold runs out
        await _turns()
        assert sender.frames_out == 1
        await asyncio.sleep(0.1)
        assert sender.frames_out == 2 and [list(f.cancels) for f in received][1] == [4]
    finally:
        sender.close()


def _request(x: np.ndarray, model: str = "controlled") -> InferRequest:
    return InferRequest(model=model, inputs={INPUT: TensorIn("FP32", x.shape, x)})


async def test_a_frontend_holds_requests_only_while_the_engine_reports_a_backlog():
    backend = ControlledBackend()
    repository = ModelRepository()
    # One worker, batches of at most 8 rows, none waiting out a delay.
    await repository.add(backend.runtime(controlled_model(workers=1, max_batch_size=8,
                                                          max_queue_delay_us=0)))
    runtime = repository.get("controlled")
    # A second model, never held up: a frontend holds only a backlogged model's requests.
    await repository.add(ControlledBackend().runtime(controlled_model(
        name="other", workers=1, max_batch_size=8, max_queue_delay_us=0)))
    host = EngineHost(LocalEngine(repository), ServerConfig())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    inputs, outputs = Arena.create("in", ARENA_BYTES), Arena.create("out", ARENA_BYTES)
    await host.attach(0, os.getpid(), ours, inputs, outputs)
    host.set_health("controlled", True)
    host.set_health("other", True)
    remote = RemoteEngine(Arena(os.dup(inputs.fd), ARENA_BYTES),
                          Arena(os.dup(outputs.fd), ARENA_BYTES))
    await remote.connect(theirs)
    remote.hold_s = 0.3
    link = remote._link
    assert link is not None
    try:
        one = np.ones((8, WIDTH), np.float32)
        await remote.infer(_request(one))  # no backlog: nothing held
        assert not remote._backlogged
        backend.controls.hold()
        xs = [np.full((8, WIDTH), i, np.float32) for i in range(4)]
        # The first runs (held at the gate), the second waits for the worker, the rest
        # queue behind it: a backlog.
        tasks = [asyncio.create_task(remote.infer(_request(x))) for x in xs]
        for _ in range(200):
            if runtime.backlogged:
                break
            await asyncio.sleep(0.005)
        assert runtime.backlogged
        await remote.stats()  # a frame from the engine, stamped with its backlog
        assert remote._backlogged == {"controlled"}
        sent = link.frames_out
        other = await asyncio.wait_for(remote.infer(_request(one, "other")), 0.25)
        np.testing.assert_array_equal(other.outputs["y"].data, expected(one))
        assert link.frames_out == sent + 1  # not held: its model has no backlog
        sent = link.frames_out
        held = asyncio.create_task(remote.infer(_request(np.full((8, WIDTH), 9, np.float32))))
        await asyncio.sleep(0.1)
        assert link.frames_out == sent  # held: the engine would only queue it
        await asyncio.sleep(0.4)
        assert link.frames_out == sent + 1  # the hold ran out
        (port,) = host.ports.values()
        # Four frames of requests: the first, the 4 made in one loop turn, "other", the held.
        assert (port.snapshot().requests, port.snapshot().request_frames) == (7, 4)
        backend.controls.release()
        answers = await asyncio.gather(*tasks, held)
        for x, answer in zip([*xs, np.full((8, WIDTH), 9, np.float32)], answers, strict=True):
            np.testing.assert_array_equal(answer.outputs["y"].data, expected(x))
        await remote.stats()  # the backlog is gone, and the next frame says so
        assert not remote._backlogged
        sent = link.frames_out
        quick = asyncio.create_task(remote.infer(_request(one)))
        await _turns()
        assert link.frames_out == sent + 1  # not held
        await quick
    finally:
        backend.controls.release()
        remote.close()
        for port in host.ports.values():
            port.close()
        await repository.stop()

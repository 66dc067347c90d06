"""Several requests in one frame: the engine submits them as a group.

The engine side is a real EngineHost over a LocalEngine (ONNX Runtime,
`offset_net`: output = input + 1, 1 worker); the frontend side writes raw
frames on the real link (a socketpair) or uses a RemoteEngine. A frame's
requests form batches together; an entry that cannot run fails alone, with
its own id; every reply is matched to its request by id; a cancel in the
same frame takes its request out of the group's batch; the model's counters
add up.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.ipc import codec
from service.ipc.link import Link, open_link
from service.ipc.shm import Arena
from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model, expected
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.api import InferRequest, TensorIn
from trtserve.service.engine.host import EngineHost
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.gen.trtserve.internal import link_pb2

ARENA_BYTES = 1 << 20
FEATURES = 4


@dataclass
class Engine:
    host: EngineHost
    repository: ModelRepository
    inputs: Arena  # the frontend's view of its input arena
    outputs: Arena  # the frontend's view of its output arena
    sock: socket.socket  # the frontend's end of the link


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    from trtserve.service.testing.onnx_models import offset_net

    repository = ModelRepository()
    path = offset_net(tmp_path / "plus1.onnx", 1.0, FEATURES)
    await repository.load(ModelConfig(name="plus1", path=str(path), workers=1))
    host = EngineHost(LocalEngine(repository), ServerConfig())
    inputs, outputs = Arena.create("in", ARENA_BYTES), Arena.create("out", ARENA_BYTES)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    await host.attach(0, os.getpid(), ours, inputs, outputs)
    host.set_health("plus1", True)
    try:
        yield Engine(host, repository, Arena(os.dup(inputs.fd), ARENA_BYTES),
                     Arena(os.dup(outputs.fd), ARENA_BYTES), theirs)
    finally:
        for port in host.ports.values():
            port.close()
        await repository.stop()


class RawFrontend:
    """The frontend's end of the link, frame by frame: what the engine replied, by id."""

    def __init__(self) -> None:
        self.replies: dict[int, Any] = {}
        self.link: Link | None = None
        self._changed = asyncio.Event()

    async def open(self, sock: socket.socket) -> RawFrontend:
        self.link = await open_link(sock, self._on_frame, lambda e: None)
        return self

    def _on_frame(self, frame: Any) -> None:
        for reply in frame.replies:
            for rid, one in _members(reply) if reply.member_ids else [(reply.id, reply)]:
                assert rid not in self.replies, f"two replies to request {rid}"
                self.replies[rid] = one
        self._changed.set()

    async def wait_for(self, count: int) -> dict[int, Any]:
        while len(self.replies) < count:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)
        return self.replies

    def send(self, frame: Any) -> None:
        assert self.link is not None
        body = frame.SerializeToString()
        self.link._transport.write(len(body).to_bytes(4, "little") + body)


def _members(reply: Any) -> list[tuple[int, Any]]:
    """A group's reply (engine/groups.py) as the reply each member would have had alone:
    its id, and its rows of every (inline) output."""
    members = []
    start = 0
    for rid, rows in zip(reply.member_ids, reply.member_rows, strict=True):
        one = link_pb2.Reply(id=rid, model=reply.model, version=reply.version)
        for tensor in reply.outputs:
            dtype, _, data = codec.take(tensor, None, copy=True)
            assert isinstance(data, np.ndarray)
            part = data[start:start + rows]
            codec.put(one.outputs.add(), tensor.name, dtype, part.shape, part, None)
        members.append((rid, one))
        start += rows
    return members


def _add(frame: Any, rid: int, x: np.ndarray, model: str = "plus1") -> Any:
    message = frame.requests.add()
    message.id = rid
    message.model = model
    codec.put(message.inputs.add(), "input", "FP32", x.shape, x, None)
    return message


def _output(reply: Any) -> np.ndarray:
    (tensor,) = reply.outputs
    _, _, data = codec.take(tensor, None, copy=True)
    assert isinstance(data, np.ndarray)
    return data


def _x(i: int) -> np.ndarray:
    return np.full((1, FEATURES), float(i), np.float32)


async def _warm(frontend: RawFrontend, rid: int) -> None:
    """One request alone: a batch of one row is now known to be quick (runs inline)."""
    frame = link_pb2.Frame()
    _add(frame, rid, _x(0))
    frontend.send(frame)
    await frontend.wait_for(len(frontend.replies) + 1)


async def test_the_requests_of_one_frame_form_one_batch(engine: Engine) -> None:
    frontend = await RawFrontend().open(engine.sock)
    await _warm(frontend, 1000)
    stats = engine.repository.get("plus1").worker_stats[0]
    batches_before = stats.batches
    frame = link_pb2.Frame()
    for i in range(16):
        _add(frame, i + 1, _x(i))
    frontend.send(frame)
    replies = await frontend.wait_for(17)
    for i in range(16):
        np.testing.assert_array_equal(_output(replies[i + 1]), _x(i) + 1)
    # Before grouping, each request dispatched alone (its worker was free again after
    # every inline run): 16 batches of one row.
    assert stats.batches - batches_before == 1


async def test_an_entry_that_cannot_run_fails_alone_and_replies_match_by_id(
        engine: Engine) -> None:
    frontend = await RawFrontend().open(engine.sock)
    await _warm(frontend, 1000)
    frame = link_pb2.Frame()
    _add(frame, 7, _x(7))
    _add(frame, 3, np.zeros((1, FEATURES + 1), np.float32))  # a shape the model refuses
    _add(frame, 9, _x(9), model="nope")  # a model not served
    bad_range = _add(frame, 4, _x(4))  # bytes outside the arena: a broken frontend
    bad_range.inputs[0].arena.offset = ARENA_BYTES * 4
    bad_range.inputs[0].arena.byte_size = 16
    bad_dtype = _add(frame, 6, _x(6))
    bad_dtype.inputs[0].dtype = "FP99"
    _add(frame, 5, _x(5))
    frontend.send(frame)
    replies = await frontend.wait_for(7)
    np.testing.assert_array_equal(_output(replies[7]), _x(7) + 1)
    np.testing.assert_array_equal(_output(replies[5]), _x(5) + 1)
    codes = {rid: grpc.StatusCode.OK if not r.code else
             next(c for c in grpc.StatusCode if c.value[0] == r.code)
             for rid, r in replies.items()}
    assert codes[3] == grpc.StatusCode.INVALID_ARGUMENT and "input" in replies[3].message
    assert codes[9] == grpc.StatusCode.NOT_FOUND and "nope" in replies[9].message
    assert codes[4] == grpc.StatusCode.INTERNAL
    assert codes[6] == grpc.StatusCode.INVALID_ARGUMENT and "FP99" in replies[6].message
    counters = engine.repository.get("plus1").counters
    # The warm-up's and the two good ones; the refused ones were never accepted.
    assert (counters.requests, counters.success, counters.failure) == (3, 3, 0)
    (port,) = engine.host.ports.values()
    assert port.in_flight == {}


async def test_a_cancel_in_the_same_frame_takes_its_request_out_of_the_batch(
        engine: Engine) -> None:
    frontend = await RawFrontend().open(engine.sock)
    await _warm(frontend, 1000)
    frame = link_pb2.Frame()
    for i in range(1, 5):
        _add(frame, i, _x(i))
    frame.cancels.append(2)
    frontend.send(frame)
    replies = await frontend.wait_for(5)
    assert replies[2].code == grpc.StatusCode.CANCELLED.value[0]
    for i in (1, 3, 4):
        np.testing.assert_array_equal(_output(replies[i]), _x(i) + 1)
    await asyncio.sleep(0)  # the counting callback of the cancelled request
    counters = engine.repository.get("plus1").counters
    assert (counters.success, counters.cancelled) == (4, 1)
    assert engine.repository.get("plus1").worker_stats[0].requests == 4


async def test_many_remote_requests_in_flight_each_get_their_own_answer(
        engine: Engine) -> None:
    remote = RemoteEngine(engine.inputs, engine.outputs)
    await remote.connect(engine.sock)
    try:
        xs = [np.full((1 + i % 3, FEATURES), float(i), np.float32) for i in range(300)]
        results = await asyncio.gather(*(remote.infer(InferRequest(
            model="plus1", inputs={"input": TensorIn("FP32", x.shape, x)})) for x in xs))
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result.outputs["output"].data, x + 1)
        counters = engine.repository.get("plus1").counters
        assert (counters.requests, counters.success) == (300, 300)
        (frontend,) = (await remote.stats()).frontends
        assert (frontend.requests, frontend.in_flight) == (300, 0)
    finally:
        remote.close()


# --- when frames are written: a last reply at once, grouped under load -------------------


def _plus1(x: np.ndarray) -> InferRequest:
    return InferRequest(model="plus1", inputs={"input": TensorIn("FP32", x.shape, x)})


async def test_the_engine_writes_a_reply_once_nothing_else_is_in_flight() -> None:
    """A batch answered outside a read (here on the worker's thread, held there until
    the test has looked): the reply to the frontend's last request in flight is written
    when the request is settled, not at the end of that loop iteration."""
    backend = ControlledBackend()
    repository = ModelRepository()
    await repository.add(backend.runtime(controlled_model(max_queue_delay_us=0)))
    host = EngineHost(LocalEngine(repository), ServerConfig())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    backend.controls.hold()
    try:
        port = await host.attach(0, os.getpid(), ours, Arena.create("in", ARENA_BYTES),
                                 Arena.create("out", ARENA_BYTES))
        assert port.link is not None
        frontend = await RawFrontend().open(theirs)
        x = np.ones((1, WIDTH), np.float32)
        frame = link_pb2.Frame()
        _add(frame, 1, x, model="controlled").inputs[0].name = INPUT
        frontend.send(frame)
        assert await asyncio.to_thread(backend.controls.started.wait, 10)  # the batch runs
        future = port.in_flight[1].future
        assert future is not None
        before = port.link.frames_out
        written: list[int] = []
        # Runs right after the engine's own completion callback of the request, in the
        # same loop iteration; a write left to the end of the iteration comes after it.
        future.add_done_callback(lambda _: written.append(port.link.frames_out - before))
        backend.controls.release()
        replies = await frontend.wait_for(1)
        assert replies[1].code == 0
        np.testing.assert_array_equal(_output(replies[1]), expected(x))
        assert written == [1]
    finally:
        backend.controls.release()
        for p in host.ports.values():
            p.close()
        await repository.stop()


async def test_frames_still_carry_many_requests_and_replies_under_load(engine: Engine) -> None:
    """With requests in flight, the requests (and replies) of one loop iteration share a
    frame; every reply reaches its own request."""
    remote = RemoteEngine(engine.inputs, engine.outputs)
    await remote.connect(engine.sock)
    link = remote._link
    (port,) = engine.host.ports.values()
    assert link is not None and port.link is not None
    try:
        await remote.infer(_plus1(_x(0)))  # warm: a batch of this size runs inline
        sent, answered = link.frames_out, port.link.frames_out
        xs = [_x(i) for i in range(1, 129)]
        results = await asyncio.gather(*(remote.infer(_plus1(x)) for x in xs))
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result.outputs["output"].data, x + 1)
        # The 128 were made in one loop iteration: one frame.
        assert link.frames_out - sent == 1
        # Replies leave per batch (max_batch_size bounds it), not one write each.
        assert port.link.frames_out - answered <= 16
        assert remote._pending == {} and port.in_flight == {}
    finally:
        remote.close()

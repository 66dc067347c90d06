"""Groups a frontend forms of the requests one of its frames carries (engine/groups.py).

The frontend side is the real RemoteEngine; the engine side the real EngineHost
over a LocalEngine (ONNX Runtime's `offset_net`, y = x + 1, and `lookup_net`,
whose Gather fails for an id out of range), over a real socketpair and arenas.
Where a test must send what no RemoteEngine sends (a broken group), it writes raw
frames. Each member must get what it would get alone: its own rows, its own
error, its own cancellation; the counters count the clients' requests.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.ipc.test_frames import FEATURES, RawFrontend, _output
from tests.ipc.test_groups import _code, _groups_of, _input_arena, served  # noqa: F401
from trtserve.client.timer import now
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.api import InferRequest, InferResult, TensorIn
from trtserve.service.engine.host import EngineHost, FrontendPort
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import ServeError
from trtserve.service.gen.trtserve.internal import link_pb2
from trtserve.service.ipc import codec
from trtserve.service.ipc.shm import Arena
from trtserve.service.testing.onnx_models import LOOKUP_INPUT, LOOKUP_ROWS, lookup_net, offset_net

ARENA_BYTES = 8 << 20


@dataclass
class Linked:
    host: EngineHost
    port: FrontendPort
    remote: RemoteEngine
    repository: ModelRepository
    frontend_inputs: Arena
    # What the engine's port was handed, message by message: ("group", member ids) or
    # ("alone", id).
    seen: list[tuple[str, Any]]


async def _linked(tmp_path: Path, inline_max_bytes: int,
                  max_rows: int | None = None) -> AsyncIterator[Linked]:
    repository = ModelRepository()
    await repository.load(ModelConfig(
        name="plus1", path=str(offset_net(tmp_path / "plus1.onnx", 1.0, FEATURES)),
        workers=1, max_rows_per_request=max_rows or 0))
    await repository.load(ModelConfig(name="lookup", path=str(
        lookup_net(tmp_path / "lookup.onnx")), workers=1))
    host = EngineHost(LocalEngine(repository), ServerConfig(),
                      inline_max_bytes=inline_max_bytes)
    inputs, outputs = Arena.create("in", ARENA_BYTES), Arena.create("out", ARENA_BYTES)
    theirs_in = Arena(os.dup(inputs.fd), ARENA_BYTES)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    port = await host.attach(0, os.getpid(), ours, inputs, outputs)
    seen: list[tuple[str, Any]] = []
    start, start_sent = port._start, port._start_sent

    def alone(message: Any, more_follow: bool) -> None:
        seen.append(("alone", message.id))
        start(message, more_follow)

    def group(message: Any, more_follow: bool) -> None:
        seen.append(("group", tuple(message.member_ids)))
        start_sent(message, more_follow)

    port._start, port._start_sent = alone, group  # type: ignore[method-assign]
    remote = RemoteEngine(theirs_in, Arena(os.dup(outputs.fd), ARENA_BYTES),
                          inline_max_bytes=inline_max_bytes)
    await remote.connect(theirs)
    for name in ("", "plus1", "lookup"):
        host.set_health(name, True)
    await asyncio.sleep(0.05)  # the pushed descriptions and health arrive
    try:
        yield Linked(host, port, remote, repository, theirs_in, seen)
    finally:
        remote.close()
        await repository.stop()


@pytest.fixture(params=["inline", "arena"])
async def linked(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Linked]:
    """Inputs inline in the frames, or every one through the frontend's arena."""
    async for one in _linked(tmp_path, codec.INLINE_MAX_BYTES if request.param == "inline"
                             else 0):
        yield one


def _plus1(x: np.ndarray, **kwargs: Any) -> InferRequest:
    return InferRequest(model="plus1", inputs={"input": TensorIn("FP32", x.shape, x)},
                        **kwargs)


def _rows(rows: int, value: float, width: int = FEATURES) -> np.ndarray:
    return np.full((rows, width), value, np.float32) + np.arange(rows, dtype=np.float32)[:, None]


async def _all(remote: RemoteEngine, requests: list[InferRequest]
               ) -> list[InferResult | BaseException]:
    """The requests sent in one loop iteration (so in one frame), each one's outcome."""
    return await asyncio.gather(*(remote.infer(r) for r in requests), return_exceptions=True)


async def test_the_requests_of_one_frame_go_as_one_group_and_each_gets_its_own_rows(
        linked: Linked) -> None:
    runtime = linked.repository.get("plus1")
    queued = _groups_of(runtime)
    xs = [_rows(1 + i % 3, 10.0 * i) for i in range(8)]
    results = await _all(linked.remote, [_plus1(x) for x in xs])
    for x, result in zip(xs, results, strict=True):
        assert isinstance(result, InferResult)
        np.testing.assert_array_equal(result.outputs["output"].data, x + 1)
    assert linked.seen == [("group", tuple(range(1, 9)))]
    assert queued == [tuple(x.shape[0] for x in xs)]
    counters = runtime.counters
    assert (counters.requests, counters.success) == (8, 8)
    assert (linked.port.requests, linked.port.in_flight) == (8, {})
    await asyncio.sleep(0.05)  # the releases of the output ranges reach the engine
    assert linked.frontend_inputs.ring.used_bytes == 0  # every member's range came back


async def test_only_requests_of_one_model_and_shape_share_a_group(linked: Linked) -> None:
    requests = [_plus1(_rows(1, 1.0)), _plus1(_rows(2, 2.0, FEATURES + 1)),  # refused
                _plus1(_rows(1, 3.0)),
                InferRequest(model="lookup", inputs={LOOKUP_INPUT: TensorIn(
                    "INT64", (1, 4), np.zeros((1, 4), np.int64))}),
                _plus1(_rows(1, 5.0), outputs=("output",)),  # other outputs asked
                _plus1(_rows(1, 6.0))]
    results = await _all(linked.remote, requests)
    assert sorted(linked.seen, key=str) == sorted(
        [("group", (1, 3, 6)), ("alone", 2), ("alone", 4), ("alone", 5)], key=str)
    assert isinstance(results[1], ServeError) and "input" in str(results[1])
    for i in (0, 2, 4, 5):
        result = results[i]
        assert isinstance(result, InferResult)
        x = requests[i].inputs["input"].data
        np.testing.assert_array_equal(result.outputs["output"].data, x + 1)


async def test_a_group_stops_at_the_models_rows_per_request(tmp_path: Path) -> None:
    async for linked in _linked(tmp_path, codec.INLINE_MAX_BYTES, max_rows=4):
        xs = [_rows(2, float(i)) for i in range(5)]
        results = await _all(linked.remote, [_plus1(x) for x in xs])
        assert linked.seen == [("group", (1, 2)), ("group", (3, 4)), ("alone", 5)]
        for x, result in zip(xs, results, strict=True):
            assert isinstance(result, InferResult)
            np.testing.assert_array_equal(result.outputs["output"].data, x + 1)


async def test_a_member_the_model_cannot_run_fails_alone_the_others_are_answered(
        linked: Linked) -> None:
    ids = [np.full((1, 4), i % LOOKUP_ROWS, np.int64) for i in range(6)]
    ids[3] = np.full((1, 4), LOOKUP_ROWS + 5, np.int64)  # out of the table: Gather fails
    results = await _all(linked.remote, [InferRequest(model="lookup", inputs={
        LOOKUP_INPUT: TensorIn("INT64", x.shape, x)}) for x in ids])
    assert linked.seen == [("group", tuple(range(1, 7)))]
    assert isinstance(results[3], ServeError)
    for i in (0, 1, 2, 4, 5):
        assert isinstance(results[i], InferResult), results[i]
    counters = linked.repository.get("lookup").counters
    assert (counters.requests, counters.success, counters.failure) == (6, 5, 1)


async def test_a_member_cancelled_in_its_frame_is_answered_cancelled_alone(
        linked: Linked) -> None:
    xs = [_rows(1, float(i)) for i in range(4)]
    tasks = [asyncio.ensure_future(linked.remote.infer(_plus1(x))) for x in xs]
    await asyncio.sleep(0)  # each has added itself to the frame
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert linked.seen == [("group", (1, 2, 3, 4))]
    assert isinstance(results[1], asyncio.CancelledError)
    for i in (0, 2, 3):
        result = results[i]
        assert isinstance(result, InferResult)
        np.testing.assert_array_equal(result.outputs["output"].data, xs[i] + 1)
    await asyncio.sleep(0.05)
    assert linked.port.in_flight == {}
    assert linked.frontend_inputs.ring.used_bytes == 0


async def test_members_keep_their_deadlines(linked: Linked) -> None:
    got: list[Any] = []
    sent = linked.port._start_sent

    def recording(message: Any, more_follow: bool) -> None:
        got.append(list(message.member_deadlines))
        sent(message, more_follow)

    linked.port._start_sent = recording  # type: ignore[method-assign]
    soon = now() + 30.0
    results = await _all(linked.remote, [_plus1(_rows(1, 1.0), deadline=soon),
                                         _plus1(_rows(1, 2.0)),
                                         _plus1(_rows(1, 3.0), deadline=soon + 1)])
    assert all(isinstance(r, InferResult) for r in results)
    assert got == [[soon, 0.0, soon + 1]]
    got.clear()
    await _all(linked.remote, [_plus1(_rows(1, 1.0)), _plus1(_rows(1, 2.0))])
    assert got == [[]]  # none has one: none sent


# --- what no RemoteEngine sends: the engine's checks of a group ---------------------------


def _group(frame: Any, ids: list[int], xs: list[np.ndarray], arena: Arena | None = None,
           model: str = "plus1") -> Any:
    """A group message as a frontend writes it: inline, or in one arena range."""
    message = frame.requests.add()
    message.model = model
    message.member_ids.extend(ids)
    message.member_rows.extend(x.shape[0] for x in xs)
    stacked = np.concatenate(xs)
    tensor = message.inputs.add(name="input", dtype="FP32", shape=stacked.shape)
    if arena is None:
        tensor.inline = stacked.tobytes()
    else:
        offset = arena.write(stacked)
        assert offset is not None
        tensor.arena.offset = offset
        tensor.arena.byte_size = stacked.nbytes
    return message


Served = tuple[EngineHost, ModelRepository, socket.socket]


@pytest.mark.parametrize("where", ["inline", "arena"])
async def test_a_sent_group_the_model_refuses_is_told_member_by_member(
        served: Served, where: str) -> None:  # noqa: F811
    host, repository, sock = served
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    wide = [_rows(1, 1.0, FEATURES + 1), _rows(2, 2.0, FEATURES + 1)]
    _group(frame, [1, 2], wide, _input_arena(host) if where == "arena" else None)
    frontend.send(frame)
    replies = await frontend.wait_for(2)
    for rid in (1, 2):
        assert _code(replies[rid]) == grpc.StatusCode.INVALID_ARGUMENT
        assert "input" in replies[rid].message
    assert repository.get("plus1").counters.requests == 0


@pytest.mark.parametrize("broken", [
    lambda m: m.member_rows.append(1),  # more row counts than members
    lambda m: m.member_deadlines.append(1.0),  # a deadline for one member of two
    lambda m: setattr(m.inputs[0].arena, "byte_size", 12),  # not whole rows
    lambda m: m.member_rows.__setitem__(1, 2),  # 3 rows declared, 2 in the input
])
async def test_a_group_that_cannot_be_cut_fails_each_member_and_nothing_else(
        served: Served, broken: Callable[[Any], None]) -> None:  # noqa: F811
    host, repository, sock = served
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    broken(_group(frame, [1, 2], [_rows(1, 1.0), _rows(1, 2.0)], _input_arena(host)))
    _group(frame, [3, 4], [_rows(1, 3.0), _rows(2, 4.0)])
    frontend.send(frame)
    replies = await frontend.wait_for(4)
    assert {_code(replies[1]), _code(replies[2])} == {grpc.StatusCode.INTERNAL}
    np.testing.assert_array_equal(_output(replies[3]), _rows(1, 3.0) + 1)
    np.testing.assert_array_equal(_output(replies[4]), _rows(2, 4.0) + 1)
    assert repository.get("plus1").counters.requests == 2


async def test_a_group_the_model_refuses_is_told_member_by_member_and_frees_its_range(
        linked: Linked) -> None:
    wide = [_rows(1, 1.0, FEATURES + 1), _rows(2, 2.0, FEATURES + 1)]
    results = await _all(linked.remote, [_plus1(x) for x in wide])
    assert linked.seen == [("group", (1, 2)), ("alone", 1), ("alone", 2)]
    for result in results:
        assert isinstance(result, ServeError) and "input" in str(result)
    await asyncio.sleep(0.05)
    assert linked.frontend_inputs.ring.used_bytes == 0  # once both members were answered


async def test_a_group_that_cannot_be_written_fails_its_members_and_leaves_none_waiting(
        tmp_path: Path) -> None:
    """A fault of ours while the frame is written (injected: the arena's write raises):
    the group's members are answered INTERNAL at once, nothing waits for a reply that
    will not come (a drain would hang), and the next requests are served."""
    async for linked in _linked(tmp_path, inline_max_bytes=0):
        write_stacked = linked.frontend_inputs.write_stacked

        def broken(arrays: Any) -> int | None:
            raise RuntimeError("injected")

        linked.frontend_inputs.write_stacked = broken  # type: ignore[method-assign]
        results = await _all(linked.remote, [_plus1(_rows(1, 1.0)), _plus1(_rows(2, 2.0))])
        for result in results:
            assert isinstance(result, ServeError) and result.code == grpc.StatusCode.INTERNAL
        assert linked.seen == []  # the frame went without the group
        await asyncio.wait_for(linked.remote.drain(), 1)  # nothing waits
        linked.remote._draining = False  # (the test's own: serve again)
        linked.frontend_inputs.write_stacked = write_stacked  # type: ignore[method-assign]
        results = await _all(linked.remote, [_plus1(_rows(1, 3.0)), _plus1(_rows(1, 4.0))])
        assert all(isinstance(r, InferResult) for r in results)
        assert linked.frontend_inputs.ring.used_bytes == 0

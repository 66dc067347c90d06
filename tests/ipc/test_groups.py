"""Requests of one read, queued as one group (service/engine/groups.py).

Real EngineHost over a LocalEngine; the frontend's side writes raw frames on the
real link (a socketpair). Models: ONNX Runtime's `offset_net` (y = x + 1) and
`lookup_net` (an id out of range makes its Gather fail: a failure that follows one
request's values), and the controlled double (tests/doubles/controlled.py) where a
test must hold a batch while it runs. Each member must get what it would get
alone: its own rows, its own error, its own cancellation; the counters count the
clients' requests, not the groups.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.ipc import codec
from service.ipc.shm import Arena
from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model, expected
from tests.doubles.unary_call import until
from tests.ipc.test_frames import (
    ARENA_BYTES,
    FEATURES,
    RawFrontend,
    _add,
    _output,
    _warm,
    _x,
)
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.host import EngineHost
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.gen.trtserve.internal import link_pb2
from trtserve.service.testing.onnx_models import (
    LOOKUP_INPUT,
    lookup_net,
    lookup_table,
    offset_net,
)


async def _serve(repository: ModelRepository) -> tuple[EngineHost, socket.socket]:
    host = EngineHost(LocalEngine(repository), ServerConfig())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    await host.attach(0, os.getpid(), ours, Arena.create("in", ARENA_BYTES),
                      Arena.create("out", ARENA_BYTES))
    for model in repository:
        host.set_health(model.name, True)
    return host, theirs


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[EngineHost, ModelRepository,
                                                        socket.socket]]:
    repository = ModelRepository()
    await repository.load(ModelConfig(name="plus1", path=str(
        offset_net(tmp_path / "plus1.onnx", 1.0, FEATURES)), workers=1))
    await repository.load(ModelConfig(name="lookup", path=str(
        lookup_net(tmp_path / "lookup.onnx")), workers=1))
    host, sock = await _serve(repository)
    try:
        yield host, repository, sock
    finally:
        for port in host.ports.values():
            port.close()
        await repository.stop()


def _groups_of(runtime: ModelRuntime) -> list[tuple[int, ...]]:
    """Record the members of every request the model queues (() for one alone)."""
    seen: list[tuple[int, ...]] = []
    submit = runtime.submit

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("members", args[6] if len(args) > 6 else ()))
        return submit(*args, **kwargs)

    runtime.submit = recording  # type: ignore[method-assign]
    return seen


def _input_arena(host: EngineHost) -> Arena:
    """The input arena of the one frontend port (this process writes it as the
    frontend would: the test shares the engine's object)."""
    (port,) = host.ports.values()
    return port.inputs


def _code(reply: Any) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == reply.code) if reply.code \
        else grpc.StatusCode.OK


async def test_requests_of_one_read_go_as_one_group_and_each_gets_its_own_rows(
        served: tuple[EngineHost, ModelRepository, socket.socket]) -> None:
    host, repository, sock = served
    runtime = repository.get("plus1")
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    _add(frame, 100, _x(0))
    frontend.send(frame)
    await frontend.wait_for(1)  # warm: a batch of this size is now known to be quick
    before = (runtime.counters.requests, runtime.counters.success,
              runtime.worker_stats[0].batches, runtime.worker_stats[0].requests,
              runtime.worker_stats[0].queue_histogram.count)
    groups = _groups_of(runtime)
    frame = link_pb2.Frame()
    xs = {rid: np.full((2 if rid > 6 else 1, FEATURES), float(rid), np.float32)
          for rid in range(1, 9)}
    for rid, x in xs.items():
        _add(frame, rid, x)
    frontend.send(frame)
    replies = await frontend.wait_for(9)
    for rid, x in xs.items():
        np.testing.assert_array_equal(_output(replies[rid]), x + 1)
    assert groups == [(1, 1, 1, 1, 1, 1, 2, 2)]
    after = (runtime.counters.requests, runtime.counters.success,
             runtime.worker_stats[0].batches, runtime.worker_stats[0].requests,
             runtime.worker_stats[0].queue_histogram.count)
    # Counted as the 8 requests they are, in one batch, and as one group of 8; their
    # queue times as 8 (KServe's queue count and Prometheus's histogram are per
    # request: before, a group's members were one there, found by an adversarial run).
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (8, 8, 1, 8, 8)
    assert (runtime.counters.groups, runtime.counters.grouped_requests) == (1, 8)
    (port,) = host.ports.values()
    assert port.in_flight == {} and port.requests == 9


@pytest.mark.parametrize("where", ["inline", "arena"])
async def test_a_member_the_model_cannot_run_fails_alone_the_others_are_answered(
        served: tuple[EngineHost, ModelRepository, socket.socket], where: str) -> None:
    """Before members ran one by one, the group ran again as a whole and every member
    failed with the one bad id's error. In the arena each member runs from its own
    range (`Request.parts`), inline from its rows of the joined array."""
    host, repository, sock = served
    runtime = repository.get("lookup")
    groups = _groups_of(runtime)
    frontend = await RawFrontend().open(sock)
    arena = _input_arena(host) if where == "arena" else None
    ids = {1: [0, 1, 2, 3], 2: [9, 8, 7, 6], 3: [1, 99, 1, 1], 4: [5, 5, 5, 5]}
    frame = link_pb2.Frame()
    for rid, row in ids.items():
        message = frame.requests.add()
        message.id, message.model = rid, "lookup"
        x = np.array([row], np.int64)
        codec.put(message.inputs.add(), LOOKUP_INPUT, "INT64", x.shape, x, arena,
                  inline_max_bytes=0)
        assert message.inputs[0].WhichOneof("data") == where
    frontend.send(frame)
    replies = await frontend.wait_for(4)
    assert groups == [(1, 1, 1, 1)]
    assert _code(replies[3]) == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot run this input" in replies[3].message
    for rid in (1, 2, 4):
        np.testing.assert_array_equal(_output(replies[rid]), lookup_table()[[ids[rid]]])
    counters = runtime.counters
    assert (counters.requests, counters.success, counters.failure) == (4, 3, 1)


async def test_a_group_in_the_arena_is_not_copied_before_its_batch_and_each_gets_its_rows(
        served: tuple[EngineHost, ModelRepository, socket.socket]) -> None:
    """Members whose inputs lie in the frontend's arena: the group queued describes
    them (no data of its own) and carries each member's range as a part, which the
    executor gathers; each member still gets its own rows back."""
    host, repository, sock = served
    runtime = repository.get("plus1")
    frontend = await RawFrontend().open(sock)
    await _warm(frontend, 100)
    queued: list[tuple[dict[str, np.ndarray], Any]] = []
    submit = runtime.submit

    def recording(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        queued.append((dict(inputs), kwargs.get("parts", args[6] if len(args) > 6 else None)))
        return submit(inputs, *args, **kwargs)

    runtime.submit = recording  # type: ignore[method-assign]
    arena = _input_arena(host)
    xs = {rid: np.arange(rid * 100, rid * 100 + (2 if rid % 2 else 1) * FEATURES,
                         dtype=np.float32).reshape(-1, FEATURES) for rid in range(1, 6)}
    frame = link_pb2.Frame()
    for rid, x in xs.items():
        message = frame.requests.add()
        message.id, message.model = rid, "plus1"
        codec.put(message.inputs.add(), "input", "FP32", x.shape, x, arena, inline_max_bytes=0)
    frontend.send(frame)
    replies = await frontend.wait_for(6)
    for rid, x in xs.items():
        np.testing.assert_array_equal(_output(replies[rid]), x + 1)
    ((described, parts),) = queued
    assert described["input"].shape == (8, FEATURES) and described["input"].strides == (0, 0)
    assert [p.shape[0] for p in parts["input"]] == [2, 1, 2, 1, 2]


async def test_members_the_model_refuses_together_are_each_told_with_their_own_shape(
        served: tuple[EngineHost, ModelRepository, socket.socket]) -> None:
    _, repository, sock = served
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    for rid in (1, 2, 3):
        _add(frame, rid, np.zeros((1, FEATURES, 1), np.float32))
    frontend.send(frame)
    replies = await frontend.wait_for(3)
    for rid in (1, 2, 3):
        assert _code(replies[rid]) == grpc.StatusCode.INVALID_ARGUMENT
        assert f"[1, {FEATURES}, 1]" in replies[rid].message, replies[rid].message
    assert repository.get("plus1").counters.requests == 0


async def test_a_member_past_its_deadline_is_not_grouped_and_is_dropped(
        served: tuple[EngineHost, ModelRepository, socket.socket]) -> None:
    from trtserve.client.timer import now

    _, repository, sock = served
    groups = _groups_of(repository.get("plus1"))
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    for rid in (1, 2, 3):
        _add(frame, rid, _x(rid))
    frame.requests[1].deadline = now() - 1.0
    frontend.send(frame)
    replies = await frontend.wait_for(3)
    assert _code(replies[2]) == grpc.StatusCode.DEADLINE_EXCEEDED
    for rid in (1, 3):
        np.testing.assert_array_equal(_output(replies[rid]), _x(rid) + 1)
    assert (1, 1) in groups


Controlled = tuple[EngineHost, ControlledBackend, ModelRuntime, socket.socket]


@pytest.fixture
async def controlled() -> AsyncIterator[Controlled]:
    backend = ControlledBackend()
    repository = ModelRepository()
    await repository.add(backend.runtime(controlled_model(max_queue_delay_us=0)))
    host, sock = await _serve(repository)
    try:
        yield host, backend, repository.get("controlled"), sock
    finally:
        backend.controls.release()
        for port in host.ports.values():
            port.close()
        await repository.stop()


def _frame(rids: range, value: Callable[[int], float] = float) -> tuple[Any, dict[int, Any]]:
    frame = link_pb2.Frame()
    xs = {}
    for rid in rids:
        xs[rid] = np.full((1, WIDTH), value(rid), np.float32)
        _add(frame, rid, xs[rid], model="controlled").inputs[0].name = INPUT
    return frame, xs


async def _running(controlled: Controlled, rids: range) -> tuple[Any, RawFrontend,
                                                                 dict[int, Any]]:
    """Batches held at the gate; the requests `rids` sent in one frame and their batch
    running: the frontend's port, the frontend, and each request's x."""
    host, backend, _, sock = controlled
    (port,) = host.ports.values()
    frontend = await RawFrontend().open(sock)
    backend.controls.hold()
    frame, xs = _frame(rids)
    frontend.send(frame)
    assert await asyncio.to_thread(backend.controls.started.wait, 10)
    return port, frontend, xs


async def test_a_member_cancelled_while_its_group_runs_is_answered_cancelled_alone(
        controlled: Controlled) -> None:
    _, backend, runtime, _ = controlled
    port, frontend, xs = await _running(controlled, range(1, 4))  # the group runs
    cancel = link_pb2.Frame()
    cancel.cancels.append(2)
    frontend.send(cancel)
    await until(lambda: 2 not in port.in_flight)
    backend.controls.release()
    replies = await frontend.wait_for(3)
    assert _code(replies[2]) == grpc.StatusCode.CANCELLED
    for rid in (1, 3):
        np.testing.assert_array_equal(_output(replies[rid]), expected(xs[rid]))
    counters = runtime.counters
    assert (counters.requests, counters.success, counters.cancelled) == (3, 2, 1)
    assert port.in_flight == {}


async def test_a_group_whose_members_are_all_cancelled_leaves_its_batch_unrun(
        controlled: Controlled) -> None:
    _, backend, runtime, _ = controlled
    port, frontend, _ = await _running(controlled, range(1, 2))  # the worker is busy
    queued, _ = _frame(range(2, 5), value=lambda rid: 1000.0 + rid)
    frontend.send(queued)
    await until(lambda: len(port.in_flight) == 4)
    cancels = link_pb2.Frame()
    cancels.cancels.extend([2, 3, 4])
    frontend.send(cancels)
    replies = await frontend.wait_for(3)
    for rid in (2, 3, 4):
        assert _code(replies[rid]) == grpc.StatusCode.CANCELLED
    backend.controls.release()
    await frontend.wait_for(4)
    rows, _ = backend.controls.snapshot()
    assert rows == 1  # the group never ran
    counters = runtime.counters
    assert (counters.requests, counters.success, counters.cancelled) == (4, 1, 3)
    assert port.in_flight == {}


async def test_a_broken_frame_cannot_move_rows_from_one_member_to_another(
        served: tuple[EngineHost, ModelRepository, socket.socket]) -> None:
    """Member 1 declares one row and carries two, member 2 declares one and carries none:
    stacked, the bytes would fit the group's 2 rows and each would get the other's
    answer. A frontend never sends this (it checks every client tensor); the engine
    still does not group them, and each fails alone."""
    _, repository, sock = served
    frontend = await RawFrontend().open(sock)
    frame = link_pb2.Frame()
    _add(frame, 1, _x(1)).inputs[0].inline = np.concatenate([_x(1), _x(2)]).tobytes()
    _add(frame, 2, _x(2)).inputs[0].inline = b""
    _add(frame, 3, _x(3))
    frontend.send(frame)
    replies = await frontend.wait_for(3)
    assert _code(replies[1]) != grpc.StatusCode.OK and _code(replies[2]) != grpc.StatusCode.OK
    np.testing.assert_array_equal(_output(replies[3]), _x(3) + 1)
    assert repository.get("plus1").counters.groups == 0


async def test_a_group_over_the_byte_budget_counts_each_member_refused(
        tmp_path: Path) -> None:
    """The group's bytes are refused together, and each member is told so: Stats and
    trtserve_requests_over_budget_total count the members (before: one per group, so
    with frontends the counter fell short of the refusals clients saw)."""
    from trtserve.service.limits import ByteBudget

    repository = ModelRepository()
    await repository.load(ModelConfig(name="plus1", path=str(
        offset_net(tmp_path / "plus1.onnx", 1.0, FEATURES)), workers=1))
    row_bytes = FEATURES * 4
    local = LocalEngine(repository, ByteBudget(limit_bytes=4 * row_bytes))
    host = EngineHost(local, ServerConfig())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    await host.attach(0, os.getpid(), ours, Arena.create("in", ARENA_BYTES),
                      Arena.create("out", ARENA_BYTES))
    host.set_health("plus1", True)
    try:
        groups = _groups_of(repository.get("plus1"))
        frontend = await RawFrontend().open(theirs)
        frame = link_pb2.Frame()
        for rid in range(1, 7):  # 6 rows in all: past the budget of 4 together
            _add(frame, rid, _x(rid))
        frontend.send(frame)
        replies = await frontend.wait_for(6)
        assert groups == []  # refused before it was queued
        assert {_code(reply) for reply in replies.values()} == \
            {grpc.StatusCode.RESOURCE_EXHAUSTED}
        budget = (await local.stats()).request_bytes
        assert (budget.held_bytes, budget.refused) == (0, 6)
    finally:
        for port in host.ports.values():
            port.close()
        await repository.stop()

"""RemoteEngine and EngineHost over a real socketpair and real arenas, on one event loop.

The engine side is a real LocalEngine serving the example model on ONNX
Runtime; the frontend side is what a frontend process runs. Both ends in one
process make the link's own guarantees visible: answers match requests with
every tensor through the arenas, every range comes back, errors keep their
code, and losing the engine fails what waits on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model
from trtserve.client.timer import now
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.api import InferRequest, RegionRef, TensorIn
from trtserve.service.engine.host import EngineHost
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import NotFound, ServeError, Unavailable
from trtserve.service.ipc.shm import Arena

ARENA_BYTES = 8 << 20


@dataclass
class Pair:
    host: EngineHost
    remote: RemoteEngine
    repository: ModelRepository
    engine_arenas: tuple[Arena, Arena]
    frontend_arenas: tuple[Arena, Arena]


@pytest.fixture
async def pair(example_onnx: Path) -> AsyncIterator[Pair]:
    """inline_max_bytes 0: every tensor crosses through an arena."""
    repository = ModelRepository()
    await repository.load(ModelConfig(name="example", path=str(example_onnx), workers=1))
    async for p in _pair(repository, "example"):
        yield p


async def _pair(repository: ModelRepository, model: str) -> AsyncIterator[Pair]:
    host = EngineHost(LocalEngine(repository), ServerConfig(), inline_max_bytes=0)
    inputs, outputs = Arena.create("in", ARENA_BYTES), Arena.create("out", ARENA_BYTES)
    theirs_in, theirs_out = Arena(os.dup(inputs.fd), ARENA_BYTES), Arena(
        os.dup(outputs.fd), ARENA_BYTES)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    await host.attach(0, os.getpid(), ours, inputs, outputs)
    remote = RemoteEngine(theirs_in, theirs_out, inline_max_bytes=0)
    await remote.connect(theirs)
    host.set_health(model, True)
    host.set_health("", True)
    await asyncio.sleep(0.05)  # the pushed health arrives
    try:
        yield Pair(host, remote, repository, (inputs, outputs), (theirs_in, theirs_out))
    finally:
        remote.close()
        await repository.stop()


def _request(x: np.ndarray, **kwargs: object) -> InferRequest:
    return InferRequest(model="example", inputs={"input": TensorIn("FP32", x.shape, x)},
                        **kwargs)  # type: ignore[arg-type]


async def test_answers_through_the_arenas_and_every_range_comes_back(
        pair: Pair, example_onnx: Path) -> None:
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 7, 64)).astype(np.float32) for i in range(200)]
    results = await asyncio.gather(*(pair.remote.infer(_request(x)) for x in xs))
    for x, result in zip(xs, results, strict=True):
        (want,) = session.run(None, {"input": x})
        np.testing.assert_allclose(result.outputs["output"].data, want, rtol=1e-5, atol=1e-5)
    await asyncio.sleep(0.05)  # the last releases reach the engine
    frontend_inputs, _ = pair.frontend_arenas
    _, engine_outputs = pair.engine_arenas
    assert frontend_inputs.ring.used_bytes == 0  # freed at each reply
    assert engine_outputs.ring.used_bytes == 0  # released after each copy-out
    (frontend,) = (await pair.remote.stats()).frontends
    assert (frontend.requests, frontend.in_flight) == (200, 0)


async def test_describe_and_health_are_answered_from_what_the_engine_pushed(
        pair: Pair) -> None:
    assert pair.remote.models() == ("example",)
    assert pair.remote.describe("example").spec.inputs[0].name == "input"
    assert pair.remote.ready() and pair.remote.ready("example")
    with pytest.raises(NotFound, match="served models: \\['example'\\]"):
        pair.remote.describe("nope")
    with pytest.raises(NotFound, match="version"):
        pair.remote.describe("example", "7")


async def test_an_error_keeps_its_code_and_message(pair: Pair) -> None:
    with pytest.raises(ServeError) as e:
        await pair.remote.infer(_request(np.zeros((1, 65), np.float32)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in str(e.value)


async def test_losing_the_engine_fails_what_waits_and_turns_not_serving(pair: Pair) -> None:
    seen: list[tuple[str, bool]] = []
    pair.remote.add_health_listener(lambda model, serving: seen.append((model, serving)))
    # A deadline far ahead and a model that takes its time: the request is in flight.
    waiting = asyncio.ensure_future(pair.remote.infer(_request(np.zeros((64, 64), np.float32))))
    await asyncio.sleep(0)
    for port in pair.host.ports.values():
        port.close()
    with pytest.raises(Unavailable, match="engine process exited"):
        await asyncio.wait_for(waiting, 10)
    await asyncio.wait_for(pair.remote.lost.wait(), 10)
    assert not pair.remote.ready()
    assert ("", False) in seen and ("example", False) in seen
    with pytest.raises(Unavailable):
        await pair.remote.infer(_request(np.zeros((1, 64), np.float32)))


async def test_region_references_reach_the_engine(pair: Pair) -> None:
    """Client shared-memory references cross as references; the engine decides on them."""
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(ServeError) as e:
        await pair.remote.infer(_request(
            x, output_regions={"output": RegionRef("client-region", 0, 64)}))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'output'" in str(e.value) and "shared-memory region 'client-region'" in str(e.value)
    by_region = InferRequest(model="example", inputs={
        "input": TensorIn("FP32", (1, 64), RegionRef("client-region", 128, 256))})
    with pytest.raises(ServeError, match="shared-memory region 'client-region'"):
        await pair.remote.infer(by_region)


async def test_stats_of_an_unknown_model_is_not_found_across_the_link(pair: Pair) -> None:
    with pytest.raises(NotFound, match="nope"):
        await pair.remote.stats("nope")
    (model,) = (await pair.remote.stats("example")).models
    assert model.name == "example"


async def test_stats_calls_that_overlap_ask_the_engine_once(pair: Pair) -> None:
    """A frontend whose clients flood Stats keeps at most one query at the engine, whose
    loop would otherwise read a snapshot for each ahead of every frontend's requests."""
    snapshots = await asyncio.gather(*(pair.remote.stats() for _ in range(50)))
    assert all(s is snapshots[0] for s in snapshots)
    # In the engine, queries that arrive together (every frontend's, Prometheus's) get one
    # answer, the frontends' rows read from /proc included.
    answers = await asyncio.gather(*(pair.host.stats() for _ in range(20)))
    assert all(a is answers[0] for a in answers)
    await pair.remote.infer(_request(np.zeros((1, 64), np.float32)))
    later = await pair.remote.stats()
    assert later is not snapshots[0]
    (frontend,) = later.frontends
    assert frontend.requests == snapshots[0].frontends[0].requests + 1


async def test_a_stats_query_that_fails_in_the_engine_is_still_answered(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend's Stats callers share one wait for the engine's answer: an error the
    engine did not expect (here injected into reading the frontends' rows) must answer
    them, or every later Stats call at that frontend would join a wait that never ends."""
    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pair.host, "frontends", broken)
    with pytest.raises(ServeError, match="internal error; see the server log"):
        await asyncio.wait_for(pair.remote.stats(), 10)
    monkeypatch.undo()
    (frontend,) = (await asyncio.wait_for(pair.remote.stats(), 10)).frontends
    assert frontend.index == 0


async def test_an_input_range_is_not_reused_while_the_batch_of_a_cancelled_request_reads_it(
        ) -> None:
    """The frontend frees a request's input range when the engine's reply arrives: for a
    request cancelled while its batch runs, that reply (CANCELLED) waits for the batch,
    while the frontend's caller has its answer at once."""
    backend = ControlledBackend()
    repository = ModelRepository()
    await repository.add(backend.runtime(controlled_model(max_queue_delay_us=0)))
    controls = backend.controls
    controls.hold()
    try:
        async for p in _pair(repository, "controlled"):
            frontend_inputs, _ = p.frontend_arenas
            x = np.ones((4, WIDTH), np.float32)
            task = asyncio.ensure_future(p.remote.infer(InferRequest(
                model="controlled", inputs={INPUT: TensorIn("FP32", x.shape, x)})))
            assert await asyncio.to_thread(controls.started.wait, 10)  # the batch runs
            assert frontend_inputs.ring.used_bytes > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # A round trip behind the cancel: a CANCELLED reply sent at once (the engine
            # handles the cancel before this query, and sends before answering it)
            # would have arrived and freed the range by the time this returns.
            (frontend,) = (await p.remote.stats()).frontends
            assert frontend.in_flight == 0  # the engine has handled the cancel
            assert frontend_inputs.ring.used_bytes > 0  # the batch may still read it
            # A new request's input goes elsewhere in the arena meanwhile.
            offset = frontend_inputs.ring.alloc(x.nbytes)
            assert offset is not None and offset >= x.nbytes
            frontend_inputs.free(offset)
            controls.release()
            while frontend_inputs.ring.used_bytes:
                await asyncio.sleep(0.001)
            (frontend,) = (await p.remote.stats()).frontends
            assert frontend.in_flight == 0
    finally:
        controls.release()


async def test_array_requests_keep_the_version_output_and_deadline_checks(pair: Pair) -> None:
    """Requests of arrays only reach the engine without an InferRequest of their own
    (EngineHost's fast path): the same checks apply to them."""
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ServeError) as e:
        await pair.remote.infer(_request(x, version="7"))
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "version '7'" in str(e.value)
    with pytest.raises(ServeError) as e:
        await pair.remote.infer(_request(x, outputs=("nope",)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in str(e.value)
    with pytest.raises(ServeError) as e:
        await pair.remote.infer(_request(x, deadline=now() - 1))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    result = await pair.remote.infer(_request(x, version="1", outputs=("output",)))
    assert (result.model, result.version) == ("example", "1")
    assert list(result.outputs) == ["output"]
    assert result.outputs["output"].dtype == "FP32"
    assert result.outputs["output"].shape == (2, 16)


async def test_a_lone_request_polls_for_its_reply_for_at_most_spin_s() -> None:
    """While its only request is at the engine the frontend's loop keeps polling (no
    sleep to be woken from) for `spin_s`, then sleeps; with others in flight it never
    starts, and 0 turns it off."""
    backend = ControlledBackend()
    repository = ModelRepository()
    await repository.add(backend.runtime(controlled_model(max_queue_delay_us=0)))
    controls = backend.controls
    controls.hold()
    loop = asyncio.get_running_loop()
    try:
        async for p in _pair(repository, "controlled"):
            remote = p.remote

            def request() -> InferRequest:
                x = np.ones((1, WIDTH), np.float32)
                return InferRequest(model="controlled", inputs={INPUT: TensorIn(
                    "FP32", x.shape, x)})

            remote.spin_s = 0.05
            task = asyncio.ensure_future(remote.infer(request()))
            await asyncio.sleep(0)
            assert remote._spinning
            start = loop.time()
            while remote._spinning:
                await asyncio.sleep(0.005)
            # It stopped on its own, at its budget, with the request still unanswered.
            assert 0.03 <= loop.time() - start <= 1.0 and not task.done()
            second = asyncio.ensure_future(remote.infer(request()))
            await asyncio.sleep(0)
            assert not remote._spinning  # not a lone request: never started
            controls.release()
            await asyncio.gather(task, second)
            remote.spin_s = 0.0
            controls.hold()
            third = asyncio.ensure_future(remote.infer(request()))
            await asyncio.sleep(0)
            assert not remote._spinning
            controls.release()
            await third
    finally:
        controls.release()

"""Real inputs a model cannot run, and tensors as large as the link's arenas, across
processes (`--frontends 2`).

tests/reliability/test_input_faults.py holds these for one process; on a host of
more than 2 cores `frontends = auto` serves through frontend processes, so the
same guarantees are checked here over the link: a request that fails in the
backend gets INVALID_ARGUMENT with the backend's reason, whichever frontend sent
it; good requests batched with it (from the other frontend too) are answered;
no worker is judged broken; and a tensor too large for a frontend's arena
travels inline, both ways, with every answer its own. Real ONNX Runtime on
generated models (service/testing/onnx_models.py), real processes and sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_frontends import _own_connection
from tests.reliability.harness import model_stats
from tests.reliability.test_input_faults import BAD_SIZES, image
from trtserve.client import Client
from trtserve.client.convert import infer_request, outputs_of
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.testing.onnx_models import (
    LOOKUP_INPUT,
    LOOKUP_OUTPUT,
    TILES_INPUT,
    TILES_OUTPUT,
    lookup_net,
    tiled_net,
)
from trtserve.service.testing.servers import ServerProcess

# Each frontend's arena, each way; the large tensors below are most of it, so that
# requests in flight together cannot all fit and some go inline.
ARENA_MIB = 4
LARGE = (1024, 768)  # 3 MiB of FP32 in, 3 MiB out
CONNECTIONS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("models")
    tiled, lookup = tiled_net(folder / "tiled.onnx"), lookup_net(folder / "lookup.onnx")
    config = folder / "server.toml"
    # lookup's batches wait (up to 30 s) for 8 requests, so the 8 sent together below form
    # one batch whatever frontend each came through.
    config.write_text(f"""
[server]
frontends = 2
frontend_arena_mib = {ARENA_MIB}

[[models]]
name = "tiled"
path = "{tiled}"
workers = 2
max_batch_size = 4
max_worker_failures = 3

[[models]]
name = "lookup"
path = "{lookup}"
workers = 1
max_batch_size = 8
max_queue_delay_us = 30000000
max_worker_failures = 1
""")
    server = ServerProcess(["--config", str(config)])
    with server.serving():
        yield server, lookup


async def _tiled(channel: grpc.aio.Channel, client: int) -> list[tuple[np.ndarray, object]]:
    """Bad sizes, good ones and large ones in turn, on a connection of this client's own."""
    sizes = [*BAD_SIZES, (32, 32), LARGE]
    out: list[tuple[np.ndarray, object]] = []
    stub = pb_grpc.InferenceServiceStub(channel)
    for n in range(len(sizes)):
        x = image(*sizes[(client + n) % len(sizes)], seed=client * 100 + n)
        try:
            reply = await stub.Infer(infer_request("tiled", {TILES_INPUT: x}), timeout=60)
            out.append((x, outputs_of(reply)[TILES_OUTPUT]))
        except grpc.aio.AioRpcError as e:
            out.append((x, e))
    return out


def test_inputs_a_model_cannot_run_are_refused_across_frontends(served) -> None:
    server, _ = served

    async def load() -> list[tuple[np.ndarray, object]]:
        # Half the connections on each frontend: left to the kernel's hash, all 8 landed
        # on one frontend in one CI run (about 1 run in 128).
        channels = await _placed_connections(server.url, CONNECTIONS // 2)
        try:
            runs = await asyncio.gather(*(_tiled(c, i) for i, c in enumerate(channels)))
        finally:
            for channel in channels:
                await channel.close(None)
        return [pair for run in runs for pair in run]

    before = model_stats(server.url, "tiled")
    pairs = asyncio.run(load())
    bad = 0
    for x, outcome in pairs:
        height, width = x.shape[2:]
        if height * width % 1024:
            bad += 1
            assert isinstance(outcome, grpc.aio.AioRpcError), (x.shape, outcome)
            assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome
            details = outcome.details() or ""
            assert "cannot run this input" in details and "Reshape" in details, details
        else:
            assert isinstance(outcome, np.ndarray), (x.shape, outcome)
            np.testing.assert_array_equal(outcome, 2 * x.reshape(1, -1, 1024))
    assert bad == CONNECTIONS * len(BAD_SIZES)

    stats = model_stats(server.url, "tiled")
    assert sum(w.rejected for w in stats.workers) - sum(w.rejected for w in before.workers) \
        == bad
    assert all(w.healthy and w.state == "serving" for w in stats.workers)
    assert sum(w.rebuilds for w in stats.workers) == 0
    assert sum(w.errors for w in stats.workers) == 0
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tiled"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(server.url) as c:
        frontends = c.stats().frontends
    # Both frontends carried requests, and nothing is left in flight on either.
    assert len(frontends) == 2 and all(f.requests > 0 and f.in_flight == 0
                                       for f in frontends), frontends


async def _placed_connections(url: str, each: int) -> list[grpc.aio.Channel]:
    """`each` connections on every frontend: the kernel places a connection by hashing its
    addresses, so open connections until both frontends have `each`, learning where each
    went from the frontends' request counts around one request on it."""
    by_frontend: dict[int, list[grpc.aio.Channel]] = {0: [], 1: []}
    spare: list[grpc.aio.Channel] = []
    async with grpc.aio.insecure_channel(url) as control:
        stats = pb_grpc.InferenceServiceStub(control).Stats

        async def counts() -> dict[int, int]:
            return {f.index: f.requests for f in (await stats(pb.StatsRequest(), timeout=10)
                                                  ).frontends}

        for _ in range(64):
            if all(len(c) >= each for c in by_frontend.values()):
                break
            channel = _own_connection(url)
            before = await counts()
            await pb_grpc.InferenceServiceStub(channel).Infer(
                infer_request("tiled", {TILES_INPUT: image(32, 32)}), timeout=30)
            after = await counts()
            (index,) = [i for i in after if after[i] != before.get(i, 0)]
            (by_frontend[index] if len(by_frontend[index]) < each else spare).append(channel)
    for channel in spare:
        await channel.close(None)
    assert all(len(c) == each for c in by_frontend.values()), "connections kept to one frontend"
    return by_frontend[0] + by_frontend[1]


def test_good_requests_batched_with_a_bad_one_from_both_frontends_are_answered(served) -> None:
    """One batch of 8 requests, 4 through each frontend, one with an id out of range:
    7 answers and 1 INVALID_ARGUMENT, as in one process."""
    server, lookup = served
    ids = [np.array([[i % 10, (i + 3) % 10, 9, 0]], np.int64) for i in range(8)]
    ids[5] = np.array([[1, 2, 99, 3]], np.int64)

    async def one(channel: grpc.aio.Channel, x: np.ndarray) -> object:
        stub = pb_grpc.InferenceServiceStub(channel)
        try:
            reply = await stub.Infer(infer_request("lookup", {LOOKUP_INPUT: x}), timeout=60)
        except grpc.aio.AioRpcError as e:
            return e
        return outputs_of(reply)[LOOKUP_OUTPUT]

    async def together() -> list[object]:
        channels = await _placed_connections(server.url, 4)
        try:
            return list(await asyncio.gather(*(one(c, x) for c, x in zip(channels, ids,
                                                                          strict=True))))
        finally:
            for channel in channels:
                await channel.close(None)

    before = model_stats(server.url, "lookup").workers[0]
    outcomes = asyncio.run(together())
    reference = ort.InferenceSession(str(lookup), providers=["CPUExecutionProvider"])
    for i, (x, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        if i == 5:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome
            assert "Gather" in (outcome.details() or "") and "idx=99" in (outcome.details() or "")
        else:
            assert isinstance(outcome, np.ndarray), outcome
            np.testing.assert_array_equal(outcome, reference.run(None, {LOOKUP_INPUT: x})[0])
    worker = model_stats(server.url, "lookup").workers[0]
    # The batch of 8 failed as a whole, then its requests ran one by one; the session kept.
    ran = {size: count - dict(before.batch_size_histogram).get(size, 0)
           for size, count in dict(worker.batch_size_histogram).items()}
    assert {size: n for size, n in ran.items() if n} == {1: 7}
    assert (worker.healthy, worker.rebuilds, worker.errors, worker.rejected - before.rejected) \
        == (True, 0, 0, 1)


def test_more_large_tensors_in_flight_than_the_arenas_hold_are_answered(served) -> None:
    """Requests of 3 MiB in and out, 6 in flight on one connection (one frontend), whose
    arenas hold 4 MiB each way: what does not fit travels inline in the link's frames;
    every answer is its own."""
    server, _ = served

    async def burst() -> list[tuple[np.ndarray, np.ndarray]]:
        async with _own_connection(server.url) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            xs = [image(*LARGE, seed=500 + i) for i in range(6)]
            replies = await asyncio.gather(*(
                stub.Infer(infer_request("tiled", {TILES_INPUT: x}), timeout=60) for x in xs))
            return [(x, outputs_of(r)[TILES_OUTPUT]) for x, r in zip(xs, replies, strict=True)]

    for _ in range(3):
        for x, y in asyncio.run(burst()):
            np.testing.assert_array_equal(y, 2 * x.reshape(1, -1, 1024))
    with Client(server.url) as c:
        assert all(f.in_flight == 0 for f in c.stats().frontends)

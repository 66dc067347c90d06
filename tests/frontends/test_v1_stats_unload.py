"""trtserve.v1 `Stats` while a model is unloaded: the unload lands between the stats
snapshot and the descriptions the answer reads right after it.

A hostile client found it (1 in 8 Stats calls NOT_FOUND "model ... is not served here"
during unload/load churn, while KServe's ModelStatistics stayed OK). Here the race is
made deterministic with the real LocalEngine and ONNX Runtime models: its subclass
below unloads a model, through the real repository, right after each snapshot is read.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.engine.api import StatsSnapshot
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.frontends.v1 import InferenceService
from trtserve.service.testing.onnx_models import offset_net


class UnloadsAfterSnapshot(LocalEngine):
    """The real LocalEngine, which unloads `victim` once a stats snapshot has been read
    and before the caller gets it: what a client's UnloadModel does when it lands there."""

    def __init__(self, repository: ModelRepository, victim: str) -> None:
        super().__init__(repository)
        self.victim = victim

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        snapshot = await super().stats(model)
        if self.victim in self.models():
            await self.unload_model(self.victim)
        return snapshot


@pytest.fixture
async def stub(tmp_path: Path):
    repository = ModelRepository()
    engine = UnloadsAfterSnapshot(repository, victim="gone")
    server = grpc.aio.server()
    try:
        for name, offset in (("kept", 1.0), ("gone", 2.0)):
            await engine.load_model(name, str(offset_net(tmp_path / f"{name}.onnx", offset)))
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceService(engine), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.InferenceServiceStub(channel), engine
    finally:
        await server.stop(None)
        await repository.stop()


async def test_stats_of_every_model_leaves_out_a_model_unloaded_after_the_snapshot(stub):
    stub, engine = stub
    response = await stub.Stats(pb.StatsRequest(), timeout=30)
    # Before: NOT_FOUND "model 'gone' is not served here; served models: ['kept']".
    assert [m.name for m in response.models] == ["kept"]
    [kept] = response.models
    assert kept.backend == "onnxruntime" and kept.batching
    assert "gone" not in engine.models()
    # The next call's snapshot no longer has it either.
    again = await stub.Stats(pb.StatsRequest(), timeout=30)
    assert [m.name for m in again.models] == ["kept"]


async def test_stats_naming_a_model_unloaded_after_the_snapshot_is_not_found(stub):
    stub, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Stats(pb.StatsRequest(model="gone"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gone" in (caught.value.details() or "")
    # A model still served is answered as before.
    response = await stub.Stats(pb.StatsRequest(model="kept"), timeout=30)
    assert [m.name for m in response.models] == ["kept"]


async def test_a_metrics_scrape_leaves_out_a_model_unloaded_after_the_snapshot(stub):
    import pickle

    from trtserve.service import metrics

    _, engine = stub
    engine.victim = "gone"
    # Before: describe raised NotFound for it, and the scrape failed.
    found = pickle.loads(await metrics.snapshot(engine))
    [info] = [f for f in found if f.name.endswith("model_info")]
    assert [sample.labels["model"] for sample in info.samples] == ["kept"]

"""RemoteEngine tells its frontend process when a request with large inputs or a large
answer is over, however it ended: the frontend gives memory back then (memory.Trimmer).

Over a real socketpair and arenas to a real LocalEngine (ONNX Runtime), as in
test_remote_engine.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.ipc.test_remote_engine import _pair
from trtserve.service.config import ModelConfig
from trtserve.service.engine.api import InferRequest, TensorIn
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import ServeError
from trtserve.service.testing.onnx_models import expand_net

LARGE = 4096  # bytes


def _request(model: str, x: np.ndarray) -> InferRequest:
    return InferRequest(model=model, inputs={"input": TensorIn("FP32", x.shape, x)})


@pytest.fixture
async def remote(example_onnx: Path, tmp_path: Path) -> AsyncIterator[RemoteEngine]:
    repository = ModelRepository()
    await repository.load(ModelConfig(name="example", path=str(example_onnx), workers=1))
    # input [batch, 1] -> output [batch, 1024]: 4 bytes in, 4 KiB out a row.
    await repository.load(ModelConfig(name="expand", workers=1,
                                      path=str(expand_net(tmp_path / "expand.onnx", 1024))))
    async for pair in _pair(repository, "example"):
        yield pair.remote


async def test_large_requests_and_large_answers_are_reported_once_over(
        remote: RemoteEngine) -> None:
    large: list[str] = []

    async def infer(what: str, model: str, x: np.ndarray) -> None:
        remote.after_large(LARGE, lambda: large.append(what))
        await remote.infer(_request(model, x))

    # example: [batch, 64] FP32 in (256 bytes a row), [batch, 16] out (64 a row).
    await infer("small", "example", np.ones((4, 64), np.float32))
    await infer("large request", "example", np.ones((16, 64), np.float32))
    await infer("large answer", "expand", np.ones((1, 1), np.float32))
    with pytest.raises(ServeError) as refused:  # 65 wide: the engine refuses it
        await infer("large and refused", "example", np.ones((16, 65), np.float32))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert large == ["large request", "large answer", "large and refused"]
    remote.after_large(0, lambda: large.append("off"))  # 0: never
    await remote.infer(_request("example", np.ones((16, 64), np.float32)))
    assert large[-1] != "off"

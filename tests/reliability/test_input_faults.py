"""Inputs that pass validation but that the model cannot run are the request's fault.

Real ONNX Runtime on generated models (service/testing/onnx_models.py): `tiled_net` fails
its Reshape unless height x width is a multiple of 1024, `lookup_net` fails its
Gather on an id out of range, and `folding_net` runs every width but answers 16
with one row of output per row of input (another width: another number of rows).
Such a request gets INVALID_ARGUMENT with the backend's reason; its worker keeps
its session and its place in the rotation, and good requests that shared its
batch are answered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from tests.integration.test_metrics import scrape
from tests.reliability.harness import SERVING, health_status, model_stats
from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.service.config import ModelConfig
from trtserve.service.testing.onnx_models import (
    FOLD_INPUT,
    FOLD_OUTPUT,
    FOLD_WIDTH,
    LOOKUP_INPUT,
    TILES_INPUT,
    TILES_OUTPUT,
    folding_net,
    lookup_net,
    tiled_net,
)
from trtserve.service.testing.servers import free_port, running_server, server_config

# Sizes validation accepts (height and width are dynamic) that the Reshape cannot tile.
BAD_SIZES = [(1, 1), (3, 3), (321, 321), (33, 517)]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiled_net(tmp_path_factory.mktemp("models") / "tiled.onnx")


@pytest.fixture(scope="module")
def lookup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_net(tmp_path_factory.mktemp("models") / "lookup.onnx")


def image(height: int, width: int, rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, height, width)) \
        .astype(np.float32)


def assert_rejected(error: BaseException, *words: str) -> None:
    assert isinstance(error, InferenceError), error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "cannot run this input" in error.details
    for word in words:
        assert word in error.details, error.details
    # The backend's reason, without its source paths and C++ frames.
    assert "/onnxruntime_src" not in error.details and "::" not in error.details


def test_many_inputs_the_model_cannot_run_never_take_it_out_of_service(tiled: Path):
    """Before: each failed with INTERNAL and cost a worker failure; 6 took the model down."""
    model = ModelConfig(name="tiled", path=str(tiled), workers=2, max_worker_failures=3,
                        max_batch_size=4)
    metrics_port = free_port()
    with running_server(server_config(model, metrics_port=metrics_port)) as s, \
            Client(s.url) as c, grpc.insecure_channel(s.url) as channel:
        bad = [BAD_SIZES[i % len(BAD_SIZES)] for i in range(4 * 2 * 3)]
        for height, width in bad:
            with pytest.raises(InferenceError) as err:
                c.infer("tiled", {TILES_INPUT: image(height, width)}, timeout=30)
            assert_rejected(err.value, "Reshape", "cannot be reshaped")
        assert health_status(channel, "tiled") == SERVING
        x = image(64, 64, rows=2)
        y = c.infer("tiled", {TILES_INPUT: x}, timeout=30)[TILES_OUTPUT]
        np.testing.assert_array_equal(y, 2 * x.reshape(2, 4, 1024))
        stats = model_stats(s.url, "tiled")
        assert all(w.healthy and w.state == "serving" for w in stats.workers)
        assert sum(w.rebuilds for w in stats.workers) == 0
        assert sum(w.errors for w in stats.workers) == 0
        assert sum(w.rejected for w in stats.workers) == len(bad)
        metrics = scrape(metrics_port)
        rejected = metrics["trtserve_worker_rejected_requests_total"]
        assert sorted(rejected.values()) == sorted(float(w.rejected) for w in stats.workers)
        assert sum(metrics["trtserve_worker_rebuilds_total"].values()) == 0


def test_an_input_refused_on_the_event_loop_keeps_later_batches_there(lookup: Path):
    """A quick batch runs inline; a refused one (same shape, an id out of range) is
    answered from the worker's thread, and the next quick batch runs inline again:
    the session was not judged broken."""
    model = ModelConfig(name="lookup", path=str(lookup), workers=1, max_worker_failures=1,
                        inline_below_us=10_000_000)
    good = np.array([[1, 2, 3, 4]], np.int64)
    with running_server(server_config(model)) as s, Client(s.url) as c:
        for _ in range(3):
            c.infer("lookup", {LOOKUP_INPUT: good}, timeout=30)
        before = model_stats(s.url, "lookup").workers[0].inline_batches
        assert before >= 1  # the learned time made this batch quick
        with pytest.raises(InferenceError) as err:
            c.infer("lookup", {LOOKUP_INPUT: np.array([[1, -11, 3, 4]], np.int64)},
                    timeout=30)
        assert_rejected(err.value, "Gather", "idx=-11")
        c.infer("lookup", {LOOKUP_INPUT: good}, timeout=30)
        worker = model_stats(s.url, "lookup").workers[0]
        assert worker.inline_batches == before + 1
        assert (worker.healthy, worker.rebuilds, worker.errors, worker.rejected) == \
            (True, 0, 0, 1)


def test_good_requests_batched_with_a_bad_one_are_answered(lookup: Path):
    """One batch of 8 requests, one with an id out of range: 7 answers, 1 INVALID_ARGUMENT."""
    model = ModelConfig(name="lookup", path=str(lookup), workers=1, max_batch_size=8,
                        max_queue_delay_us=30_000_000, max_worker_failures=1)
    ids = [np.array([[i % 10, (i + 3) % 10, 9, 0]], np.int64) for i in range(8)]
    ids[5] = np.array([[1, 2, 99, 3]], np.int64)
    reference = ort.InferenceSession(str(lookup), providers=["CPUExecutionProvider"])
    with running_server(server_config(model)) as s:
        async def run() -> list[object]:
            async with AsyncClient(s.url) as c:
                return await asyncio.gather(
                    *(c.infer("lookup", {LOOKUP_INPUT: x}, timeout=60) for x in ids),
                    return_exceptions=True)

        outcomes = asyncio.run(run())
        for i, (x, outcome) in enumerate(zip(ids, outcomes, strict=True)):
            if i == 5:
                assert_rejected(outcome, "Gather", "idx=99")  # type: ignore[arg-type]
            else:
                assert isinstance(outcome, dict), outcome
                np.testing.assert_array_equal(outcome["vectors"],
                                              reference.run(None, {LOOKUP_INPUT: x})[0])
        worker = model_stats(s.url, "lookup").workers[0]
        # The batch of 8 failed as a whole, then its requests ran one by one.
        assert dict(worker.batch_size_histogram) == {1: 7}
        assert (worker.healthy, worker.rebuilds, worker.errors, worker.rejected) == \
            (True, 0, 0, 1)
        with Client(s.url) as c:
            x = np.array([[4, 5, 6, 7]] * 8, np.int64)  # a full batch: no queue delay
            np.testing.assert_array_equal(c.infer("lookup", {LOOKUP_INPUT: x})["vectors"],
                                          reference.run(None, {LOOKUP_INPUT: x})[0])


def test_a_model_answering_with_other_rows_than_it_was_given_stays_in_service(
        tmp_path: Path) -> None:
    """`folding_net` at width 32 answers each row with two. Before, such a batch was the
    worker's failure (INTERNAL, a rebuild): a client sending 8 of them a second took every
    worker out of the rotation and the model answered no one (found by an adversarial
    run). Now the batch's requests run alone, each is refused naming the output, and
    requests of the width the model answers row for row are served throughout."""
    path = folding_net(tmp_path / "folding.onnx")
    model = ModelConfig(name="folding", path=str(path), workers=2, max_worker_failures=1,
                        max_batch_size=8, max_queue_delay_us=2000)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    good = [rng.standard_normal((1 + i % 3, FOLD_WIDTH)).astype(np.float32) for i in range(24)]
    bad = [rng.standard_normal((1, 2 * FOLD_WIDTH)).astype(np.float32) for _ in range(24)]
    with running_server(server_config(model)) as s, grpc.insecure_channel(s.url) as channel:
        async def run() -> list[object]:
            async with AsyncClient(s.url) as c:
                calls = [c.infer("folding", {FOLD_INPUT: x}, timeout=60)
                         for pair in zip(good, bad, strict=True) for x in pair]
                return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = asyncio.run(run())
        for x, outcome in zip(good, outcomes[0::2], strict=True):
            assert isinstance(outcome, dict), outcome
            np.testing.assert_array_equal(outcome[FOLD_OUTPUT],
                                          reference.run(None, {FOLD_INPUT: x})[0])
        for outcome in outcomes[1::2]:
            assert_rejected(outcome, f"output '{FOLD_OUTPUT}' came out with shape "
                            "[2, 2, 8] for 1 row(s) of input")
        assert health_status(channel, "folding") == SERVING
        stats = model_stats(s.url, "folding")
        assert all(w.healthy for w in stats.workers)
        assert (sum(w.rebuilds for w in stats.workers), sum(w.errors for w in stats.workers),
                sum(w.rejected for w in stats.workers)) == (0, 0, len(bad))

"""Fault isolation: a failing batch fails only its own requests; workers recover.

The controlled double fails on command: any batch holding a poison value, the
next N batches, or the next N executor builds (the rebuild after a failure).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np
import pytest

from tests.doubles.controlled import SECRET, expected
from tests.reliability.harness import (
    NOT_SERVING,
    SERVING,
    health_status,
    model_stats,
    serve_controlled,
    wait_for,
)
from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.client.convert import infer_request
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

POISON = -4242.0


def unique_rows(i: int, n: int = 1) -> np.ndarray:
    """Rows no other request shares, so a failed batch says whose they were."""
    return (1000.0 * (i + 1) + np.arange(n * 8, dtype=np.float32)).reshape(n, 8)


def assert_internal_without_leak(error: BaseException) -> None:
    assert isinstance(error, InferenceError), error
    assert error.code == grpc.StatusCode.INTERNAL
    assert "inference failed on worker" in error.details and "not completed" in error.details
    for leak in (SECRET, "hunter2", "/secret", "Traceback"):
        assert leak not in error.details


def test_only_the_poisoned_batch_fails_and_its_worker_is_rebuilt():
    with serve_controlled(workers=2, max_batch_size=8, max_queue_delay_us=2000) as s:
        s.controls.poison = POISON
        s.controls.sleep_s = 0.005
        inputs = [unique_rows(i, 1 + i % 3) for i in range(120)]
        poisoned = {17, 64}
        for i in poisoned:
            inputs[i] = inputs[i].copy()
            inputs[i][0, 3] = POISON

        async def run():
            clients = [AsyncClient(s.url) for _ in range(12)]
            try:
                return await asyncio.gather(*(
                    clients[i % 12].infer("controlled", {"x": x}, timeout=30)
                    for i, x in enumerate(inputs)), return_exceptions=True)
            finally:
                await asyncio.gather(*(c.close() for c in clients))

        outcomes = asyncio.run(run())
        failed_values = np.concatenate(s.controls.failed_batches) if \
            s.controls.failed_batches else np.empty((0, 8), np.float32)
        failed_rows = {row.tobytes() for row in failed_values}
        in_failed_batch = [any(r.tobytes() in failed_rows for r in x) for x in inputs]
        assert all(in_failed_batch[i] for i in poisoned)
        assert sum(in_failed_batch) < len(inputs) // 2, "failures spread beyond their batches"
        for x, outcome, failed in zip(inputs, outcomes, in_failed_batch, strict=True):
            if failed:
                assert_internal_without_leak(outcome)
            else:
                assert isinstance(outcome, dict), outcome
                np.testing.assert_array_equal(outcome["y"], expected(x))

        stats = model_stats(s.url)
        failures = len(s.controls.failed_batches)
        assert failures >= 1
        assert sum(w.rebuilds for w in stats.workers) == failures
        assert sum(w.errors for w in stats.workers) == failures
        assert all(w.healthy for w in stats.workers)
        failed = [w for w in stats.workers if w.errors]
        assert failed and all("InjectedFailure" in w.last_error for w in failed)
        assert not any("hunter2" in w.last_error for w in stats.workers)  # Stats reach clients
        assert s.controls.builds == 2 + failures  # one build per worker, one per rebuild
        assert stats.errors == sum(in_failed_batch)
        # The rebuilt workers serve on, each of them.
        s.controls.poison = None
        with Client(s.url) as c:
            for i in range(6):
                x = unique_rows(500 + i, 2)
                np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        assert all(w.batches > 0 for w in model_stats(s.url).workers)


def test_a_failure_inside_a_stream_fails_only_that_request():
    with serve_controlled(max_batch_size=1) as s, grpc.insecure_channel(s.url) as channel:
        s.controls.poison = POISON
        bad = unique_rows(0)
        bad[0, 0] = POISON
        xs = {f"r{i}": unique_rows(i + 1) for i in range(8)}
        requests = [infer_request("controlled", {"x": x}, None, rid) for rid, x in xs.items()]
        requests.insert(4, infer_request("controlled", {"x": bad}, None, "poisoned"))
        answers = list(pb_grpc.InferenceServiceStub(channel).InferStream(iter(requests),
                                                                           timeout=30))
        by_id = {a.id: a for a in answers}
        assert sorted(by_id) == sorted([*xs, "poisoned"]) and len(answers) == len(by_id)
        error = by_id.pop("poisoned").error
        assert error.code == grpc.StatusCode.INTERNAL.value[0]
        assert "inference failed" in error.message and "hunter2" not in error.message
        for rid, answer in by_id.items():
            y = np.frombuffer(answer.response.outputs[0].data, np.float32).reshape(1, 8)
            np.testing.assert_array_equal(y, expected(xs[rid]))


def test_repeated_failures_take_the_worker_out_and_the_model_reports_it():
    with serve_controlled(workers=1, max_worker_failures=3, worker_retry_backoff_s=3600,
                          worker_retry_backoff_max_s=3600) as s, \
            grpc.insecure_channel(s.url) as channel, Client(s.url) as c:
        x = unique_rows(1)
        s.controls.fail_next_batches(2)
        for _ in range(2):
            with pytest.raises(InferenceError) as err:
                c.infer("controlled", {"x": x})
            assert_internal_without_leak(err.value)
        # Two failures in a row: rebuilt twice, still in rotation.
        np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        worker = model_stats(s.url).workers[0]
        assert (worker.rebuilds, worker.healthy) == (2, True)
        assert health_status(channel, "controlled") == SERVING

        # A success reset the count; three failures in a row now take it out.
        s.controls.fail_next_batches(3)
        for _ in range(3):
            with pytest.raises(InferenceError) as err:
                c.infer("controlled", {"x": x})
            assert_internal_without_leak(err.value)
        worker = model_stats(s.url).workers[0]
        assert not worker.healthy and worker.errors == 5
        wait_for(lambda: health_status(channel, "controlled") == NOT_SERVING)
        assert health_status(channel, "") == SERVING  # the server itself is fine
        with pytest.raises(InferenceError) as err:
            c.infer("controlled", {"x": x}, timeout=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no healthy worker" in err.value.details
        assert s.controls.snapshot()[0] == 1  # nothing ran after the one success
        worker = model_stats(s.url).workers[0]
        assert worker.state == "backing_off" and 3000 < worker.retry_in_seconds <= 3600
        assert "3 consecutive failures" in worker.last_error
        assert "InjectedFailure" in worker.last_error and "hunter2" not in worker.last_error


def test_a_worker_whose_rebuild_fails_leaves_and_the_others_carry_on():
    with serve_controlled(workers=2, max_batch_size=4, worker_retry_backoff_s=3600,
                          worker_retry_backoff_max_s=3600) as s, \
            grpc.insecure_channel(s.url) as channel, Client(s.url) as c:
        s.controls.fail_next_batches(1)
        s.controls.fail_next_builds(1)
        with pytest.raises(InferenceError) as err:
            c.infer("controlled", {"x": unique_rows(0)})
        assert_internal_without_leak(err.value)
        workers = model_stats(s.url).workers
        assert sorted(w.healthy for w in workers) == [False, True]
        assert health_status(channel, "controlled") == SERVING
        for i in range(4):
            x = unique_rows(i + 1, 2)
            np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        healthy = next(w for w in model_stats(s.url).workers if w.healthy)
        assert healthy.batches == 4

        # The last healthy worker goes the same way: now the model is NOT_SERVING.
        s.controls.fail_next_batches(1)
        s.controls.fail_next_builds(1)
        with pytest.raises(InferenceError):
            c.infer("controlled", {"x": unique_rows(9)})
        wait_for(lambda: health_status(channel, "controlled") == NOT_SERVING)
        with pytest.raises(InferenceError) as err:
            c.infer("controlled", {"x": unique_rows(10)}, timeout=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_failing_model_does_not_touch_another_model_on_the_server():
    from tests.doubles.controlled import ControlledBackend, controlled_model

    with serve_controlled(workers=1, max_worker_failures=1) as s, Client(s.url) as c, \
            grpc.insecure_channel(s.url) as channel:
        other = ControlledBackend()
        s.server.call(s.server.server.add_model(other.runtime(controlled_model("other"))))
        s.controls.fail_next_batches(1)
        with pytest.raises(InferenceError):
            c.infer("controlled", {"x": unique_rows(0)})
        wait_for(lambda: health_status(channel, "controlled") == NOT_SERVING)
        assert health_status(channel, "other") == SERVING
        x = unique_rows(3, 4)
        np.testing.assert_array_equal(c.infer("other", {"x": x})["y"], expected(x))


def test_outputs_of_the_wrong_length_fail_the_batch_instead_of_misrouting():
    """Answers are sliced out of a batch's outputs by row; a short output must not shift
    them onto other requests. Each request runs again alone, is short again, and is
    refused saying so; the worker is not at fault (before: INTERNAL, a rebuild and a
    worker failure per batch, so a few such requests took the model down)."""
    with serve_controlled(workers=1, max_batch_size=8, max_queue_delay_us=50_000,
                          max_worker_failures=1) as s, \
            grpc.insecure_channel(s.url) as channel:
        s.controls.short_outputs = True

        async def run() -> list[Any]:
            async with AsyncClient(s.url) as c:
                return await asyncio.gather(*(c.infer("controlled", {"x": unique_rows(i, 2)})
                                              for i in range(3)), return_exceptions=True)

        for outcome in asyncio.run(run()):
            assert isinstance(outcome, InferenceError), outcome
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
            assert "output 'y' came out with shape [1, 8] for 2 row(s)" in outcome.details
        worker = model_stats(s.url).workers[0]
        assert (worker.healthy, worker.rebuilds, worker.errors, worker.rejected) == \
            (True, 0, 0, 3)
        assert health_status(channel, "controlled") == SERVING
        s.controls.short_outputs = False
        x = unique_rows(7, 3)
        with Client(s.url) as c:
            np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))


def test_a_worker_out_of_the_rotation_is_rebuilt_after_a_backoff_and_the_model_recovers():
    """Before: a worker that left the rotation never came back; the model stayed down."""
    with serve_controlled(workers=1, max_worker_failures=1, worker_retry_backoff_s=0.01,
                          worker_retry_backoff_max_s=0.05) as s, Client(s.url) as c, \
            grpc.insecure_channel(s.url) as channel:
        s.controls.fail_next_builds(10**9)  # every rebuild fails until the test says
        s.controls.fail_next_batches(1)
        with pytest.raises(InferenceError) as err:
            c.infer("controlled", {"x": unique_rows(0)})
        assert_internal_without_leak(err.value)
        wait_for(lambda: health_status(channel, "controlled") == NOT_SERVING)
        # Rebuilds are tried again and again, the wait doubling up to its cap.
        wait_for(lambda: model_stats(s.url).workers[0].retries >= 5)
        worker = model_stats(s.url).workers[0]
        assert not worker.healthy and worker.state in ("backing_off", "rebuilding")
        assert worker.retry_in_seconds <= 0.05
        assert "rebuilding the executor" in worker.last_error
        assert "hunter2" not in worker.last_error
        with pytest.raises(InferenceError) as err:
            c.infer("controlled", {"x": unique_rows(1)}, timeout=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE

        s.controls.fail_next_builds(0)  # the fault is gone: the next rebuild succeeds
        wait_for(lambda: health_status(channel, "controlled") == SERVING)
        worker = model_stats(s.url).workers[0]
        assert (worker.healthy, worker.state, worker.retry_in_seconds) == \
            (True, "serving", 0.0)
        for i in range(3):
            x = unique_rows(10 + i, 2)
            np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        # Back in the rotation with a clean slate: one more failure takes it out again,
        # and it comes back again, after the initial backoff.
        s.controls.fail_next_batches(1)
        with pytest.raises(InferenceError):
            c.infer("controlled", {"x": unique_rows(20)})
        wait_for(lambda: model_stats(s.url).workers[0].state == "serving")
        x = unique_rows(21)
        np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        assert health_status(channel, "controlled") == SERVING


def test_a_pool_keeps_serving_while_one_worker_backs_off():
    with serve_controlled(workers=2, max_batch_size=4, max_worker_failures=1,
                          worker_retry_backoff_s=0.01) as s, Client(s.url) as c, \
            grpc.insecure_channel(s.url) as channel:
        s.controls.fail_next_batches(1)
        with pytest.raises(InferenceError):
            c.infer("controlled", {"x": unique_rows(0)})
        assert health_status(channel, "controlled") == SERVING
        wait_for(lambda: all(w.healthy for w in model_stats(s.url).workers))
        for i in range(4):
            x = unique_rows(i + 1, 2)
            np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        assert all(w.batches > 0 for w in model_stats(s.url).workers)


def test_a_worker_that_fails_again_after_each_rebuild_backs_off_further(caplog):
    """A rebuild that succeeds does not prove the worker sound, a batch served does: a
    worker whose batches keep failing waits twice as long each time it leaves."""
    caplog.set_level(logging.ERROR, logger="trtserve.service.engine.model")
    with serve_controlled(workers=1, max_worker_failures=1, worker_retry_backoff_s=0.01,
                          worker_retry_backoff_max_s=0.04) as s, Client(s.url) as c:
        def leave_and_return() -> None:
            s.controls.fail_next_batches(1)
            with pytest.raises(InferenceError):
                c.infer("controlled", {"x": unique_rows(0)})
            wait_for(lambda: model_stats(s.url).workers[0].state == "serving")

        for _ in range(4):
            leave_and_return()
        x = unique_rows(1)
        np.testing.assert_array_equal(c.infer("controlled", {"x": x})["y"], expected(x))
        leave_and_return()  # after a batch served: the initial wait again
    waits = [r.args[-1] for r in caplog.records if "taken out of the rotation" in r.msg]
    assert waits == [0.01, 0.02, 0.04, 0.04, 0.01]

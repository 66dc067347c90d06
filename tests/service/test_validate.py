"""ModelRuntime.validate: accepted signatures are remembered, refusals never are."""

import numpy as np
import pytest

from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model
from trtserve.service.engine import model
from trtserve.service.errors import TensorError


@pytest.fixture
def runtime():
    return ControlledBackend().runtime(controlled_model(max_batch_size=8))


def rows(n, width=WIDTH, dtype=np.float32):
    return {INPUT: np.zeros((n, width), dtype)}


def test_a_repeated_signature_gets_the_same_answer_without_rechecking(runtime, monkeypatch):
    first = runtime.validate(rows(3), {})
    assert first == (3, ((WIDTH,),))
    monkeypatch.setattr(runtime, "_check", lambda *a: pytest.fail("checked again"))
    assert runtime.validate(rows(3), {}) == first  # same names, dtypes and shapes
    with pytest.raises(BaseException, match="checked again"):
        runtime.validate(rows(4), {})  # another shape is a new signature


def test_refusals_are_checked_every_time_and_never_remembered(runtime):
    for _ in range(3):
        with pytest.raises(TensorError, match="dtype FP64"):
            runtime.validate(rows(2, dtype=np.float64), {})
        with pytest.raises(TensorError, match="9 rows"):
            runtime.validate(rows(9), {})
        with pytest.raises(TensorError, match="dimension 1"):
            runtime.validate(rows(2, width=WIDTH + 1), {})
    assert runtime._validated == {}


def test_the_wire_dtype_is_part_of_the_signature(runtime):
    runtime.validate(rows(1), {})
    with pytest.raises(TensorError, match="dtype INT32"):
        runtime.validate(rows(1), {INPUT: "INT32"})  # same array, other declared type


def test_the_memory_is_bounded(runtime, monkeypatch):
    monkeypatch.setattr(model, "VALIDATED_SIGNATURES", 3)
    for n in range(1, 7):
        assert runtime.validate(rows(n), {})[0] == n
    assert len(runtime._validated) == 3

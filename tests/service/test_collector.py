"""The garbage collector's young-generation threshold in the serving processes (issue 18)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from trtserve.service.config import ServerConfig
from trtserve.service.errors import ConfigError
from trtserve.service.memory import tune_collector


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*before)


def test_the_young_threshold_is_raised_and_the_older_ones_kept(
        thresholds: tuple[int, int, int]) -> None:
    assert tune_collector(ServerConfig().gc_gen0_threshold)
    assert gc.get_threshold() == (20_000, 10, 10)


def test_zero_leaves_pythons_thresholds(thresholds: tuple[int, int, int]) -> None:
    assert not tune_collector(0)
    assert gc.get_threshold() == thresholds


def test_a_negative_threshold_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"server\.gc_gen0_threshold: got -1"):
        ServerConfig(gc_gen0_threshold=-1)

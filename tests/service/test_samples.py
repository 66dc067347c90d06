"""Latency percentiles of Stats (service/engine/stats.py: Samples, Merged).

Stats and every metrics scrape read them on the engine's loop: a window is a numpy
ring summarized only when it changed, and a model's percentiles cover every one of
its workers' windows.
"""

from __future__ import annotations

import numpy as np

from trtserve.service.engine.stats import Merged, Percentiles, Samples


def _percentiles_us(seconds: np.ndarray) -> tuple[int, float, float, float, float]:
    us = seconds * 1e6
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return len(us), float(us.mean()), float(p50), float(p90), float(p99)


def _as_tuple(p: Percentiles) -> tuple[int, float, float, float, float]:
    return p.count, p.mean_us, p.p50_us, p.p90_us, p.p99_us


def test_a_window_summarizes_its_last_samples_only() -> None:
    rng = np.random.default_rng(0)
    values = rng.exponential(1e-3, 1000)
    window = Samples(window=64)
    for v in values:
        window.add(float(v))
    assert sorted(window.values()) == sorted(values[-64:])
    assert np.allclose(_as_tuple(window.summary()), _percentiles_us(values[-64:]))


def test_samples_added_together_are_the_same_samples_added_one_by_one() -> None:
    """A group's members share one wait: added in one call (slices of the ring), they
    leave the window as many adds would, across the ring's end and past its size."""
    rng = np.random.default_rng(1)
    together, one_by_one = Samples(window=16), Samples(window=16)
    for count in (1, 3, 7, 1, 12, 40, 5):
        seconds = float(rng.exponential(1e-3))
        together.add(seconds, count)
        for _ in range(count):
            one_by_one.add(seconds)
        assert together.added == one_by_one.added
        assert sorted(together.values()) == sorted(one_by_one.values())


def test_an_empty_window_has_no_percentiles() -> None:
    assert Samples().summary() == Percentiles()
    assert Merged([Samples(), Samples()]).summary() == Percentiles()
    assert Merged([]).summary() == Percentiles()


def test_a_summary_follows_every_new_sample() -> None:
    window = Samples(window=8)
    window.add(1e-3)
    assert window.summary().p50_us == 1000.0
    assert window.summary() is window.summary()  # unchanged: not computed again
    window.add(3e-3)
    assert (window.summary().count, window.summary().p50_us) == (2, 2000.0)


def test_a_models_percentiles_cover_every_workers_window() -> None:
    """Before, the model's window was its workers' appended in turn and cut to 4096, so
    a busy last worker's samples left out the others'."""
    slow, fast = Samples(window=100), Samples(window=100)
    for _ in range(100):
        slow.add(10e-3)
        fast.add(1e-3)
    merged = Merged([slow, fast])
    first = merged.summary()
    assert (first.count, first.mean_us) == (200, 5500.0)
    assert merged.summary() is first  # no window changed
    fast.add(1e-3)  # the ring drops one of fast's, keeps 100 of each
    assert merged.summary() is not first
    assert np.allclose(_as_tuple(merged.summary()),
                       _percentiles_us(np.concatenate([slow.values(), fast.values()])))

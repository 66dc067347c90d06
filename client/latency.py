"""Latency summaries, shared by the load generator and `trtserve profile`."""

from __future__ import annotations

import math

import numpy as np


def latency_summary_ms(seconds: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p95, p99 and max of durations in seconds, as milliseconds."""
    if seconds.size == 0:
        return {k: math.nan for k in ("mean", "p50", "p90", "p95", "p99", "max")}
    ms = seconds * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "max": float(ms.max())}

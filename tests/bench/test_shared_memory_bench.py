"""`benchmarks.shared_memory`'s measure of the server's region copy (the default `copy`
mode's pread) runs the server's own SystemRegion on a real POSIX object and leaves no
object behind."""

from __future__ import annotations

import math
import os

from benchmarks.shared_memory import mean_model, region_read_cold_us


def test_region_read_cold_runs_the_servers_copy_and_unlinks_its_object(tmp_path):
    before = set(os.listdir("/dev/shm"))
    read_us, read_and_run_us = region_read_cold_us(mean_model(tmp_path / "mean.onnx"),
                                                   repeats=2)
    assert math.isfinite(read_us) and read_us > 0
    assert math.isfinite(read_and_run_us) and read_and_run_us > 0
    assert set(os.listdir("/dev/shm")) - before == set()

"""TensorRT calls our logger holding a lock of its own; a garbage collection inside that
callback that frees another TensorRT object takes the lock again and deadlocks (seen once
in this suite: a Builder being created logged while the collector freed an IRuntime).
So no collection may run while TensorRT can log: `gc_paused` around every such call."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest

from trtserve.service.backends.tensorrt.api import gc_paused
from trtserve.service.build import log as build_log
from trtserve.service.build.build import BuildOptions, build_engine
from trtserve.service.testing import onnx_models


def test_the_collector_is_off_inside_and_back_after_nested_and_failed_pauses():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the inner pause ended the outer one"
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a build that fails")
    assert gc.isenabled()


def test_overlapping_pauses_in_two_threads_end_with_the_last():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with gc_paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    with gc_paused():
        second_in.set()
        first_out.wait(10)
        assert not gc.isenabled(), "the first thread's pause ending turned the collector on"
    thread.join(10)
    assert gc.isenabled()


def test_the_collector_is_off_at_every_log_callback_of_a_real_build(tmp_path: Path,
                                                                     monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx builds engines on the CPU")
    onnx_models.mlp(tmp_path / "mlp.onnx")
    collector_on: list[bool] = []
    real_line = build_log._LogLine

    def line(severity: str, message: str) -> object:  # made inside TensorRT's callback
        collector_on.append(gc.isenabled())
        return real_line(severity, message)

    monkeypatch.setattr(build_log, "_LogLine", line)
    build_engine(tmp_path / "mlp.onnx", tmp_path / "mlp.engine", BuildOptions(batch=(1, 4, 8)))
    assert collector_on, "the build logged nothing: the check saw no callback"
    assert not any(collector_on), f"{sum(collector_on)} of {len(collector_on)} log callbacks " \
        "ran with the collector on"
    assert gc.isenabled()

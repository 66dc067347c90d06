"""The ONNX Runtime backend's thread defaults, on real sessions."""

import os
import subprocess
import sys

import pytest

from service.backends import onnxruntime as ort_backend
from service.config import ModelConfig

SPINNING = "session.intra_op.allow_spinning"


def _options(model: ModelConfig):
    loaded = ort_backend.load(model)
    executor = loaded.factories[0]()
    try:
        return executor._session.get_session_options()  # the options the session runs with
    finally:
        executor.close()


def test_sessions_sleep_between_operators_unless_told_to_spin(example_onnx):
    quiet = _options(ModelConfig(name="m", path=str(example_onnx)))
    assert quiet.get_session_config_entry(SPINNING) == "0"
    assert quiet.intra_op_num_threads == ort_backend.default_threads(1)
    spinning = _options(ModelConfig(name="m", path=str(example_onnx), intra_op_threads=3,
                                    intra_op_spinning=True))
    assert spinning.get_session_config_entry(SPINNING) == "1"
    assert spinning.intra_op_num_threads == 3


def test_default_threads_count_the_cores_this_process_may_use():
    """A process pinned to one core (taskset, a container's cpuset) gets one thread."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from service.backends.onnxruntime import default_threads, usable_cores; "
            "print(usable_cores(), default_threads(1), default_threads(4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "1", "1"]


def test_one_core_is_left_for_the_event_loop_and_grpc():
    cores = ort_backend.usable_cores()
    assert ort_backend.default_threads(1) == max(1, cores - 1)
    assert ort_backend.default_threads(cores) == 1

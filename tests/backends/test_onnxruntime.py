"""The ONNX Runtime backend's thread defaults, on real sessions."""

import os
import subprocess
import sys

import pytest

from trtserve.service import cpus
from trtserve.service.backends import onnxruntime as ort_backend
from trtserve.service.config import ModelConfig

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
            "from trtserve.service.backends.onnxruntime import default_threads; "
            "from trtserve.service.cpus import usable; "
            "print(usable(), default_threads(1), default_threads(4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "1", "1"]


def test_one_core_is_left_for_the_event_loop_and_grpc():
    cores = cpus.usable()
    assert ort_backend.default_threads(1) == max(1, cores - 1)
    assert ort_backend.default_threads(cores) == 1


def test_inputs_the_model_cannot_run_are_rejected_and_the_session_runs_on(tmp_path):
    """A Reshape that does not divide, an id out of range, a wrong fixed dimension: the
    input's fault (InputRejected, with ORT's reason cleaned of paths and C++ frames)."""
    import numpy as np

    from trtserve.service.errors import InputRejected
    from trtserve.service.testing.onnx_models import lookup_net, tiled_net

    tiled = ort_backend.OrtExecutor(str(tiled_net(tmp_path / "tiled.onnx")), 1, 8)
    lookup = ort_backend.OrtExecutor(str(lookup_net(tmp_path / "lookup.onnx")), 1, 8)
    cases = [
        (tiled, {"image": [np.zeros((1, 1, 3, 3), np.float32)]},
         "Reshape node 'tile' failed: The input tensor cannot be reshaped to the requested "
         "shape. Input shape:{1,1,3,3}, requested shape:{1,-1,1024}"),
        (lookup, {"ids": [np.array([[0, 10, 1, 2]], np.int64)]},
         "Gather node 'lookup' failed: indices element out of data bounds, idx=10 must be "
         "within the inclusive range [-10,9]"),
        (tiled, {"image": [np.zeros((1, 2, 32, 32), np.float32)]},
         "Got invalid dimensions for input: image for the following indices index: 1 Got: 2 "
         "Expected: 1 Please fix either the inputs/outputs or the model."),
    ]
    for executor, feed, reason in cases:
        with pytest.raises(InputRejected) as err:
            executor.run(feed, 1)
        assert err.value.reason == reason
    ok = tiled.run({"image": [np.ones((2, 1, 32, 64), np.float32)]}, 2)
    assert ok.outputs["tiles"].shape == (2, 2, 1024)


def test_failures_that_are_not_the_inputs_stay_the_workers():
    """An allocation failing inside a node, or a FAIL outside any node, is not the input's."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    oom = state.Fail(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul "
        "node. Name:'fc' Status Message: /onnxruntime_src/onnxruntime/core/framework/"
        "bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool) "
        "Failed to allocate memory for requested buffer of size 4294967296")
    assert ort_backend.rejection(oom) is None
    assert ort_backend.rejection(state.Fail("[ONNXRuntimeError] : 1 : FAIL : session")) is None
    assert ort_backend.rejection(state.InvalidArgument(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input: x Got: 3 "
        "Expected: 4 Please fix either the inputs/outputs or the model.")) == \
        "Invalid rank for input: x Got: 3 Expected: 4 Please fix either the inputs/outputs " \
        "or the model."


def test_a_reason_reaches_clients_without_paths_frames_or_length():
    from trtserve.service.errors import REASON_CHARS, client_reason

    text = ("/src/onnxruntime/core/x.h:84 onnxruntime::A::B(const onnxruntime::T&, bool) "
            "size was bad\n at /home/build/model.onnx " + "x" * 1000)
    reason = client_reason(text)
    assert "/src" not in reason and "/home" not in reason and "::" not in reason
    assert reason.startswith("size was bad at") and len(reason) == REASON_CHARS
    assert reason.endswith("...")


def test_a_zero_dimension_a_convolution_cannot_take_is_rejected(tmp_path):
    """The OCR detector's case: a dynamic dimension of 0 passes validation; Conv refuses it."""
    import numpy as np

    from trtserve.service.errors import InputRejected
    from trtserve.service.testing.onnx_models import conv_net

    executor = ort_backend.OrtExecutor(str(conv_net(tmp_path / "conv.onnx",
                                                    dynamic_spatial=True)), 1, 8)
    with pytest.raises(InputRejected) as err:
        executor.run({"image": [np.zeros((1, 3, 0, 16), np.float32)]}, 1)
    assert err.value.reason.startswith("Conv node '")
    assert "Invalid input shape" in err.value.reason
    assert executor.run({"image": [np.zeros((1, 3, 5, 7), np.float32)]}, 1) \
        .outputs["logits"].shape == (1, 10)

"""The executor's quick CUDA calls, made without letting go of the GIL.

cuda-python releases the GIL in every call. That is right for a call that waits
(an event synchronize), and costly for one that returns in a microsecond or two:
the worker thread must then take the GIL back, and while the event loop is busy
with frames it waits far longer than the call took. A thread asking for the GIL
gets it when the holder blocks or, at the latest, after the switch interval
(5 ms by default): Python's convoy effect. A batch made five such calls and one
wait; these four now keep the GIL: the graph launch and the three elapsed-time
reads.

They go to the driver library through `ctypes.PyDLL`, whose calls hold the GIL.
The runtime's handles are the driver's (a `cudaStream_t` is a `CUstream`, a
`cudaEvent_t` a `CUevent`, a `cudaGraphExec_t` a `CUgraphExec`), and the
executor made the device's primary context current on its thread with
`cudaSetDevice`, so the driver acts on the same objects in the same context.
Without the driver library (no GPU here) `load()` gives None and every call
stays with cuda-python.

Off (`ENABLED`) until measured on a GPU host: whether these waits are what holds
a worker's batches back there is not known yet. `python -m benchmarks.worker_time`
runs the served stand-in with and without them and shows where a worker's time
per batch goes (docs/gpu.md).
"""

from __future__ import annotations

import ctypes
import logging

from trtserve.client.cuda import CudaError

log = logging.getLogger(__name__)

_NOT_LOADED = object()

# Read when a CudaRuntime is made (one per served TensorRT model).
ENABLED = False


class HeldGilCalls:
    """cuGraphLaunch and cuEventElapsedTime through ctypes, the GIL held throughout.

    Safe to share between threads: the result buffer is written and read under
    the GIL, which no call here releases.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._launch = lib.cuGraphLaunch
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._launch.restype = ctypes.c_int
        # CUDA 12.8 added the _v2 entry point (the one CUDA 13's header names); an
        # older driver has the first.
        elapsed = getattr(lib, "cuEventElapsedTime_v2", None) or lib.cuEventElapsedTime
        elapsed.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        elapsed.restype = ctypes.c_int
        self._elapsed = elapsed
        self._ms = ctypes.c_float()
        self._ms_ref = ctypes.byref(self._ms)
        self._error_name = lib.cuGetErrorName
        self._error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._error_name.restype = ctypes.c_int

    def graph_launch(self, graph_exec: object, stream: int) -> None:
        code = self._launch(_handle(graph_exec), stream)
        if code:
            raise CudaError("cuGraphLaunch", self._name_of(code), code)

    def event_elapsed_s(self, start: object, end: object) -> float:
        code = self._elapsed(self._ms_ref, _handle(start), _handle(end))
        if code:
            raise CudaError("cuEventElapsedTime", self._name_of(code), code)
        return self._ms.value / 1e3

    def _name_of(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self._error_name(code, ctypes.byref(name)) == 0 and name.value:
            return name.value.decode()
        return f"CUresult({code})"


def _handle(obj: object) -> int:
    # cuda-python's handle objects convert to the pointer they wrap.
    return int(obj)  # type: ignore[call-overload]


_loaded: object = _NOT_LOADED


def load() -> HeldGilCalls | None:
    """The driver's calls, loaded once per process; None where there is no driver
    (or while ENABLED is off)."""
    global _loaded
    if not ENABLED:
        return None
    if _loaded is _NOT_LOADED:
        try:
            _loaded = HeldGilCalls(ctypes.PyDLL("libcuda.so.1"))
        except (OSError, AttributeError) as err:
            log.debug("CUDA calls keep to cuda-python (no driver library: %s)", err)
            _loaded = None
    return _loaded  # type: ignore[return-value]

"""The CUDA runtime calls the TensorRT executor makes, each one checked.

cuda-python returns `(err, *results)` from every call; `check` unwraps that and
raises `CudaError` carrying the error's name (`cudaErrorInvalidValue`), so no
call's status can be dropped. `CudaRuntime` is a thin object over the few calls
the executor needs; the executor receives one by injection, which lets tests
substitute a host-memory double.

cuda-python is imported on first use, not at import time, so this module imports
on a machine without a GPU (or without cuda-python). cuda-python 12.9+/13 release
the GIL inside every call, so a worker thread waiting on an event does not stall
the event loop.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import Any, NewType

import numpy as np

# The checked-call helpers are shared with the client's CUDA regions (one owner).
from trtserve.client.cuda import CudaError, check, error_name, runtime_module

__all__ = ["CudaError", "CudaRuntime", "check", "error_name", "runtime_module"]

# Opaque cuda-python handles. Streams travel as plain ints, the form TensorRT takes.
Event = NewType("Event", object)
Graph = NewType("Graph", object)
GraphExec = NewType("GraphExec", object)


class CudaRuntime:
    """The runtime calls the executor makes, on one device, each checked.

    Holds no resources itself: every stream, buffer, event and graph it creates
    belongs to the caller, who frees it with the matching call.
    """

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self._rt = runtime_module()
        # cudaMemcpyAsync calls made through this runtime, by kind ("h2d", "d2h", "d2d"),
        # and the copy nodes of graphs launched ("graph_h2d", "graph_d2h", counted by the
        # executor at each launch): what the shared-memory benchmark and GPU tests read
        # to show that a request made no host copy.
        self.copies: Counter[str] = Counter()

    def _call(self, name: str, *args: Any) -> Any:
        return check(getattr(self._rt, name)(*args), name)

    # --- device and streams ---------------------------------------------------------

    def set_device(self) -> None:
        """Make this runtime's device current for the calling thread."""
        self._call("cudaSetDevice", self.device)

    def device_name(self) -> str:
        props = self._call("cudaGetDeviceProperties", self.device)
        name = props.name
        return name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)

    def stream_create(self) -> int:
        """A new stream created with cudaStreamNonBlocking (never syncs with stream 0)."""
        stream = self._call("cudaStreamCreateWithFlags", self._rt.cudaStreamNonBlocking)
        return int(stream)

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def stream_synchronize(self, stream: int) -> None:
        """Wait for one stream's work (used when closing, never per batch)."""
        self._call("cudaStreamSynchronize", stream)

    def stream_non_blocking(self, stream: int) -> bool:
        flags = self._call("cudaStreamGetFlags", stream)
        return bool(int(flags) & int(self._rt.cudaStreamNonBlocking))

    # --- memory -----------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        """Device memory; at least one byte is asked for, so a size of 0 still gives a pointer."""
        return int(self._call("cudaMalloc", max(nbytes, 1)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Pinned (page-locked) host memory as a uint8 numpy array over it.

        The array does not own the memory: free it with `host_free`, after which the
        array must not be used.
        """
        size = max(nbytes, 1)
        ptr = int(self._call("cudaHostAlloc", size, self._rt.cudaHostAllocDefault))
        buffer = (ctypes.c_uint8 * size).from_address(ptr)
        return np.ctypeslib.as_array(buffer)[:nbytes]

    def host_free(self, array: np.ndarray) -> None:
        self._call("cudaFreeHost", array.ctypes.data)

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", ptr, value, nbytes, stream)

    def memcpy_h2d_async(self, dst: int, src: np.ndarray, nbytes: int, stream: int) -> None:
        """Copy the first `nbytes` of host array `src` to device pointer `dst` (pinned:
        asynchronous DMA; pageable: CUDA stages it before returning)."""
        self.copies["h2d"] += 1
        self._call(
            "cudaMemcpyAsync",
            dst,
            src.ctypes.data,
            nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            stream,
        )

    def memcpy_d2h_async(self, dst: np.ndarray, src: int, nbytes: int, stream: int) -> None:
        """Copy `nbytes` from device pointer `src` into host array `dst` (pinned, or a
        pageable one, for which CUDA returns once the copy is done)."""
        self.copies["d2h"] += 1
        self._call(
            "cudaMemcpyAsync",
            dst.ctypes.data,
            src,
            nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            stream,
        )

    def memcpy_d2d_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy `nbytes` between device pointers (a CUDA region's and a buffer)."""
        self.copies["d2d"] += 1
        self._call(
            "cudaMemcpyAsync",
            dst,
            src,
            nbytes,
            self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            stream,
        )

    # --- events -------------------------------------------------------------------------

    def event_create(self) -> Event:
        """A timing event (cudaEventDefault): record, wait on it, measure between two."""
        return Event(self._call("cudaEventCreateWithFlags", self._rt.cudaEventDefault))

    def event_destroy(self, event: Event) -> None:
        self._call("cudaEventDestroy", event)

    def event_record(self, event: Event, stream: int, external: bool = False) -> None:
        """Record `event` on `stream`. `external` while capturing: the graph gets an event
        record node, so each launch records the event (timing a graph's parts)."""
        if external:
            self._call("cudaEventRecordWithFlags", event, stream, self._rt.cudaEventRecordExternal)
        else:
            self._call("cudaEventRecord", event, stream)

    def event_synchronize(self, event: Event) -> None:
        """Wait for the work before `event` on its stream, and nothing else."""
        self._call("cudaEventSynchronize", event)

    def event_elapsed_s(self, start: Event, end: Event) -> float:
        return float(self._call("cudaEventElapsedTime", start, end)) / 1e3

    # --- graphs -------------------------------------------------------------------------

    def begin_capture(self, stream: int) -> None:
        """Start capturing `stream`. Thread-local mode: other threads' calls are unaffected."""
        self._call(
            "cudaStreamBeginCapture",
            stream,
            self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal,
        )

    def end_capture(self, stream: int) -> Graph:
        """End capturing `stream` (also after a failure inside the capture)."""
        return Graph(self._call("cudaStreamEndCapture", stream))

    def is_capturing(self, stream: int) -> bool:
        status = self._call("cudaStreamIsCapturing", stream)
        return bool(status != self._rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone)

    def graph_instantiate(self, graph: Graph) -> GraphExec:
        return GraphExec(self._call("cudaGraphInstantiate", graph, 0))

    def graph_launch(self, graph_exec: GraphExec, stream: int) -> None:
        self._call("cudaGraphLaunch", graph_exec, stream)

    def graph_exec_destroy(self, graph_exec: GraphExec) -> None:
        self._call("cudaGraphExecDestroy", graph_exec)

    def graph_destroy(self, graph: Graph) -> None:
        self._call("cudaGraphDestroy", graph)

    def clear_error(self) -> str | None:
        """Reset this thread's last CUDA error; return its name, or None if there was none."""
        err, *_ = self._rt.cudaGetLastError()
        if err == self._rt.cudaError_t.cudaSuccess:
            return None
        return error_name(err)

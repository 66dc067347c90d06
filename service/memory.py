"""Giving memory back to the system after large requests (glibc's malloc; elsewhere a no-op).

A large request leaves memory behind in ONNX Runtime's CPU arena (off by
default, `models.cpu_memory_arena`) and in glibc's heaps: the free chunks
between live ones stay resident, and so does the top of a heap below glibc's
trim threshold, which rises with the large blocks freed (up to 64 MiB).
`Trimmer` runs `malloc_trim(0)`, which returns the free pages inside every
heap, after large requests. `tune_malloc` can also fix the mmap threshold
(large blocks then get their own mapping, returned when freed), at the price
of page faults on every large temporary. Measurements are in
docs/reliability.md ("Memory").
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

# mallopt parameter, from glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
# Coalesce the trims of a burst: one after its large requests went quiet this long.
TRIM_DELAY_S = 0.05


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune_malloc(mmap_threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold for this process; False where not glibc.

    A threshold set explicitly also turns off glibc's dynamic raising of it.
    """
    if _LIBC is None or mmap_threshold_bytes <= 0:
        return False
    ok = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold_bytes)))
    if not ok:
        log.warning("mallopt refused an mmap threshold of %d bytes", mmap_threshold_bytes)
    return ok


def tune_collector(gen0_threshold: int) -> bool:
    """Collect the young generation after `gen0_threshold` new container objects rather
    than Python's 700 (the older generations keep their ratios); False for 0 (Python's own).

    Every request leaves a few dozen containers behind (its request, futures, dicts,
    closures), nearly all freed by reference counting: at 700 the collector walks the
    young generation every few dozen requests for next to nothing, on the event loop.
    """
    if gen0_threshold <= 0:
        return False
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, older, oldest)
    return True


def trim() -> bool:
    """Return glibc's free memory to the system; whether any was (False where not glibc)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


class Trimmer:
    """Runs `trim` in a thread shortly after large requests, once per burst (event loop owned).

    `follow_up_s` (0: none): one more trim that long after a burst's trim, unless another
    burst began since. A frontend process hears that a request is over when the engine
    answers it, before it encodes the answer and gRPC or HTTP sends it: what the answer
    held is freed only once the client has read it, after the burst's trim.
    """

    def __init__(self, follow_up_s: float = 0.0) -> None:
        self.trims = 0
        self.follow_up_s = follow_up_s
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[bool] | None = None
        self._again = False

    @property
    def available(self) -> bool:
        return _LIBC is not None

    def request(self) -> None:
        """Trim soon: after TRIM_DELAY_S without another request, or after the running trim."""
        if not self.available:
            return
        if self._running is not None:
            self._again = True
            return
        if self._timer is not None:  # a burst's trim to come, or a follow-up: this one first
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._start, True)

    def _start(self, burst: bool) -> None:
        """Trim now: a burst's trim (followed up, with `follow_up_s`), or its follow-up."""
        self._timer = None
        self._again = False
        # malloc_trim walks every heap (milliseconds on a large one): not on the loop.
        running = asyncio.get_running_loop().run_in_executor(None, trim)
        self._running = running
        running.add_done_callback(lambda future: self._done(future, burst))

    def _done(self, future: asyncio.Future[bool], burst: bool) -> None:
        self._running = None
        if future.cancelled():
            return
        self.trims += 1
        if future.exception() is not None:
            log.error("malloc_trim failed", exc_info=future.exception())
        else:
            log.debug("malloc_trim %d%s: %s", self.trims, "" if burst else " (follow-up)",
                      "memory given back" if future.result() else "nothing to give back")
        if self._again:
            self.request()
        elif burst and self.follow_up_s > 0:
            self._timer = asyncio.get_running_loop().call_later(self.follow_up_s, self._start,
                                                                False)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""A one-shot event-loop timer with microsecond precision (a Linux timerfd).

asyncio's own timers end in an epoll wait whose timeout counts whole
milliseconds, so a 500 us `max_queue_delay_us` would really last more than a
millisecond (measured: docs/benchmarks.md, "The hot path"). A timerfd expires
on the kernel's high-resolution clock and wakes epoll as a readable descriptor.
Where there is none (not Linux, or a loop without add_reader),
`PreciseTimer.create` returns None and callers use `call_later`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


def _load_libc() -> ctypes.PyDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    if time.get_clock_info("monotonic").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None  # `now` must be the clock the timer runs on
    try:
        # PyDLL keeps the GIL across each call: timerfd_settime is a short syscall,
        # and releasing and retaking the GIL around it costs more than the call
        # when worker threads want the GIL too.
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()

# The serving clock: request arrivals, batch deadlines and call deadlines.
# Not loop.time(): uvloop's loop clock counts whole milliseconds, cached once per
# loop iteration, too coarse for sub-millisecond delays. The timerfd below is
# armed on this same clock (CLOCK_MONOTONIC), as is asyncio's default loop.
now = time.monotonic


class PreciseTimer:
    """A one-shot timer with microsecond precision: a Linux timerfd read by the loop.

    asyncio's own timers end in an epoll wait whose timeout counts whole
    milliseconds, so a 500 us `max_queue_delay_us` would really last more than a
    millisecond. A timerfd expires on the kernel's high-resolution clock and wakes
    epoll as a readable descriptor. `create` returns None where there is no
    timerfd (not Linux, or a loop without add_reader); callers then use
    `loop.call_later`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 callback: Callable[[], None]) -> None:
        self._loop = loop
        self._fd = fd
        self._callback = callback
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self._when = 0.0
        self.armed = False
        loop.add_reader(fd, self._fired)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop,
               callback: Callable[[], None]) -> PreciseTimer | None:
        if _LIBC is None:
            return None
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            log.debug("timerfd_create failed (errno %d); using loop timers", ctypes.get_errno())
            return None
        try:
            return cls(loop, fd, callback)
        except (NotImplementedError, OSError, ValueError):  # e.g. a proactor loop
            os.close(fd)
            return None

    def arm(self, when: float) -> None:
        """Fire at `when` on the serving clock (`now`: CLOCK_MONOTONIC)."""
        if self.armed and when == self._when:
            return  # reprogramming the same expiry costs a system call (and, in a VM, more)
        self._when = when
        sec = int(when)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = max(1, int((when - sec) * 1e9))
        self._settime(_TFD_TIMER_ABSTIME)
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self._spec.it_value.tv_sec = self._spec.it_value.tv_nsec = 0
            self._settime(0)
            self.armed = False

    def _settime(self, flags: int) -> None:
        assert _LIBC is not None
        if _LIBC.timerfd_settime(self._fd, flags, self._spec_ref, None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"timerfd_settime: {os.strerror(errno)}")

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # disarmed (or re-armed) after it became readable
            return
        self.armed = False
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)

"""One client process: its window, its recorder and the loops that send the load.

Closed loop, a blocking single stream, open loop. The parent starts `_child`
in each client process ("spawn"), so it stays a module-level function.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

from client.bench.channels import _aio_channel, _metadata, _method, _sync_channel
from client.bench.config import BenchConfig, Level


@dataclass
class _Window:
    start: float  # time.monotonic(), shared by every process on the machine
    warm_end: float
    end: float

    def inside(self, t: float) -> bool:
        return self.warm_end <= t <= self.end


class _Recorder:
    """What one process saw inside the window; progress goes to shared memory."""

    def __init__(self, window: _Window, progress: Any, slot: int) -> None:
        self.window = window
        self.latencies = array("d")
        self.lags = array("d")
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self._progress = progress
        self._slot = slot
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def done(self, due: float, finished: float, code: str | None) -> None:
        if not self.window.warm_end <= finished <= self.window.end:
            return
        if code is None:
            self.latencies.append(finished - due)
            self._progress[self._slot] += 1
        else:
            self.errors[code] += 1
            self._progress[self._slot + 1] += 1

    def mark_cpu(self, which: str) -> None:
        times = os.times()
        setattr(self, which, times.user + times.system)


Call = grpc.aio.UnaryUnaryMultiCallable


async def _one(call: Call, payload: bytes, timeout: float, metadata: Any) -> str | None:
    try:
        await call(payload, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return None


async def _closed(call: Call, payloads: list[bytes], level: Level, rec: _Recorder,
                  timeout: float, metadata: Any, first: int) -> None:
    end = rec.window.end
    n = len(payloads)

    async def stream(k: int) -> None:
        i = k
        while (sent := time.monotonic()) < end:
            code = await _one(call, payloads[i % n], timeout, metadata)
            rec.done(sent, time.monotonic(), code)
            i += 1

    await asyncio.gather(*(stream(first + k) for k in range(int(level.value))))


def _closed_sync(channel: grpc.Channel, protocol: str, payloads: list[bytes], rec: _Recorder,
                 timeout: float, metadata: Any, first: int) -> None:
    """One stream with gRPC's blocking client: cheaper per call than asyncio's."""
    call = channel.unary_unary(_method(protocol), request_serializer=None,
                               response_deserializer=None)
    end = rec.window.end
    n = len(payloads)
    i = first
    while (sent := time.monotonic()) < end:
        if rec.cpu_start is None and sent >= rec.window.warm_end:
            rec.mark_cpu("cpu_start")
        code = None
        try:
            call(payloads[i % n], timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code().name
        rec.done(sent, time.monotonic(), code)
        i += 1
    rec.mark_cpu("cpu_end")


class _Sleeper:
    """Sleeps until a time on the loop's clock to the microsecond, where Linux allows.

    asyncio.sleep rounds up to whole milliseconds in epoll, which would show
    up as send lag (and latency, counted from the due time) in open loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from service.timer import PreciseTimer

        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._timer = PreciseTimer.create(loop, self._fired)

    def _fired(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, when: float) -> None:
        if when <= self._loop.time():
            return
        if self._timer is None:
            await asyncio.sleep(when - self._loop.time())
            return
        self._waiter = self._loop.create_future()
        self._timer.arm(when)
        await self._waiter

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()


async def _open(call: Call, payloads: list[bytes], rate: float, rec: _Recorder,
                timeout: float, metadata: Any, max_outstanding: int, seed: int) -> None:
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    n = len(payloads)

    async def request(due: float, i: int) -> None:
        sent = time.monotonic()
        if rec.window.inside(sent):
            rec.lags.append(sent - due)
        code = await _one(call, payloads[i % n], timeout, metadata)
        rec.done(due, time.monotonic(), code)

    sleeper = _Sleeper(asyncio.get_running_loop())
    due, i = rec.window.start, 0
    try:
        while due < rec.window.end:
            now = time.monotonic()
            while due <= now and due < rec.window.end:
                if len(tasks) >= max_outstanding:
                    if rec.window.inside(due):
                        rec.dropped += 1
                else:
                    task = asyncio.create_task(request(due, i))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
                due += rng.expovariate(rate)
            if due < rec.window.end:
                await sleeper.until(due)
    finally:
        sleeper.close()
    if tasks:
        await asyncio.gather(*tasks)


async def _run_level(channel: grpc.aio.Channel, config: BenchConfig, payloads: list[bytes],
                     level: Level, window: _Window, index: int, share: float,
                     progress: Any) -> dict[str, Any]:
    call = channel.unary_unary(_method(config.protocol), request_serializer=None,
                               response_deserializer=None)
    rec = _Recorder(window, progress, 2 * index)
    loop = asyncio.get_running_loop()
    loop.call_at(window.warm_end, rec.mark_cpu, "cpu_start")
    loop.call_at(window.end, rec.mark_cpu, "cpu_end")
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    metadata = _metadata(config)
    if share > 0:
        if level.mode == "closed":
            await _closed(call, payloads, Level("closed", share), rec, config.timeout_s,
                          metadata, first=index)
        else:
            await _open(call, payloads, share, rec, config.timeout_s, metadata,
                        config.max_outstanding, config.seed * 1000 + index)
    await asyncio.sleep(max(0.0, window.end - time.monotonic()) + 0.01)
    return _summary(rec)


def _summary(rec: _Recorder) -> dict[str, Any]:
    cpu = (rec.cpu_end or 0.0) - (rec.cpu_start or 0.0)
    window = rec.window
    return {"latencies": rec.latencies.tobytes(), "lags": rec.lags.tobytes(),
            "errors": dict(rec.errors), "dropped": rec.dropped,
            "cpu": cpu / (window.end - window.warm_end)}


def _run_sync_level(config: BenchConfig, payloads: list[bytes], window: _Window, index: int,
                    progress: Any) -> dict[str, Any]:
    """A single closed-loop stream on gRPC's blocking client (cheaper per call)."""
    rec = _Recorder(window, progress, 2 * index)
    with _sync_channel(config) as channel:
        grpc.channel_ready_future(channel).result(config.timeout_s)
        time.sleep(max(0.0, window.start - time.monotonic()))
        _closed_sync(channel, config.protocol, payloads, rec, config.timeout_s,
                     _metadata(config), index)
    time.sleep(max(0.0, window.end - time.monotonic()))
    if rec.cpu_end is None:
        rec.mark_cpu("cpu_end")
    return _summary(rec)


def _split(level: Level, processes: int, index: int) -> float:
    """This process's share of a level: whole streams for closed loop, a rate for open."""
    if level.mode == "open":
        return level.value / processes
    total = int(level.value)
    return total // processes + (1 if index < total % processes else 0)


def _child(config: BenchConfig, payloads: list[bytes], index: int, conn: Connection,
           progress: Any) -> None:
    """A client process: wait for a level and its window, run it, report, repeat."""

    async def main() -> None:
        conn.send(("ready", None))
        while (message := await asyncio.to_thread(conn.recv)) is not None:
            level, window = message
            share = _split(level, config.processes, index)
            # Channels per level, so a single-stream level runs with no asyncio
            # channel (and its polling) alive in the process.
            if level.mode == "closed" and share == 1:
                result = await asyncio.to_thread(_run_sync_level, config, payloads, window,
                                                 index, progress)
            else:
                channel = _aio_channel(config)
                try:
                    await channel.channel_ready()
                    result = await _run_level(channel, config, payloads, level, window, index,
                                              share, progress)
                finally:
                    await channel.close(None)
            conn.send(("result", result))

    try:
        asyncio.run(main())
    except BaseException as e:  # the parent reports it; a bare exit would hang it
        conn.send(("error", f"client process {index}: {type(e).__name__}: {e}"))
        raise

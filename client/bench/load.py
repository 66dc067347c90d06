"""One client process: the loops that send the load, one call per request.

Closed loop, a blocking single stream, open loop (streams.py sends over a
bidirectional stream instead). The parent starts `_child`
in each client process ("spawn"), so it stays a module-level function.

`closed_loop` and `open_loop` take any unary call and a Recorder, so other
harnesses drive their load with them too (benchmarks/gpu_standin.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import grpc

from trtserve.client.bench import streams
from trtserve.client.bench.channels import _aio_channel, _metadata, _method, _sync_channel
from trtserve.client.bench.config import BenchConfig, Level
from trtserve.client.bench.recorder import Recorder, Window, arrivals

Call = grpc.aio.UnaryUnaryMultiCallable


def _as_calls(call: Call | Sequence[Call]) -> Sequence[Call]:
    return call if isinstance(call, Sequence) else (call,)


async def _one(call: Call, payload: bytes, timeout: float, metadata: Any) -> str | None:
    try:
        await call(payload, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return None


async def closed_loop(call: Call | Sequence[Call], payloads: list[bytes], concurrency: int,
                      rec: Recorder, timeout: float, metadata: Any = None,
                      first: int = 0) -> None:
    """`concurrency` requests always outstanding, each answer sending the next, until the
    window ends; latency counts from each send. Stream k starts at payload first + k.
    Given several calls (one per connection), stream k sends on call k mod their count."""
    end = rec.window.end
    n = len(payloads)
    calls = _as_calls(call)

    async def stream(k: int) -> None:
        i = k
        call = calls[k % len(calls)]
        while (sent := time.monotonic()) < end:
            code = await _one(call, payloads[i % n], timeout, metadata)
            rec.done(sent, time.monotonic(), code)
            i += 1

    await asyncio.gather(*(stream(first + k) for k in range(concurrency)))


def _closed_sync(channel: grpc.Channel, protocol: str, payloads: list[bytes], rec: Recorder,
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


async def open_loop(call: Call | Sequence[Call], payloads: list[bytes],
                    due_times: AsyncIterator[tuple[float, int]], rec: Recorder, timeout: float,
                    metadata: Any = None, max_outstanding: int | None = None) -> None:
    """A request at each arrival of `due_times` (recorder.arrivals), whatever the server
    does; latency counts from the due time, so a client that falls behind shows.
    Given several calls (one per connection), arrivals take them in turn.

    With `max_outstanding`, an arrival that finds that many requests in flight is
    not sent and counts as dropped; with None every arrival is sent. Returns once
    every request sent is answered.
    """
    tasks: set[asyncio.Task[None]] = set()
    n = len(payloads)
    calls = _as_calls(call)
    sent_count = 0

    async def request(due: float, i: int, call: Call) -> None:
        sent = time.monotonic()
        if rec.window.inside(sent):
            rec.lags.append(sent - due)
        code = await _one(call, payloads[i % n], timeout, metadata)
        rec.done(due, time.monotonic(), code)

    async for due, i in due_times:
        if max_outstanding is not None and len(tasks) >= max_outstanding:
            if rec.window.inside(due):
                rec.dropped += 1
            continue
        task = asyncio.create_task(request(due, i, calls[sent_count % len(calls)]))
        sent_count += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _run_level(channels: Sequence[grpc.aio.Channel], config: BenchConfig,
                     payloads: list[bytes], level: Level, window: Window, index: int,
                     share: float, progress: Any) -> dict[str, Any]:
    channel = channels[0]  # a stream needs one
    calls = [c.unary_unary(_method(config.protocol), request_serializer=None,
                           response_deserializer=None) for c in channels]
    rec = Recorder(window, progress, 2 * index)
    loop = asyncio.get_running_loop()
    loop.call_at(window.warm_end, rec.mark_cpu, "cpu_start")
    loop.call_at(window.end, rec.mark_cpu, "cpu_end")
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    metadata = _metadata(config)
    seed = config.seed * 1000 + index
    if share > 0 and config.streaming:
        if level.mode == "closed":
            await streams.closed(channel, config, payloads, int(share), rec, first=index)
        else:
            await streams.open_loop(channel, config, payloads, share, rec, seed)
    elif share > 0:
        if level.mode == "closed":
            await closed_loop(calls, payloads, int(share), rec, config.timeout_s, metadata,
                              first=index)
        else:
            due_times = arrivals(config.arrivals, window.start, window.end, share, seed)
            await open_loop(calls, payloads, due_times, rec, config.timeout_s, metadata,
                            config.max_outstanding)
    await asyncio.sleep(max(0.0, window.end - time.monotonic()) + 0.01)
    return _summary(rec)


def _summary(rec: Recorder) -> dict[str, Any]:
    cpu = (rec.cpu_end or 0.0) - (rec.cpu_start or 0.0)
    window = rec.window
    return {"latencies": rec.latencies.tobytes(), "lags": rec.lags.tobytes(),
            "errors": dict(rec.errors), "dropped": rec.dropped,
            "cpu": cpu / (window.end - window.warm_end)}


def _run_sync_level(config: BenchConfig, payloads: list[bytes], window: Window, index: int,
                    progress: Any) -> dict[str, Any]:
    """A single closed-loop stream on gRPC's blocking client (cheaper per call)."""
    rec = Recorder(window, progress, 2 * index)
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
            if level.mode == "closed" and share == 1 and not config.streaming:
                result = await asyncio.to_thread(_run_sync_level, config, payloads, window,
                                                 index, progress)
            else:
                count = 1 if config.streaming else config.connections
                channels = [_aio_channel(config) for _ in range(count)]
                try:
                    await asyncio.gather(*(c.channel_ready() for c in channels))
                    result = await _run_level(channels, config, payloads, level, window,
                                              index, share, progress)
                finally:
                    await asyncio.gather(*(c.close(None) for c in channels))
            conn.send(("result", result))

    try:
        asyncio.run(main())
    except BaseException as e:  # the parent reports it; a bare exit would hang it
        conn.send(("error", f"client process {index}: {type(e).__name__}: {e}"))
        raise

"""Load over the protocol's bidirectional stream instead of one call per request.

trtserve.v1 `InferStream` and KServe `ModelStreamInfer` keep many requests in
flight on one HTTP/2 stream and answer in completion order, each answer
carrying its request's id. A stream saves gRPC's per-call work (a new HTTP/2
stream, headers, status) on both sides, which is most of what a request costs
a Python server; `--streaming` measures a server the way a throughput-minded
client would call it (perf_analyzer's `--streaming` does the same for Triton).

Ids: a request's id is set by appending the serialized id field to the
pre-serialized request (protobuf merges concatenated messages, and for a
scalar field the last value wins), so no request is re-serialized per send.
Closed loop gives every slot a fixed id, as a slot has one request in flight
at a time; open loop numbers its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from trtserve.client.bench.channels import _metadata, _stream_method
from trtserve.client.bench.config import BenchConfig
from trtserve.client.bench.recorder import Recorder, poisson_arrivals

# Closed loop: requests in flight on one stream at most; more slots open more
# streams, so one stream's ordered writes do not pace the whole level.
SLOTS_PER_STREAM = 64
# Pause before reopening a stream that failed, so a server that refuses
# streams is not hammered in a tight loop.
REOPEN_PAUSE_S = 0.05

OnAnswer = Callable[["_Stream", str, float, float, "str | None"], None]
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def id_suffix(protocol: str, request_id: str) -> bytes:
    """The serialized `id` field alone, to append to a serialized request."""
    return _request_type(protocol)(id=request_id).SerializeToString()


@functools.cache
def _request_type(protocol: str) -> Any:
    """The protocol's request message (open loop builds an id per request with it)."""
    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        return pb.InferRequest
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    return kpb.ModelInferRequest


def answer_reader(protocol: str) -> Callable[[bytes], tuple[str, str | None]]:
    """A parser of one stream answer: (request id, None or the error's name)."""
    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        def v1(raw: bytes) -> tuple[str, str | None]:
            answer = pb.InferStreamResponse.FromString(raw)
            if answer.WhichOneof("result") == "error":
                return answer.id, _CODE_NAMES.get(answer.error.code, "UNKNOWN")
            return answer.id, None

        return v1
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    def kserve(raw: bytes) -> tuple[str, str | None]:
        answer = kpb.ModelStreamInferResponse.FromString(raw)
        # KServe stream errors carry a message and no status code.
        return answer.infer_response.id, "STREAM_ERROR" if answer.error_message else None

    return kserve


class _Stream:
    """One stream: a writer task sends what `send` queues; `on_answer` gets each answer.

    The stream owns its call and the ids it has in flight (id -> due time);
    gRPC allows one write at a time, so every write goes through one task.
    `payloads` (id -> request) is what a closed loop re-sends.
    """

    def __init__(self, channel: grpc.aio.Channel, config: BenchConfig, on_answer: OnAnswer,
                 payloads: dict[str, bytes] | None = None) -> None:
        self.payloads = payloads or {}
        self._method = channel.stream_stream(_stream_method(config.protocol),
                                             request_serializer=None,
                                             response_deserializer=None)
        self._metadata = _metadata(config)
        self._parse = answer_reader(config.protocol)
        self._on_answer = on_answer
        self._outbox: asyncio.Queue[tuple[str, bytes, float] | None] = asyncio.Queue()
        self.pending: dict[str, float] = {}

    def send(self, request_id: str, payload: bytes, due: float) -> None:
        self.pending[request_id] = due
        self._outbox.put_nowait((request_id, payload, due))

    def finish(self) -> None:
        """No more requests: close the sending side once the queued ones are written."""
        self._outbox.put_nowait(None)

    async def run(self) -> str | None:
        """Until the server ends the stream; the status name if it failed, else None."""
        call = self._method(None, metadata=self._metadata)  # requests go by write()
        writer = asyncio.create_task(self._write(call))
        try:
            async for raw in call:
                request_id, code = self._parse(raw)
                due = self.pending.pop(request_id, None)
                if due is not None:
                    self._on_answer(self, request_id, due, time.monotonic(), code)
            await writer
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write racing the call's end fails with INTERNAL or "RPC already
            # finished"; the call's own status says why it ended.
            status = await call.code()
            return None if status == grpc.StatusCode.OK else status.name
        finally:
            writer.cancel()
            call.cancel()  # a no-op once the call has ended
            # The writer may have ended with the same race as above (it stops at
            # its first failed write); the call's status already said why.
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError,
                                     asyncio.InvalidStateError):
                await writer
        return None

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while (item := await self._outbox.get()) is not None:
            await call.write(item[1])
        await call.done_writing()


async def closed(channel: grpc.aio.Channel, config: BenchConfig, payloads: list[bytes],
                 slots: int, rec: Recorder, first: int) -> None:
    """`slots` requests always in flight, spread over streams of SLOTS_PER_STREAM at most."""
    end = rec.window.end
    n = len(payloads)
    # A slot keeps its id (and its payload) for the whole level.
    mine = [(str(k), payloads[(first + k) % n] + id_suffix(config.protocol, str(k)))
            for k in range(slots)]
    groups = [mine[i:i + SLOTS_PER_STREAM] for i in range(0, slots, SLOTS_PER_STREAM)]

    def answered(stream: _Stream, request_id: str, due: float, now: float,
                 code: str | None) -> None:
        rec.done(due, now, code)
        if now < end:
            stream.send(request_id, stream.payloads[request_id], now)
        elif not stream.pending:
            stream.finish()

    async def one_stream(group: list[tuple[str, bytes]]) -> None:
        while time.monotonic() < end:
            stream = _Stream(channel, config, answered, dict(group))
            started = time.monotonic()
            for request_id, payload in group:
                stream.send(request_id, payload, started)
            failure = await _bounded(stream.run(), end + config.timeout_s)
            if failure is None and stream.pending:
                failure = "STREAM_ENDED"  # the server closed the stream with answers owed
            if failure is not None:
                now = time.monotonic()
                for due in stream.pending.values():
                    rec.done(due, now, failure)
                await asyncio.sleep(REOPEN_PAUSE_S)

    await asyncio.gather(*(one_stream(g) for g in groups))


async def open_loop(channel: grpc.aio.Channel, config: BenchConfig, payloads: list[bytes],
                    rate: float, rec: Recorder, seed: int) -> None:
    """Poisson arrivals onto one stream; latency counts from each request's due time."""
    n = len(payloads)
    stream = _Stream(channel, config,
                     lambda _stream, _id, due, now, code: rec.done(due, now, code))
    running = asyncio.create_task(_bounded(stream.run(), rec.window.end + config.timeout_s))
    try:
        async for due, i in poisson_arrivals(rec.window, rate, seed):
            if running.done():
                break  # the stream failed; what it owed is counted below
            if len(stream.pending) >= config.max_outstanding:
                if rec.window.inside(due):
                    rec.dropped += 1
                continue
            now = time.monotonic()
            if rec.window.inside(now):
                rec.lags.append(now - due)
            request_id = str(i)
            stream.send(request_id, payloads[i % n] + id_suffix(config.protocol, request_id),
                        due)
    finally:
        stream.finish()
    failure = await running
    if failure is not None:
        now = time.monotonic()
        for pending_due in stream.pending.values():
            rec.done(pending_due, now, failure)


async def _bounded(run: Coroutine[Any, Any, str | None], deadline: float) -> str | None:
    """A stream's run, cut off (as DEADLINE_EXCEEDED) if answers stop coming."""
    try:
        return await asyncio.wait_for(run, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return "DEADLINE_EXCEEDED"

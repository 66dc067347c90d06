"""`AsyncClient.stream()`: many `infer` calls in flight on one InferStream.

    async with AsyncClient(url) as c, c.stream() as s:
        outs = await asyncio.gather(*(s.infer("example", {"input": x}) for x in xs))

Each `infer` awaits its own answer, as with `AsyncClient.infer`, but the
requests share one bidirectional stream instead of a gRPC call each. That
spares the client and the server gRPC's per-call work, which is most of what
a small request costs a Python server: lower latency at low load, more
requests per second at high load (docs/benchmarks.md measures both).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from trtserve.client.convert import infer_request, outputs_of
from trtserve.client.errors import InferenceError
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class InferStream:
    """One InferStream call; owns it, its reader task and the answers it owes.

    Requests are numbered on this stream, and the server echoes the number as
    the answer's id, so answers may arrive in any order. gRPC allows one write
    at a time on a call, hence the lock.
    """

    def __init__(self, stub: pb_grpc.InferenceServiceStub, metadata: Any) -> None:
        self._call = stub.InferStream(metadata=metadata)
        self._ids = itertools.count()
        self._owed: dict[str, asyncio.Future[pb.InferResponse]] = {}
        self._write_lock = asyncio.Lock()
        self._failure: Exception | None = None
        self._reader = asyncio.create_task(self._read())

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None, timeout: float | None = None,
                    dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """As `AsyncClient.infer`; raises `InferenceError` for this request's error."""
        if self._failure is not None:
            raise self._failure
        request = infer_request(model, inputs, list(outputs or []), dtypes=dtypes)
        request.id = str(next(self._ids))
        answer = asyncio.get_running_loop().create_future()
        self._owed[request.id] = answer
        try:
            async with self._write_lock:
                await self._call.write(request)
            response = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no answer on the stream within {timeout} s") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The write failed because the call has ended (gRPC says INTERNAL, or
            # "RPC already finished", depending on the race): report why it ended.
            raise await self._ended() from None
        finally:
            self._owed.pop(request.id, None)
        return outputs_of(response)

    async def close(self) -> None:
        """Finish sending, and wait until every answer owed has come."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            async with self._write_lock:
                await self._call.done_writing()
        await self._reader

    async def _read(self) -> None:
        try:
            async for answer in self._call:
                owed = self._owed.get(answer.id)
                if owed is None or owed.done():
                    continue  # its caller gave up (timeout, cancellation)
                if answer.WhichOneof("result") == "error":
                    code = _CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                    owed.set_exception(InferenceError(code, answer.error.message))
                else:
                    owed.set_result(answer.response)
            self._fail(InferenceError(grpc.StatusCode.UNAVAILABLE, "the stream has ended"))
        except grpc.aio.AioRpcError:
            # The call's own status: a read racing a failed write may only say INTERNAL.
            self._fail(await self._ended())
        except asyncio.CancelledError:
            self._fail(InferenceError(grpc.StatusCode.CANCELLED, "the stream was closed"))
            raise

    async def _ended(self) -> Exception:
        """Why the call is over: the reader's verdict if it has one, else the call's status."""
        if self._failure is not None:
            return self._failure
        code = await self._call.code()
        if code == grpc.StatusCode.OK:
            return InferenceError(grpc.StatusCode.UNAVAILABLE, "the stream has ended")
        return InferenceError(code, await self._call.details() or "")

    def _fail(self, error: Exception) -> None:
        """The stream is over: every answer still owed fails, and so does every later call."""
        self._failure = error
        for owed in self._owed.values():
            if not owed.done():
                owed.set_exception(error)

    async def abort(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

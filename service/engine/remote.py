"""The `Engine` seen from a frontend process: the engine runs in the main process.

Requests go over the link (service/ipc/link.py) as descriptors, large inputs
through this frontend's input arena; each request's future is keyed by its id
and resolved by the engine's one reply. `describe` and `ready` are answered
here, from what the engine pushes (descriptions, health), so the request path
waits on nothing but the reply.

When the client gives up (grpc.aio cancels the handler: a cancel or the
deadline), the request's cancel reaches the engine, which takes it out of its
batch; its input range stays allocated until the engine's reply, because the
engine may read it until then. When the engine goes away, every request in
flight fails UNAVAILABLE, every model turns NOT_SERVING and `lost` is set.

Requests of one frame that share a model and shapes go as one group
(engine/groups.py, `_Forming`), written when the frame is: the engine's one loop
thread then reads, checks and answers them once, and the frontend cuts each
member's rows from the group's reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import grpc
import numpy as np

from trtserve.service import echo
from trtserve.service.config import ServerConfig
from trtserve.service.engine import groups
from trtserve.service.engine.api import (
    HealthListener,
    InferRequest,
    InferResult,
    ModelDescription,
    ModelState,
    RegionStatus,
    StatsSnapshot,
    TensorIn,
    TensorOut,
    check_version,
)
from trtserve.service.engine.shared_calls import SharedCalls
from trtserve.service.errors import NotFound, ServeError, Unavailable
from trtserve.service.gen.trtserve.internal import link_pb2
from trtserve.service.ipc import codec
from trtserve.service.ipc.link import Link, decode_payload, encode_payload, open_link
from trtserve.service.ipc.shm import Arena

log = logging.getLogger(__name__)

K = link_pb2.Control
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Failed(ServeError):
    """An error the engine answered, with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Pending:
    __slots__ = ("future", "offsets")

    def __init__(self, future: asyncio.Future[InferResult], offsets: list[int]) -> None:
        self.future = future
        self.offsets = offsets


class _Forming:
    """Requests of the frame being written that share a key (`_group_key`). Their message
    keeps its place in the frame and is written when the frame is (`_write`): as a
    request of its own for one member, else as a group (Request.member_ids) whose
    inputs are the members' rows stacked, inline or in one arena range they share."""

    __slots__ = ("message", "nbytes", "pendings", "requests", "rids", "rows", "total_rows")

    def __init__(self, message: link_pb2.Request) -> None:
        self.message = message
        self.rids: list[int] = []
        self.requests: list[InferRequest] = []
        self.pendings: list[_Pending] = []
        self.rows: list[int] = []
        self.total_rows = 0
        self.nbytes = 0

    def fits(self, rows: int, nbytes: int, max_rows: int) -> bool:
        return self.total_rows + rows <= max_rows and \
            self.nbytes + nbytes <= groups.MAX_GROUP_BYTES

    def add(self, rid: int, request: InferRequest, pending: _Pending, rows: int,
            nbytes: int) -> None:
        self.rids.append(rid)
        self.requests.append(request)
        self.pendings.append(pending)
        self.rows.append(rows)
        self.total_rows += rows
        self.nbytes += nbytes


class RemoteEngine:
    """Implements engine/api.py's `Engine` over the link to the engine process."""

    def __init__(self, inputs: Arena, outputs: Arena,
                 inline_max_bytes: int = codec.INLINE_MAX_BYTES) -> None:
        self._inputs = inputs
        self._outputs = outputs
        self.inline_max_bytes = inline_max_bytes
        self._link: Link | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._queries: dict[int, asyncio.Future[object]] = {}
        # Stats calls that overlap ask the engine once (a flood of them cannot queue
        # snapshots ahead of other frontends' requests there).
        self._stats_calls: SharedCalls[StatsSnapshot] = SharedCalls()
        self._descriptions: dict[str, ModelDescription] = {}
        self._failed: frozenset[str] = frozenset()
        self._health: dict[str, bool] = {}
        self._listeners: list[HealthListener] = []
        loop = asyncio.get_running_loop()
        self.config: asyncio.Future[ServerConfig] = loop.create_future()
        self.drain_requested = asyncio.Event()
        self.lost = asyncio.Event()
        self._draining = False
        # Set whenever no request is waiting for the engine's reply.
        self._idle = asyncio.Event()
        self._idle.set()
        # How long a lone request's frontend polls for its reply (_spin); set from the
        # server config once connected.
        self.spin_s = 0.0
        # How long a frame of requests may wait for more while their model has a backlog
        # at the engine (as its last frame said); set from the server config once connected.
        self.hold_s = 0.0
        self._backlogged: frozenset[str] = frozenset()
        self._spinning = False
        self._spin_until = 0.0
        self._spin_frames = 0
        # The groups of the frame being written (`_forming_frame`): every one, and the
        # one still open to more members by key.
        self._groups: list[_Forming] = []
        # Input ranges a group's members share: how many have yet to be answered.
        self._sharing: dict[int, int] = {}
        self._forming: dict[tuple[Any, ...], _Forming] = {}
        self._forming_frame: link_pb2.Frame | None = None
        # Called once a request whose inputs or answer held at least `_large_bytes` is
        # over, however it ended (`after_large`); 0: never.
        self._large_bytes = 0
        self._on_large: Callable[[], None] | None = None

    async def connect(self, sock: socket.socket) -> ServerConfig:
        """Open the link; returns the server config the engine sends first."""
        self._link = await open_link(sock, self._on_frame, self._on_lost,
                                     before_write=self._write_groups)
        return await self.config

    def after_large(self, large_bytes: int, on_large: Callable[[], None]) -> None:
        """Call `on_large` whenever a request of at least `large_bytes` of input tensors,
        or with an answer of that many bytes of output tensors, is over (0: never).

        This is where a frontend process sees the size of what it decoded and of what
        the engine answered: the server gives memory back to the system after such
        requests (service/memory.py), here as in the engine's byte budget."""
        self._large_bytes = large_bytes
        self._on_large = on_large

    def ready_to_serve(self) -> None:
        """Tell the engine this frontend has bound its port and serves."""
        self._send_control(K(kind=K.READY, pid=os.getpid()))

    # --- Engine ---

    def models(self) -> Sequence[str]:
        return tuple(self._descriptions)

    def describe(self, model: str, version: str = "") -> ModelDescription:
        description = self._descriptions.get(model)
        if description is None:  # as the engine's repository says it
            if model in self._failed:
                raise NotFound(f"model '{model}' failed to load when the server started "
                               "(the server log says why)")
            raise NotFound(f"model '{echo.text(model)}' is not served here; served models: "
                           f"{sorted(self._descriptions)}")
        check_version(model, version, description.version)
        return description

    def ready(self, model: str | None = None) -> bool:
        if self.lost.is_set():
            return False
        if model is None:
            return self._health.get("", False)
        return self._health.get(model, False)

    async def infer(self, request: InferRequest) -> InferResult:
        link = self._link
        if link is None or link.closed:
            raise Unavailable("the engine process is not reachable")
        if self._draining:
            raise Unavailable(f"model '{request.model}' is shutting down; not accepting "
                              "requests")
        rid = next(self._ids)
        frame = link.outgoing(self.hold_s if request.model in self._backlogged else 0.0)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferResult] = loop.create_future()
        found = self._group_key(request)
        if found is None:
            pending = _Pending(future, self._add(frame, rid, request))
        else:
            pending = _Pending(future, [])
            self._forming_in(frame, found, request.model).add(rid, request, pending,
                                                              found[1], found[2])
        self._pending[rid] = pending
        self._idle.clear()
        if len(self._pending) == 1 and self.spin_s > 0 and not self._spinning:
            self._spinning = True
            self._spin_until = time.monotonic() + self.spin_s
            self._spin_frames = link.frames_in
            loop.call_soon(self._spin)
        result: InferResult | None = None
        try:
            result = await future
            return result
        except asyncio.CancelledError:
            # The await cancelled `future` too; the request waits for the engine's reply
            # until it comes (its input range is the engine's to read until then).
            if rid in self._pending and not link.closed:
                link.outgoing().cancels.append(rid)
            raise
        finally:
            if self._large_bytes:
                self._report_large(request, found, result)

    def _report_large(self, request: InferRequest,
                      found: tuple[tuple[Any, ...], int, int] | None,
                      result: InferResult | None) -> None:
        """Request over: `_on_large` if its input arrays (`found` weighed them for a
        group's member) or its answer's held `_large_bytes` or more."""
        large = self._large_bytes
        if self._on_large is None:
            return
        if (found[2] if found is not None else _array_bytes(request.inputs.values())) >= large \
                or (result is not None and _array_bytes(result.outputs.values()) >= large):
            self._on_large()

    def _add(self, frame: link_pb2.Frame, rid: int, request: InferRequest) -> list[int]:
        """Request `rid` as a message of its own in `frame`; the arena offsets it took."""
        message = frame.requests.add()
        try:
            return self._fill(message, rid, request)
        except BaseException:
            del frame.requests[-1]
            raise

    def _fill(self, message: link_pb2.Request, rid: int, request: InferRequest) -> list[int]:
        """Write request `rid` into `message`; the arena offsets it took (none on failure)."""
        message.id = rid
        message.model = request.model
        message.version = request.version
        if request.outputs:
            message.outputs[:] = request.outputs
        if request.deadline is not None:
            message.deadline = request.deadline
        for name, ref in request.output_regions.items():
            region = message.output_regions[name]
            region.region, region.offset, region.byte_size = ref.region, ref.offset, ref.byte_size
        offsets: list[int] = []
        try:
            for name, tensor in request.inputs.items():
                offset = codec.put(message.inputs.add(), name, tensor.dtype, tensor.shape,
                                   tensor.data, self._inputs, self.inline_max_bytes)
                if offset is not None:
                    offsets.append(offset)
        except BaseException:
            for offset in offsets:
                self._inputs.free(offset)
            raise
        return offsets

    def _group_key(self, request: InferRequest) -> tuple[tuple[Any, ...], int, int] | None:
        """What requests must share to go as one group (groups.entry's key, from the
        request's own fields), its rows and input bytes; None: it goes alone (a model
        that does not batch, regions, BYTES, inputs that disagree on rows)."""
        description = self._descriptions.get(request.model)
        if description is None or not description.spec.batching or request.output_regions:
            return None
        key: list[Any] = [request.model, request.version, tuple(request.outputs)]
        rows = -1
        nbytes = 0
        for name, tensor in request.inputs.items():
            data = tensor.data
            shape = tensor.shape
            if not isinstance(data, np.ndarray) or not shape or tensor.dtype == "BYTES" \
                    or data.shape != shape:
                return None
            if rows < 0:
                rows = shape[0]
            elif shape[0] != rows:
                return None
            nbytes += data.nbytes
            key.append((name, tensor.dtype, shape[1:]))
        if rows < 0:
            return None
        return tuple(key), rows, nbytes

    def _forming_in(self, frame: link_pb2.Frame, found: tuple[tuple[Any, ...], int, int],
                    model: str) -> _Forming:
        """The group of `frame` that a request of this key (`_group_key`) joins: the
        open one, or a new one where it would pass the model's rows per request or
        groups.MAX_GROUP_BYTES."""
        if frame is not self._forming_frame:  # (a frame dropped unwritten left its own)
            self._forming.clear()
            self._groups.clear()
            self._forming_frame = frame
        key, rows, nbytes = found
        forming = self._forming.get(key)
        if forming is None or not forming.fits(
                rows, nbytes, self._descriptions[model].batching.max_rows_per_request):
            forming = self._forming[key] = _Forming(frame.requests.add())
            self._groups.append(forming)
        return forming

    def _write_groups(self, frame: link_pb2.Frame) -> None:
        """The frame is about to be written: its groups into their messages."""
        if frame is not self._forming_frame:
            return
        dropped: list[link_pb2.Request] = []
        for forming in self._groups:
            try:
                self._write(forming)
            except Exception:  # ours: its members fail, the frame goes without it
                log.exception("a group of model '%s' could not be written to the engine",
                              forming.requests[0].model)
                error = ServeError("internal error; see the server log")
                for rid in forming.rids:
                    if rid in self._pending:  # no reply will come: answered here
                        self._answer(rid, error)
                dropped.append(forming.message)
        self._groups.clear()
        self._forming.clear()
        self._forming_frame = None
        for message in dropped:
            requests = frame.requests
            del requests[next(i for i, m in enumerate(requests) if m is message)]
        if not self._pending:
            self._idle.set()

    def _write(self, forming: _Forming) -> None:
        """One member: a request of its own. Several: a group, each input the members'
        rows stacked, inline or in one arena range (freed once every member is answered:
        `_release`); one range is what the engine's checks and the executor's gather
        read in one piece."""
        m = forming.message
        if len(forming.rids) == 1:
            forming.pendings[0].offsets = self._fill(m, forming.rids[0], forming.requests[0])
            return
        first = forming.requests[0]
        m.model = first.model
        m.version = first.version
        if first.outputs:
            m.outputs[:] = first.outputs
        m.member_ids[:] = forming.rids
        m.member_rows[:] = forming.rows
        deadlines = [r.deadline for r in forming.requests]
        if any(d is not None for d in deadlines):
            m.member_deadlines[:] = [d or 0.0 for d in deadlines]
        total = forming.total_rows
        offsets: list[int] = []
        try:
            for name, tensor in first.inputs.items():
                # Arrays all (`_group_key` keeps region references alone).
                arrays = [cast(np.ndarray, r.inputs[name].data) for r in forming.requests]
                t = m.inputs.add(name=name, dtype=tensor.dtype,
                                 shape=(total, *tensor.shape[1:]))
                nbytes = sum(a.nbytes for a in arrays)
                offset = self._inputs.write_stacked(arrays) \
                    if nbytes > self.inline_max_bytes else None
                if offset is None:
                    t.inline = b"".join(a.tobytes() for a in arrays)
                else:
                    offsets.append(offset)
                    t.arena.offset = offset
                    t.arena.byte_size = nbytes
        except BaseException:
            for offset in offsets:
                self._inputs.free(offset)
            raise
        for offset in offsets:
            self._sharing[offset] = len(forming.rids)
        for pending in forming.pendings:
            pending.offsets = offsets

    def _release(self, offset: int) -> None:
        """A member's reply is in: the input range is free once no member reads it."""
        left = self._sharing.pop(offset, 1) - 1
        if left:
            self._sharing[offset] = left
        else:
            self._inputs.free(offset)

    def _spin(self) -> None:
        """Keep the loop polling (a callback always ready: its waits take no time) while
        the request that started this is unanswered, up to `spin_s`.

        At concurrency 1 a frontend otherwise sleeps until the engine's reply wakes it:
        a wake-up on another core and Python running cold after it, the larger part of
        what a frontend adds to a request (docs/processes.md). Only a frontend with a
        lone request spins, and only until the engine's next frame: under load the
        loop has work and frames come often."""
        link = self._link
        if self._pending and link is not None and link.frames_in == self._spin_frames \
                and time.monotonic() < self._spin_until:
            asyncio.get_running_loop().call_soon(self._spin)
        else:
            self._spinning = False

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        return await self._stats_calls.run(model, lambda: self._query_stats(model))

    async def _query_stats(self, model: str | None) -> StatsSnapshot:
        link = self._link
        if link is None or link.closed:
            raise Unavailable("the engine process is not reachable")
        qid = next(self._ids)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queries[qid] = future
        link.outgoing().controls.append(K(kind=K.STATS_QUERY, id=qid, model=model or ""))
        try:
            answer = await future
        finally:
            self._queries.pop(qid, None)
        if isinstance(answer, ServeError):
            raise answer
        assert isinstance(answer, StatsSnapshot)
        return answer

    def add_health_listener(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    # --- what lives in the engine: clients' regions, model control (host.CALLS) ---

    async def _call(self, method: str, *args: object) -> Any:
        link = self._link
        if link is None or link.closed:
            raise Unavailable("the engine process is not reachable")
        qid = next(self._ids)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queries[qid] = future
        link.outgoing().controls.append(K(kind=K.CALL, id=qid, model=method,
                                          payload=encode_payload(args)))
        try:
            answer = await future
        finally:
            self._queries.pop(qid, None)
        if isinstance(answer, ServeError):
            raise answer
        return answer

    async def register_system_region(self, name: str, key: str, offset: int,
                                     byte_size: int) -> None:
        await self._call("register_system_region", name, key, offset, byte_size)

    async def register_cuda_region(self, name: str, raw_handle: bytes, device_id: int,
                                   byte_size: int) -> None:
        await self._call("register_cuda_region", name, raw_handle, device_id, byte_size)

    async def unregister_region(self, name: str | None, kind: str | None = None) -> None:
        await self._call("unregister_region", name, kind)

    async def region_status(self, name: str | None, kind: str | None = None
                            ) -> tuple[RegionStatus, ...]:
        return tuple(await self._call("region_status", name, kind))

    async def repository_index(self) -> Sequence[ModelState]:
        return tuple(await self._call("repository_index"))

    async def load_model(self, model: str, path: str = "") -> ModelState:
        return await self._call("load_model", model, path)

    async def unload_model(self, model: str) -> ModelState:
        return await self._call("unload_model", model)

    async def reload_model(self, model: str, path: str = "") -> ModelState:
        return await self._call("reload_model", model, path)

    async def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); return once every accepted one is answered."""
        self._draining = True
        await self._idle.wait()

    # --- from the engine ---

    def _on_frame(self, frame: link_pb2.Frame) -> None:
        # A request of a backlogged model waits at least a batch's run at the engine
        # wherever it is, while each frame costs the engine's one loop a parse, a
        # write and their syscalls: its frame may wait up to hold_s for more (infer).
        self._backlogged = frozenset(frame.backlogged) if frame.backlogged else frozenset()
        if frame.controls:
            for control in frame.controls:
                self._control(control)
        releases: list[int] = []
        for reply in frame.replies:
            if reply.member_ids:
                self._group_reply(reply, releases)
            elif reply.id in self._pending:
                self._answer(reply.id, self._outcome(reply, releases))
        if not self._pending:
            self._idle.set()
        if releases and self._link is not None and not self._link.closed:
            # Not urgent (they free arena space): they may ride with held requests.
            out = self._link.outgoing(self.hold_s if self._backlogged else 0.0).releases
            for offset in releases:
                out.add(offset=offset)

    def _group_reply(self, reply: link_pb2.Reply, releases: list[int]) -> None:
        """The results of a group (engine/groups.py): each member gets its own rows of
        the stacked outputs (views of one copy)."""
        outcome = self._outcome(reply, releases)
        start = 0
        for rid, rows in zip(reply.member_ids, reply.member_rows, strict=True):
            end = start + rows
            if rid in self._pending:
                self._answer(rid, outcome if isinstance(outcome, BaseException)
                             else _rows(outcome, start, end))
            start = end

    def _answer(self, rid: int, outcome: InferResult | ServeError) -> None:
        """Request `rid`'s reply is in: its input ranges are free, its caller answered
        (unless it has gone)."""
        pending = self._pending.pop(rid)
        for offset in pending.offsets:
            self._release(offset)
        if pending.future.done():
            return
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    def _outcome(self, reply: link_pb2.Reply, releases: list[int]) -> InferResult | ServeError:
        if reply.code:
            return _Failed(_CODES.get(reply.code, grpc.StatusCode.INTERNAL), reply.message)
        outputs = {}
        for t in reply.outputs:
            dtype, shape, data = codec.take(t, self._outputs, copy=True)
            if t.WhichOneof("data") == "arena":
                releases.append(t.arena.offset)
            outputs[t.name] = TensorOut(dtype, shape, data)
        return InferResult(model=reply.model, version=reply.version, outputs=outputs)

    def _control(self, c: link_pb2.Control) -> None:
        kind = c.kind
        if kind == K.MODELS:
            descriptions, failed = decode_payload(c.payload)
            self._descriptions = {d.name: d for d in descriptions}
            self._failed = frozenset(failed)
        elif kind == K.HEALTH:
            self._set_health(c.model, c.serving)
        elif kind in (K.STATS, K.RESULT):
            future = self._queries.get(c.id)
            if future is not None and not future.done():
                future.set_result(decode_payload(c.payload))
        elif kind == K.CONFIG:
            if not self.config.done():
                self.config.set_result(decode_payload(c.payload))
        elif kind == K.DRAIN:
            self.drain_requested.set()

    def _set_health(self, model: str, serving: bool) -> None:
        if self._health.get(model) == serving:
            return
        self._health[model] = serving
        for listener in self._listeners:
            listener(model, serving)

    def _send_control(self, control: link_pb2.Control) -> None:
        if self._link is not None and not self._link.closed:
            self._link.outgoing().controls.append(control)

    def _on_lost(self, exc: BaseException | None) -> None:
        """The engine is gone: fail what waits on it, and stop serving."""
        error = Unavailable("the engine process exited")
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        self._idle.set()
        for future in self._queries.values():
            if not future.done():
                future.set_exception(error)
        if not self.config.done():
            self.config.set_exception(ConnectionError("the engine closed the link"))
        self.lost.set()
        for model in ("", *self._descriptions):
            self._set_health(model, False)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()


def _array_bytes(tensors: Iterable[TensorIn | TensorOut]) -> int:
    """Bytes of the tensors held as arrays in this process (not those in regions)."""
    total = 0
    for t in tensors:  # a loop, not sum() over a generator: on every request's path
        data = t.data
        if isinstance(data, np.ndarray):
            total += data.nbytes
    return total


def _rows(result: InferResult, start: int, end: int) -> InferResult:
    """A member's share of a group's result: rows [start, end) of every output (views)."""
    outputs = {}
    for name, t in result.outputs.items():
        assert isinstance(t.data, np.ndarray)  # a group never writes into regions
        outputs[name] = TensorOut(t.dtype, (end - start, *t.shape[1:]), t.data[start:end])
    return InferResult(result.model, result.version, outputs)

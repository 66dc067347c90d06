"""The engine process's side of the link: any `Engine`, served to N frontend processes.

Every frontend has one `FrontendPort` here: its link, its two arenas and the
tasks of its requests in flight. A request read from the link becomes an
`InferRequest` whose large inputs are read-only views of the frontend's input
arena (no copy before the batch's gather); its one reply (result or error)
goes back on the link; its large outputs are written once into the
frontend's output arena. A cancel from the frontend (its client went away, or
the deadline passed there) cancels the request's task here, which takes it
out of its batch if the batch has not run yet; the reply is CANCELLED, sent
once no batch reads the request's input ranges any more (the frontend reuses
them when it arrives).

The host pushes to every frontend what it must answer without asking: the
models' descriptions (`describe` is on every request's path) and their health.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import grpc
import numpy as np

from trtserve.client.timer import now
from trtserve.service import open_files
from trtserve.service.config import ServerConfig
from trtserve.service.engine import groups
from trtserve.service.engine.api import (
    Engine,
    FrontendSnapshot,
    HealthListener,
    InferRequest,
    InferResult,
    ModelDescription,
    RegionRef,
    StatsSnapshot,
    TensorIn,
)
from trtserve.service.engine.batch import Validated
from trtserve.service.engine.cuda_ipc import HostPinner
from trtserve.service.engine.local import LocalEngine, Submitted, Tensors
from trtserve.service.engine.model import DEADLINE_CANCEL_SLACK_S
from trtserve.service.engine.shared_calls import SharedCalls
from trtserve.service.errors import ServeError
from trtserve.service.gen.trtserve.internal import link_pb2
from trtserve.service.ipc import codec
from trtserve.service.ipc.link import Link, decode_payload, encode_payload, open_link
from trtserve.service.ipc.shm import Arena

log = logging.getLogger(__name__)

K = link_pb2.Control
# What a frontend may ask of the engine besides infer, describe and stats: the calls
# whose state lives in the engine (clients' shared-memory regions, model control),
# all async, taking and returning plain data.
CALLS = frozenset({"register_system_region", "register_cuda_region", "unregister_region",
                   "region_status", "repository_index", "load_model", "unload_model",
                   "reload_model"})
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class FrontendPort:
    """One frontend process as the engine sees it; owned by `EngineHost`."""

    def __init__(self, host: EngineHost, index: int, pid: int, inputs: Arena,
                 outputs: Arena) -> None:
        self.host = host
        self.index = index
        self.pid = pid
        self.inputs = inputs
        self.outputs = outputs
        self.link: Link | None = None
        # Requests submitted and not yet answered, by the frontend's id (a group's
        # members each under its own).
        self.in_flight: dict[int, Submitted | _Group] = {}
        self.requests = 0
        self.request_frames = 0  # frames read that carried requests
        # The requests (and the cancels after them) of the read in progress, acted on
        # together at its end (`on_read_end`): that is where groups form.
        self._read: list[link_pb2.Request] = []
        self._read_cancels: list[int] = []
        # True while a frame's requests are submitted (see _finish).
        self._reading = False
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self._open_files = open_files.Held(pid)

    # --- from the frontend ---

    def on_frame(self, frame: link_pb2.Frame) -> None:
        # Ranges first: a request of this read answered inline reuses the range of the
        # reply it comes after (at concurrency 1, the same few hot pages every time)
        # rather than walking the arena through cold ones.
        # Each repeated field is tested before it is walked: walking an empty one costs
        # twice the test, and most frames carry requests and nothing else.
        if releases := frame.releases:
            for r in releases:
                self.outputs.free(r.offset)
        if requests := frame.requests:
            self.request_frames += 1
            self._read.extend(requests)
        if cancels := frame.cancels:
            if self._read:  # after the requests they may name, at the read's end
                self._read_cancels.extend(cancels)
            else:
                for rid in cancels:
                    self._cancel(rid)
        if controls := frame.controls:
            for control in controls:
                self._control(control)

    def on_read_end(self) -> None:
        """Submit the requests of the read just parsed, then the cancels that followed them."""
        requests, self._read = self._read, []
        if not requests:
            return
        cancels, self._read_cancels = self._read_cancels, []
        # Replies of the batches this read runs inline leave at its end, in one write.
        self._reading = True
        try:
            if len(requests) == 1:
                self._start_message(requests[0], False)
            else:
                # A request cancelled in its own read goes alone: it is taken out of its
                # batch below, where a group's member would run with the group.
                self._start_all(requests, frozenset(cancels))
        finally:
            self._reading = False
        for rid in cancels:
            self._cancel(rid)
        if not self.in_flight:  # answered inline, in this read's write
            self.host.poll_for_next()

    def _cancel(self, rid: int) -> None:
        # Out of the count at once; its reply (CANCELLED) may wait for a batch that
        # still reads its input ranges (ModelRuntime.submit).
        entry = self.in_flight.pop(rid, None)
        if isinstance(entry, _Group):
            entry.cancel(rid)
        elif entry is not None:
            entry.cancel()

    def _start_all(self, requests: Sequence[link_pb2.Request], alone: frozenset[int]) -> None:
        """Several requests of one read: those of equal shapes in groups (groups.py), the
        others alone; all but the last submitted with more to follow (Batcher.submit)."""
        engine = self.host.engine
        units = self._units(engine, requests, alone) if isinstance(engine, LocalEngine) \
            else requests
        last = len(units) - 1
        for i, unit in enumerate(units):
            if isinstance(unit, _Same):
                self._start_group(unit, i < last)
            else:
                self._start_message(unit, i < last)

    def _start_message(self, message: link_pb2.Request, more_follow: bool) -> None:
        """One message as it came: a group the frontend sent, or a request alone."""
        if message.member_ids:
            self._start_sent(message, more_follow)
        else:
            self._start(message, more_follow)

    @staticmethod
    def _units(engine: LocalEngine, requests: Sequence[link_pb2.Request],
               alone: frozenset[int]) -> Sequence[link_pb2.Request | _Same]:
        """The read's requests, in order, those sharing a key (groups.entry) gathered
        into groups the model takes (`_Same.chunks`); the `alone` ids never grouped."""
        items: list[link_pb2.Request | _Same] = []
        by_key: dict[groups.Key, _Same] = {}
        now_s = now()
        for request in requests:
            found = groups.entry(request, now_s) if request.id not in alone else None
            if found is None:
                items.append(request)
                continue
            key, rows, nbytes = found
            same = by_key.get(key)
            if same is None:
                by_key[key] = same = _Same()
                items.append(same)
            same.add(request, rows, nbytes)
        units: list[link_pb2.Request | _Same] = []
        for item in items:
            if isinstance(item, _Same):
                units.extend(item.chunks(engine.group_rows(item.requests[0].model)))
            else:
                units.append(item)
        return units

    def _start(self, message: link_pb2.Request, more_follow: bool) -> None:
        """Submit one request of a frame; no task: its reply is built when its future is
        done, at once when its batch ran inline (then it leaves in this read's write)."""
        self.requests += 1
        rid = message.id
        model = message.model
        try:
            submitted = self._submit(message, more_follow,
                                     lambda s: self._finish(rid, s, model))
        except ValueError:  # a range outside the arena: a broken frontend, not a client
            log.exception("frontend-%d sent a request the engine cannot read", self.index)
            self._reply_error(rid, grpc.StatusCode.INTERNAL, "internal error")
            return
        except Exception as e:  # a refusal (ServeError), or ours
            self._reply_failure((rid,), e, model)
            return
        if not submitted.finished:  # else answered already: its batch ran inline
            self.in_flight[rid] = submitted

    def _submit(self, m: link_pb2.Request, more_follow: bool,
                on_done: Callable[[Submitted], None]) -> Submitted:
        """The request read from its message and submitted; refusals raise.

        Most requests carry arrays only (inline, or in the arena), for a LocalEngine:
        those go to it as arrays (`LocalEngine.submit_arrays`), the rest as an
        InferRequest (`_request`).
        """
        host = self.host
        engine = host.engine
        if m.output_regions or not isinstance(engine, LocalEngine):
            return host.submit(self._request(m), more_follow, on_done)
        if not self.inputs.pinned:
            self._pin(m.model)
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for t in m.inputs:
            dtype, _, data = codec.take(t, self.inputs, copy=False)
            if isinstance(data, RegionRef):  # rare: a region input; the general path
                return host.submit(self._request(m), more_follow, on_done)
            arrays[t.name] = data
            dtypes[t.name] = dtype
        return engine.submit_arrays(m.model, m.version, arrays, dtypes,
                                    tuple(m.outputs) if m.outputs else (),
                                    m.deadline if m.HasField("deadline") else None,
                                    more_follow, on_done)

    def _start_group(self, same: _Same, more_follow: bool) -> None:
        """Submit requests of equal shapes as one group (groups.py); if validation refuses
        the group, each goes on alone to be told what is wrong with it."""
        engine = self.host.engine
        assert isinstance(engine, LocalEngine)
        messages = same.requests
        first = messages[0]
        model = first.model
        deadlines = [m.deadline if m.HasField("deadline") else None for m in messages]
        group = _Group(self, model, [m.id for m in messages], deadlines, same.rows)
        try:
            if not self.inputs.pinned:
                self._pin(model)
            arrays, dtypes, parts = groups.stack(messages, same.rows, self.inputs)
            validated = engine.validate(model, arrays, dtypes)
        except Exception:  # a member at fault (its dtype, shapes or range): each alone,
            self._start_each(messages, more_follow)  # to be told what is wrong with it
            return
        self._submit_group(engine, group, first, arrays, dtypes, parts, validated,
                           more_follow)

    def _start_sent(self, message: link_pb2.Request, more_follow: bool) -> None:
        """Submit a group the frontend formed (Request.member_ids: groups.sent); if the
        engine cannot take it whole, each member goes on alone (groups.members)."""
        engine = self.host.engine
        if not isinstance(engine, LocalEngine):
            self._start_members(message, more_follow)
            return
        model = message.model
        try:
            rows = groups.member_rows(message)
            group = _Group(self, model, list(message.member_ids),
                           groups.sent_deadlines(message), rows)
            if not self.inputs.pinned:
                self._pin(model)
            arrays, dtypes = groups.sent(message, rows, self.inputs)
            validated = engine.validate(model, arrays, dtypes)
        except Exception:
            self._start_members(message, more_follow)
            return
        self._submit_group(engine, group, message, arrays, dtypes, {}, validated,
                           more_follow)

    def _start_members(self, message: link_pb2.Request, more_follow: bool) -> None:
        """A sent group the engine does not take whole: each member on its own."""
        try:
            each = groups.members(message)
        except Exception:  # counts that disagree: a broken frontend, not a client
            log.exception("frontend-%d sent a group the engine cannot read", self.index)
            for rid in message.member_ids:
                self._reply_error(rid, grpc.StatusCode.INTERNAL, "internal error")
            return
        self._start_each(each, more_follow)

    def _start_each(self, messages: Sequence[link_pb2.Request], more_follow: bool) -> None:
        last = len(messages) - 1
        for i, message in enumerate(messages):
            self._start(message, more_follow or i < last)

    def _submit_group(self, engine: LocalEngine, group: _Group, first: link_pb2.Request,
                      arrays: dict[str, np.ndarray], dtypes: dict[str, str],
                      parts: dict[str, list[np.ndarray]], validated: Validated,
                      more_follow: bool) -> None:
        """Submit a validated group: one request of its members' rows to the model."""
        self.requests += len(group.rids)
        try:
            group.submitted = engine.submit_arrays(
                group.model, first.version, arrays, dtypes,
                tuple(first.outputs) if first.outputs else (), groups.latest(group.deadlines),
                more_follow, group.finish, members=tuple(group.members), validated=validated,
                parts=parts)
        except Exception as e:  # a refusal (ServeError) for all of them, or ours
            self._reply_failure(group.rids, e, group.model)
            return
        if not group.submitted.finished:  # else answered already: its batch ran inline
            for rid in group.rids:
                self.in_flight[rid] = group

    def _finish_group(self, group: _Group, submitted: Submitted) -> None:
        for rid in group.rids:
            self.in_flight.pop(rid, None)
        model = group.model
        try:
            version, whole, per_member = submitted.member_tensors(
                group.members, whole=not group.cancelled)
        except (asyncio.CancelledError, Exception) as e:
            self._reply_failure(group.rids, e, model)
        else:
            if whole is not None:  # one reply: the frontend cuts each member's rows
                self._reply(0, model, version, whole, group)
            else:
                self._reply_members(group, model, version, per_member)
        self._flush_if_idle()

    def _reply_members(self, group: _Group, model: str, version: str,
                       per_member: list[Tensors | ServeError]) -> None:
        """A group's members answered one by one: some given up, or some failed alone."""
        for rid, outcome in zip(group.rids, per_member, strict=True):
            if rid in group.cancelled:
                self._reply_error(rid, grpc.StatusCode.CANCELLED, "request cancelled")
            elif isinstance(outcome, ServeError):
                self._reply_error(rid, outcome.code, str(outcome))
            else:
                self._reply(rid, model, version, outcome)

    def _pin(self, model: str) -> None:
        if (pinner := self.host.pinner_for(model)) is not None:
            # A TensorRT model reads this arena: page-locked, its copies to the device
            # read it directly (once; a refusal leaves it pageable, logged once).
            self.inputs.pin(pinner)

    def _request(self, m: link_pb2.Request) -> InferRequest:
        if not self.inputs.pinned:
            self._pin(m.model)
        inputs = {}
        for t in m.inputs:
            dtype, shape, data = codec.take(t, self.inputs, copy=False)
            inputs[t.name] = TensorIn(dtype, shape, data)
        # Skipped when empty (most requests): each is a few protobuf accesses per request.
        output_regions = {name: RegionRef(r.region, r.offset, r.byte_size)
                          for name, r in m.output_regions.items()} if m.output_regions else {}
        return InferRequest(model=m.model, inputs=inputs, version=m.version,
                            outputs=tuple(m.outputs) if m.outputs else (),
                            output_regions=output_regions,
                            deadline=m.deadline if m.HasField("deadline") else None)

    def _finish(self, rid: int, submitted: Submitted, model: str) -> None:
        self.in_flight.pop(rid, None)
        try:
            version, tensors = submitted.tensors()
        except (asyncio.CancelledError, Exception) as e:
            self._reply_failure((rid,), e, model)
        else:
            self._reply(rid, model, version, tensors)
        self._flush_if_idle()

    def _flush_if_idle(self) -> None:
        if not self.in_flight and not self._reading and self.link is not None:
            # The frontend's last request in flight: no other reply will join this frame,
            # so it leaves now rather than at the end of the loop iteration (at
            # concurrency 1, one loop pass sooner). With requests still in flight, the
            # replies of one iteration go together; inside a read, at the read's end.
            self.link.flush()
            self.host.poll_for_next()

    def _reply_failure(self, rids: Sequence[int], error: BaseException, model: str) -> None:
        """Requests `rids` ended with `error`: CANCELLED, a refusal's own code and text, or
        (anything else, logged) INTERNAL."""
        if isinstance(error, asyncio.CancelledError):
            code, message = grpc.StatusCode.CANCELLED, "request cancelled"
        elif isinstance(error, ServeError):
            code, message = error.code, str(error)
        else:
            log.error("request of model '%s' failed", model, exc_info=error)
            code, message = grpc.StatusCode.INTERNAL, "internal error"
        for rid in rids:
            self._reply_error(rid, code, message)

    def _reply(self, rid: int, model: str, version: str, tensors: Tensors,
               group: _Group | None = None) -> None:
        """The result of request `rid`, or of every member of `group` (rid unused)."""
        # Called from the batcher's completion (or inside `submit`): it must not raise.
        if self.link is None or self.link.closed:
            return
        replies = self.link.outgoing().replies
        reply = replies.add()
        if group is not None:
            reply.member_ids.extend(group.rids)
            reply.member_rows.extend(group.members)
        else:
            reply.id = rid
        reply.model = model
        reply.version = version
        inline_max = self.host.inline_max_bytes
        offsets: list[int] = []
        try:
            for name, dtype, shape, data in tensors:
                offset = codec.put(reply.outputs.add(), name, dtype, shape, data,
                                   self.outputs, inline_max)
                if offset is not None:
                    offsets.append(offset)
        except Exception:
            log.exception("the result of a request of model '%s' could not be encoded", model)
            for offset in offsets:
                self.outputs.free(offset)
            del replies[-1]
            for failed in group.rids if group is not None else (rid,):
                self._reply_error(failed, grpc.StatusCode.INTERNAL, "internal error")

    def _reply_error(self, rid: int, code: grpc.StatusCode, message: str) -> None:
        if self.link is None or self.link.closed:
            return
        reply = self.link.outgoing().replies.add()
        reply.id = rid
        reply.code = code.value[0]
        reply.message = message

    def _control(self, c: link_pb2.Control) -> None:
        if c.kind == K.READY:
            if not self.ready.done():
                self.ready.set_result(None)
        elif c.kind == K.STATS_QUERY:
            task = asyncio.ensure_future(self._answer_stats(c.id, c.model or None))
            self.host.background(task)
        elif c.kind == K.CALL:
            self.host.background(asyncio.ensure_future(self._answer_call(c.id, c.model,
                                                                         c.payload)))

    async def _answer_stats(self, qid: int, model: str | None) -> None:
        await self._answer(K(kind=K.STATS, id=qid), "stats", lambda: self.host.stats(model))

    async def _answer_call(self, qid: int, method: str, payload: bytes) -> None:
        """A frontend's call of the engine: only the methods of CALLS, with plain arguments."""
        async def call() -> object:
            if method not in CALLS:
                raise ServeError(f"the engine takes no call '{method}' from a frontend")
            args = decode_payload(payload)
            if not isinstance(args, tuple):
                raise ServeError(f"call '{method}': arguments are not a tuple")
            return await getattr(self.host.engine, method)(*args)

        await self._answer(K(kind=K.RESULT, id=qid), f"engine call '{method}'", call)

    async def _answer(self, control: link_pb2.Control, what: str,
                      answer: Callable[[], Awaitable[object]]) -> None:
        """Send the frontend `answer()`, or its error. Always answered: a frontend's callers
        wait for it (its Stats callers share one wait), so an error nobody expected
        answers "internal error" too, and is logged here."""
        try:
            control.payload = encode_payload(await answer())
        except ServeError as e:
            control.payload = encode_payload(e)
        except Exception:
            log.exception("frontend %d: %s failed", self.index, what)
            control.payload = encode_payload(ServeError("internal error; see the server log"))
        if self.link is not None and not self.link.closed:
            self.link.outgoing().controls.append(control)

    # --- to the frontend ---

    def send(self, control: link_pb2.Control) -> None:
        if self.link is not None and not self.link.closed:
            self.link.outgoing().controls.append(control)

    def on_lost(self, exc: BaseException | None) -> None:
        """The frontend is gone: its requests have nobody to answer; cancel them."""
        for rid in list(self.in_flight):
            self._cancel(rid)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("frontend closed the link before ready"))
            # Marked seen: its only waiter (the start) may have moved on when the
            # process's exit came first, and asyncio would log it as never retrieved.
            self.ready.exception()
        if not self.closed.done():
            self.closed.set_result(None)

    def snapshot(self) -> FrontendSnapshot:
        return FrontendSnapshot(index=self.index, pid=self.pid, requests=self.requests,
                                in_flight=len(self.in_flight), cpu_s=_cpu_s(self.pid),
                                request_frames=self.request_frames,
                                open_files=self._open_files.count())

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.inputs.close()
        self.outputs.close()


class _Same:
    """Requests of one read that share a key (groups.entry), in order, with their rows
    and input bytes."""

    __slots__ = ("nbytes", "requests", "rows")

    def __init__(self) -> None:
        self.requests: list[link_pb2.Request] = []
        self.rows: list[int] = []
        self.nbytes: list[int] = []

    def add(self, request: link_pb2.Request, rows: int, nbytes: int) -> None:
        self.requests.append(request)
        self.rows.append(rows)
        self.nbytes.append(nbytes)

    def chunks(self, limit: int) -> list[link_pb2.Request | _Same]:
        """Cut into groups the model takes as one request (`limit` rows, 0: it never
        groups; groups.MAX_GROUP_BYTES); a request alone stays a request."""
        if len(self.requests) == 1 or limit <= 0:
            return list(self.requests)
        out: list[link_pb2.Request | _Same] = []
        chunk = _Same()
        rows = size = 0
        for request, r, b in zip(self.requests, self.rows, self.nbytes, strict=True):
            if chunk.requests and (rows + r > limit or size + b > groups.MAX_GROUP_BYTES):
                out.append(chunk if len(chunk.requests) > 1 else chunk.requests[0])
                chunk, rows, size = _Same(), 0, 0
            chunk.add(request, r, b)
            rows += r
            size += b
        out.append(chunk if len(chunk.requests) > 1 else chunk.requests[0])
        return out


class _Group:
    """Requests submitted as one (groups.py: of one read, or sent as a group by the
    frontend), as their frontend's port sees them: their ids, deadlines and rows, and
    which were given up."""

    __slots__ = ("cancelled", "deadlines", "members", "model", "port", "rids", "submitted")

    def __init__(self, port: FrontendPort, model: str, rids: list[int],
                 deadlines: list[float | None], rows: Sequence[int]) -> None:
        self.port = port
        self.model = model
        self.rids = rids
        self.deadlines = deadlines
        self.members = rows
        self.cancelled: set[int] = set()
        self.submitted: Submitted | None = None

    def cancel(self, rid: int) -> None:
        """Member `rid` was given up by its frontend (its client went, or its deadline
        passed there); the group goes on for the others."""
        if rid in self.cancelled or self.submitted is None:
            return
        self.cancelled.add(rid)
        deadline = self.deadlines[self.rids.index(rid)]
        self.submitted.cancel_member(
            deadline is not None and now() + DEADLINE_CANCEL_SLACK_S >= deadline)

    def finish(self, submitted: Submitted) -> None:
        self.port._finish_group(self, submitted)


class EngineHost:
    """Serves one `Engine` to the frontend processes over their links."""

    def __init__(self, engine: Engine, config: ServerConfig,
                 inline_max_bytes: int = codec.INLINE_MAX_BYTES,
                 failed_models: Callable[[], Sequence[str]] = tuple,
                 pinner_for: Callable[[str], HostPinner | None] = lambda model: None) -> None:
        self.engine = engine
        # What page-locks the frontends' input arenas for a model whose executors read
        # device memory (TensorRT); None for the others.
        self.pinner_for = pinner_for
        # Models that failed to load at start (model_load_failure = "skip"): frontends
        # say so, as the engine's repository does, rather than "not served".
        self._failed_models = failed_models
        self.config = config
        self.inline_max_bytes = inline_max_bytes
        self.ports: dict[int, FrontendPort] = {}
        self._health: dict[str, bool] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Stats queries that overlap (every frontend's, Prometheus's) share one answer,
        # the frontends' rows (read from /proc) included.
        self._stats_calls: SharedCalls[StatsSnapshot] = SharedCalls()
        self.on_health: Callable[[str, bool], None] | None = None
        engine.add_health_listener(self._on_health)
        # How long the loop polls for the next frame once a frontend has nothing in
        # flight (server.engine_spin_us); the frames read when it began, and until when.
        self.spin_s = config.resolved_engine_spin_us / 1e6
        self._spin_frames = 0
        self._spin_until = 0.0
        self._spinning = False

    async def attach(self, index: int, pid: int, sock: socket.socket, inputs: Arena,
                     outputs: Arena) -> FrontendPort:
        """Serve frontend `index` (process `pid`) over `sock`; sends it the config, the
        models and their health."""
        port = FrontendPort(self, index, pid, inputs, outputs)
        # Replies of the batches a read ran inline leave in one write at the read's end.
        port.link = await open_link(sock, port.on_frame, port.on_lost, flush_on_read=True,
                                    on_read_end=port.on_read_end,
                                    before_write=self._stamp)
        self.ports[index] = port
        port.send(K(kind=K.CONFIG, payload=encode_payload(self.config)))
        port.send(self._models())
        for name, serving in self._health.items():
            port.send(K(kind=K.HEALTH, model=name, serving=serving))
        return port

    def poll_for_next(self) -> None:
        """A frontend's last request is answered: keep the loop polling (a callback
        always ready, so its waits take no time) until any frontend's next frame or
        `spin_s`.

        At concurrency 1 the next request comes a client's round trip later; asleep,
        the engine would wake for it on a cold core and run its Python cold (its
        read, checks and queueing took several times their warm cost on the 2-core
        machine: docs/processes.md, "Concurrency 1"). The frontend polls for the
        reply the same way (`RemoteEngine._spin`). Under load frames come often and
        a frontend is seldom idle, so the loop seldom polls."""
        if self._spinning or not self.spin_s:
            return
        self._spinning = True
        self._spin_frames = self._frames_in()
        self._spin_until = now() + self.spin_s
        asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        if self._frames_in() == self._spin_frames and now() < self._spin_until:
            asyncio.get_running_loop().call_soon(self._spin)
        else:
            self._spinning = False

    def _frames_in(self) -> int:
        """Frames read from every frontend so far (each link counts its own)."""
        return sum(port.link.frames_in for port in self.ports.values()
                   if port.link is not None)

    def _stamp(self, frame: link_pb2.Frame) -> None:
        """Every frame tells the frontend which models have a backlog (its frame hold)."""
        engine = self.engine
        if isinstance(engine, LocalEngine) and (backlogged := engine.backlogged()):
            frame.backlogged.extend(backlogged)

    def _models(self) -> link_pb2.Control:
        descriptions = []
        for name in self.engine.models():
            try:
                descriptions.append(self.engine.describe(name))
            except ServeError:
                continue
        failed = tuple(self._failed_models())
        return K(kind=K.MODELS, payload=encode_payload((tuple(descriptions), failed)))

    def _on_health(self, model: str, serving: bool) -> None:
        self._health[model] = serving
        models = self._models()
        for port in self.ports.values():
            port.send(models)
            port.send(K(kind=K.HEALTH, model=model, serving=serving))
        if self.on_health is not None:
            self.on_health(model, serving)

    def set_health(self, model: str, serving: bool) -> None:
        """Health the engine does not report itself (the server as a whole)."""
        self._on_health(model, serving)

    def drain(self) -> None:
        for port in self.ports.values():
            port.send(K(kind=K.DRAIN))

    def background(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def frontends(self) -> tuple[FrontendSnapshot, ...]:
        return tuple(p.snapshot() for p in sorted(self.ports.values(), key=lambda p: p.index))

    # --- Engine, as metrics see it: the engine's, with the frontends' rows in its stats ---

    def models(self) -> Sequence[str]:
        return self.engine.models()

    def describe(self, model: str, version: str = "") -> ModelDescription:
        return self.engine.describe(model, version)

    def ready(self, model: str | None = None) -> bool:
        return self.engine.ready(model)

    async def infer(self, request: InferRequest) -> InferResult:
        return await self.engine.infer(request)

    def submit(self, request: InferRequest, more_follow: bool,
               on_done: Callable[[Submitted], None]) -> Submitted:
        """A frontend's request, without a task where the engine is this process's."""
        if isinstance(self.engine, LocalEngine):
            return self.engine.submit(request, more_follow, on_done)
        submitted = Submitted(None, ())
        task = submitted.future = asyncio.ensure_future(self.engine.infer(request))
        task.add_done_callback(lambda _: submitted.settle(on_done))
        return submitted

    def add_health_listener(self, listener: HealthListener) -> None:
        self.engine.add_health_listener(listener)

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        return await self._stats_calls.run(model, lambda: self._stats(model))

    async def _stats(self, model: str | None) -> StatsSnapshot:
        snapshot = await self.engine.stats(model)
        return dataclasses.replace(snapshot, frontends=self.frontends())


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process of this host (0 when it is gone)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 (utime, stime), counted after the ")" that ends the command name.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

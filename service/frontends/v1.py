"""The trtserve.v1.InferenceService servicer: convert, delegate, return."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.config import SharedMemoryConfig
from trtserve.service.engine.api import Engine, InferRequest, ModelSnapshot
from trtserve.service.errors import InvalidArgument, NotFound
from trtserve.service.frontends import v1_convert as convert
from trtserve.service.frontends.common import check_inputs, deadline_of, require_local_peer
from trtserve.service.frontends.errors import status_of, streaming, unary
from trtserve.service.frontends.streaming import StreamLimits, StreamProtocol, answer_stream
from trtserve.service.frontends.unsent import (
    Connection,
    UnsentAnswers,
    expected_answer_bytes,
)


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, stream_limits: StreamLimits | None = None,
                 shared_memory: SharedMemoryConfig | None = None,
                 on_refused: Callable[[Any], None] | None = None,
                 unsent: UnsentAnswers | None = None) -> None:
        self._engine = engine
        # Answers not read yet, by connection: shared with the process's other services.
        self._unsent = unsent or UnsentAnswers()
        # Called with each unary request refused with an error (frontends/errors.py).
        self.on_refused = on_refused
        self._stream_limits = stream_limits or StreamLimits()
        self._shared_memory = shared_memory or SharedMemoryConfig()
        self._started = time.monotonic()

    async def _infer(self, request: pb.InferRequest, deadline: float | None,
                     connection: Connection,
                     unary: grpc.aio.ServicerContext | None) -> pb.InferResponse:
        """The answer to `request`, counted for `connection` while it runs; a unary call's
        (`unary`: its context) is held in the ledger until gRPC is done with the call, a
        stream's by answer_stream until gRPC has taken it."""
        model = self._engine.describe(request.model)
        # Refused before any tensor is decoded: outputs the model lacks, inputs it can't take.
        convert.check_outputs(request, model.spec)
        check_inputs(model.name, model.spec, request.inputs)
        regions = convert.output_regions(request)
        # The answer's bytes count for the connection from now (frontends/unsent.py),
        # before its inputs are decoded. Checked with the reservation right after it, no
        # await between: requests read side by side (a stream's) then count one by one.
        expected = expected_answer_bytes(model.spec, request.inputs, regions)
        connection.check()
        reserved = connection.reserve(expected.bytes)
        try:
            result = await self._engine.infer(InferRequest(
                request.model, convert.decode_inputs(request),
                outputs=tuple(request.outputs) if request.outputs else (),
                output_regions=regions, deadline=deadline))
        finally:
            if reserved is not None:
                reserved()
        response = convert.encode_outputs(request, result)
        if unary is not None and expected.may_be_large:
            self._unsent.hold_call(unary, connection, convert.answer_bytes(response))
        return response

    @unary
    async def Infer(self, request: pb.InferRequest,
                    context: grpc.aio.ServicerContext) -> pb.InferResponse:
        return await self._infer(request, deadline_of(context),
                                 self._unsent.connection(context.peer), unary=context)

    @streaming
    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.InferStreamResponse]:
        deadline = deadline_of(context)
        # The peer now, while the call is live: request tasks can outlive it.
        connection = self._unsent.connection(context.peer())

        async def handle(request: pb.InferRequest) -> pb.InferStreamResponse:
            try:
                response = await self._infer(request, deadline, connection, unary=None)
            except Exception as e:
                return _stream_error(request, e)
            return pb.InferStreamResponse(id=request.id, response=response)

        protocol = StreamProtocol(handle, _stream_error, _request_id,
                                  convert.stream_answer_bytes)
        async for answer in answer_stream(request_iterator, protocol, self._stream_limits,
                                          connection):
            yield answer

    @unary
    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        snapshot = await self._engine.stats(request.model or None)
        return pb.StatsResponse(
            models=self._model_stats(snapshot.models, named=bool(request.model)),
            uptime_seconds=time.monotonic() - self._started,
            shared_memory=convert.shared_memory_stats(snapshot.shared_memory),
            frontends=[pb.FrontendStats(index=f.index, pid=f.pid, requests=f.requests,
                                        in_flight=f.in_flight, cpu_seconds=f.cpu_s,
                                        request_frames=f.request_frames,
                                        open_files=f.open_files)
                       for f in snapshot.frontends])

    def _model_stats(self, models: Sequence[ModelSnapshot], named: bool) -> list[pb.ModelStats]:
        """Each model's stats with its description, read now. A model unloaded since the
        snapshot is left out of an answer for every model (it is not served any more);
        a call that named it is NOT_FOUND, as it would have been a moment later."""
        found = []
        for model in models:
            try:
                description = self._engine.describe(model.name)
            except NotFound:
                if named:
                    raise
                continue
            found.append(convert.model_stats(model, description))
        return found

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        if not request.model:
            raise NotFound("ModelMetadata needs a model name")
        return convert.model_metadata(self._engine.describe(request.model))

    # --- shared-memory regions -------------------------------------------------------------

    @unary
    async def RegisterSystemRegion(self, request: pb.RegisterSystemRegionRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> pb.RegisterRegionResponse:
        require_local_peer(context, self._shared_memory.allow_remote_register,
                           "RegisterSystemRegion")
        await self._engine.register_system_region(request.name, request.key, request.offset,
                                                  request.byte_size)
        return pb.RegisterRegionResponse()

    @unary
    async def RegisterCudaRegion(self, request: pb.RegisterCudaRegionRequest,
                                 context: grpc.aio.ServicerContext) -> pb.RegisterRegionResponse:
        require_local_peer(context, self._shared_memory.allow_remote_register,
                           "RegisterCudaRegion")
        await self._engine.register_cuda_region(request.name, request.raw_handle,
                                                request.device_id, request.byte_size)
        return pb.RegisterRegionResponse()

    @unary
    async def UnregisterRegion(self, request: pb.UnregisterRegionRequest,
                               context: grpc.aio.ServicerContext) -> pb.UnregisterRegionResponse:
        await self._engine.unregister_region(request.name)
        return pb.UnregisterRegionResponse()

    @unary
    async def RegionStatus(self, request: pb.RegionStatusRequest,
                           context: grpc.aio.ServicerContext) -> pb.RegionStatusResponse:
        statuses = await self._engine.region_status(request.name)
        return pb.RegionStatusResponse(regions=[convert.region(r) for r in statuses])


    # --- model control ---------------------------------------------------------------------

    @unary
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        states = await self._engine.repository_index()
        return pb.ListModelsResponse(models=[convert.model_state(s) for s in states])

    @unary
    async def LoadModel(self, request: pb.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelControlResponse:
        _require_model("LoadModel", request.model)
        state = await self._engine.load_model(request.model, request.path)
        return pb.ModelControlResponse(model=convert.model_state(state))

    @unary
    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelControlResponse:
        _require_model("UnloadModel", request.model)
        state = await self._engine.unload_model(request.model)
        return pb.ModelControlResponse(model=convert.model_state(state))

    @unary
    async def ReloadModel(self, request: pb.ReloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelControlResponse:
        _require_model("ReloadModel", request.model)
        state = await self._engine.reload_model(request.model, request.path)
        return pb.ModelControlResponse(model=convert.model_state(state))


def _require_model(rpc: str, model: str) -> None:
    if not model:
        raise InvalidArgument(f"{rpc} needs a model name")


def _stream_error(request: pb.InferRequest, error: Exception) -> pb.InferStreamResponse:
    """One request's error on a stream; the stream carries on."""
    code, message = status_of(error)
    return pb.InferStreamResponse(id=request.id, error=pb.Error(code=code.value[0],
                                                                message=message))


def _request_id(request: pb.InferRequest) -> str:
    return request.id

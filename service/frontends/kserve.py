"""The KServe v2 / Open Inference Protocol servicer (`inference.GRPCInferenceService`).

Convert, delegate, return: tensors go through kserve_convert, model
descriptions and statistics through kserve_model_config, and inference through
the same `Engine.infer` (service/engine/api.py) as trtserve.v1. Errors map to statuses in
frontends/errors.py. The model repository RPCs go to the engine's
model control (frontends/kserve_repository.py). RPCs for features trtserve does
not have (tracing, log settings) answer UNIMPLEMENTED saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as pb_grpc
from trtserve.service.config import SharedMemoryConfig
from trtserve.service.engine.api import (
    CUDA,
    SYSTEM,
    Engine,
    InferRequest,
    ModelDescription,
    RegionRef,
    TensorIn,
    TensorOut,
    now,
)
from trtserve.service.errors import InvalidArgument, NotFound, ServeError
from trtserve.service.frontends import kserve_convert as convert
from trtserve.service.frontends import kserve_model_config as describe
from trtserve.service.frontends import kserve_repository as repository
from trtserve.service.frontends.common import (
    answered_by,
    check_inputs,
    check_version,
    deadline_of,
    require_local_peer,
)
from trtserve.service.frontends.errors import status_of, streaming, unary
from trtserve.service.frontends.streaming import StreamLimits, StreamProtocol, answer_stream
from trtserve.service.frontends.unsent import (
    Connection,
    UnsentAnswers,
    expected_answer_bytes,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "trtserve"
# Only what is really implemented: perf_analyzer reads server-side times from
# ModelStatistics because "statistics" is listed here.
EXTENSIONS = ("model_configuration", "model_repository", "statistics",
              "system_shared_memory", "cuda_shared_memory")
# Request parameters asking for sequence batching, which trtserve does not do.
_SEQUENCE_KEYS = ("sequence_id", "sequence_start", "sequence_end")
# Request parameter: microseconds the request may wait before it must have run.
_TIMEOUT_KEY = "timeout"
# Set on every stream response: each request has exactly one response.
_FINAL_RESPONSE_KEY = "triton_final_response"


class Unimplemented(ServeError):
    code = grpc.StatusCode.UNIMPLEMENTED


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # running from a checkout without install
        return "0+unknown"


def _is_set(param: pb.InferParameter) -> bool:
    kind = param.WhichOneof("parameter_choice")
    return kind is not None and bool(getattr(param, kind))


def _deadline(request: pb.ModelInferRequest, call_deadline: float | None) -> float | None:
    """The earlier of the call's deadline and the request's `timeout` parameter."""
    param = request.parameters.get(_TIMEOUT_KEY)
    if param is None:
        return call_deadline
    kind = param.WhichOneof("parameter_choice")
    micros = getattr(param, kind) if kind in ("int64_param", "uint64_param") else -1
    if micros < 0:
        raise InvalidArgument("request parameter 'timeout' must be a non-negative int64_param "
                              "(microseconds)")
    if micros == 0:  # as in Triton: no timeout
        return call_deadline
    timeout = now() + micros / 1e6
    return timeout if call_deadline is None else min(timeout, call_deadline)


def _check_parameters(request: pb.ModelInferRequest) -> None:
    for key in _SEQUENCE_KEYS:
        if key in request.parameters and _is_set(request.parameters[key]):
            raise InvalidArgument(f"request parameter '{key}': sequence batching is not "
                                  "supported by trtserve")


class KServeInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine,
                 server_ready: Callable[[], bool] | None = None,
                 stream_limits: StreamLimits | None = None,
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
        # Whether the server has finished starting (and is not draining); models
        # still loading are not in the engine yet, so it can't tell alone.
        self._server_ready = server_ready or (lambda: True)
        self._version = _version()

    def _model(self, name: str, version: str) -> ModelDescription:
        return self._engine.describe(name, version)

    async def _infer(self, request: pb.ModelInferRequest, call_deadline: float | None,
                     connection: Connection,
                     unary: grpc.aio.ServicerContext | None) -> pb.ModelInferResponse:
        """The answer to `request`, counted for `connection` while it runs; a unary call's
        (`unary`: its context) is held in the ledger until gRPC is done with the call, a
        stream's by answer_stream until gRPC has taken it."""
        model = self._model(request.model_name, request.model_version)
        output_dtypes = {t.name: t.dtype for t in model.spec.outputs}
        convert.check_requested_outputs(request, output_dtypes.keys(), output_dtypes)
        _check_parameters(request)
        deadline = _deadline(request, call_deadline)
        # Every input's parameters are read here: their count is bounded by the
        # request's field limit (frontends/field_count.py).
        convert.check_raw_contents(request)
        check_inputs(model.name, model.spec, request.inputs)
        regions = convert.output_regions(request)
        # The answer's bytes count for the connection from now (frontends/unsent.py),
        # before its inputs are decoded. Checked with the reservation right after it, no
        # await between: requests read side by side (a stream's) then count one by one.
        expected = expected_answer_bytes(model.spec, request.inputs, regions)
        connection.check()
        reserved = connection.reserve(expected.bytes)
        try:
            decoded = convert.decode_inputs(request)
            # The wire datatype tells BF16 from UINT16, which numpy alone can't.
            inputs = {t.name: TensorIn(t.datatype, tuple(t.shape), decoded[t.name])
                      for t in request.inputs}
            # Every output, in the model's order: encode_outputs picks those asked for.
            infer = self._engine.infer(InferRequest(
                model.name, inputs, version=request.model_version,
                output_regions=regions, deadline=deadline))
            # gRPC enforces the call's own deadline; a `timeout` parameter before it, we do.
            result = await (answered_by(deadline, infer) if deadline != call_deadline
                            else infer)
        finally:
            if reserved is not None:
                reserved()
        ordered: dict[str, np.ndarray | TensorOut] = {}
        for name, tensor in result.outputs.items():
            # Written into a region: described, its bytes are in the client's memory.
            ordered[name] = tensor if isinstance(tensor.data, RegionRef) else tensor.data
        response = convert.encode_outputs(request, ordered, model.name, result.version,
                                          request.id, datatypes=output_dtypes)
        if unary is not None and expected.may_be_large:
            self._unsent.hold_call(unary, connection, convert.answer_bytes(response))
        return response

    # --- health ------------------------------------------------------------------------

    @unary
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        ready = self._server_ready() and self._engine.ready()
        return pb.ServerReadyResponse(ready=ready)

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        # As Triton answers: an unknown model or version is not ready, not an error,
        # so that clients polling while models still load see False.
        try:
            self._model(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._engine.ready(request.name))

    # --- metadata and configuration ------------------------------------------------------

    @unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version,
                                         extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return describe.model_metadata(self._model(request.name, request.version))

    @unary
    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        return pb.ModelConfigResponse(config=describe.model_config(model))

    @unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._model(request.name, request.version)
        else:
            check_version(None, request.version)
        snapshot = await self._engine.stats(request.name or None)
        return pb.ModelStatisticsResponse(
            model_stats=[describe.model_statistics(m) for m in snapshot.models])

    # --- model repository (frontends/kserve_repository.py) ---------------------------------

    @unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return repository.index(await self._engine.repository_index(), request.ready)

    @unary
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        repository.check_name("RepositoryModelLoad", request.model_name)
        path = repository.load_path(request.parameters)
        await self._engine.load_model(request.model_name, path)
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        repository.check_name("RepositoryModelUnload", request.model_name)
        repository.check_unload(request.parameters)
        await self._engine.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference -----------------------------------------------------------------------

    @unary
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context),
                                 self._unsent.connection(context.peer), unary=context)

    @streaming
    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)
        # The peer now, while the call is live: request tasks can outlive it.
        connection = self._unsent.connection(context.peer())

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self._infer(request, deadline, connection, unary=None)
            except Exception as e:  # one request's error; the stream carries on
                return _stream_error(request, e)
            response.parameters[_FINAL_RESPONSE_KEY].bool_param = True
            return pb.ModelStreamInferResponse(infer_response=response)

        protocol = StreamProtocol(handle, _stream_error, _request_id, _stream_answer_bytes)
        async for answer in answer_stream(request_iterator, protocol, self._stream_limits,
                                          connection):
            yield answer


    # --- shared memory (Triton's system and CUDA shared-memory extensions) -------------

    def _local_only(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        require_local_peer(context, self._shared_memory.allow_remote_register, rpc)

    @unary
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self._local_only(context, "SystemSharedMemoryRegister")
        await self._engine.register_system_region(request.name, request.key, request.offset,
                                                  request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @unary
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._engine.unregister_region(request.name, SYSTEM)
        return pb.SystemSharedMemoryUnregisterResponse()

    @unary
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in await self._engine.region_status(request.name, SYSTEM):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size))
        return response

    @unary
    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.CudaSharedMemoryRegisterResponse:
        self._local_only(context, "CudaSharedMemoryRegister")
        await self._engine.register_cuda_region(request.name, request.raw_handle,
                                                request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @unary
    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._engine.unregister_region(request.name, CUDA)
        return pb.CudaSharedMemoryUnregisterResponse()

    @unary
    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in await self._engine.region_status(request.name, CUDA):
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size))
        return response


def _stream_error(request: pb.ModelInferRequest, error: Exception
                  ) -> pb.ModelStreamInferResponse:
    """One request's error on a stream: the message, and the request's id and model."""
    _, message = status_of(error)
    answer = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id))
    # Every answer is its request's last (docs/protocols.md), errors too.
    answer.infer_response.parameters[_FINAL_RESPONSE_KEY].bool_param = True
    return answer


def _request_id(request: pb.ModelInferRequest) -> str:
    return request.id


def _stream_answer_bytes(answer: pb.ModelStreamInferResponse) -> int:
    return len(answer.error_message) + convert.answer_bytes(answer.infer_response)


def _unimplemented(rpc: str, why: str) -> Callable[..., Any]:
    async def method(self: KServeInferenceService, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(f"{rpc} is not implemented by trtserve: {why}")

    method.__name__ = method.__qualname__ = rpc
    return unary(method)


_NOT_IMPLEMENTED = {
    "TraceSetting": "tracing is not supported; use the Stats RPC and Prometheus metrics",
    "LogSettings": "log settings are set at start (command line and configuration)",
}
for _rpc, _why in _NOT_IMPLEMENTED.items():
    setattr(KServeInferenceService, _rpc, _unimplemented(_rpc, _why))


def add_to_server(server: Any, engine: Engine,
                  server_ready: Callable[[], bool] | None = None,
                  stream_limits: StreamLimits | None = None,
                  shared_memory: SharedMemoryConfig | None = None,
                  on_refused: Callable[[Any], None] | None = None,
                  unsent: UnsentAnswers | None = None) -> str:
    """Serve KServe v2 on `server`; returns the service's full name (for health and reflection).

    `server`: a grpc.aio.Server, or what the generated `add_*_to_server` functions
    take in its place (its two `add_*_handlers` methods).
    """
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeInferenceService(engine, server_ready, stream_limits, shared_memory, on_refused,
                               unsent),
        server)
    return SERVICE_NAME

"""Python clients for trtserve: `Client` (blocking) and `AsyncClient` (asyncio) speak
trtserve.v1; `KServeClient` (blocking) speaks KServe v2, for the same server or any
other KServe v2 / Triton server.

    from client import Client
    with Client("127.0.0.1:8001") as c:
        out = c.infer("example", {"input": np.ones((1, 64), np.float32)})

`AsyncClient.stream()` puts many requests on one InferStream (client/stream.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Self

import grpc
import numpy as np

from client.channels import DEFAULT_MAX_MESSAGE_BYTES, Endpoint
from client.convert import infer_request, outputs_of
from client.errors import InferenceError
from client.kserve_convert import kserve_outputs, kserve_request
from client.stream import InferStream
from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from service.gen.inference import model_config_pb2 as kmc
from service.gen.trtserve.v1 import inference_pb2 as pb
from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc


class _Connection:
    """A channel, its stub and the auth metadata: what every client is built from.

    Subclasses name the protocol's stub in `_stub_type`, and `AsyncClient` opens an
    asyncio channel instead of a blocking one.
    """

    _stub_type: Any
    _asyncio = False

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        tls: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        endpoint = Endpoint(url, token, root_certificates, private_key, certificate_chain, tls,
                            max_message_bytes)
        # Any: a blocking or an asyncio channel; each subclass uses the one it opened.
        self._channel: Any = endpoint.aio_channel() if self._asyncio else endpoint.channel()
        self._stub = self._stub_type(self._channel)
        self._metadata = endpoint.metadata()


class _BlockingClient(_Connection):
    """A blocking client: errors turned into InferenceError."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise InferenceError(e.code(), e.details() or "") from None


class Client(_BlockingClient):
    """trtserve.v1: Infer, Stats, ModelMetadata."""

    _stub_type = pb_grpc.InferenceServiceStub

    def infer(self, model: str, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | None = None, timeout: float | None = None,
              dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        request = infer_request(model, inputs, list(outputs or []), dtypes=dtypes)
        return outputs_of(self._call(self._stub.Infer, request, timeout))

    def stats(self, model: str = "", timeout: float | None = None) -> pb.StatsResponse:
        return self._call(self._stub.Stats, pb.StatsRequest(model=model), timeout)

    def metadata(self, model: str, timeout: float | None = None) -> pb.ModelMetadataResponse:
        return self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(model=model),
                          timeout)


class AsyncClient(_Connection):
    """trtserve.v1 on asyncio: Infer, InferStream, Stats, ModelMetadata."""

    _stub_type = pb_grpc.InferenceServiceStub
    _asyncio = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise InferenceError(e.code(), e.details() or "") from None

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None, timeout: float | None = None,
                    dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        request = infer_request(model, inputs, list(outputs or []), dtypes=dtypes)
        return outputs_of(await self._call(self._stub.Infer, request, timeout))

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[InferStream]:
        """One InferStream for many `infer` calls in flight; see client/stream.py.

        Leaving the block waits for every answer owed; an exception cancels the stream.
        """
        stream = InferStream(self._stub, self._metadata)
        try:
            yield stream
        except BaseException:
            await stream.abort()
            raise
        await stream.close()

    async def stats(self, model: str = "", timeout: float | None = None) -> pb.StatsResponse:
        return await self._call(self._stub.Stats, pb.StatsRequest(model=model), timeout)

    async def metadata(self, model: str, timeout: float | None = None
                       ) -> pb.ModelMetadataResponse:
        return await self._call(self._stub.ModelMetadata,
                                pb.ModelMetadataRequest(model=model), timeout)


class KServeClient(_BlockingClient):
    """KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`).

    Works against trtserve and any other KServe v2 server (Triton included);
    numpy in, numpy out. Errors raise InferenceError with the gRPC status.
    """

    _stub_type = kpb_grpc.GRPCInferenceServiceStub

    def live(self, timeout: float | None = None) -> bool:
        return bool(self._call(self._stub.ServerLive, kpb.ServerLiveRequest(), timeout).live)

    def ready(self, timeout: float | None = None) -> bool:
        return bool(self._call(self._stub.ServerReady, kpb.ServerReadyRequest(), timeout).ready)

    def model_ready(self, model: str, version: str = "", timeout: float | None = None) -> bool:
        request = kpb.ModelReadyRequest(name=model, version=version)
        return bool(self._call(self._stub.ModelReady, request, timeout).ready)

    def server_metadata(self, timeout: float | None = None) -> kpb.ServerMetadataResponse:
        return self._call(self._stub.ServerMetadata, kpb.ServerMetadataRequest(), timeout)

    def metadata(self, model: str, version: str = "", timeout: float | None = None
                 ) -> kpb.ModelMetadataResponse:
        request = kpb.ModelMetadataRequest(name=model, version=version)
        return self._call(self._stub.ModelMetadata, request, timeout)

    def config(self, model: str, version: str = "", timeout: float | None = None
               ) -> kmc.ModelConfig:
        request = kpb.ModelConfigRequest(name=model, version=version)
        return self._call(self._stub.ModelConfig, request, timeout).config

    def statistics(self, model: str = "", version: str = "", timeout: float | None = None
                   ) -> kpb.ModelStatisticsResponse:
        request = kpb.ModelStatisticsRequest(name=model, version=version)
        return self._call(self._stub.ModelStatistics, request, timeout)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | None = None, timeout: float | None = None,
              dtypes: Mapping[str, str] | None = None, request_id: str = ""
              ) -> dict[str, np.ndarray]:
        request = kserve_request(model, inputs, outputs or (), request_id, dtypes)
        return kserve_outputs(self._call(self._stub.ModelInfer, request, timeout))

"""Python clients for trtserve: `Client` (blocking) and `AsyncClient` (asyncio).

    from client import Client
    with Client("127.0.0.1:8001") as c:
        out = c.infer("example", {"input": np.ones((1, 64), np.float32)})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from client.convert import infer_request, outputs_of
from service.gen.trtserve.v1 import inference_pb2 as pb
from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

# Tensors can be large; match the server's default limits, not gRPC's 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class InferenceError(Exception):
    """A call failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _credentials(root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
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
        options = _options(max_message_bytes)
        if tls or root_certificates:
            creds = _credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(url, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(url, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(token)

    def __enter__(self) -> Client:
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


class AsyncClient:
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
        options = _options(max_message_bytes)
        if tls or root_certificates:
            creds = _credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.aio.secure_channel(url, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(url, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(token)

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

    async def stats(self, model: str = "", timeout: float | None = None) -> pb.StatsResponse:
        return await self._call(self._stub.Stats, pb.StatsRequest(model=model), timeout)

    async def metadata(self, model: str, timeout: float | None = None
                       ) -> pb.ModelMetadataResponse:
        return await self._call(self._stub.ModelMetadata,
                                pb.ModelMetadataRequest(model=model), timeout)

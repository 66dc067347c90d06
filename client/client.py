"""Python clients for trtserve: `Client` (blocking) and `AsyncClient` (asyncio) speak
trtserve.v1; `KServeClient` (blocking) speaks KServe v2, for the same server or any
other KServe v2 / Triton server.

    from trtserve.client import Client
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

from trtserve.client.channels import DEFAULT_MAX_MESSAGE_BYTES, Endpoint
from trtserve.client.convert import infer_request, outputs_of
from trtserve.client.errors import InferenceError
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.gen.inference import model_config_pb2 as kmc
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.client.kserve_convert import kserve_outputs, kserve_request
from trtserve.client.shared_memory import CudaRegion, RegionSlot, RegionTensor, SystemRegion
from trtserve.client.stream import InferStream

Region = SystemRegion | CudaRegion


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
    """trtserve.v1: Infer, Stats, ModelMetadata, and model control."""

    _stub_type = pb_grpc.InferenceServiceStub

    def __init__(self, url: str = "127.0.0.1:8001", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        # Regions this client registered, by name: inputs that are views of them
        # travel as references, and outputs written into them come back as views.
        self._regions: dict[str, Region] = {}

    def infer(self, model: str, inputs: Mapping[str, np.ndarray | RegionTensor],
              outputs: Sequence[str] | None = None, timeout: float | None = None,
              dtypes: Mapping[str, str] | None = None,
              output_regions: Mapping[str, RegionSlot] | None = None) -> dict[str, np.ndarray]:
        """Run one request. Inputs that are views of a registered system region (or
        RegionTensors) are sent as references; `output_regions` has the server write
        those outputs into a registered region (returned as views of it)."""
        request = infer_request(model, inputs, list(outputs or []), dtypes=dtypes,
                                regions=self._regions.values(), output_regions=output_regions)
        return outputs_of(self._call(self._stub.Infer, request, timeout), self._regions)

    def register_region(self, region: Region, timeout: float | None = None) -> None:
        """Register a SystemRegion or CudaRegion with the server under its name."""
        method, request = _register_call(self._stub, region)
        self._call(method, request, timeout)
        self._regions[region.name] = region

    def unregister_region(self, region: Region | str = "", timeout: float | None = None
                          ) -> None:
        """Unregister one region ("" : every region, this client's or not)."""
        name = region if isinstance(region, str) else region.name
        self._call(self._stub.UnregisterRegion, pb.UnregisterRegionRequest(name=name), timeout)
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

    def region_status(self, name: str = "", timeout: float | None = None
                      ) -> list[pb.Region]:
        response = self._call(self._stub.RegionStatus, pb.RegionStatusRequest(name=name),
                              timeout)
        return list(response.regions)

    def stats(self, model: str = "", timeout: float | None = None) -> pb.StatsResponse:
        return self._call(self._stub.Stats, pb.StatsRequest(model=model), timeout)

    def metadata(self, model: str, timeout: float | None = None) -> pb.ModelMetadataResponse:
        return self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(model=model),
                          timeout)

    # Model control (the server's model_control): each answers once the operation is done.

    def list_models(self, timeout: float | None = None) -> list[pb.ModelState]:
        """Every model the server knows, loaded or not, with its version and state."""
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def load_model(self, model: str, path: str = "", timeout: float | None = None
                   ) -> pb.ModelState:
        """Load `model` (from `path`, a file on the server's host; else its own file);
        a loaded model is reloaded."""
        request = pb.LoadModelRequest(model=model, path=path)
        return self._call(self._stub.LoadModel, request, timeout).model

    def unload_model(self, model: str, timeout: float | None = None) -> pb.ModelState:
        request = pb.UnloadModelRequest(model=model)
        return self._call(self._stub.UnloadModel, request, timeout).model

    def reload_model(self, model: str, path: str = "", timeout: float | None = None
                     ) -> pb.ModelState:
        """A new version of a loaded model, switched to once it is up."""
        request = pb.ReloadModelRequest(model=model, path=path)
        return self._call(self._stub.ReloadModel, request, timeout).model


def _register_call(stub: Any, region: Region) -> tuple[Any, Any]:
    """The register RPC of the region's kind, and its request."""
    if isinstance(region, SystemRegion):
        return stub.RegisterSystemRegion, pb.RegisterSystemRegionRequest(
            name=region.name, key=region.key, byte_size=region.byte_size)
    return stub.RegisterCudaRegion, pb.RegisterCudaRegionRequest(
        name=region.name, raw_handle=region.raw_handle, device_id=region.device_id,
        byte_size=region.byte_size)


class AsyncClient(_Connection):
    """trtserve.v1 on asyncio: Infer, InferStream, Stats, ModelMetadata."""

    _stub_type = pb_grpc.InferenceServiceStub
    _asyncio = True

    def __init__(self, url: str = "127.0.0.1:8001", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        # As Client's: inputs that are views of these travel as references.
        self._regions: dict[str, Region] = {}

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

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray | RegionTensor],
                    outputs: Sequence[str] | None = None, timeout: float | None = None,
                    dtypes: Mapping[str, str] | None = None,
                    output_regions: Mapping[str, RegionSlot] | None = None
                    ) -> dict[str, np.ndarray]:
        """As Client.infer: views of registered regions travel as references."""
        request = infer_request(model, inputs, list(outputs or []), dtypes=dtypes,
                                regions=self._regions.values(), output_regions=output_regions)
        return outputs_of(await self._call(self._stub.Infer, request, timeout), self._regions)

    async def register_region(self, region: Region, timeout: float | None = None) -> None:
        method, request = _register_call(self._stub, region)
        await self._call(method, request, timeout)
        self._regions[region.name] = region

    async def unregister_region(self, region: Region | str = "",
                                timeout: float | None = None) -> None:
        name = region if isinstance(region, str) else region.name
        await self._call(self._stub.UnregisterRegion, pb.UnregisterRegionRequest(name=name),
                         timeout)
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

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

    # Model control, as in Client.

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelState]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    async def load_model(self, model: str, path: str = "", timeout: float | None = None
                         ) -> pb.ModelState:
        request = pb.LoadModelRequest(model=model, path=path)
        return (await self._call(self._stub.LoadModel, request, timeout)).model

    async def unload_model(self, model: str, timeout: float | None = None) -> pb.ModelState:
        request = pb.UnloadModelRequest(model=model)
        return (await self._call(self._stub.UnloadModel, request, timeout)).model

    async def reload_model(self, model: str, path: str = "", timeout: float | None = None
                           ) -> pb.ModelState:
        request = pb.ReloadModelRequest(model=model, path=path)
        return (await self._call(self._stub.ReloadModel, request, timeout)).model


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

    def repository_index(self, ready: bool = False, timeout: float | None = None
                         ) -> list[kpb.RepositoryIndexResponse.ModelIndex]:
        request = kpb.RepositoryIndexRequest(ready=ready)
        return list(self._call(self._stub.RepositoryIndex, request, timeout).models)

    def load_model(self, model: str, path: str = "", timeout: float | None = None) -> None:
        """RepositoryModelLoad; trtserve takes the model file as the `path` parameter."""
        request = kpb.RepositoryModelLoadRequest(model_name=model)
        if path:
            request.parameters["path"].string_param = path
        self._call(self._stub.RepositoryModelLoad, request, timeout)

    def unload_model(self, model: str, timeout: float | None = None) -> None:
        request = kpb.RepositoryModelUnloadRequest(model_name=model)
        self._call(self._stub.RepositoryModelUnload, request, timeout)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | None = None, timeout: float | None = None,
              dtypes: Mapping[str, str] | None = None, request_id: str = ""
              ) -> dict[str, np.ndarray]:
        request = kserve_request(model, inputs, outputs or (), request_id, dtypes)
        return kserve_outputs(self._call(self._stub.ModelInfer, request, timeout))

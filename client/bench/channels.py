"""Reaching the server: gRPC channels, call metadata and the Infer method of each protocol."""

from __future__ import annotations

import grpc

from trtserve.client.bench.config import BenchConfig
from trtserve.client.channels import Endpoint

V1_INFER = "/trtserve.v1.InferenceService/Infer"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
V1_STREAM = "/trtserve.v1.InferenceService/InferStream"
KSERVE_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _endpoint(config: BenchConfig) -> Endpoint:
    return Endpoint(config.url, token=config.token, root_certificates=config.root_certificates,
                    tls=config.tls)


def _metadata(config: BenchConfig) -> tuple[tuple[str, str], ...] | None:
    return _endpoint(config).metadata()


def _sync_channel(config: BenchConfig) -> grpc.Channel:
    return _endpoint(config).channel()


def _aio_channel(config: BenchConfig) -> grpc.aio.Channel:
    return _endpoint(config).aio_channel(own_connection=config.connections > 1)


def _method(protocol: str) -> str:
    return V1_INFER if protocol == "v1" else KSERVE_INFER


def _stream_method(protocol: str) -> str:
    return V1_STREAM if protocol == "v1" else KSERVE_STREAM

"""Reaching the server: gRPC channels, call metadata and the Infer method of each protocol."""

from __future__ import annotations

from typing import Any

import grpc

from client.bench.config import BenchConfig
from client.client import DEFAULT_MAX_MESSAGE_BYTES

V1_INFER = "/trtserve.v1.InferenceService/Infer"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
V1_STREAM = "/trtserve.v1.InferenceService/InferStream"
KSERVE_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _channel_options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES)]


def _metadata(config: BenchConfig) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {config.token}"),) if config.token else None


def _sync_channel(config: BenchConfig) -> grpc.Channel:
    if config.tls or config.root_certificates:
        creds = grpc.ssl_channel_credentials(config.root_certificates)
        return grpc.secure_channel(config.url, creds, options=_channel_options())
    return grpc.insecure_channel(config.url, options=_channel_options())


def _aio_channel(config: BenchConfig) -> grpc.aio.Channel:
    if config.tls or config.root_certificates:
        creds = grpc.ssl_channel_credentials(config.root_certificates)
        return grpc.aio.secure_channel(config.url, creds, options=_channel_options())
    return grpc.aio.insecure_channel(config.url, options=_channel_options())


def _method(protocol: str) -> str:
    return V1_INFER if protocol == "v1" else KSERVE_INFER


def _stream_method(protocol: str) -> str:
    return V1_STREAM if protocol == "v1" else KSERVE_STREAM

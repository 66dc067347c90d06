"""Reaching a server: the one place that turns an address, TLS settings and a
token into a gRPC channel and call metadata, for `Client`, `AsyncClient`,
`KServeClient` and the load generator (client/bench) alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

# Tensors can be large; match the server's default limits, not gRPC's 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """A server and how to reach it. TLS is on with `tls` or any certificate given."""

    url: str = "127.0.0.1:8001"
    token: str | None = None
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    tls: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.root_certificates)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call carries: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                            self.certificate_chain)

    def channel(self) -> grpc.Channel:
        """A blocking channel."""
        if self.secure:
            return grpc.secure_channel(self.url, self._credentials(), options=self.options())
        return grpc.insecure_channel(self.url, options=self.options())

    def aio_channel(self, own_connection: bool = False) -> grpc.aio.Channel:
        """An asyncio channel (create it on the loop that will use it).

        `own_connection`: a TCP connection of its own. By default gRPC lets channels
        of one process with the same target and options share one connection; a
        server of several frontend processes is spread over by connection (the
        kernel's SO_REUSEPORT), so a load generator wants several.
        """
        options = self.options()
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self.secure:
            return grpc.aio.secure_channel(self.url, self._credentials(), options=options)
        return grpc.aio.insecure_channel(self.url, options=options)

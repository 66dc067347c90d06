"""trtserve's Python client, and the protocol's Python side that the server shares.

`from trtserve.client import Client` is the usual entry. The package also holds
what both sides of the wire use: the generated stubs (`gen`), the tensor data
types (`dtypes`), trtserve's descriptor pool, and the gRPC transport settings
(`grpc_tuning`). It depends on grpcio, protobuf and numpy only.

The client classes load on first use (PEP 562), so importing a submodule such
as `trtserve.client.grpc_tuning` does not import grpc: that module must run
before grpc loads to take effect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtserve.client.client import AsyncClient, Client, InferenceError, KServeClient
    from trtserve.client.stream import InferStream

__all__ = ["AsyncClient", "Client", "InferStream", "InferenceError", "KServeClient"]

_HOMES = {"AsyncClient": "client", "Client": "client", "InferenceError": "client",
          "KServeClient": "client", "InferStream": "stream"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trtserve.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trtserve.client.{home}"), name)

"""trtserve's Python client."""

from client.client import AsyncClient, Client, InferenceError, KServeClient

__all__ = ["AsyncClient", "Client", "InferenceError", "KServeClient"]

"""trtserve's Python client."""

from client.client import AsyncClient, Client, InferenceError

__all__ = ["AsyncClient", "Client", "InferenceError"]

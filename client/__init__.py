"""trtserve's Python client."""

from client.client import AsyncClient, Client, InferenceError, KServeClient
from client.stream import InferStream

__all__ = ["AsyncClient", "Client", "InferStream", "InferenceError", "KServeClient"]

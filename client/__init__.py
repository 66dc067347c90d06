"""trtserve's Python client."""

from trtserve.client.client import AsyncClient, Client, InferenceError, KServeClient
from trtserve.client.stream import InferStream

__all__ = ["AsyncClient", "Client", "InferStream", "InferenceError", "KServeClient"]

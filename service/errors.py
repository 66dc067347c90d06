"""The service's exception hierarchy; the frontends map each to a gRPC status.

Messages of these exceptions are written for clients: they name the model or
tensor and what was wrong. Any other exception is a bug or a backend failure
and reaches clients only as a generic INTERNAL message.
"""

from __future__ import annotations

import grpc

from service import echo


class ServeError(Exception):
    """Base of errors whose message is safe to send to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TensorError(InvalidArgument):
    """A tensor of a request is wrong; the message names it."""

    def __init__(self, tensor: str, problem: str) -> None:
        # The name is the client's: shortened, so the status always fits its trailer.
        super().__init__(f"tensor '{echo.text(tensor)}': {problem}")
        self.tensor = tensor


class NotFound(ServeError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServeError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(ServeError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class BackendError(ServeError):
    """A batch failed inside a backend; only that batch's requests see it."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(ValueError):
    """Bad configuration, refused at start; the message names the key."""

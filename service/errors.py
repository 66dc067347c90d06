"""The service's exception hierarchy; the frontends map each to a gRPC status.

Messages of these exceptions are written for clients: they name the model or
tensor and what was wrong. Any other exception is a bug or a backend failure
and reaches clients only as a generic INTERNAL message.
"""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """Base of errors whose message is safe to send to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TensorError(InvalidArgument):
    """A tensor of a request is wrong; the message names it."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"tensor '{tensor}': {problem}")
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


class StartError(Exception):
    """The server cannot start. The message is one line for the operator: it names
    the key, model, file or port and what to do; `trtserve` prints it and exits
    with `exit_code` (2: fix the configuration or a file it names)."""

    exit_code = 2


class ConfigError(StartError, ValueError):
    """Bad configuration, refused at start; the message names the key."""


class ModelLoadError(StartError):
    """A configured model could not be loaded; the message names the model and its file."""

    def __init__(self, model: str, path: str, problem: str) -> None:
        super().__init__(f"model '{model}' ({path}): {problem}")
        self.model = model
        self.path = path
        self.problem = problem


class PortInUse(StartError):
    """Another process listens on an address the server was told to bind."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries write several)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return "no message"

"""The service's exception hierarchy; the frontends map each to a gRPC status.

Messages of these exceptions are written for clients: they name the model or
tensor and what was wrong. Any other exception is a bug or a backend failure
and reaches clients only as a generic INTERNAL message.
"""

from __future__ import annotations

import re

import grpc

from trtserve.service import echo


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


class AlreadyExists(ServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServeError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(ServeError):
    code = grpc.StatusCode.UNAVAILABLE


class LoadFailed(ServeError):
    """A model could not be loaded at run time (RepositoryModelLoad, a reload, the
    file watch); what served before serves on. The message names the model, its file
    and why: the client asked for that file, so it is theirs to see."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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


class InputRejected(InvalidArgument):
    """The backend refused a batch because of its input, not because of its own state.

    Raised by executors when the input passed validation (dynamic dimensions,
    any values) but the model cannot run it: a Reshape that does not divide,
    an index out of range. The worker and its executor are fine; the request is
    at fault. `reason` is the backend's own words, cleaned for clients
    (`client_reason`).
    """

    def __init__(self, reason: str) -> None:
        self.reason = client_reason(reason)
        super().__init__(self.reason)


# A backend's reason reaches clients: at most this many characters of it.
REASON_CHARS = 300
# Source locations and C++ frames in backend messages ("/src/x/reshape.h:84 ns::f(...) ").
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.+-]+){2,}(?::\d+)?")
_FRAME = re.compile(r"\b\w+(?:::\w+)+(?:\([^()]*\))?(?:\s*const)?")


def client_reason(text: str) -> str:
    """A backend's error text as a client may see it: no paths or C++ frames, one line, short."""
    text = _FRAME.sub("", _PATH.sub("", text))
    text = " ".join(text.split())
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS - 3].rstrip() + "..."
    return text


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

"""What every frontend shares: the call's deadline, model versions, readiness, and
the checks of a request's tensors that come before any is decoded.

The frontends (trtserve.v1 and KServe v2) differ only in their messages; both
hand decoded arrays to the same `ModelRuntime.infer`. The few pieces of call
handling they have in common live here so that neither copies the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np

from service import echo
from service.backends.base import ModelSpec
from service.engine.batch import Outputs
from service.engine.model import ModelRuntime
from service.engine.timer import now
from service.errors import NotFound, TensorError
from service.limits import ByteBudget, request_bytes

# trtserve serves one version of each model. KServe clients may name it "1" or
# leave the version empty.
MODEL_VERSION = "1"


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the serving clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return now() + remaining


def check_version(model: str | None, version: str) -> None:
    """Refuse any version but the one served ("" asks for it too); `model` None: any model."""
    if version not in ("", MODEL_VERSION):
        shown = echo.text(version)
        subject = (f"model '{echo.text(model)}' has no version '{shown}'" if model is not None
                   else f"no model has version '{shown}'")
        raise NotFound(f"{subject}; trtserve serves version '{MODEL_VERSION}' of each model "
                       "(or leave the version empty)")


def is_ready(model: ModelRuntime) -> bool:
    """Accepting requests, with at least one worker in the rotation."""
    return model.ready and model.healthy_workers > 0


class WireTensor(Protocol):
    """An input tensor as either protocol's message carries it."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def check_inputs(model: str, spec: ModelSpec, tensors: Iterable[WireTensor]) -> None:
    """Refuse, before any tensor is decoded, inputs the model cannot take at all.

    Each input must have a name the model takes, appear once, and have the
    model's number of dimensions. A request can carry a million tensors (or
    dimensions) in a few megabytes; decoding them before looking at their names
    held the event loop for seconds. Here the n+1st tensor, for a model of n
    inputs, is either unknown or a repeat, so at most n+1 tensors are looked at,
    and a shape's length is compared before its dimensions are read.
    """
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise TensorError("", f"input #{index} has an empty name")
        if name in seen:
            raise TensorError(name, "appears more than once in the request's inputs")
        tensor_spec = spec.input(name)
        if tensor_spec is None:
            raise TensorError(name, f"unknown input; model '{echo.text(model)}' takes "
                              f"{[t.name for t in spec.inputs]}")
        ndim, want = len(tensor.shape), len(tensor_spec.shape)
        if ndim != want:
            raise TensorError(name, f"shape {echo.dims(tensor.shape)} has {ndim} dimensions, "
                              f"the model takes {want}: {list(tensor_spec.shape)}")
        seen.add(name)


async def infer_within_budget(model: ModelRuntime, budget: ByteBudget,
                              inputs: Mapping[str, np.ndarray], deadline: float | None,
                              dtypes: Mapping[str, str]) -> Outputs:
    """`model.infer`, holding the inputs' bytes in the server's budget until answered.

    Validation comes first, so that a request that can never run is told so
    (INVALID_ARGUMENT) rather than to retry (RESOURCE_EXHAUSTED). The bytes are
    released once, however the request ends: answered, failed, cancelled or
    expired.
    """
    nbytes = request_bytes(inputs)
    try:
        model.validate(inputs, dtypes)
        budget.acquire(nbytes)
        try:
            return await model.infer(inputs, deadline, dtypes)
        finally:
            budget.release(nbytes)
    finally:
        budget.finished(nbytes)

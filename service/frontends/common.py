"""What every frontend shares: the call's deadline, and the checks of a request's
tensors that come before any is decoded.

The frontends (trtserve.v1 and KServe v2) differ only in their messages; both
hand decoded arrays to the same `Engine.infer` (service/engine/api.py). The few
pieces of call handling they have in common live here so that neither copies
the other. Model versions are the engine's (api.check_version), re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc

from service import echo
from service.engine.api import MODEL_VERSION, ModelSpec, check_version, now
from service.errors import TensorError

__all__ = ["MODEL_VERSION", "check_inputs", "check_version", "deadline_of"]


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the serving clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return now() + remaining


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

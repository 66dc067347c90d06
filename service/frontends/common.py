"""What every frontend shares: the call's deadline, model versions, readiness.

The frontends (trtserve.v1 and KServe v2) differ only in their messages; both
hand decoded arrays to the same `ModelRuntime.infer`. The few pieces of call
handling they have in common live here so that neither copies the other.
"""

from __future__ import annotations

import grpc

from service.errors import NotFound
from service.model import ModelRuntime
from service.timer import now

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
        subject = f"model '{model}' has" if model is not None else "no model has"
        raise NotFound(f"{subject} no version '{version}'; trtserve serves version "
                       f"'{MODEL_VERSION}' of each model (or leave the version empty)")


def is_ready(model: ModelRuntime) -> bool:
    """Accepting requests, with at least one worker in the rotation."""
    return model.ready and model.healthy_workers > 0

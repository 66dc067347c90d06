"""What every frontend shares: the call's deadline, model versions, readiness.

The frontends (trtserve.v1 and KServe v2) differ only in their messages; both
hand decoded arrays to the same `ModelRuntime.infer`. The few pieces of call
handling they have in common live here so that neither copies the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import numpy as np

from service.batch import Outputs
from service.errors import NotFound
from service.limits import ByteBudget, request_bytes
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

"""What one request, and all requests together, may cost in memory.

`InputLimits` bounds each input tensor of one request (bytes, and the size of
each dimension) for one model: a request beyond them is INVALID_ARGUMENT
naming the tensor and the bound, before it is queued. `ByteBudget` bounds the
input bytes that accepted requests hold until they are answered, over every
model, protocol and stream: beyond it a request is RESOURCE_EXHAUSTED naming
the budget, and retrying later may succeed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from trtserve.service.backends.base import ModelSpec
from trtserve.service.config import ModelConfig
from trtserve.service.errors import ConfigError, ResourceExhausted, TensorError

MIB = 1024 * 1024


def _size(nbytes: int) -> str:
    """Bytes as people read them in a message: exact bytes, and MiB when that helps."""
    if nbytes >= MIB:
        return f"{nbytes} bytes ({nbytes / MIB:.1f} MiB)"
    return f"{nbytes} bytes"


class InputLimits:
    """One model's bounds on a request's input tensors, from its config."""

    def __init__(self, config: ModelConfig, spec: ModelSpec) -> None:
        self._model = config.name
        self._max_bytes = config.max_input_bytes
        key = f"models.{config.name}.max_input_shapes"
        taken = [t.name for t in spec.inputs]
        self._max_shapes: dict[str, tuple[int, ...]] = {}
        for name, dims in config.max_input_shapes.items():
            tensor = spec.input(name)
            if tensor is None:
                raise ConfigError(f"{key}: got a bound for {name!r}, but model "
                                  f"'{config.name}' takes {taken}")
            if len(dims) != len(tensor.shape):
                raise ConfigError(f"{key}.{name}: got {list(dims)}, expected "
                                  f"{len(tensor.shape)} sizes, one per dimension of "
                                  f"{list(tensor.shape)} (0: no bound)")
            self._max_shapes[name] = tuple(dims)

    def check(self, inputs: Mapping[str, np.ndarray]) -> None:
        """TensorError naming the tensor and the bound it passes; nothing when within them."""
        for name, array in inputs.items():
            bounds = self._max_shapes.get(name)
            if bounds is not None:
                for axis, (got, bound) in enumerate(zip(array.shape, bounds, strict=True)):
                    if bound and got > bound:
                        raise TensorError(name, f"shape {list(array.shape)} is larger than "
                                          f"{list(bounds)} in dimension {axis} ({got} > "
                                          f"{bound}; models.{self._model}.max_input_shapes, "
                                          "0: no bound)")
            if self._max_bytes and array.nbytes > self._max_bytes:
                raise TensorError(name, f"{_size(array.nbytes)} of shape {list(array.shape)} "
                                  f"is more than models.{self._model}.max_input_bytes = "
                                  f"{_size(self._max_bytes)} per input")


def request_bytes(inputs: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in inputs.values())


@dataclass(frozen=True)
class ByteBudgetSnapshot:
    held_bytes: int
    limit_bytes: int  # 0: no budget
    refused: int


class ByteBudget:
    """Input bytes of the requests accepted and not yet answered, over the whole server.

    Owned by the event loop (no locks): frontends `acquire` a request's bytes
    before it is queued and `release` them once it is answered.
    `on_large_done` runs after a request of at least `large_bytes` has
    finished, however it ended (the server gives memory back there).
    """

    def __init__(self, limit_bytes: int, large_bytes: int = 0,
                 on_large_done: Callable[[], None] | None = None) -> None:
        self.limit_bytes = limit_bytes  # 0: no budget
        self.held_bytes = 0
        self.refused = 0
        self._large_bytes = large_bytes
        self._on_large_done = on_large_done

    def acquire(self, nbytes: int, requests: int = 1) -> None:
        """Count `nbytes` as in flight; ResourceExhausted if they don't fit. Pair with release.
        `requests`: how many clients' requests the bytes are (a group's members, each
        refused with it, each counted in `refused`)."""
        if self.limit_bytes and self.held_bytes + nbytes > self.limit_bytes:
            self.refused += requests
            if nbytes > self.limit_bytes:
                raise ResourceExhausted(
                    f"request of {_size(nbytes)} of input tensors is larger than the server's "
                    f"whole budget (max_request_bytes_in_flight = {_size(self.limit_bytes)})")
            raise ResourceExhausted(
                f"too many request bytes in flight: {_size(self.held_bytes)} held, this "
                f"request needs {_size(nbytes)} more (max_request_bytes_in_flight = "
                f"{_size(self.limit_bytes)}); retry later")
        self.held_bytes += nbytes

    def snapshot(self) -> ByteBudgetSnapshot:
        return ByteBudgetSnapshot(self.held_bytes, self.limit_bytes, self.refused)

    def release(self, nbytes: int) -> None:
        self.held_bytes -= nbytes

    def finished(self, nbytes: int) -> None:
        """A request of `nbytes` is over, however it ended: after a large one, `on_large_done`."""
        if self._on_large_done is not None and self._large_bytes and nbytes >= self._large_bytes:
            self._on_large_done()

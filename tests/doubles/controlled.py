"""A test double for a backend whose every move the test controls.

`ControlledBackend` computes y = 2x + 1 on one FP32 input x of shape [-1, 8],
so any response can be checked against its own request. Through its shared
`Controls` a test can make batches slow, hold them at a gate, fail the next N
batches, fail any batch holding a poison value, fail executor builds, return
outputs one row short (a backend bug the worker must catch), or let batches
run on any thread; and it can read back what actually ran: batch sizes, rows
executed, the thread each batch ran on, the values of every failed batch, and
any batch that reached the executor malformed.

It is a double, not a backend: Stats shows it as "controlled-double".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from trtserve.service.backends.base import (
    BatchResult,
    LoadedModel,
    ModelSpec,
    ProfileSpec,
    WorkerInfo,
)
from trtserve.service.config import ModelConfig
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.tensors import TensorSpec

INPUT = "x"
OUTPUT = "y"
WIDTH = 8
LABEL = "controlled-double"
# The exception text of an injected failure; it must never reach a client.
SECRET = "injected failure: /secret/path/on/server token=hunter2"


def expected(x: np.ndarray) -> np.ndarray:
    """What the double answers for x (NaN stays NaN; overflow gives inf, silently)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (2 * x.astype(np.float32) + np.float32(1)).astype(np.float32)


class InjectedFailure(RuntimeError):
    """What a failing batch (or build) raises."""


@dataclass
class Controls:
    """Shared between the test and every executor; all access under one lock."""

    sleep_s: float = 0.0  # per batch, before computing
    poison: float | None = None  # a batch holding this value fails
    short_outputs: bool = False  # answer one row fewer than the batch has (a backend bug)
    # Say the executor may run on any thread, as an ONNX Runtime session does,
    # so the model may run quick batches on the event loop (inline_below_us).
    any_thread: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _fail_batches: int = 0
    _fail_builds: int = 0
    _gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # set by each batch
    # What happened, for assertions.
    builds: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    executed_rows: int = 0
    failed_batches: list[np.ndarray] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    executed_values: list[np.ndarray] = field(default_factory=list)
    ran_on: list[str] = field(default_factory=list)  # thread name of every batch that ran
    keep_values: bool = False  # record every executed batch's x (tests that need it)

    def __post_init__(self) -> None:
        self._gate.set()

    # --- what a test commands ------------------------------------------------

    def fail_next_batches(self, n: int) -> None:
        with self._lock:
            self._fail_batches = n

    def fail_next_builds(self, n: int) -> None:
        with self._lock:
            self._fail_builds = n

    def hold(self) -> None:
        """Batches wait at the gate (after `started` is set) until `release`."""
        self.started.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # --- what a test reads -----------------------------------------------------

    def snapshot(self) -> tuple[int, list[int]]:
        with self._lock:
            return self.executed_rows, list(self.batch_sizes)

    # --- executor side -----------------------------------------------------------

    def _build(self) -> None:
        with self._lock:
            self.builds += 1
            if self._fail_builds > 0:
                self._fail_builds -= 1
                raise InjectedFailure(SECRET)

    def _should_fail(self, x: np.ndarray) -> bool:
        with self._lock:
            if self._fail_batches > 0:
                self._fail_batches -= 1
                return True
        return self.poison is not None and bool(np.any(x == self.poison))


class ControlledExecutor:
    def __init__(self, controls: Controls, max_batch: int) -> None:
        controls._build()
        self._controls = controls
        self.info = WorkerInfo(device="cpu", max_batch_size=max_batch,
                               runs_on_any_thread=controls.any_thread)

    def run(self, inputs: Mapping[str, Sequence[np.ndarray]], rows: int) -> BatchResult:
        c = self._controls
        start = time.perf_counter()
        problem = _malformed(inputs, rows)
        if problem:
            with c._lock:
                c.malformed.append(problem)
            raise InjectedFailure(f"malformed batch reached the executor: {problem}")
        x = np.concatenate(inputs[INPUT])
        with c._lock:
            c.ran_on.append(threading.current_thread().name)
        c.started.set()
        if not c._gate.wait(timeout=60):
            raise InjectedFailure("gate never released")
        if c.sleep_s:
            time.sleep(c.sleep_s)
        if c._should_fail(x):
            with c._lock:
                c.failed_batches.append(x.copy())
            raise InjectedFailure(SECRET)
        y = expected(x)[:-1] if c.short_outputs else expected(x)
        with c._lock:
            c.executed_rows += rows
            c.batch_sizes.append(rows)
            if c.keep_values:
                c.executed_values.append(x.copy())
        return BatchResult(outputs={OUTPUT: y}, compute_s=time.perf_counter() - start)

    def close(self) -> None:
        pass


def _malformed(inputs: Mapping[str, Sequence[np.ndarray]], rows: int) -> str:
    """Why a batch is not what the model takes ('' when it is)."""
    if set(inputs) != {INPUT}:
        return f"inputs {sorted(inputs)}"
    for part in inputs[INPUT]:
        if part.dtype != np.float32 or part.ndim != 2 or part.shape[1] != WIDTH \
                or part.shape[0] < 1:
            return f"part {part.dtype} {part.shape}"
    total = sum(p.shape[0] for p in inputs[INPUT])
    return "" if total == rows else f"{total} rows, told {rows}"


class ControlledBackend:
    """Makes a `LoadedModel` (and a `ModelRuntime`) for y = 2x + 1 on FP32 [-1, 8]."""

    def __init__(self, controls: Controls | None = None, max_batch_size: int = 32) -> None:
        self.controls = controls or Controls()
        self.max_batch_size = max_batch_size

    def spec(self) -> ModelSpec:
        return ModelSpec(
            backend=LABEL, platform=LABEL,
            inputs=(TensorSpec(INPUT, "FP32", (-1, WIDTH)),),
            outputs=(TensorSpec(OUTPUT, "FP32", (-1, WIDTH)),),
            max_batch_size=self.max_batch_size, min_batch_size=1,
            profiles=(ProfileSpec(0),),
        )

    def load(self, workers: int) -> LoadedModel:
        def factory() -> ControlledExecutor:
            return ControlledExecutor(self.controls, self.max_batch_size)

        return LoadedModel(spec=self.spec(), factories=[factory] * workers)

    def runtime(self, config: ModelConfig, stats_window_s: float = 10.0) -> ModelRuntime:
        return ModelRuntime(config, self.load(config.workers), stats_window_s)


def controlled_model(name: str = "controlled", **overrides: object) -> ModelConfig:
    """A ModelConfig for the double (its path is never read)."""
    settings: dict[str, object] = {"workers": 1, "max_batch_size": 32,
                                   "max_queue_delay_us": 1000}
    settings.update(overrides)
    return ModelConfig(name=name, path=f"<{LABEL}>", **settings)  # type: ignore[arg-type]

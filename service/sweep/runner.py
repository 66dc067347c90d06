"""Running a backend alone, in-process: one thread per executor, all at once,
each batch size for a fixed window (the engine of `trtserve profile`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trtserve.client.latency import latency_summary_ms
from trtserve.client.random_data import random_array
from trtserve.service.config import ModelConfig
from trtserve.service.sweep.report import SizeResult, SweepReport, recommend
from trtserve.service.tensors import TensorSpec


def sample_inputs(specs: Sequence[TensorSpec], rows: int, sample_shapes: dict[str, tuple[int, ...]],
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of `rows` rows; dynamic non-batch dims come from `sample_shapes`."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for t in specs:
        rest = sample_shapes.get(t.name, t.shape[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"input '{t.name}' has dynamic dimensions {list(t.shape)}; give "
                             f"one row's shape with --sample-shape {t.name}=D,D,...")
        arrays[t.name] = random_array(t.dtype, (rows, *rest), rng)
    return arrays


class ExecutorThread:
    """One thread owning one executor, running batches back to back while the main
    thread asks it to.

    Not a serving `Worker` (service/engine/worker.py): that one takes one batch at a time
    from the event loop and reports each back; here each thread runs the same batch
    in a tight loop for a time window, so that what is measured is the backend and
    nothing in between.
    """

    def __init__(self, index: int, factory: Callable[[], Any]) -> None:
        self.index = index
        self._factory = factory
        self._work: tuple[dict[str, list[np.ndarray]], int, float, float, float] | None = None
        self._go = threading.Event()
        self._done = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self.records: list[tuple[float, float, float]] = []  # (start, end, compute_s)
        self._thread = threading.Thread(target=self._main, name=f"sweep-{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._done.wait()
        self._done.clear()
        if self.error is not None:
            raise self.error

    def run(self, inputs: dict[str, list[np.ndarray]], rows: int, start: float,
            warm_end: float, end: float) -> None:
        self._work = (inputs, rows, start, warm_end, end)
        self.records = []
        self._go.set()

    def wait(self) -> None:
        self._done.wait()
        self._done.clear()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(30)

    def _main(self) -> None:
        try:
            executor = self._factory()
        except BaseException as e:  # handed to the main thread by start()
            self.error = e
            self._done.set()
            return
        self._done.set()
        try:
            while True:
                self._go.wait()
                self._go.clear()
                if self._stop or self._work is None:
                    return
                inputs, rows, start, warm_end, end = self._work
                while time.monotonic() < start:
                    time.sleep(max(0.0, start - time.monotonic()))
                try:
                    while (t0 := time.monotonic()) < end:
                        result = executor.run(inputs, rows)
                        t1 = time.monotonic()
                        if warm_end <= t1 <= end:
                            self.records.append((t0, t1, result.compute_s))
                except BaseException as e:
                    self.error = e
                self._done.set()
        finally:
            executor.close()


def sweep(config: ModelConfig, batch_sizes: Sequence[int], duration_s: float = 3.0,
            warmup_s: float = 1.0, sample_shapes: dict[str, tuple[int, ...]] | None = None,
            on_result: Callable[[SizeResult], None] | None = None) -> SweepReport:
    """Measure `config`'s backend at each batch size with `config.workers` executors at once."""
    from trtserve.service.backends.onnxruntime import default_threads
    from trtserve.service.engine.repository import load_backend

    loaded = load_backend(config)
    spec = loaded.spec
    threads = config.intra_op_threads
    if spec.backend == "onnxruntime" and not threads:
        threads = default_threads(config.workers)  # what each session was given
    report = SweepReport(model=config.name, path=config.path, backend=spec.backend,
                           workers=len(loaded.factories),
                           intra_op_threads=threads,
                           duration_s=duration_s, warmup_s=warmup_s)
    runners = [ExecutorThread(i, f) for i, f in enumerate(loaded.factories)]
    try:
        for r in runners:
            r.start()
        for size in sorted(set(batch_sizes)):
            why = _cannot_run(spec, size)
            if why:
                report.skipped[size] = why
                continue
            arrays = sample_inputs(spec.inputs, size, sample_shapes or {}, seed=size)
            inputs = {name: [a] for name, a in arrays.items()}
            start = time.monotonic() + 0.05
            warm_end, end = start + warmup_s, start + warmup_s + duration_s
            for r in runners:
                r.run(inputs, size, start, warm_end, end)
            for r in runners:
                r.wait()
            records = [rec for r in runners for rec in r.records]
            wall = np.array([b - a for a, b, _ in records])
            compute = np.array([c for _, _, c in records])
            result = SizeResult(
                batch_size=size, workers=len(runners), batches=len(records),
                window_s=duration_s, rows_per_s=len(records) * size / duration_s,
                batches_per_s=len(records) / duration_s, latency_ms=latency_summary_ms(wall),
                compute_ms=latency_summary_ms(compute))
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        for r in runners:
            r.close()
        loaded.close()
    report.recommendation = recommend(report.results)
    return report


def _cannot_run(spec: Any, size: int) -> str:
    if size < spec.min_batch_size or size > spec.max_batch_size:
        return (f"outside the model's batch range {spec.min_batch_size}.."
                f"{spec.max_batch_size}")
    return ""

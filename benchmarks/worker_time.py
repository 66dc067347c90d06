"""Where a worker's time per batch goes, served (GPU stand-in, NOT TensorRT).

    python -m benchmarks.worker_time [--seconds 5] [--frontends 8] [--rows 8] [--rounds 2]

At 8 rows per request the served stand-in queues requests in the batcher for
13-20 ms while the GPU is 3-5% busy (docs/processes.md): the workers' own
threads hold the batches, waiting for the GIL (measured: docs/gpu.md). This
serves the light stand-in as `frontends_rows gpu` does (256 clients in 8 client
processes x 4 connections, 4 workers) and clocks,
per batch, on each worker's thread:

- `turn`: the thread's whole turn for the batch (Worker._run), wall time;
- `exec` and `exec cpu`: the executor's run within it, wall and CPU time. Wall
  minus CPU minus the GPU's own time (Stats' busy time) is waiting: for the
  GPU's copies and kernels, or for the GIL;
- `inbox`: how long the batch waited at its worker before the turn began (a
  batch queued one ahead waits for the batch before it);
- `settle`: from the turn's end until the event loop took the outcome.

Variants, alternated over the rounds on one machine:

- `today's`: the defaults (4 workers, the frame hold on);
- `no frame hold`: `frontend_hold_us = 0` (docs/processes.md, "Frames held");
- `8 workers`: twice the batches in flight, each waiting for the GIL on its own.

The clocks wrap the worker's methods in this process, which is the engine's
(`serving_standin` runs it in a thread here, the frontends in processes of
their own); they add about a microsecond a batch.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from trtserve.service.engine import worker as worker_module

STAGES = ("turn", "exec", "exec_cpu", "inbox", "settle")
VARIANTS = ("today's", "no frame hold", "8 workers")


class WorkerClock:
    """Per-batch times of every Worker in this process while `installed()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: Counter[str] = Counter()
        self._submitted: dict[int, float] = {}

    def reset(self) -> None:
        with self._lock:
            self._sums.clear()

    def per_batch_us(self) -> dict[str, float]:
        """Each stage's mean over the batches since `reset`, in microseconds, and
        `batches`, `rows` as counts."""
        with self._lock:
            sums = dict(self._sums)
        batches = sums.get("batches", 0)
        out = {"batches": batches, "rows": sums.get("rows", 0)}
        for stage in STAGES:
            out[stage] = sums.get(stage, 0.0) / batches * 1e6 if batches else 0.0
        return out

    def _add(self, **values: float) -> None:
        with self._lock:
            self._sums.update(values)

    @contextmanager
    def installed(self) -> Iterator[WorkerClock]:
        w = worker_module
        run, submit, execute, report = w.Worker._run, w.Worker.submit, w._execute, \
            w.Worker._report
        clock = self

        def timed_submit(worker: Any, batch: Any) -> None:
            clock._submitted[id(batch)] = time.perf_counter()
            submit(worker, batch)

        def timed_run(worker: Any, batch: Any) -> Any:
            start = time.perf_counter()
            submitted = clock._submitted.pop(id(batch), start)
            outcome = run(worker, batch)
            clock._add(batches=1, rows=batch.rows, turn=time.perf_counter() - start,
                       inbox=start - submitted)
            return outcome

        def timed_execute(executor: Any, inputs: Any, rows: int, targets: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            result = execute(executor, inputs, rows, targets)
            clock._add(exec=time.perf_counter() - start, exec_cpu=time.thread_time() - cpu)
            return result

        def timed_report(worker: Any, callback: Callable[..., None], *args: Any) -> None:
            if not (args and isinstance(args[-1], w.Outcome)):
                report(worker, callback, *args)
                return
            sent = time.perf_counter()

            def settle(*a: Any) -> None:
                clock._add(settle=time.perf_counter() - sent)
                callback(*a)

            report(worker, settle, *args)

        w.Worker._run, w.Worker.submit, w._execute, w.Worker._report = \
            timed_run, timed_submit, timed_execute, timed_report  # type: ignore[method-assign]
        try:
            yield self
        finally:
            w.Worker._run, w.Worker.submit, w._execute, w.Worker._report = \
                run, submit, execute, report  # type: ignore[method-assign]


def _served(light: Any, clock: WorkerClock, variant: str, seconds: float, frontends: int,
            rows: int) -> dict[str, float]:
    from benchmarks import gpu_standin as g
    from trtserve.service.config import ServerConfig

    where_waiting = g.where_waiting

    def measured(*args: Any, **kwargs: Any) -> dict[str, float]:
        clock.reset()  # served_throughput reads Stats here, as its window opens
        result = where_waiting(*args, **kwargs)
        result.update({f"clock_{k}": v for k, v in clock.per_batch_us().items()})
        return result

    hold_us = 0 if variant == "no frame hold" else ServerConfig().frontend_hold_us
    g.where_waiting = measured  # type: ignore[assignment]
    try:
        return g.served_throughput(light, _workers(variant), 256, 8, seconds,
                                   rows_per_request=rows, frontends=frontends,
                                   connections=4,
                                   server_options={"frontend_hold_us": hold_us})
    finally:
        g.where_waiting = where_waiting  # type: ignore[assignment]


def _workers(variant: str) -> int:
    return 8 if variant == "8 workers" else 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--frontends", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="rows per request")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from benchmarks import gpu_standin as g
    from trtserve.service.backends.tensorrt.cuda import CudaRuntime

    CudaRuntime(0).set_device()
    light = g.light_engine()
    clock = WorkerClock()
    print(f"GPU stand-in (NOT TensorRT), {args.frontends} frontends, {args.rows} rows per "
          f"request, 256 clients, 4 workers unless named, {args.seconds:g} s a run; "
          "per batch, in us")
    print(f"{'variant':<14} {'rows/s':>9} {'batch':>6} {'queue ms':>8} {'GPU':>5} "
          + " ".join(f"{s:>9}" for s in STAGES))
    try:
        with clock.installed():
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    r = _served(light, clock, variant, args.seconds, args.frontends, args.rows)
                    gpu_us = r["gpu_busy_per_worker"] * _workers(variant) * args.seconds / \
                        max(r["clock_batches"], 1) * 1e6
                    print(f"{variant:<14} {r['rows_per_s']:>9,.0f} {r['mean_batch']:>6.1f} "
                          f"{r['queue_time_p50_ms']:>8.1f} {gpu_us:>5.0f} "
                          + " ".join(f"{r['clock_' + s]:>9.0f}" for s in STAGES), flush=True)
    finally:
        light.close()


if __name__ == "__main__":
    main()

"""The parent: start the client processes, run each level, merge what they saw."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from trtserve.client.bench.config import BenchConfig, BenchReport, Level, LevelResult
from trtserve.client.bench.load import _child
from trtserve.client.bench.recorder import Window
from trtserve.client.bench.report import _config_dict, machine_info
from trtserve.client.bench.requests import prepare, server_batches
from trtserve.client.latency import latency_summary_ms


def _merge(level: Level, config: BenchConfig, parts: list[dict[str, Any]],
           batches: tuple[tuple[int, int] | None, tuple[int, int] | None]) -> LevelResult:
    latencies = np.concatenate([np.frombuffer(p["latencies"], dtype=np.float64)
                                for p in parts])
    lags = np.concatenate([np.frombuffer(p["lags"], dtype=np.float64) for p in parts])
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    window = config.duration_s
    result = LevelResult(
        mode=level.mode, load=level.value, processes=config.processes, window_s=window,
        requests=int(latencies.size), throughput_rps=latencies.size / window,
        rows_per_s=latencies.size * config.batch_rows / window,
        latency_ms=latency_summary_ms(latencies), errors=dict(sorted(errors.items())),
        client_cpu=[round(p["cpu"], 3) for p in parts],
        dropped=sum(p["dropped"] for p in parts),
        send_lag_p99_ms=float(np.percentile(lags, 99) * 1e3) if lags.size else None,
    )
    before, after = batches
    if before is not None and after is not None and after[0] > before[0]:
        result.server_batches = after[0] - before[0]
        result.server_mean_batch = (after[1] - before[1]) / result.server_batches
    return result


class _Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_len = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self._last_len - len(text))
            sys.stderr.write("\r" + text + " " * pad)
            sys.stderr.flush()
            self._last_len = len(text)

    def finish(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.show(text)
            sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._last_len = 0


def run(config: BenchConfig, progress: bool = True) -> BenchReport:
    """Run every level of `config` and return the merged results."""
    with contextlib.ExitStack() as stack:  # shared-memory regions, if any, until the end
        return _run(config, prepare(config, stack), progress)


def _run(config: BenchConfig, payloads: list[bytes], progress: bool) -> BenchReport:
    ctx = mp.get_context("spawn")  # gRPC's C core does not survive fork
    counters = ctx.Array("q", 2 * config.processes, lock=False)
    pipes, procs = [], []
    for i in range(config.processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(config, payloads, i, child, counters),
                           name=f"bench-client-{i}", daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    line = _Progress(progress)
    report = BenchReport(config=_config_dict(config), machine=machine_info())
    try:
        for conn in pipes:
            _expect(conn, "ready", config.timeout_s)
        for level in config.levels:
            report.results.append(_level(config, level, pipes, counters, line))
    finally:
        for conn in pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    return report


def _expect(conn: Connection, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"a client process sent nothing within {timeout:.0f}s")
    got, payload = conn.recv()
    if got == "error":
        raise RuntimeError(payload)
    if got != kind:
        raise RuntimeError(f"a client process sent {got!r}, expected {kind!r}")
    return payload


def _level(config: BenchConfig, level: Level, pipes: list[Connection], counters: Any,
           line: _Progress) -> LevelResult:
    for i in range(len(counters)):
        counters[i] = 0
    start = time.monotonic() + 0.2
    window = Window(start, start + config.warmup_s, start + config.warmup_s + config.duration_s)
    for conn in pipes:
        conn.send((level, window))
    head = f"[{level.mode} {level.label}]"
    before = after = None
    snapped = [False, False]
    while (now := time.monotonic()) < window.end + 0.05:
        if not snapped[0] and now >= window.warm_end:
            before, snapped[0] = server_batches(config), True
        if now < window.warm_end:
            line.show(f"{head} warming up {now - window.start:4.1f}/{config.warmup_s:g}s")
        else:
            ok = sum(counters[0::2])
            failed = sum(counters[1::2])
            elapsed = max(now - window.warm_end, 1e-9)
            line.show(f"{head} {min(elapsed, config.duration_s):5.1f}/{config.duration_s:g}s "
                      f"{ok / elapsed:9.1f} req/s  errors {failed}")
        time.sleep(max(0.0, min(0.25, window.end + 0.05 - time.monotonic())))
    if not snapped[1]:
        after = server_batches(config)
    parts = [_expect(conn, "result", config.timeout_s + 30) for conn in pipes]
    result = _merge(level, config, parts, (before, after))
    line.finish(f"{head} done: {result.throughput_rps:.1f} req/s, "
                f"p50 {result.latency_ms['p50']:.3f} ms, errors {sum(result.errors.values())}")
    return result

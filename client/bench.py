"""`trtserve-client bench`: a load generator for trtserve.v1 and KServe v2 servers.

    trtserve-client bench --model example --concurrency 1,8,64,256 --duration 10
    trtserve-client bench --model example --rate 500,1000 --protocol kserve --processes 2

Closed loop (`--concurrency`): that many requests are always outstanding;
each answer sends the next. Open loop (`--rate`): requests leave at Poisson
arrival times whatever the server does, and latency counts from the moment a
request was due, so a client that falls behind shows up in the numbers
instead of hiding (no coordinated omission).

Each load level warms up, then measures for `--duration` seconds: a request
counts when it completes inside the window. Load comes from `--processes`
client processes (each one asyncio loop with one gRPC channel), and the
report says how much CPU each used, so a client-bound run is visible.

Requests are serialized once up front and sent as raw bytes, and answers
are not parsed (one probe answer is, before the run), so the client spends
its time on gRPC alone. A process whose share of a closed-loop level is a
single stream (concurrency 1) uses gRPC's blocking client in a thread, which
costs less per call than asyncio's, so that level measures the server rather
than the client. The load processes run gRPC's C core with the settings the
server runs with (service/grpc_tuning.py; they inherit GRPC_EXPERIMENTS), and
the report names them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import multiprocessing as mp
import os
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client.client import DEFAULT_MAX_MESSAGE_BYTES
from service import grpc_tuning  # noqa: F401  # sets GRPC_EXPERIMENTS for the load processes
from service.profile_cli import latency_summary_ms, random_array

PROTOCOLS = ("v1", "kserve")
V1_INFER = "/trtserve.v1.InferenceService/Infer"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
# A client process above this share of one core is likely the bottleneck.
CLIENT_BUSY = 0.85


@dataclass(frozen=True)
class Level:
    """One load level: `closed` with `value` requests outstanding, or `open` at `value`/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.mode == "closed" else f"{self.value:g}/s"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # wire name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for dynamic dimensions, batch first


@dataclass(frozen=True)
class BenchConfig:
    url: str
    model: str
    levels: tuple[Level, ...]
    protocol: str = "v1"
    duration_s: float = 10.0
    warmup_s: float = 2.0
    processes: int = 1
    batch_rows: int = 1
    # name -> .npy file; inputs not named get random data of the model's shapes.
    input_files: tuple[tuple[str, str], ...] = ()
    # name -> full shape, for dynamic non-batch dimensions.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    timeout_s: float = 60.0
    # Open loop: requests outstanding per process at most; more are counted as dropped.
    max_outstanding: int = 10_000
    seed: int = 0
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.protocol in PROTOCOLS, f"--protocol: got {self.protocol!r}, "
                                         f"expected one of {PROTOCOLS}"),
            (bool(self.levels), "no load levels: give --concurrency or --rate"),
            (all(lv.value > 0 for lv in self.levels), "load levels must be above 0"),
            (all(lv.mode in ("closed", "open") for lv in self.levels),
             "a level's mode is 'closed' or 'open'"),
            (self.duration_s > 0, f"--duration: got {self.duration_s}, expected > 0"),
            (self.warmup_s >= 0, f"--warmup: got {self.warmup_s}, expected >= 0"),
            (self.processes >= 1, f"--processes: got {self.processes}, expected >= 1"),
            (self.batch_rows >= 1, f"--batch-rows: got {self.batch_rows}, expected >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class LevelResult:
    mode: str
    load: float
    processes: int
    window_s: float
    requests: int  # answered OK within the window
    throughput_rps: float
    rows_per_s: float
    latency_ms: dict[str, float]  # mean, p50, p90, p95, p99, max
    errors: dict[str, int]  # gRPC status name -> count, within the window
    client_cpu: list[float]  # per process: CPU seconds / window seconds (1.0 = one core)
    dropped: int = 0  # open loop: due but not sent (max_outstanding reached)
    send_lag_p99_ms: float | None = None  # open loop: how late requests left
    server_mean_batch: float | None = None  # from trtserve Stats, when the server has it
    server_batches: int | None = None

    @property
    def label(self) -> str:
        return Level(self.mode, self.load).label

    @property
    def client_bound(self) -> bool:
        return max(self.client_cpu, default=0.0) >= CLIENT_BUSY


@dataclass
class BenchReport:
    config: dict[str, Any]
    results: list[LevelResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)


# --- what to send --------------------------------------------------------------------


def concrete_shape(tensor: TensorInfo, rows: int, override: tuple[int, ...] | None
                   ) -> tuple[int, ...]:
    if override is not None:
        return override
    if not tensor.shape:
        return ()
    rest = tensor.shape[1:]
    if any(d < 0 for d in rest):
        raise ValueError(f"input '{tensor.name}' has dynamic dimensions {list(tensor.shape)}; "
                         f"give its shape with --shape {tensor.name}=D0,D1,...")
    first = rows if tensor.shape[0] < 0 else tensor.shape[0]
    return (first, *rest)


def make_inputs(inputs: Sequence[TensorInfo], config: BenchConfig, variant: int
                ) -> dict[str, np.ndarray]:
    files = dict(config.input_files)
    shapes = dict(config.shapes)
    rng = np.random.default_rng(config.seed + variant)
    arrays = {}
    for t in inputs:
        if t.name in files:
            arrays[t.name] = np.load(files[t.name])
        else:
            shape = concrete_shape(t, config.batch_rows, shapes.get(t.name))
            arrays[t.name] = random_array(t.dtype, shape, rng)
    unknown = set(files) - {t.name for t in inputs}
    if unknown:
        raise ValueError(f"--input names {sorted(unknown)}, which the model does not take "
                         f"(inputs: {[t.name for t in inputs]})")
    return arrays


def encode_request(protocol: str, model: str, arrays: dict[str, np.ndarray],
                   dtypes: dict[str, str]) -> bytes:
    from service.tensors import encode

    if protocol == "v1":
        from service.gen.trtserve.v1 import inference_pb2 as pb

        v1 = pb.InferRequest(model=model)
        for name, a in arrays.items():
            v1.inputs.add(name=name, dtype=pb.DataType.Value(f"DATA_TYPE_{dtypes[name]}"),
                          shape=a.shape, data=encode(a))
        return v1.SerializeToString()
    from service.gen.inference import grpc_service_pb2 as kpb

    ks = kpb.ModelInferRequest(model_name=model)
    for name, a in arrays.items():
        ks.inputs.add(name=name, datatype=dtypes[name], shape=a.shape)
        ks.raw_input_contents.append(encode(a))
    return ks.SerializeToString()


def _channel_options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES)]


def _metadata(config: BenchConfig) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {config.token}"),) if config.token else None


def _sync_channel(config: BenchConfig) -> grpc.Channel:
    if config.tls or config.root_certificates:
        creds = grpc.ssl_channel_credentials(config.root_certificates)
        return grpc.secure_channel(config.url, creds, options=_channel_options())
    return grpc.insecure_channel(config.url, options=_channel_options())


def model_inputs(channel: grpc.Channel, config: BenchConfig) -> list[TensorInfo]:
    """The model's inputs from its metadata, over the protocol being measured."""
    md = _metadata(config)
    if config.protocol == "v1":
        from client.convert import dtype_label
        from service.gen.trtserve.v1 import inference_pb2 as pb
        from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

        v1 = pb_grpc.InferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(model=config.model), timeout=config.timeout_s, metadata=md)
        return [TensorInfo(t.name, dtype_label(t.dtype), tuple(t.shape)) for t in v1.inputs]
    from service.gen.inference import grpc_service_pb2 as kpb
    from service.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    ks = kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        kpb.ModelMetadataRequest(name=config.model), timeout=config.timeout_s, metadata=md)
    return [TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in ks.inputs]


def _check_answer(protocol: str, answer: bytes) -> int:
    """Number of outputs in one answer; the probe fails loudly on an empty one."""
    if protocol == "v1":
        from service.gen.trtserve.v1 import inference_pb2 as pb

        return len(pb.InferResponse.FromString(answer).outputs)
    from service.gen.inference import grpc_service_pb2 as kpb

    return len(kpb.ModelInferResponse.FromString(answer).outputs)


def _method(protocol: str) -> str:
    return V1_INFER if protocol == "v1" else KSERVE_INFER


def prepare(config: BenchConfig, variants: int = 8) -> list[bytes]:
    """Serialized requests to cycle through; one probe call checks they are accepted."""
    with _sync_channel(config) as channel:
        inputs = model_inputs(channel, config)
        dtypes = {t.name: t.dtype for t in inputs}
        payloads = [encode_request(config.protocol, config.model,
                                   make_inputs(inputs, config, i), dtypes)
                    for i in range(variants)]
        call = channel.unary_unary(_method(config.protocol), request_serializer=None,
                               response_deserializer=None)
        answer = call(payloads[0], timeout=config.timeout_s, metadata=_metadata(config))
        if _check_answer(config.protocol, answer) == 0:
            raise ValueError(f"model '{config.model}' answered the probe with no outputs")
    return payloads


def server_batches(config: BenchConfig) -> tuple[int, int] | None:
    """(batches, rows) so far from trtserve's Stats; None where the server has no Stats."""
    from service.gen.trtserve.v1 import inference_pb2 as pb
    from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    try:
        with _sync_channel(config) as channel:
            stats = pb_grpc.InferenceServiceStub(channel).Stats(
                pb.StatsRequest(model=config.model), timeout=5, metadata=_metadata(config))
    except grpc.RpcError:
        return None
    if not stats.models:
        return None
    return stats.models[0].batches, stats.models[0].inferences


# --- one client process ------------------------------------------------------------------


@dataclass
class _Window:
    start: float  # time.monotonic(), shared by every process on the machine
    warm_end: float
    end: float

    def inside(self, t: float) -> bool:
        return self.warm_end <= t <= self.end


class _Recorder:
    """What one process saw inside the window; progress goes to shared memory."""

    def __init__(self, window: _Window, progress: Any, slot: int) -> None:
        self.window = window
        self.latencies = array("d")
        self.lags = array("d")
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self._progress = progress
        self._slot = slot
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def done(self, due: float, finished: float, code: str | None) -> None:
        if not self.window.warm_end <= finished <= self.window.end:
            return
        if code is None:
            self.latencies.append(finished - due)
            self._progress[self._slot] += 1
        else:
            self.errors[code] += 1
            self._progress[self._slot + 1] += 1

    def mark_cpu(self, which: str) -> None:
        times = os.times()
        setattr(self, which, times.user + times.system)


Call = grpc.aio.UnaryUnaryMultiCallable


async def _one(call: Call, payload: bytes, timeout: float, metadata: Any) -> str | None:
    try:
        await call(payload, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return None


async def _closed(call: Call, payloads: list[bytes], level: Level, rec: _Recorder,
                  timeout: float, metadata: Any, first: int) -> None:
    end = rec.window.end
    n = len(payloads)

    async def stream(k: int) -> None:
        i = k
        while (sent := time.monotonic()) < end:
            code = await _one(call, payloads[i % n], timeout, metadata)
            rec.done(sent, time.monotonic(), code)
            i += 1

    await asyncio.gather(*(stream(first + k) for k in range(int(level.value))))


def _closed_sync(channel: grpc.Channel, protocol: str, payloads: list[bytes], rec: _Recorder,
                 timeout: float, metadata: Any, first: int) -> None:
    """One stream with gRPC's blocking client: cheaper per call than asyncio's."""
    call = channel.unary_unary(_method(protocol), request_serializer=None,
                               response_deserializer=None)
    end = rec.window.end
    n = len(payloads)
    i = first
    while (sent := time.monotonic()) < end:
        if rec.cpu_start is None and sent >= rec.window.warm_end:
            rec.mark_cpu("cpu_start")
        code = None
        try:
            call(payloads[i % n], timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code().name
        rec.done(sent, time.monotonic(), code)
        i += 1
    rec.mark_cpu("cpu_end")


class _Sleeper:
    """Sleeps until a time on the loop's clock to the microsecond, where Linux allows.

    asyncio.sleep rounds up to whole milliseconds in epoll, which would show
    up as send lag (and latency, counted from the due time) in open loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from service.timer import PreciseTimer

        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._timer = PreciseTimer.create(loop, self._fired)

    def _fired(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, when: float) -> None:
        if when <= self._loop.time():
            return
        if self._timer is None:
            await asyncio.sleep(when - self._loop.time())
            return
        self._waiter = self._loop.create_future()
        self._timer.arm(when)
        await self._waiter

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()


async def _open(call: Call, payloads: list[bytes], rate: float, rec: _Recorder,
                timeout: float, metadata: Any, max_outstanding: int, seed: int) -> None:
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    n = len(payloads)

    async def request(due: float, i: int) -> None:
        sent = time.monotonic()
        if rec.window.inside(sent):
            rec.lags.append(sent - due)
        code = await _one(call, payloads[i % n], timeout, metadata)
        rec.done(due, time.monotonic(), code)

    sleeper = _Sleeper(asyncio.get_running_loop())
    due, i = rec.window.start, 0
    try:
        while due < rec.window.end:
            now = time.monotonic()
            while due <= now and due < rec.window.end:
                if len(tasks) >= max_outstanding:
                    if rec.window.inside(due):
                        rec.dropped += 1
                else:
                    task = asyncio.create_task(request(due, i))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
                due += rng.expovariate(rate)
            if due < rec.window.end:
                await sleeper.until(due)
    finally:
        sleeper.close()
    if tasks:
        await asyncio.gather(*tasks)


def _aio_channel(config: BenchConfig) -> grpc.aio.Channel:
    if config.tls or config.root_certificates:
        creds = grpc.ssl_channel_credentials(config.root_certificates)
        return grpc.aio.secure_channel(config.url, creds, options=_channel_options())
    return grpc.aio.insecure_channel(config.url, options=_channel_options())


async def _run_level(channel: grpc.aio.Channel, config: BenchConfig, payloads: list[bytes],
                     level: Level, window: _Window, index: int, share: float,
                     progress: Any) -> dict[str, Any]:
    call = channel.unary_unary(_method(config.protocol), request_serializer=None,
                               response_deserializer=None)
    rec = _Recorder(window, progress, 2 * index)
    loop = asyncio.get_running_loop()
    loop.call_at(window.warm_end, rec.mark_cpu, "cpu_start")
    loop.call_at(window.end, rec.mark_cpu, "cpu_end")
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    metadata = _metadata(config)
    if share > 0:
        if level.mode == "closed":
            await _closed(call, payloads, Level("closed", share), rec, config.timeout_s,
                          metadata, first=index)
        else:
            await _open(call, payloads, share, rec, config.timeout_s, metadata,
                        config.max_outstanding, config.seed * 1000 + index)
    await asyncio.sleep(max(0.0, window.end - time.monotonic()) + 0.01)
    return _summary(rec)


def _summary(rec: _Recorder) -> dict[str, Any]:
    cpu = (rec.cpu_end or 0.0) - (rec.cpu_start or 0.0)
    window = rec.window
    return {"latencies": rec.latencies.tobytes(), "lags": rec.lags.tobytes(),
            "errors": dict(rec.errors), "dropped": rec.dropped,
            "cpu": cpu / (window.end - window.warm_end)}


def _run_sync_level(config: BenchConfig, payloads: list[bytes], window: _Window, index: int,
                    progress: Any) -> dict[str, Any]:
    """A single closed-loop stream on gRPC's blocking client (cheaper per call)."""
    rec = _Recorder(window, progress, 2 * index)
    with _sync_channel(config) as channel:
        grpc.channel_ready_future(channel).result(config.timeout_s)
        time.sleep(max(0.0, window.start - time.monotonic()))
        _closed_sync(channel, config.protocol, payloads, rec, config.timeout_s,
                     _metadata(config), index)
    time.sleep(max(0.0, window.end - time.monotonic()))
    if rec.cpu_end is None:
        rec.mark_cpu("cpu_end")
    return _summary(rec)


def _split(level: Level, processes: int, index: int) -> float:
    """This process's share of a level: whole streams for closed loop, a rate for open."""
    if level.mode == "open":
        return level.value / processes
    total = int(level.value)
    return total // processes + (1 if index < total % processes else 0)


def _child(config: BenchConfig, payloads: list[bytes], index: int, conn: Connection,
           progress: Any) -> None:
    """A client process: wait for a level and its window, run it, report, repeat."""

    async def main() -> None:
        conn.send(("ready", None))
        while (message := await asyncio.to_thread(conn.recv)) is not None:
            level, window = message
            share = _split(level, config.processes, index)
            # Channels per level, so a single-stream level runs with no asyncio
            # channel (and its polling) alive in the process.
            if level.mode == "closed" and share == 1:
                result = await asyncio.to_thread(_run_sync_level, config, payloads, window,
                                                 index, progress)
            else:
                channel = _aio_channel(config)
                try:
                    await channel.channel_ready()
                    result = await _run_level(channel, config, payloads, level, window, index,
                                              share, progress)
                finally:
                    await channel.close(None)
            conn.send(("result", result))

    try:
        asyncio.run(main())
    except BaseException as e:  # the parent reports it; a bare exit would hang it
        conn.send(("error", f"client process {index}: {type(e).__name__}: {e}"))
        raise


# --- the parent: levels, progress, merging ------------------------------------------------


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
    payloads = prepare(config)
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
    window = _Window(start, start + config.warmup_s, start + config.warmup_s + config.duration_s)
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


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "grpcio": grpc.__version__,
            "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", "")}


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = asdict(config)
    d["levels"] = [Level(**lv).label if isinstance(lv, dict) else lv.label
                   for lv in d["levels"]]
    d.pop("root_certificates", None)
    d["token"] = "***" if config.token else None
    return d


# --- output ------------------------------------------------------------------------------

COLUMNS = ("load", "req/s", "rows/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors",
           "client CPU", "batch")


def _row(r: LevelResult) -> list[str]:
    lat = r.latency_ms
    errors = ",".join(f"{k}:{v}" for k, v in r.errors.items()) or "0"
    if r.dropped:
        errors += f" dropped:{r.dropped}"
    cpu = "/".join(f"{c:.0%}" for c in r.client_cpu)
    return [f"{r.mode} {r.label}", f"{r.throughput_rps:.1f}", f"{r.rows_per_s:.1f}",
            f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p95']:.3f}", f"{lat['p99']:.3f}",
            errors, cpu + (" !" if r.client_bound else ""),
            f"{r.server_mean_batch:.1f}" if r.server_mean_batch is not None else "-"]


def table(report: BenchReport) -> str:
    c = report.config
    rows = [list(COLUMNS), *(_row(r) for r in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"model {c['model']} at {c['url']} over {c['protocol']}, "
             f"{c['batch_rows']} row(s) per request, {c['processes']} client process(es), "
             f"{c['warmup_s']:g}s warm-up + {c['duration_s']:g}s per level"]
    for row in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    lines.append("client CPU: CPU time of each client process over the window (100% = one "
                 f"core; this machine has {report.machine.get('cpus')}); batch: mean batch "
                 "size the server formed (trtserve Stats)")
    if any(r.client_bound for r in report.results):
        lines.append(f"! a client process was {CLIENT_BUSY:.0%}+ busy: the client may be the "
                     "bottleneck; try more --processes")
    if any(r.mode == "open" for r in report.results):
        lags = ", ".join(f"{r.label}: {r.send_lag_p99_ms:.2f} ms" for r in report.results
                         if r.mode == "open" and r.send_lag_p99_ms is not None)
        lines.append(f"open loop: latency counts from when a request was due; p99 send lag "
                     f"{lags}")
    return "\n".join(lines)


def to_json(report: BenchReport) -> str:
    return json.dumps({"config": report.config, "machine": report.machine,
                       "results": [asdict(r) for r in report.results]}, indent=2)


def to_csv(report: BenchReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["mode", "load", "processes", "window_s", "requests", "throughput_rps",
                     "rows_per_s", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms",
                     "errors", "dropped", "client_cpu_max", "client_cpu_sum",
                     "send_lag_p99_ms", "server_mean_batch"])
    for r in report.results:
        lat = r.latency_ms
        writer.writerow([
            r.mode, r.load, r.processes, r.window_s, r.requests, f"{r.throughput_rps:.3f}",
            f"{r.rows_per_s:.3f}", *(f"{lat[k]:.4f}" for k in
                                     ("mean", "p50", "p90", "p95", "p99", "max")),
            ";".join(f"{k}:{v}" for k, v in r.errors.items()), r.dropped,
            f"{max(r.client_cpu, default=0):.3f}", f"{sum(r.client_cpu):.3f}",
            "" if r.send_lag_p99_ms is None else f"{r.send_lag_p99_ms:.4f}",
            "" if r.server_mean_batch is None else f"{r.server_mean_batch:.3f}"])
    return out.getvalue()


# --- command line --------------------------------------------------------------------------


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers above 0, got {text!r}")
    return values


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure throughput and latency under load",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="HOST:PORT (default: the top-level --url, else 127.0.0.1:8001)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="v1",
                   help="trtserve.v1 Infer, or KServe v2 ModelInfer (Triton, PyTriton, trtserve)")
    p.add_argument("--concurrency", type=_numbers, metavar="N,N,...",
                   help="closed loop: requests kept outstanding, one level each "
                        "(default 1,8,64,256 when no --rate)")
    p.add_argument("--rate", type=_numbers, metavar="R,R,...",
                   help="open loop: Poisson arrivals at R requests/s, one level each")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the load (use more when one is busy)")
    p.add_argument("--batch-rows", type=int, default=1, help="rows per request")
    p.add_argument("--input", action="append", type=_named, default=[],
                   metavar="NAME=FILE.npy", help="an input from a .npy file; repeatable")
    p.add_argument("--shape", action="append", type=_named, default=[], metavar="NAME=D,D,...",
                   help="full shape of an input with dynamic non-batch dimensions")
    p.add_argument("--max-outstanding", type=int, default=10_000,
                   help="open loop: requests in flight per process at most")
    p.add_argument("--seed", type=int, default=0)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of the table")
    out.add_argument("--csv", action="store_true", help="print CSV instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    levels = [Level("closed", v) for v in (args.concurrency or ())]
    levels += [Level("open", v) for v in (args.rate or ())]
    if not levels:
        levels = [Level("closed", v) for v in (1, 8, 64, 256)]
    if any(lv.mode == "closed" and lv.value != int(lv.value) for lv in levels):
        raise ValueError("--concurrency takes whole numbers")
    token_file = getattr(args, "token_file", None)
    ca = getattr(args, "tls_ca", None)
    try:
        shapes = tuple((n, tuple(int(d) for d in v.split(","))) for n, v in args.shape)
    except ValueError:
        raise ValueError(f"--shape takes NAME=D,D,... with integers, got {args.shape}") from None
    return BenchConfig(
        url=getattr(args, "url", None) or "127.0.0.1:8001", model=args.model,
        levels=tuple(levels), protocol=args.protocol, duration_s=args.duration,
        warmup_s=args.warmup, processes=args.processes, batch_rows=args.batch_rows,
        input_files=tuple(args.input), shapes=shapes,
        timeout_s=getattr(args, "timeout", None) or 60.0,
        max_outstanding=args.max_outstanding, seed=args.seed,
        token=Path(token_file).read_text().strip() if token_file else None,
        tls=bool(getattr(args, "tls", False)),
        root_certificates=Path(ca).read_bytes() if ca else None)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        report = run(config, progress=not args.quiet)
    except ValueError as e:
        print(f"trtserve-client bench: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"trtserve-client bench: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"trtserve-client bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(to_json(report))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(table(report))
    return 0

"""GPU benchmark of trtserve's TensorRT execution path, with the GPU stand-in.

The stand-in (service/testing/gpu_standin.py) is a TEST DOUBLE of a TensorRT engine whose
execute_async_v3 launches a two-layer FP32 MLP as CuPy RawKernels on the worker's
stream. Everything around it is the real thing: TrtExecutor, CudaRuntime, CUDA
graphs, the batcher, the scheduler and the gRPC server. EVERY NUMBER HERE IS
MEASURED WITH THE STAND-IN, NOT TENSORRT.

    python -m benchmarks.gpu_standin [--output docs/benchmarks-gpu.md]

Sections (sized to finish in a few minutes on one GPU):
  1. CPU cost of one launch: CUDA graph launch vs plain execute_async_v3, batch 1 and 64;
     and the executor's whole batch (gather, H2D, launch, D2H, wait) at both.
  2. In-process throughput with 1, 2 and 4 workers (threads, own streams), small batches.
  3. Served throughput (gRPC, dynamic batching, 256 concurrent clients in client
     processes) over raw in-process throughput at the served mean batch size.
  4. p50/p99 latency at a fixed request rate (open loop).

The load of sections 3 and 4 is `trtserve-client bench`'s (client/bench/load.py), run in
this module's client processes so that the server's counters and event-loop CPU can be
read at the measured window's edges:
  3. closed_loop: 256 requests always in flight; a request counts when it is answered
     inside the measured window, its latency from its send.
  4. open_loop with even arrivals (exactly 1/rate apart, the client processes interleaved)
     and no cap on requests in flight; latency from each request's scheduled send time,
     every answer counted however late.
What changed when the load moved there (the measurements mean what they meant): section 3
counts the requests answered inside the window (before: those both sent and answered
inside it, which left out the few in flight at its start) and the errors inside it (before:
over the whole run); requests go out as bytes serialized once (before: per call), so the
client processes spend a little less CPU per request.
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on (GRPC_EXPERIMENTS= for gRPC's own).
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
import datetime
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.placement import ANYWHERE, Placement
from trtserve.client.bench.channels import V1_INFER
from trtserve.client.bench.load import Call, closed_loop, open_loop
from trtserve.client.bench.recorder import Recorder, Window, even_arrivals
from trtserve.client.channels import Endpoint

LABEL = "stand-in, not TensorRT"
FEATURES_IN = "input"
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Dims:
    in_features: int
    hidden: int
    out_features: int

    @classmethod
    def parse(cls, text: str) -> Dims:
        a, b, c = (int(v) for v in text.split(":"))
        return cls(a, b, c)

    def __str__(self) -> str:
        return f"{self.in_features}->{self.hidden}->{self.out_features}"


# --- helpers ----------------------------------------------------------------------------------


def _engine(dims: Dims, **options: Any) -> Any:
    from trtserve.service.testing.gpu_standin import StandinEngine

    return StandinEngine(dims.in_features, dims.hidden, dims.out_features, **options)


# The light stand-in of section 3 and the frontends rows, and its profile of 1-64 rows.
LIGHT = Dims(512, 2048, 512)
LIGHT_BATCH = (1, 32, 64)


def light_engine(dims: Dims = LIGHT) -> Any:
    """The light stand-in engine (close it when done)."""
    return _engine(dims, batch=LIGHT_BATCH)


# The GPU-bound stand-in of section 3 (8.6 GFLOP a row): the GPU, not the serving path,
# sets the pace, so served/raw shows what serving loses of the GPU's time.
HEAVY = Dims(4096, 524288, 4096)


def heavy_engine(dims: Dims = HEAVY) -> Any:
    """The GPU-bound stand-in engine, weights on the GPU only (close it when done)."""
    return _engine(dims, batch=(1, 32, 64), host_weights=False)


def _executor(engine: Any, cuda: Any, **options: Any) -> Any:
    from trtserve.service.backends.tensorrt.executor import TrtExecutor
    from trtserve.service.backends.tensorrt.load import graph_buckets
    from trtserve.service.testing.trt_double import trt_module

    options.setdefault("graph_batch_sizes", graph_buckets((), engine.batch[2]))
    return TrtExecutor(engine, cuda, trt_module=trt_module, **options)


def _rows(rows: int, features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def _median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


# --- 1. CPU cost of a launch ------------------------------------------------------------------


def launch_cost(engine: Any, cuda: Any, rows: int, launches: int = 2000,
                chunk: int = 25) -> dict[str, float]:
    """Host time of one plain execute_async_v3 vs one cudaGraphLaunch of the same work."""
    from trtserve.service.testing.trt_double import ExecutionContextAllocationStrategy

    stream = cuda.stream_create()
    event = cuda.event_create()
    memory_size = engine.get_device_memory_size_for_profile_v2(0)
    buffers = [cuda.malloc(engine.batch[2] * engine.in_features * 4),
               cuda.malloc(engine.batch[2] * engine.out_features * 4),
               cuda.malloc(memory_size)]
    context = engine.create_execution_context(
        ExecutionContextAllocationStrategy.USER_MANAGED)
    graph = graph_exec = None
    try:
        context.set_device_memory(buffers[2], memory_size)
        assert context.set_optimization_profile_async(0, stream)
        assert context.set_input_shape("input", (rows, engine.in_features))
        assert context.set_tensor_address("input", buffers[0])
        assert context.set_tensor_address("output", buffers[1])
        cuda.memset_async(buffers[0], 0, engine.batch[2] * engine.in_features * 4, stream)
        assert context.execute_async_v3(stream)  # warm-up after the shape change
        cuda.begin_capture(stream)
        assert context.execute_async_v3(stream)
        graph = cuda.end_capture(stream)
        graph_exec = cuda.graph_instantiate(graph)

        def timed(launch: Callable[[], object]) -> list[int]:
            samples = []
            for i in range(launches):
                t0 = time.perf_counter_ns()
                launch()
                samples.append(time.perf_counter_ns() - t0)
                if i % chunk == chunk - 1:  # keep the launch queue short; not timed
                    cuda.event_record(event, stream)
                    cuda.event_synchronize(event)
            return samples

        for _ in range(2):  # warm both paths, then measure
            plain = timed(lambda: context.execute_async_v3(stream))
            graphed = timed(lambda: cuda.graph_launch(graph_exec, stream))
        cuda.event_record(event, stream)
        cuda.event_synchronize(event)
        return {"plain_us": _median_us(plain), "graph_us": _median_us(graphed)}
    finally:
        if graph_exec is not None:
            cuda.graph_exec_destroy(graph_exec)
        if graph is not None:
            cuda.graph_destroy(graph)
        cuda.stream_synchronize(stream)
        for ptr in buffers:
            cuda.free(ptr)
        cuda.event_destroy(event)
        cuda.stream_destroy(stream)


def batch_cost(engine: Any, cuda: Any, rows: int, cuda_graphs: bool, graph_io: bool = True,
               batches: int = 300) -> dict[str, float]:
    """The executor's whole batch: wall time per run() and GPU compute time (events)."""
    ex = _executor(engine, cuda, cuda_graphs=cuda_graphs, graph_io=graph_io)
    try:
        x = _rows(rows, engine.in_features)
        for _ in range(20):
            ex.run({FEATURES_IN: [x]}, rows)
        walls, computes = [], []
        for _ in range(batches):
            t0 = time.perf_counter_ns()
            result = ex.run({FEATURES_IN: [x]}, rows)
            walls.append(time.perf_counter_ns() - t0)
            computes.append(result.compute_s)
        return {"wall_us": _median_us(walls), "gpu_us": statistics.median(computes) * 1e6}
    finally:
        ex.close()


# --- 2. in-process throughput -----------------------------------------------------------------


def raw_throughput(engine: Any, cuda: Any, workers: int, rows: int,
                   seconds: float = 2.0, graph_io: bool = True) -> dict[str, float]:
    """Rows/s of `workers` executors, each driven by its own thread on its own stream."""
    ready = threading.Barrier(workers + 1)
    counts = [0] * workers
    errors: list[BaseException] = []
    stop_at = [0.0]

    def drive(index: int) -> None:
        try:
            ex = _executor(engine, cuda, profile=index % engine.num_optimization_profiles,
                           graph_io=graph_io)
        except BaseException as err:
            errors.append(err)
            ready.abort()
            return
        try:
            x = _rows(rows, engine.in_features, index)
            for _ in range(5):  # capture and warm up
                ex.run({FEATURES_IN: [x]}, rows)
            ready.wait()
            done = 0
            while time.monotonic() < stop_at[0]:
                ex.run({FEATURES_IN: [x]}, rows)
                done += 1
            counts[index] = done
        except BaseException as err:
            errors.append(err)
        finally:
            ex.close()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + 3600
    with suppress(threading.BrokenBarrierError):  # a worker failed: reported below
        ready.wait()
    start = time.monotonic()
    stop_at[0] = start + seconds
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - start
    return {"rows_per_s": sum(counts) * rows / elapsed,
            "batches_per_s": sum(counts) / elapsed}


# --- 3 and 4. served --------------------------------------------------------------------------


def _request_bytes(model: str, rows: int, features: int) -> bytes:
    from trtserve.client.convert import infer_request

    return infer_request(model, {FEATURES_IN: _rows(rows, features)}).SerializeToString()


@dataclass(frozen=True)
class ClosedLoad:
    """`concurrency` requests always in flight until the window ends (load.closed_loop)."""

    concurrency: int

    async def __call__(self, call: Call | list[Call], payloads: list[bytes],
                       rec: Recorder) -> None:
        await closed_loop(call, payloads, self.concurrency, rec, REQUEST_TIMEOUT_S)


@dataclass(frozen=True)
class EvenOpenLoad:
    """Requests exactly 1/rate_per_s apart from `start` for `seconds`, none held back
    (load.open_loop with even arrivals and no cap on requests in flight)."""

    rate_per_s: float
    start: float  # time.monotonic()
    seconds: float

    async def __call__(self, call: Call | list[Call], payloads: list[bytes],
                       rec: Recorder) -> None:
        due_times = even_arrivals(self.start, self.start + self.seconds, self.rate_per_s)
        await open_loop(call, payloads, due_times, rec, REQUEST_TIMEOUT_S, max_outstanding=None)


def _client_process(url: str, request: bytes, load: ClosedLoad | EvenOpenLoad, window: Window,
                    results: Any, connections: int = 1) -> None:
    """One client process: `load` over `connections` gRPC connections, counted by a
    Recorder over `window`; puts (requests an open loop sent, latencies in s, errors by
    status code, this process's CPU over the measured window / its length) on `results`."""
    async def main() -> tuple[int, list[float], dict[str, int], float]:
        endpoint = Endpoint(url)
        channels = [endpoint.aio_channel(own_connection=connections > 1)
                    for _ in range(connections)]
        try:
            calls = [c.unary_unary(V1_INFER, request_serializer=None,
                                   response_deserializer=None) for c in channels]
            rec = Recorder(window, [0, 0], 0)
            loop = asyncio.get_running_loop()
            loop.call_at(window.warm_end, rec.mark_cpu, "cpu_start")
            loop.call_at(window.end, rec.mark_cpu, "cpu_end")
            await asyncio.sleep(max(0.0, window.start - time.monotonic()))
            await load(calls, [request], rec)
            ended = min(time.monotonic(), window.end)
            if rec.cpu_end is None:  # the load finished before the window did
                rec.mark_cpu("cpu_end")
            span = ended - window.warm_end
            cpu = ((rec.cpu_end or 0.0) - (rec.cpu_start or 0.0)) / span if span > 0 else 0.0
            # An open loop logs each send's lag: their count is the requests sent.
            return len(rec.lags), rec.latencies.tolist(), dict(rec.errors), cpu
        finally:
            for c in channels:
                await c.close(None)

    results.put(asyncio.run(main()))


@contextmanager
def _served(engine: Any, workers: int, max_queue_delay_us: int,
            inline_below_us: int | None = None, frontends: int = 1,
            server_options: Mapping[str, Any] | None = None) -> Iterator[Any]:
    from trtserve.service.testing.gpu_standin import serving_standin, standin_config

    options: dict[str, Any] = {} if inline_below_us is None else \
        {"inline_below_us": inline_below_us}
    config = standin_config(workers=workers, max_queue_delay_us=max_queue_delay_us,
                            max_queue_size=65536, **options)
    with serving_standin(engine, config, stats_window_s=60, frontends=frontends,
                         server_options=server_options) as server:
        yield server


def _errors(outcomes: list[Any]) -> float:
    """The client processes' failed requests; which status codes, on stderr, since a
    count alone cannot tell a refused request from a lost one."""
    codes: Counter[str] = Counter()
    for o in outcomes:
        codes.update(o[2])
    if codes:
        print(f"failed requests by status code: {dict(codes)}", file=sys.stderr, flush=True)
    return float(sum(codes.values()))


def _stats(url: str) -> Any:
    return _server_stats(url).models[0]


def _server_stats(url: str) -> Any:
    from trtserve.client.client import Client

    with Client(url) as c:
        return c.stats("standin")


async def _thread_ident() -> int:
    return threading.get_ident()


def _thread_cpu_s(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def _host_busy_s() -> float:
    """CPU seconds the whole host has spent busy since boot (every core, user, system
    and interrupts: /proc/stat's first line less idle and iowait); 0.0 without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def frontend_spread(before: Sequence[Any], after: Sequence[Any], seconds: float
                    ) -> dict[str, float]:
    """How a window's load spread over the frontend processes, from two Stats'
    `frontends` rows (FrontendStats, by index): the busiest and the idlest frontend's
    share of the requests (1/N each when even; the kernel spreads connections, not
    requests) and their CPU over the window (1.0: a core), with all the frontends' CPU;
    and the requests a frame to the engine carried, over all of them (more while frames
    are held for a backlog). No frontends (one process): shares 1.0, CPU 0, requests
    per frame 0."""
    served = [a.requests - b.requests for a, b in zip(after, before, strict=True)]
    cpu = [(a.cpu_seconds - b.cpu_seconds) / seconds for a, b in zip(after, before, strict=True)]
    frames = sum(a.request_frames - b.request_frames for a, b in zip(after, before, strict=True))
    total = sum(served)
    return {
        "frontend_share_min": min(served) / total if total else 1.0,
        "frontend_share_max": max(served) / total if total else 1.0,
        "frontend_cpu_min": min(cpu, default=0.0),
        "frontend_cpu_max": max(cpu, default=0.0),
        "frontend_cores": sum(cpu),
        "requests_per_frame": total / frames if frames else 0.0,
    }


def where_waiting(url: str, until: float, every_s: float = 0.2,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, float]:
    """Where a closed loop's requests wait, from Stats read every `every_s` until `clock()`
    reaches `until`: the medians of the requests the frontends have passed to the
    engine and not had answered (the rest of the clients' are in the clients, gRPC and
    the frontends themselves), of the requests queued in the model's batcher (a group
    counts once), and of its batches in flight on workers (dispatched, not yet
    settled by the engine's loop). One process has no frontends: `at_engine` is 0."""
    at_engine, queued, batches = [], [], []
    while clock() < until:
        stats = _server_stats(url)
        model = stats.models[0]
        at_engine.append(sum(f.in_flight for f in stats.frontends))
        queued.append(model.queue_depth)
        batches.append(model.in_flight_batches)
        time.sleep(every_s)
    if not queued:
        return {"at_engine": 0.0, "queue_depth": 0.0, "batches_in_flight": 0.0}
    return {"at_engine": statistics.median(at_engine),
            "queue_depth": statistics.median(queued),
            "batches_in_flight": statistics.median(batches)}


def served_throughput(engine: Any, workers: int, clients: int, processes: int,
                      seconds: float, warmup_s: float = 1.5, max_queue_delay_us: int = 0,
                      rows_per_request: int = 1,
                      switch_interval_s: float | None = None,
                      inline_below_us: int | None = None,
                      frontends: int = 1, connections: int = 1,
                      server_options: Mapping[str, Any] | None = None,
                      placement: Placement = ANYWHERE) -> dict[str, float]:
    """Section 3's run; `connections`: gRPC connections per client process (with
    frontends > 1 the kernel spreads connections, not requests, over the frontends);
    `server_options`: ServerConfig fields to set (`serving_standin`); `placement`:
    where the processes run (benchmarks/placement.py; default: where the kernel puts
    them)."""
    context = multiprocessing.get_context("spawn")
    request = _request_bytes("standin", rows_per_request, engine.in_features)
    default_switch = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    try:
        return _served_run(engine, workers, clients, processes, seconds, warmup_s,
                           max_queue_delay_us, request, rows_per_request, context,
                           inline_below_us, frontends, connections,
                           {**(server_options or {}), **placement.server_options()},
                           placement)
    finally:
        sys.setswitchinterval(default_switch)
        placement.restore()  # the server pinned this process's threads to the engine's


def _served_run(engine: Any, workers: int, clients: int, processes: int, seconds: float,
                warmup_s: float, max_queue_delay_us: int, request: bytes,
                rows_per_request: int, context: Any,
                inline_below_us: int | None = None, frontends: int = 1,
                connections: int = 1, server_options: Mapping[str, Any] | None = None,
                placement: Placement = ANYWHERE) -> dict[str, float]:
    with _served(engine, workers, max_queue_delay_us, inline_below_us, frontends,
                 server_options) as server:
        loop_thread = server.call(_thread_ident())
        for frontend in _server_stats(server.url).frontends:
            placement.frontend(frontend.pid)
        # Warm every worker's graphs before the clock starts.
        from trtserve.client.client import Client

        with Client(server.url) as c:
            for rows in (1, 2, 4, 8, 16, 32, 64):
                c.infer("standin", {FEATURES_IN: _rows(rows, engine.in_features)})
        results = context.Queue()
        start_at = time.monotonic() + 4.0  # spawned processes need time to import
        measure_from, stop_at = start_at + warmup_s, start_at + warmup_s + seconds
        window = Window(start_at, measure_from, stop_at)
        procs = [context.Process(target=_client_process,
                                 args=(server.url, request, ClosedLoad(clients // processes),
                                       window, results, connections))
                 for _ in range(processes)]
        for p in procs:
            p.start()
            placement.client(p.pid)
        time.sleep(max(0.0, measure_from - time.monotonic()))
        before_all = _server_stats(server.url)
        loop_cpu, engine_cpu, host_cpu = (_thread_cpu_s(loop_thread), time.process_time(),
                                          _host_busy_s())
        # Stats' reads cost the engine's loop a few hundred microseconds every 0.2 s.
        waiting = where_waiting(server.url, stop_at)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        loop_cpu = _thread_cpu_s(loop_thread) - loop_cpu
        engine_cpu, host_cpu = time.process_time() - engine_cpu, _host_busy_s() - host_cpu
        after_all = _server_stats(server.url)
        before, after = before_all.models[0], after_all.models[0]
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    completed = sum(len(o[1]) for o in outcomes)
    latencies = sorted(v for o in outcomes for v in o[1])
    batches = after.batches - before.batches
    rows = after.inferences - before.inferences
    busy = after.busy_seconds - before.busy_seconds
    return {
        "client_cpu_max": max(o[3] for o in outcomes),
        **frontend_spread(before_all.frontends, after_all.frontends, seconds),
        # Where the host's cores went over the window, in cores (1.0: one busy core):
        # the whole host, then the client processes, the frontends (frontend_spread's
        # frontend_cores) and the engine's process (this one: its main thread only
        # reads Stats meanwhile, a few milliseconds every 0.2 s).
        "host_cores": host_cpu / seconds,
        "client_cores": sum(o[3] for o in outcomes),
        "engine_cores": engine_cpu / seconds,
        **waiting,
        "queue_time_p50_ms": after.queue_time.p50_us / 1e3,
        "rows_per_s": completed * rows_per_request / seconds,
        "requests_per_s": completed / seconds,
        "loop_cpu": loop_cpu / seconds,
        "mean_batch": rows / batches if batches else 0.0,
        "gpu_busy_per_worker": busy / seconds / workers,
        "p50_ms": latencies[len(latencies) // 2] * 1e3 if latencies else 0.0,
        "errors": _errors(outcomes),
        "graph_share": (after.graph_launches - before.graph_launches) / batches if batches
        else 0.0,
    }


def fixed_rate_latency(engine: Any, workers: int, rate: float, processes: int,
                       seconds: float, max_queue_delay_us: int = 0) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    request = _request_bytes("standin", 1, engine.in_features)
    with _served(engine, workers, max_queue_delay_us) as server:
        from trtserve.client.client import Client

        with Client(server.url) as c:
            for rows in (1, 2, 4, 8, 16, 32, 64):
                c.infer("standin", {FEATURES_IN: _rows(rows, engine.in_features)})
        results = context.Queue()
        start_at = time.monotonic() + 4.0
        procs = []
        for i in range(processes):
            start = start_at + 0.5 * i / rate  # the processes' arrivals interleave
            # Every answer counts, however late: the window runs past the last
            # request's timeout.
            window = Window(start, start, start + seconds + REQUEST_TIMEOUT_S + 1)
            load = EvenOpenLoad(rate / processes, start, seconds)
            procs.append(context.Process(target=_client_process,
                                         args=(server.url, request, load, window, results)))
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(30)
        stats = _stats(server.url)
    latencies = np.array([v for o in outcomes for v in o[1]]) * 1e3
    sent = sum(o[0] for o in outcomes)
    return {
        "rate": rate,
        "sent": float(sent),
        "answered": float(len(latencies)),
        "errors": _errors(outcomes),
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else 0.0,
        "mean_batch": stats.mean_batch_size,
    }


# --- the report -------------------------------------------------------------------------------


def _device(cuda: Any) -> str:
    from trtserve.service.backends.tensorrt.cuda import runtime_module

    rt = runtime_module()
    err, driver = rt.cudaDriverGetVersion()
    version = f"{driver // 1000}.{driver % 1000 // 10}" if err == rt.cudaError_t.cudaSuccess \
        else "?"
    return f"{cuda.device_name()} (CUDA driver API {version})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-gpu.md"))
    parser.add_argument("--light", type=Dims.parse, default=LIGHT,
                        metavar="IN:HIDDEN:OUT", help="the stand-in MLP for most sections")
    parser.add_argument("--heavy", type=Dims.parse, default=HEAVY,
                        metavar="IN:HIDDEN:OUT",
                        help="a stand-in heavy enough that the GPU, not the frontend, limits "
                        "served throughput (section 3)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per served run")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--client-processes", type=int, default=8)
    parser.add_argument("--connections", type=int, default=4,
                        help="gRPC connections per client process in section 3 (frontends "
                             "are spread over by connection)")
    parser.add_argument("--serve-workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s for section 4")
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    parser.add_argument("--frontends", default="8",
                        help="comma-separated frontend process counts for the `frontends = N` "
                             "rows of section 3 (one engine process; docs/processes.md); "
                             "'' for none")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0

    from trtserve.service.backends.tensorrt.cuda import CudaRuntime

    cuda = CudaRuntime(0)
    cuda.set_device()
    device = _device(cuda)
    started = time.monotonic()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    light = light_engine(args.light)
    try:
        say(f"## 1. CPU cost per batch: CUDA graph launch vs plain enqueue ({LABEL})")
        say()
        say(f"Stand-in MLP {args.light} FP32. Launch = host time of one call, median of 2000. "
            "Batch = TrtExecutor.run() wall time (gather, H2D, launch, D2H, event wait), "
            "median of 300; GPU = its compute time from CUDA events.")
        say()
        say("| batch | plain execute_async_v3 (us) | graph launch (us) | plain / graph "
            "| run() plain (us) | run() graph, copies outside (us) | run() graph with copies "
            "(us) | GPU compute (us) |")
        say("|---:|---:|---:|---:|---:|---:|---:|---:|")
        section1 = {}
        for rows in (1, 64):
            launch = launch_cost(light, cuda, rows)
            plain = batch_cost(light, cuda, rows, cuda_graphs=False)
            outside = batch_cost(light, cuda, rows, cuda_graphs=True, graph_io=False)
            graphed = batch_cost(light, cuda, rows, cuda_graphs=True)
            section1[rows] = launch
            say(f"| {rows} | {launch['plain_us']:.1f} | {launch['graph_us']:.1f} | "
                f"{launch['plain_us'] / launch['graph_us']:.1f}x | {plain['wall_us']:.0f} | "
                f"{outside['wall_us']:.0f} | {graphed['wall_us']:.0f} | "
                f"{graphed['gpu_us']:.0f} |")
        ratio = section1[1]["plain_us"] / section1[1]["graph_us"]
        say()
        say(f"Target: graph launch >= 3x cheaper than plain enqueue at batch 1: "
            f"{'met' if ratio >= 3 else 'MISSED'} ({ratio:.1f}x).")
        say()

        say(f"## 2. Throughput with 1, 2 and 4 workers, small batches ({LABEL})")
        say()
        say("Each worker: its own thread, TrtExecutor, non-blocking stream and CUDA graphs, "
            "in one process (no gRPC). Rows/s over 2 s.")
        say()
        say("| batch | 1 worker (rows/s) | 2 workers | 4 workers | 2w / 1w | 4w / 1w |")
        say("|---:|---:|---:|---:|---:|---:|")
        scaling_ok = True
        for rows in (1, 8, 64):
            rates = {w: raw_throughput(light, cuda, w, rows)["rows_per_s"] for w in (1, 2, 4)}
            if rows <= 8:
                scaling_ok &= rates[2] > rates[1] and rates[4] > rates[1]
            say(f"| {rows} | {rates[1]:,.0f} | {rates[2]:,.0f} | {rates[4]:,.0f} | "
                f"{rates[2] / rates[1]:.2f} | {rates[4] / rates[1]:.2f} |")
        rates = {w: raw_throughput(light, cuda, w, 1, graph_io=False)["rows_per_s"]
                 for w in (1, 2, 4)}
        say(f"| 1, copies outside the graph | {rates[1]:,.0f} | {rates[2]:,.0f} | "
            f"{rates[4]:,.0f} | {rates[2] / rates[1]:.2f} | {rates[4] / rates[1]:.2f} |")
        say()
        say(f"Target: 2 and 4 workers above one worker's throughput for small batches "
            f"(1 and 8): {'met' if scaling_ok else 'MISSED'}.")
        say()

        say(f"## 3. Served over raw throughput at saturation ({LABEL})")
        say()
        say(f"gRPC Infer (trtserve.v1, unary), {args.clients} concurrent clients in "
            f"{args.client_processes} client processes on the same machine "
            f"({args.connections} gRPC connections each), "
            f"{args.serve_workers} workers, dynamic batching (max batch 64, max queue delay "
            f"0 us, the default), {args.seconds:g} s measured. Raw = the same number of in-process "
            "workers (no gRPC) at the served mean batch size. Event-loop thread CPU = CPU "
            "time of the server's one asyncio thread over wall time. GPU busy = Stats' busy "
            f"seconds per worker over wall time. The GPU-bound stand-in ({args.heavy}, "
            f"{2 * 2 * args.heavy.in_features * args.heavy.hidden / 1e9:.1f} GFLOP per row) is "
            "sized so the GPU, not the frontend, limits throughput. A light batch is quick "
            "(under `inline_below_us`, 100 us of GPU time), so it waits for the quick batch "
            "in flight rather than taking a second worker; the `inline_below_us 0` row "
            "spreads every batch over the idle workers instead, as before that rule. "
            "Client CPU = the busiest client process's CPU over the window (1 = a core: "
            "above 0.85 the clients, not the server, may be the limit). Frontend share = "
            "the least and the most busy frontend process's part of the requests (the "
            "kernel spreads connections over them, not requests; 1/N each when even). "
            "Host cores = the whole host's busy CPU over the window (from /proc/stat, in "
            "cores), then the client processes', the frontends' and the engine process's "
            "own: what is left of the host's cores shows whether the host itself is the "
            "limit. At engine / queued / batches in flight = medians of Stats read every "
            "0.2 s: the clients' requests the frontends have passed to the engine and not "
            "had answered (the rest wait in the clients, gRPC or the frontends), those "
            "queued in the batcher (a group once), and batches on workers.")
        say()
        say("| stand-in MLP | rows / request | served (rows/s) | requests/s | event-loop "
            "thread CPU | mean batch | GPU busy / worker | raw at that batch (rows/s) "
            "| served / raw | client CPU (max) | frontend share (min-max) "
            "| frontend CPU (min-max) | host cores: all (clients / frontends / engine) "
            "| at engine / queued / batches in flight |")
        say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ratios = {}
        counts = [int(n) for n in args.frontends.split(",") if n.strip()]
        runs = [("light", args.light, 1, None, None, 1), ("light", args.light, 8, None, None, 1),
                ("light, inline_below_us 0", args.light, 1, None, 0, 1),
                ("light, inline_below_us 0", args.light, 8, None, 0, 1),
                ("light, GIL switch interval 0.5 ms", args.light, 1, 0.0005, None, 1),
                *((f"light, frontends {n}", args.light, rows, None, None, n)
                  for n in counts for rows in (1, 8)),
                ("GPU-bound", args.heavy, 1, None, None, 1),
                *((f"GPU-bound, frontends {n}", args.heavy, 1, None, None, n) for n in counts)]
        heavy = None
        served_runs: dict[tuple[str, int], dict[str, float]] = {}
        try:
            for name, dims, per_request, switch, inline_below_us, frontends in runs:
                if dims == args.heavy:
                    heavy = heavy_engine(dims)
                    engine = heavy
                else:
                    engine = light
                served = served_throughput(engine, args.serve_workers, args.clients,
                                           args.client_processes, args.seconds,
                                           rows_per_request=per_request,
                                           switch_interval_s=switch,
                                           inline_below_us=inline_below_us,
                                           frontends=frontends,
                                           connections=args.connections)
                served_runs[(name, per_request)] = served
                batch = max(1, round(served["mean_batch"]))
                raw = raw_throughput(engine, cuda, args.serve_workers, batch)
                ratio = served["rows_per_s"] / raw["rows_per_s"]
                ratios[(name, per_request)] = ratio
                say(f"| {name} {dims} | {per_request} | {served['rows_per_s']:,.0f} | "
                    f"{served['requests_per_s']:,.0f} | {served['loop_cpu']:.0%} | "
                    f"{served['mean_batch']:.1f} | {served['gpu_busy_per_worker']:.0%} | "
                    f"{raw['rows_per_s']:,.0f} | {ratio:.2f} | {served['client_cpu_max']:.2f} | "
                    + (f"{served['frontend_share_min']:.0%}-{served['frontend_share_max']:.0%} | "
                       f"{served['frontend_cpu_min']:.2f}-{served['frontend_cpu_max']:.2f} |"
                       if frontends > 1 else "- | - |")
                    + f" {served['host_cores']:.1f} ({served['client_cores']:.1f} / "
                      f"{served['frontend_cores']:.1f} / {served['engine_cores']:.1f}) | "
                      f"{served['at_engine']:.0f} / {served['queue_depth']:.0f} / "
                      f"{served['batches_in_flight']:.1f} |")
                if served["errors"]:
                    say(f"  ({served['errors']:.0f} requests failed)")
        finally:
            if heavy is not None:
                heavy.close()
        say()
        light_ratio = ratios.get(("light", 1), 0.0)
        heavy_ratio = ratios.get(("GPU-bound", 1), 0.0)
        say(f"Target: served / raw >= 0.9 at saturation: light (1 row per request) "
            f"{'met' if light_ratio >= 0.9 else 'MISSED'} ({light_ratio:.2f}); GPU-bound "
            f"{'met' if heavy_ratio >= 0.9 else 'MISSED'} ({heavy_ratio:.2f}).")
        for n in counts:
            one, many = served_runs.get(("light", 1)), served_runs.get((f"light, frontends {n}", 1))
            one8 = served_runs.get(("light", 8))
            many8 = served_runs.get((f"light, frontends {n}", 8))
            if not (one and many and one8 and many8):
                continue
            gain = many["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else 0
            gain8 = many8["rows_per_s"] / one8["rows_per_s"] if one8["rows_per_s"] else 0
            ratio_n = ratios.get((f"light, frontends {n}", 1), 0.0)
            heavy_n = ratios.get((f"GPU-bound, frontends {n}", 1), 0.0)
            say(f"Targets with frontends = {n} (issue 18; one engine process, the same run): "
                f"light, 1 row: requests/s {gain:.2f}x of one process "
                f"({'met' if gain >= 8 else 'MISSED'}: 8x), served/raw {ratio_n:.2f} "
                f"({'met' if ratio_n >= 0.5 else 'MISSED'}: 0.5); light, 8 rows: rows/s "
                f"{gain8:.2f}x ({'met' if gain8 >= 5 else 'MISSED'}: 5x); GPU-bound served/raw "
                f"{heavy_n:.2f} ({'met' if heavy_n >= 0.9 else 'MISSED'}: 0.9).")
        say()

        say(f"## 4. Latency at a fixed request rate ({LABEL})")
        say()
        latency = fixed_rate_latency(light, args.serve_workers, args.rate, 4, args.seconds)
        say(f"Open loop: {args.rate:g} requests/s of 1 row for {args.seconds:g} s from 4 client "
            f"processes, stand-in MLP {args.light}, {args.serve_workers} workers; latency from "
            "each request's scheduled send time to its answer.")
        say()
        say("| rate (req/s) | sent | answered | errors | p50 (ms) | p99 (ms) | mean batch |")
        say("|---:|---:|---:|---:|---:|---:|---:|")
        say(f"| {latency['rate']:g} | {latency['sent']:.0f} | {latency['answered']:.0f} | "
            f"{latency['errors']:.0f} | {latency['p50_ms']:.2f} | {latency['p99_ms']:.2f} | "
            f"{latency['mean_batch']:.1f} |")
        say()
    finally:
        light.close()

    command = " ".join(["python", "-m", "benchmarks.gpu_standin",
                        *(argv if argv is not None else sys.argv[1:])])
    header = [
        "# GPU benchmark: the TensorRT execution path with the GPU stand-in",
        "",
        "**Every figure on this page was measured with the GPU stand-in, not TensorRT.** "
        "The stand-in (service/testing/gpu_standin.py) is a test double of a TensorRT engine whose "
        "execute_async_v3 launches a two-layer FP32 MLP as CuPy RawKernels on the worker's "
        "stream; everything around it is trtserve's own code (TrtExecutor, CudaRuntime, CUDA "
        "graphs, batcher, scheduler, gRPC server). How to run it and read it: docs/gpu.md.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- device: {device}",
        f"- host: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "- gRPC: server and clients with "
        f"`GRPC_EXPERIMENTS={os.environ.get('GRPC_EXPERIMENTS', '')}` "
        "(service/grpc_tuning.py); the server on its default event loop (uvloop)",
        f"- wall time of the whole run: {time.monotonic() - started:.0f} s",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(header + lines) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

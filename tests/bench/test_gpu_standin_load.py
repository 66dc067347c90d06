"""benchmarks/gpu_standin.py's CPU side: its load (client/bench/load.py's loops) and its
client process, against a trivial async target and a real server of the example model.

The benchmark itself needs a GPU; these check what it sends and counts, never how fast.
"""

import asyncio
import pickle
import queue
import time

import numpy as np
import pytest

from benchmarks.gpu_standin import (
    REQUEST_TIMEOUT_S,
    ClosedLoad,
    EvenOpenLoad,
    _client_process,
    _errors,
    _host_busy_s,
    frontend_spread,
    where_waiting,
)
from tests.doubles.unary_call import HANG_GUARD_S, UnaryCallDouble, until
from trtserve.client.bench import encode_request
from trtserve.client.bench.recorder import Recorder, Window
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1,
                                       max_batch_size=16))
    with running_server(config) as s:
        yield s


def test_the_loads_survive_the_trip_to_a_spawned_client_process():
    load = EvenOpenLoad(rate_per_s=250.0, start=12.5, seconds=6.0)
    assert pickle.loads(pickle.dumps(load)) == load
    assert pickle.loads(pickle.dumps(ClosedLoad(32))) == ClosedLoad(32)


async def test_the_open_load_sends_rate_times_seconds_requests_evenly_and_holds_none_back():
    start = time.monotonic() - 10.0  # all due already: nothing sleeps
    # Answers come only once all 25 are in flight: any cap or pacing would hang.
    target = UnaryCallDouble(release_at_in_flight=25)
    rec = Recorder(Window(start, start, time.monotonic() + 60.0), [0, 0], 0)
    await asyncio.wait_for(EvenOpenLoad(50.0, start, 0.5)(target, [b"r"], rec), HANG_GUARD_S)
    assert len(target.calls) == 25 and target.peak == 25
    assert len(rec.lags) == 25 and len(rec.latencies) == 25 and rec.dropped == 0


async def test_the_closed_load_keeps_its_concurrency_in_flight():
    now = time.monotonic()
    target = UnaryCallDouble(release_at_in_flight=6)
    rec = Recorder(Window(now - 1.0, now - 1.0, now + 600.0), [0, 0], 0)
    running = asyncio.create_task(ClosedLoad(6)(target, [b"r"], rec))

    await until(lambda: len(target.calls) >= 30)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert target.peak == 6 and len(rec.latencies) >= 30 - 6


def test_the_client_process_counts_every_request_of_an_even_open_loop(server):
    request = encode_request("v1", "example", {"input": np.ones((1, 64), np.float32)},
                             {"input": "FP32"})
    start = time.monotonic() + 0.1
    # As fixed_rate_latency sets it up: the window runs past the last request's timeout,
    # so every answer counts however late.
    window = Window(start, start, start + 0.2 + REQUEST_TIMEOUT_S + 1)
    results: queue.Queue = queue.Queue()
    _client_process(server.url, request, EvenOpenLoad(50.0, start, 0.2), window, results)
    sent, latencies, errors, cpu = results.get_nowait()
    assert (sent, len(latencies), errors) == (10, 10, {})
    assert cpu > 0
    assert all(0 < lat < REQUEST_TIMEOUT_S for lat in latencies)


def test_the_client_process_spreads_a_closed_loop_over_its_connections(server):
    request = encode_request("v1", "example", {"input": np.ones((1, 64), np.float32)},
                             {"input": "FP32"})
    start = time.monotonic() + 0.1
    window = Window(start, start, start + 0.5)
    results: queue.Queue = queue.Queue()
    # Each channel's own connection is tests/bench/test_connections.py's; here: the
    # process runs its load over both and reports its answers and its CPU.
    _client_process(server.url, request, ClosedLoad(4), window, results, connections=2)
    _, latencies, errors, cpu = results.get_nowait()
    assert errors == {} and len(latencies) > 0 and cpu > 0


def test_the_frontend_spread_is_each_frontends_share_of_the_window_and_its_cpu():
    def rows(*triples: tuple[int, float, int]) -> list:
        return [pb.FrontendStats(index=i, requests=r, cpu_seconds=c, request_frames=f)
                for i, (r, c, f) in enumerate(triples)]

    before = rows((100, 1.0, 90), (50, 2.0, 50), (0, 0.5, 0))
    # 300, 100, 100 requests in 2 s, in 110, 30 and 60 frames
    after = rows((400, 3.0, 200), (150, 2.5, 80), (100, 0.5, 60))
    spread = frontend_spread(before, after, 2.0)
    assert spread == {"frontend_share_min": 0.2, "frontend_share_max": 0.6,
                      "frontend_cpu_min": 0.0, "frontend_cpu_max": 1.0,
                      "frontend_cores": 1.25, "requests_per_frame": 2.5}
    # One process: no frontend rows.
    assert frontend_spread([], [], 2.0) == {"frontend_share_min": 1.0,
                                            "frontend_share_max": 1.0,
                                            "frontend_cpu_min": 0.0, "frontend_cpu_max": 0.0,
                                            "frontend_cores": 0.0, "requests_per_frame": 0.0}


def test_the_host_busy_time_counts_this_process_burning_a_core():
    """/proc/stat's busy time over a stretch in which this process computes for 0.3 s of
    CPU: at least that much (other processes' time adds to it). A reading that left
    out user time, or stopped moving, gives less."""
    before, cpu_before = _host_busy_s(), time.process_time()
    while time.process_time() - cpu_before < 0.3:
        pass
    burned = time.process_time() - cpu_before
    busy = _host_busy_s() - before
    assert burned - 0.02 <= busy  # /proc/stat counts in ticks (10 ms)


def test_where_waiting_gives_the_medians_of_what_stats_report_at_each_read(monkeypatch):
    """Over a DOUBLE of the Stats call (scripted answers): the frontends' unanswered
    requests summed per read, the model's queue depth and batches in flight, as medians."""
    answers = iter([
        pb.StatsResponse(models=[pb.ModelStats(queue_depth=q, in_flight_batches=b)],
                         frontends=[pb.FrontendStats(index=0, in_flight=a),
                                    pb.FrontendStats(index=1, in_flight=c)])
        for a, c, q, b in ((10, 5, 70, 3), (20, 0, 90, 4), (100, 100, 80, 2))])
    monkeypatch.setattr("benchmarks.gpu_standin._server_stats", lambda url: next(answers))
    clock = iter([0.0, 0.0, 0.0, 1.0])  # three reads, then past `until`
    got = where_waiting("unused", until=0.5, every_s=0.0, clock=lambda: next(clock))
    assert got == {"at_engine": 20.0, "queue_depth": 80.0, "batches_in_flight": 3.0}


def test_failed_requests_are_counted_over_the_processes_and_named_by_code(capsys):
    outcomes = [(0, [0.1], {"CANCELLED": 2}, 0.5), (0, [], {}, 0.4),
                (0, [], {"CANCELLED": 1, "UNAVAILABLE": 1}, 0.3)]
    assert _errors(outcomes) == 4.0
    assert "{'CANCELLED': 3, 'UNAVAILABLE': 1}" in capsys.readouterr().err
    assert _errors([(0, [0.1], {}, 0.5)]) == 0.0
    assert capsys.readouterr().err == ""

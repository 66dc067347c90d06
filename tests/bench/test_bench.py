"""The load generator against a live in-process server (functional, never timed)."""

import argparse
import asyncio
import json
import time

import grpc
import numpy as np
import pytest

from trtserve.client import cli
from trtserve.client.bench import (
    BenchConfig,
    BenchReport,
    Level,
    LevelResult,
    TensorInfo,
    concrete_shape,
    config_from_args,
    encode_request,
    register,
    run,
    streams,
    table,
    to_csv,
    to_json,
)
from trtserve.client.bench.processes import _merge
from trtserve.client.bench.recorder import Recorder, Window
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=2,
                                       max_batch_size=16, max_queue_delay_us=500))
    with running_server(config) as s:
        yield s


def _has_kserve() -> bool:
    try:
        import trtserve.service.frontends.kserve  # noqa: F401
    except ImportError:
        return False
    return True


def test_closed_and_open_loop_levels_report_every_number(server):
    config = BenchConfig(url=server.url, model="example",
                         levels=(Level("closed", 4), Level("open", 50)),
                         duration_s=0.6, warmup_s=0.2, processes=2, batch_rows=2)
    report = run(config, progress=False)
    assert [(r.mode, r.load) for r in report.results] == [("closed", 4), ("open", 50)]
    for r in report.results:
        assert r.requests > 0 and r.errors == {}
        assert r.rows_per_s == pytest.approx(2 * r.throughput_rps)
        assert set(r.latency_ms) == {"mean", "p50", "p90", "p95", "p99", "max"}
        assert r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
        assert len(r.client_cpu) == 2
        # trtserve's Stats say what batches the server formed while the level ran.
        assert r.server_mean_batch is not None and r.server_mean_batch >= 2
    assert report.results[1].send_lag_p99_ms is not None
    text = table(report)
    assert "closed c=4" in text and "open 50/s" in text


@pytest.mark.skipif(not _has_kserve(), reason="the KServe v2 frontend is not present")
def test_kserve_protocol_drives_the_same_server(server):
    config = BenchConfig(url=server.url, model="example", levels=(Level("closed", 2),),
                         protocol="kserve", duration_s=0.5, warmup_s=0.1)
    (result,) = run(config, progress=False).results
    assert result.requests > 0 and result.errors == {}


def test_cli_prints_json_and_csv(server, capsys):
    args = ["--url", server.url, "bench", "--model", "example", "--concurrency", "2",
            "--duration", "0.4", "--warmup", "0.1", "--quiet"]
    assert cli.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["model"] == "example" and data["config"]["url"] == server.url
    assert data["results"][0]["requests"] > 0
    assert data["machine"]["cpus"] >= 1
    assert cli.main([*args, "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("mode,load,processes") and lines[1].startswith("closed,2")


def test_inputs_from_npy_files(server, tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((3, 64), np.float32))
    assert cli.main(["--url", server.url, "bench", "--model", "example", "--input",
                     f"input={path}", "--concurrency", "1", "--duration", "0.3", "--warmup",
                     "0", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["requests"] > 0 and result["server_mean_batch"] >= 3


def test_a_request_the_server_refuses_fails_before_the_run(server, tmp_path, capsys):
    path = tmp_path / "bad.npy"
    np.save(path, np.ones((1, 3), np.float32))
    code = cli.main(["--url", server.url, "bench", "--model", "example", "--input",
                     f"input={path}", "--duration", "0.2", "--quiet"])
    assert code == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_unknown_model_and_bad_flags(server, capsys):
    assert cli.main(["--url", server.url, "bench", "--model", "nope", "--quiet"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["--url", server.url, "bench", "--model", "example",
                     "--concurrency", "1.5", "--quiet"]) == 2
    assert "whole numbers" in capsys.readouterr().err


def test_dynamic_dimensions_need_a_shape():
    t = TensorInfo("x", "FP32", (-1, -1, 3))
    with pytest.raises(ValueError, match="--shape x="):
        concrete_shape(t, 4, None)
    assert concrete_shape(t, 4, (4, 7, 3)) == (4, 7, 3)
    assert concrete_shape(TensorInfo("y", "INT64", (-1, 5)), 2, None) == (2, 5)
    assert concrete_shape(TensorInfo("z", "FP32", (8, 5)), 2, None) == (8, 5)


def test_merge_counts_errors_by_status_and_splits_nothing_twice():
    config = BenchConfig(url="x", model="m", levels=(Level("closed", 3),), duration_s=2.0)
    parts = [
        {"latencies": np.array([0.001, 0.002]).tobytes(), "lags": b"",
         "errors": {"UNAVAILABLE": 2}, "dropped": 0, "cpu": 0.5},
        {"latencies": np.array([0.003]).tobytes(), "lags": b"",
         "errors": {"UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 4}, "dropped": 1, "cpu": 0.9},
    ]
    r = _merge(Level("closed", 3), config, parts, ((10, 20), (15, 60)))
    assert r.requests == 3 and r.throughput_rps == pytest.approx(1.5)
    assert r.errors == {"DEADLINE_EXCEEDED": 4, "UNAVAILABLE": 3}
    assert r.latency_ms["p50"] == pytest.approx(2.0)
    assert r.server_batches == 5 and r.server_mean_batch == pytest.approx(8.0)
    assert r.client_bound and r.dropped == 1
    report = BenchReport(config={"model": "m", "url": "x", "protocol": "v1", "batch_rows": 1,
                                 "processes": 2, "warmup_s": 0, "duration_s": 2},
                         results=[r], machine={"cpus": 2})
    assert "UNAVAILABLE:3" in table(report) and "more --processes" in table(report)
    assert "DEADLINE_EXCEEDED:4;UNAVAILABLE:3" in to_csv(report)
    assert json.loads(to_json(report))["results"][0]["errors"]["UNAVAILABLE"] == 3


def test_config_is_validated():
    with pytest.raises(ValueError, match="--protocol"):
        BenchConfig(url="x", model="m", levels=(Level("closed", 1),), protocol="http")
    with pytest.raises(ValueError, match="--processes"):
        BenchConfig(url="x", model="m", levels=(Level("closed", 1),), processes=0)
    with pytest.raises(ValueError, match="no load levels"):
        BenchConfig(url="x", model="m", levels=())


def test_open_loop_spacing_and_cap_flags_reach_the_config():
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["bench", "--model", "m", "--rate", "100", "--arrivals", "even",
                         "--max-outstanding", "0"])
    config = config_from_args(args)
    assert config.arrivals == "even" and config.max_outstanding is None
    defaults = config_from_args(p.parse_args(["bench", "--model", "m", "--rate", "100"]))
    assert defaults.arrivals == "poisson" and defaults.max_outstanding == 10_000
    with pytest.raises(ValueError, match="--max-outstanding: got -1"):
        config_from_args(p.parse_args(["bench", "--model", "m", "--max-outstanding", "-1"]))
    with pytest.raises(ValueError, match="--arrivals: got 'uniform'"):
        BenchConfig(url="x", model="m", levels=(Level("open", 1),), arrivals="uniform")


def test_even_open_loop_without_a_cap_over_the_server(server):
    config = BenchConfig(url=server.url, model="example", levels=(Level("open", 50),),
                         duration_s=0.6, warmup_s=0.2, arrivals="even", max_outstanding=None)
    r = run(config, progress=False).results[0]
    assert r.requests > 0 and r.errors == {} and r.dropped == 0


def test_level_result_label():
    r = LevelResult("open", 250.0, 1, 1.0, 0, 0.0, 0.0, {}, {}, [0.1])
    assert r.label == "250/s" and not r.client_bound


# --- --streaming: the load over InferStream / ModelStreamInfer ------------------------


@pytest.mark.parametrize("protocol", ["v1", "kserve"])
def test_closed_and_open_loop_over_the_stream(server, protocol):
    config = BenchConfig(url=server.url, model="example", protocol=protocol, streaming=True,
                         levels=(Level("closed", 70), Level("open", 80)),
                         duration_s=0.8, warmup_s=0.2, processes=1, batch_rows=2)
    closed, open_ = run(config, progress=False).results
    for r in (closed, open_):
        assert r.requests > 0 and r.errors == {} and r.dropped == 0
        assert r.rows_per_s == pytest.approx(2 * r.throughput_rps)
        assert r.server_mean_batch is not None and r.server_mean_batch >= 2
    # 70 slots ride two streams; with 70 in flight the batcher fills its batches.
    assert closed.server_mean_batch > 2
    assert open_.send_lag_p99_ms is not None


def test_an_id_appended_to_a_serialized_request_is_its_id():
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    payload = encode_request("v1", "m", {"input": x}, {"input": "FP32"})
    request = pb.InferRequest.FromString(payload + streams.id_suffix("v1", "17"))
    assert request.id == "17" and request.model == "m"
    assert np.frombuffer(request.inputs[0].data, np.float32).tolist() == x.ravel().tolist()
    # Appended twice, the last one wins (a closed-loop slot's payload is built once).
    twice = payload + streams.id_suffix("v1", "1") + streams.id_suffix("v1", "2")
    assert pb.InferRequest.FromString(twice).id == "2"


def test_answers_are_read_for_their_id_and_error():
    read = streams.answer_reader("v1")
    ok = pb.InferStreamResponse(id="4", response=pb.InferResponse(model="m"))
    bad = pb.InferStreamResponse(id="5", error=pb.Error(code=3, message="no"))
    assert read(ok.SerializeToString()) == ("4", None)
    assert read(bad.SerializeToString()) == ("5", "INVALID_ARGUMENT")
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    read_k = streams.answer_reader("kserve")
    k_bad = kpb.ModelStreamInferResponse(error_message="no",
                                         infer_response=kpb.ModelInferResponse(id="9"))
    assert read_k(k_bad.SerializeToString()) == ("9", "STREAM_ERROR")


def _recorder(seconds: float) -> Recorder:
    start = time.monotonic()
    return Recorder(Window(start, start, start + seconds), [0, 0], 0)


def test_refused_requests_are_counted_and_the_stream_carries_on(server):
    """Every request the server refuses is one error by its status; none is lost."""
    config = BenchConfig(url=server.url, model="example", levels=(Level("closed", 3),),
                         streaming=True)
    wrong = encode_request("v1", "example", {"input": np.ones((1, 5), np.float32)},
                           {"input": "FP32"})

    async def drive() -> Recorder:
        async with grpc.aio.insecure_channel(server.url) as channel:
            await channel.channel_ready()  # the window starts once connected
            rec = _recorder(0.5)
            await streams.closed(channel, config, [wrong], 3, rec, first=0)
            return rec

    rec = asyncio.run(drive())
    assert not rec.latencies
    assert set(rec.errors) == {"INVALID_ARGUMENT"} and rec.errors["INVALID_ARGUMENT"] > 10


def test_a_server_without_the_stream_counts_its_status_for_each_request():
    config = BenchConfig(url="", model="m", levels=(Level("closed", 2),), streaming=True)
    payload = encode_request("v1", "m", {"input": np.ones((1, 4), np.float32)},
                             {"input": "FP32"})
    window_s = 0.5

    async def drive() -> Recorder:
        empty = grpc.aio.server()  # no services: every method is UNIMPLEMENTED
        port = empty.add_insecure_port("127.0.0.1:0")
        await empty.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                # The window starts once connected: a loaded machine may take
                # longer than the window to connect, and count nothing.
                await channel.channel_ready()
                rec = _recorder(window_s)
                await streams.closed(channel, config, [payload], 2, rec, first=0)
                return rec
        finally:
            await empty.stop(None)

    rec = asyncio.run(drive())
    # Each failed stream owes its two requests; the pause between reopenings
    # bounds how many streams the window tries. gRPC's core ends some refused
    # streams INTERNAL instead (the client's writes race the refusal; most
    # often on a loaded machine), and that is the status the bench must count.
    assert set(rec.errors) <= {"UNIMPLEMENTED", "INTERNAL"}
    failures = rec.errors["UNIMPLEMENTED"] + rec.errors["INTERNAL"]
    assert failures % 2 == 0
    assert 2 <= failures <= 2 * (window_s / streams.REOPEN_PAUSE_S + 1)


@pytest.mark.parametrize("protocol", ["v1", "kserve"])
def test_shared_memory_system_sends_references_and_unregisters_at_the_end(server, protocol):
    from trtserve.client import Client

    config = BenchConfig(url=server.url, model="example", levels=(Level("closed", 2),),
                         protocol=protocol, duration_s=0.5, warmup_s=0.1,
                         shared_memory="system")
    with Client(server.url) as c:
        before = c.stats().shared_memory
        (result,) = run(config, progress=False).results
        after = c.stats().shared_memory
        assert c.region_status() == []  # every region unregistered when the run ended
    assert result.requests > 0 and result.errors == {}
    # Every request's input came from a region, none through gRPC.
    assert after.input_bytes - before.input_bytes >= result.requests * 64 * 4
    assert after.output_bytes - before.output_bytes >= result.requests * 16 * 4


def test_shared_memory_flag_is_checked():
    with pytest.raises(ValueError, match="--shared-memory: got 'gpu'"):
        BenchConfig(url="x", model="m", levels=(Level("closed", 1),), shared_memory="gpu")

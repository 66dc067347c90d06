"""`trtserve profile`: the backend alone, per batch size (functional, never timed)."""

import json

import pytest

from trtserve.service import cli
from trtserve.service.config import ModelConfig
from trtserve.service.sweep.report import SizeResult, recommend, table, to_json
from trtserve.service.sweep.runner import sweep


def _result(size, rows_per_s, p99=1.0):
    lat = {"mean": p99, "p50": p99, "p90": p99, "p95": p99, "p99": p99, "max": p99}
    return SizeResult(size, 1, 10, 1.0, rows_per_s, rows_per_s / size, lat, lat)


def test_the_sweep_measures_each_size_with_every_worker(example_onnx):
    config = ModelConfig(name="example", path=str(example_onnx), workers=2, max_batch_size=8)
    seen = []
    report = sweep(config, [4, 1, 16], duration_s=0.3, warmup_s=0.05, on_result=seen.append)
    assert [r.batch_size for r in report.results] == [1, 4]
    assert seen == report.results
    assert 16 in report.skipped and "batch range" in report.skipped[16]
    for r in report.results:
        assert r.workers == 2 and r.batches > 0
        assert r.rows_per_s == pytest.approx(r.batches_per_s * r.batch_size)
        assert r.latency_ms["p50"] > 0 and r.compute_ms["p50"] > 0
    assert report.recommendation is not None
    assert report.recommendation.max_batch_size in (1, 4)
    text = table(report)
    assert "recommended: max_batch_size" in text and "skipped batch 16" in text


def test_cli_profile_json(example_onnx, capsys):
    code = cli.main(["profile", "--model", f"example={example_onnx}", "--batch-sizes", "1,2",
                     "--workers", "1", "--duration", "0.2", "--warmup", "0.05", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "example" and data["backend"] == "onnxruntime"
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    assert data["recommendation"]["max_batch_size"] in (1, 2)


def test_cli_profile_sizes_above_the_default_cap(example_onnx, capsys):
    # ONNX models with a dynamic batch take any size; the default cap of 64 is lifted.
    code = cli.main(["profile", "--model", f"example={example_onnx}", "--batch-sizes", "80",
                     "--workers", "1", "--duration", "0.1", "--warmup", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and "max_batch_size = 80" in out


def test_cli_profile_refuses_a_bad_model_argument(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "--model", "no-path"])
    assert "NAME=PATH" in capsys.readouterr().err


def test_recommendation_prefers_the_smallest_near_peak_batch():
    results = [_result(1, 100), _result(8, 700), _result(16, 960), _result(32, 1000),
               _result(64, 1010)]
    rec = recommend(results)
    assert rec is not None and rec.max_batch_size == 16
    assert rec.preferred_batch_sizes == [16]
    assert "16" in rec.reason


def test_recommendation_keeps_a_batch_that_beats_its_neighbours():
    # 16 fits in cache and beats 24; 32 is the near-peak size.
    results = [_result(8, 700), _result(16, 900), _result(24, 850), _result(32, 1000)]
    rec = recommend(results)
    assert rec is not None and rec.max_batch_size == 32
    assert rec.preferred_batch_sizes == [16, 32]


def test_recommendation_respects_a_latency_budget():
    results = [_result(8, 700, p99=2.0), _result(32, 1000, p99=9.0)]
    rec = recommend(results, latency_budget_ms=5.0)
    assert rec is not None and rec.max_batch_size == 8
    assert recommend(results, latency_budget_ms=1.0) is None


def test_json_report_round_trips(example_onnx):
    config = ModelConfig(name="example", path=str(example_onnx), workers=1, max_batch_size=2)
    report = sweep(config, [2, 4], duration_s=0.1, warmup_s=0)
    data = json.loads(to_json(report))
    assert data["skipped"] == {"4": report.skipped[4]}


def test_sweep_is_another_name_for_the_profile_command(example_onnx, capsys):
    """`profile` also names TensorRT optimization profiles; `sweep` says what this does."""
    code = cli.main(["sweep", "--model", f"example={example_onnx}", "--batch-sizes", "2",
                     "--workers", "1", "--duration", "0.1", "--warmup", "0", "--json"])
    assert code == 0
    assert [r["batch_size"] for r in json.loads(capsys.readouterr().out)["results"]] == [2]

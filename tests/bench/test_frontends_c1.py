"""benchmarks.frontends_c1: its arithmetic on made-up bursts, and one short pair of real
servers (`light` on ONNX Runtime: one process against 2 frontends)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.frontends_c1 import Config, configs, pair, summary

ROOT = Path(__file__).resolve().parents[2]


def test_cost_is_the_median_of_round_by_round_differences_not_of_medians():
    one = Config("one process", [], p50_us=[[1000, 1400, 1000], [900, 900, 900]],
                 p90_us=[1500, 1600], cores=[0.5, 0.5])
    many = Config("8 frontends", [], p50_us=[[1050, 1450, 1100], [1000, 1020, 980]],
                  p90_us=[1200, 2400, 1900], cores=[1.0, 1.2, 1.4])
    header, base, row = summary([one, many])
    assert header.split() == ["configuration", "p50", "us", "cost", "us", "pairs", "p90", "us",
                              "cores"]
    assert base.split() == ["one", "process", "950", "1550", "0.50"]
    # Rounds: +50 +50 +100 | +100 +120 +80 -> median +90; pairs' medians +50 and +100.
    assert row.split() == ["8", "frontends", "1035", "+90", "+50", "to", "+100", "1900",
                           "1.20"]


def test_each_variant_is_one_more_configuration_of_n_frontends():
    assert [c.flags for c in configs(4)] == [["--frontends", "1"], ["--frontends", "4"]]
    variants = ["--engine-spin-us=500", "--engine-spin-us 0 --frontend-spin-us 0"]
    polled, both = configs(4, variants)[2:]
    assert polled.flags == ["--frontends", "4", "--engine-spin-us=500"]
    assert polled.name == "4 frontends --engine-spin-us=500"
    assert both.flags == ["--frontends", "4", "--engine-spin-us", "0", "--frontend-spin-us", "0"]


def test_one_pair_of_real_servers_gives_every_configuration_its_bursts(capsys):
    cfgs = configs(2)
    pair(0, cfgs, bursts=2, seconds=0.2)
    for c in cfgs:
        (rounds,) = c.p50_us
        assert len(rounds) == 2 and all(100 < p50 < 1_000_000 for p50 in rounds)
        assert len(c.cores) == 2 and all(cores > 0 for cores in c.cores)
        assert len(c.p90_us) == 2
        assert all(p90 >= p50 for p90, p50 in zip(c.p90_us, rounds, strict=True))
    assert capsys.readouterr().out.startswith("pair 1: one process p50 ")


def _light_servers_since(start: float) -> list[str]:
    """Command lines of `light` servers started since `start` and still running."""
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if "trtserve.service.cli serve" in cmdline and "light=" in cmdline \
                and (p.info["create_time"] or 0) >= start - 1:
            found.append(cmdline)
    return found


def test_a_time_limit_still_prints_the_table_of_the_pairs_done():
    """SIGTERM (what `timeout` sends) after the first pair: its table, then exit, with no
    server left running. (The handler raised at once: landing inside Popen after the fork,
    it left a server behind, found running after a CI run.)"""
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.frontends_c1", "--pairs", "5", "--bursts", "2",
         "--seconds", "0.2", "--frontends", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("pair 1: one process p50 "), first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped after 1 of 5 pairs" in err
    header, base, row = out.splitlines()[-3:]
    assert header.split()[0] == "configuration"
    assert base.startswith("one process") and row.startswith("2 frontends")
    assert _light_servers_since(start) == []

"""The report: the machine it ran on, and the results as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from trtserve.client.bench.config import CLIENT_BUSY, BenchConfig, BenchReport, Level, LevelResult


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

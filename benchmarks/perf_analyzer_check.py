"""perf_analyzer (Triton's own load tool) against trtserve, next to our bench tool.

Serves a CPU model (ONNX Runtime) and, where a GPU and CuPy are present, the GPU
stand-in (a test double of a TensorRT engine; its numbers are the stand-in's, not
TensorRT's) from one trtserve, then runs for each model:

  perf_analyzer -m NAME -i grpc -u HOST:PORT --concurrency-range 1:57:8 [--streaming]
  perf_analyzer -m NAME -i http -u HOST:HTTP_PORT --concurrency-range 1:57:8
  trtserve-client bench --model NAME --protocol kserve --concurrency 1,9,...,57

and writes docs/perf_analyzer.md with both tables and the command lines.
perf_analyzer needs glibc 2.38 (the `perf-analyzer` wheel's binary); give its
path with --perf-analyzer or PERF_ANALYZER.

    python -m benchmarks.perf_analyzer_check --perf-analyzer /tmp/pa/perf_analyzer
"""

from __future__ import annotations

# First, before grpc loads: the transport trtserve runs on (GRPC_EXPERIMENTS= for gRPC's own).
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from trtserve.service.config import EVENT_LOOPS, ModelConfig
from trtserve.service.example_model import write_example
from trtserve.service.testing.servers import ROOT, free_port, running_server, server_config

RANGE = "1:57:8"  # perf_analyzer's --concurrency-range: start:end:step
PA_LINE = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")


def levels(spec: str) -> list[int]:
    start, end, step = (int(x) for x in spec.split(":"))
    return list(range(start, end + 1, step))


def perf_analyzer(binary: str, url: str, model: str, streaming: bool, log: Path,
                  spec: str, protocol: str = "grpc") -> list[dict]:
    cmd = [binary, "-m", model, "-i", protocol, "-u", url, "--concurrency-range", spec,
           "--measurement-interval", "2000", "--stability-percentage", "25",
           "--max-trials", "10"]
    if streaming:
        cmd.append("--streaming")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log.write_text(" ".join(cmd) + "\n\n" + result.stdout + result.stderr)
    rows = [{"concurrency": int(c), "throughput": float(t), "latency_us": int(lat)}
            for c, t, lat in PA_LINE.findall(result.stdout)]
    if result.returncode != 0 or not rows:
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
    return rows


def our_bench(url: str, model: str, spec: str) -> list[dict]:
    cmd = [sys.executable, "-m", "trtserve.client.cli", "--url", url, "bench", "--model", model,
           "--protocol", "kserve", "--concurrency", ",".join(map(str, levels(spec))),
           "--duration", "3", "--warmup", "1", "--json", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return []
    report = json.loads(result.stdout)
    return [{"concurrency": int(r["load"]), "throughput": r["throughput_rps"],
             "latency_us": r["latency_ms"]["p50"] * 1000,
             "p99_us": r["latency_ms"]["p99"] * 1000} for r in report["results"]]


def table(pa: list[dict], ours: list[dict]) -> list[str]:
    by_c = {r["concurrency"]: r for r in ours}
    lines = ["| concurrency | perf_analyzer infer/s | perf_analyzer avg latency (us) "
             "| trtserve bench req/s | trtserve bench p50 (us) | ratio pa/ours |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in pa:
        o = by_c.get(r["concurrency"])
        if o:
            lines.append(f"| {r['concurrency']} | {r['throughput']:,.0f} | {r['latency_us']:,} "
                         f"| {o['throughput']:,.0f} | {o['latency_us']:,.0f} "
                         f"| {r['throughput'] / max(o['throughput'], 1e-9):.2f} |")
        else:
            lines.append(f"| {r['concurrency']} | {r['throughput']:,.0f} | {r['latency_us']:,} "
                         "| - | - | - |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER",
                                                                  "perf_analyzer"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "perf_analyzer.md"))
    parser.add_argument("--logs", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--no-streaming", action="store_true", help="unary calls only")
    parser.add_argument("--no-http", action="store_true",
                        help="skip perf_analyzer -i http (KServe v2 over HTTP/REST)")
    parser.add_argument("--concurrency-range", default=RANGE, metavar="START:END:STEP")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="the server's event loop (server.event_loop)")
    args = parser.parse_args(argv)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    grpc_settings = os.environ.get("GRPC_EXPERIMENTS", "")

    onnx = write_example(Path("/tmp/trtserve-pa/example.onnx"))
    cpu = ModelConfig(name="example", path=str(onnx), workers=4, max_queue_delay_us=0,
                      intra_op_threads=2)
    results: dict[str, dict[str, Any]] = {}
    http_port = 0 if args.no_http else free_port()
    with running_server(server_config(cpu, event_loop=args.event_loop,
                                      http_port=http_port)) as server:
        models = ["example"]
        engine = None
        if not args.no_gpu:
            try:
                from trtserve.service.testing.gpu_standin import (
                    StandinEngine,
                    standin_config,
                    standin_model,
                )

                engine = StandinEngine()
            except Exception as e:  # no GPU/CuPy: the CPU model alone
                print(f"GPU stand-in unavailable ({type(e).__name__}: {e}); CPU model only")
        if engine is not None:
            from trtserve.service.engine.model import ModelRuntime

            config = standin_config(workers=2, max_queue_delay_us=0, max_queue_size=65536)
            runtime = ModelRuntime(config, standin_model(config, engine))
            server.call(server.server.models.add(runtime))
            models.append("standin")
        for model in models:
            for streaming in (False,) if args.no_streaming else (False, True):
                key = f"{model}{' --streaming' if streaming else ''}"
                log = Path(args.logs) / f"pa_{model}_{'stream' if streaming else 'unary'}.txt"
                pa = perf_analyzer(args.perf_analyzer, server.url, model, streaming, log,
                                   args.concurrency_range)
                # Our bench tool measures unary calls only.
                ours = [] if streaming else our_bench(server.url, model, args.concurrency_range)
                results[key] = {"pa": pa, "ours": ours}
                print(key, json.dumps(results[key]), flush=True)
            if http_port:
                # The same requests over HTTP/REST (JSON header, binary tensors); our
                # bench column stays the gRPC one, for comparison.
                key = f"{model} -i http"
                log = Path(args.logs) / f"pa_{model}_http.txt"
                pa = perf_analyzer(args.perf_analyzer, f"127.0.0.1:{server.server.http_port}",
                                   model, False, log, args.concurrency_range, protocol="http")
                results[key] = {"pa": pa, "ours": results[model]["ours"]}
                print(key, json.dumps(results[key]), flush=True)
        if engine is not None:
            engine.close()

    lines = ["# perf_analyzer against trtserve", "",
             "Triton's perf_analyzer (2.60, from the `perf-analyzer` wheel), unchanged, "
             "pointed at trtserve's KServe v2 endpoint, next to trtserve's own "
             "`trtserve-client bench` over the same protocol, same server, same run.",
             "Rows with the GPU stand-in measure trtserve's TensorRT path around a "
             "stand-in engine (CuPy kernels), **not TensorRT**.", "",
             "- command: `python -m benchmarks.perf_analyzer_check --perf-analyzer PATH`",
             f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- host: {os.cpu_count()} CPUs, {platform.platform()}, Python "
             f"{platform.python_version()}",
             "- server: one trtserve process, `example` (ONNX Runtime, 4 workers x 2 threads) "
             "and `standin` (2 workers, CUDA graphs); max_queue_delay_us=0; event loop "
             f"{type(server.loop).__module__}; GRPC_EXPERIMENTS={grpc_settings!r} "
             "(service/grpc_tuning.py)", "",
             "perf_analyzer's latency is its average; ours is the p50.", ""]
    for key, r in results.items():
        lines += [f"## {key}", "", *table(r["pa"], r["ours"]), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["pa"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

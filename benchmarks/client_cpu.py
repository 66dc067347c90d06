"""The load generator's CPU per request against trtserve and against PyTriton (issue 18).

    .venv/bin/python -m benchmarks.client_cpu                 # 3 rounds at 300 requests/s
    .venv/bin/python -m benchmarks.client_cpu --rate 500 --rounds 1 --servers trtserve

Both servers serve `light` (the bundled example model) over KServe v2 gRPC with
2 workers / 2 model instances, max batch 64 and a 500 us queue delay. One
client process (`trtserve-client bench`, the library behind it) sends an open
loop at a fixed rate both servers keep up with, so each request costs the client
the same work on its side and any difference in its CPU comes from what the
server sends back. Per server and round:

- requests/s served, the client process's CPU seconds per request (getrusage
  over the measured window), and the server's (its process tree, psutil, over
  warm-up and window, divided by the requests sent meanwhile);
- then, at the same load through a loopback proxy that counts HTTP/2 frames
  (benchmarks/h2_frames.py), what the server sent per answer: frames, the reads
  they arrived in at the proxy (at most the server's writes; each write the
  client sees is a wakeup for it), reads holding flow-control frames alone,
  PING, WINDOW_UPDATE and SETTINGS frames, and the size of the trailers.

The rows "trtserve via proxy" are the experiment that tells cause from
coincidence: the client talks to trtserve through the proxy for the CPU
measurement too, once forwarding as it reads (the control) and once holding
the server's bytes for 2 ms and writing them in one go, as a server that sends
a batch's answers together would ("client reads/request" shows the effect).

Every number is from this one run; the servers take turns within a round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.cpu.config import MODELS, PYTRITON_VENV, ROOT, Options
from benchmarks.cpu.harness import Served, bench, pytriton, pytriton_env, say, trtserve
from benchmarks.h2_frames import FrameProxy
from trtserve.client.bench import Level
from trtserve.service.example_model import write_example


@dataclass(frozen=True)
class Server:
    """One server to measure: trtserve with these environment variables, or PyTriton;
    directly, or (hold_us not None) through the frame proxy holding what the server
    sends for hold_us before writing it to the client in one go."""

    label: str
    kind: str  # "trtserve" or "pytriton"
    env: tuple[tuple[str, str], ...] = ()
    hold_us: float | None = None


HOLD_US = 2000.0  # about one batch's worth of trtserve's answers at concurrency 128
SERVERS = {
    "trtserve": Server("trtserve", "trtserve"),
    "pytriton": Server("PyTriton", "pytriton"),
    # The experiment: the same trtserve, its answers reaching the client in fewer
    # writes. The proxy without a hold is the control (the proxy's own effect).
    "trtserve-proxy": Server("trtserve via proxy", "trtserve", hold_us=0.0),
    "trtserve-held": Server(f"trtserve via proxy holding {HOLD_US:g} us", "trtserve",
                            hold_us=HOLD_US),
    # gRPC's own transport defaults on the server (service/grpc_tuning.py off there).
    "trtserve-grpc-defaults": Server("trtserve, GRPC_EXPERIMENTS= (server)", "trtserve",
                                     (("GRPC_EXPERIMENTS", ""),)),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.client_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0,
                   help="requests/s, open loop, one client process; 0: none "
                        "(default %(default)s)")
    p.add_argument("--concurrency", type=int, default=128,
                   help="closed loop with this many requests outstanding, after the open "
                        "loop; 0: none (default %(default)s)")
    p.add_argument("--duration", type=float, default=8.0,
                   help="measured seconds (default %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds (default %(default)s)")
    p.add_argument("--frames-duration", type=float, default=3.0,
                   help="seconds counted through the frame proxy (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="(default %(default)s)")
    p.add_argument("--servers", default="trtserve,pytriton,trtserve-proxy,trtserve-held",
                   help=f"comma-separated, of {','.join(SERVERS)} (default %(default)s)")
    p.add_argument("--streaming", action="store_true",
                   help="KServe ModelStreamInfer (one stream per 64 requests in flight, "
                        "`bench --streaming`) instead of a ModelInfer call per request; "
                        "trtserve only (PyTriton's server exited under it here, not "
                        "investigated)")
    p.add_argument("--pytriton-python", default=str(PYTRITON_VENV / "bin" / "python"),
                   help="interpreter with nvidia-pytriton installed (default %(default)s)")
    a = p.parse_args(argv)
    unknown = [s for s in a.servers.split(",") if s not in SERVERS]
    if unknown:
        p.error(f"--servers: unknown {unknown}; known: {list(SERVERS)}")
    if a.streaming and "pytriton" in a.servers.split(","):
        p.error("--streaming: measures trtserve only; give --servers without pytriton")
    return a


@contextlib.contextmanager
def serve(server: Server, model: Path, log_dir: Path, opts: Options) -> Iterator[Served]:
    if server.kind == "trtserve":
        with trtserve("light", model, log_dir, env=dict(server.env)) as served:
            yield served
        return
    found = pytriton_env(opts, [])
    if isinstance(found, str):
        raise RuntimeError(found)
    python, env = found
    with pytriton(python, env, "light", model, log_dir) as served:
        yield served


@contextlib.contextmanager
def proxied(served: Served, hold_us: float | None) -> Iterator[tuple[Served, FrameProxy | None]]:
    if hold_us is None:
        yield served, None
        return
    proxy = FrameProxy(served.url, hold_us / 1e6)
    proxy.start()
    try:
        yield Served(served.child, proxy.url, served.model, served.command), proxy
    finally:
        proxy.stop()


def measure(served: Served, server: Server, opts: Options, level: Level,
            frames_s: float, streaming: bool = False) -> dict[str, Any]:
    cpu0 = served.child.cpu_s(tree=True)
    with proxied(served, server.hold_us) as (target, _):
        run = bench(target, opts, level, protocol="kserve", tree=True, streaming=streaming)
    server_s = served.child.cpu_s(tree=True) - cpu0
    r = run.result
    client_s = sum(r.client_cpu) * r.window_s
    # The server's CPU is sampled over the whole bench call (warm-up and window).
    sent = r.throughput_rps * (opts.warmup_s + opts.duration_s)
    row: dict[str, Any] = {
        "rps": r.throughput_rps, "requests": r.requests,
        "errors": sum(r.errors.values()) + r.dropped,
        "client_us": client_s / r.requests * 1e6 if r.requests else float("nan"),
        "server_us": server_s / sent * 1e6 if sent else float("nan"),
        "p50_ms": r.latency_ms["p50"],
    }
    row.update(frames(served, server, opts, level, frames_s, streaming))
    return row


def frames(served: Served, server: Server, opts: Options, level: Level,
           seconds: float, streaming: bool = False) -> dict[str, Any]:
    """What the server sends per answer, counted through the proxy at the same load."""
    short = Options(seconds, opts.warmup_s, 1, True, opts.pytriton_python, False,
                    opts.out, None, set())
    with proxied(served, server.hold_us or 0.0) as (through, proxy):
        run = bench(through, short, level, protocol="kserve", streaming=streaming)
        assert proxy is not None
        got = proxy.snapshot()
    s, c = got["server"], got["client"]
    # Per answer: every call, the probe's and the warm-up's too, ends in one trailers
    # frame. A stream's answers share one: there, the answers counted in the window
    # and those the warm-up's rate implies.
    n = max(1, s.trailers if not streaming else
            round(run.result.throughput_rps * (opts.warmup_s + seconds)))
    return {
        "frames": sum(s.frames.values()) / n, "reads": s.reads / n,
        "delivered": s.delivered / n, "control_reads": s.control_reads / n,
        "bytes": s.wire_bytes / n,
        "by_type": {k: v / n for k, v in sorted(s.frames.items())},
        "trailer_bytes": s.trailer_bytes / max(1, s.trailers),
        "client_frames": sum(c.frames.values()) / n,
        "client_by_type": {k: v / n for k, v in sorted(c.frames.items())},
    }


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    head = ["server, load", "requests/s", "client CPU us/request", "server CPU us/request",
            "frames/request", "server writes/request", "client reads/request",
            "flow-control-only writes/request", "PING+WINDOW_UPDATE+SETTINGS /request",
            "trailers bytes", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rounds in rows.items():
        control = [sum(r["by_type"].get(k, 0.0) for k in ("PING", "WINDOW_UPDATE", "SETTINGS"))
                   for r in rounds]
        lines.append("| " + " | ".join([
            label, spread([r["rps"] for r in rounds]), spread([r["client_us"] for r in rounds]),
            spread([r["server_us"] for r in rounds]),
            f"{statistics.median(r['frames'] for r in rounds):.2f}",
            f"{statistics.median(r['reads'] for r in rounds):.2f}",
            f"{statistics.median(r['delivered'] for r in rounds):.2f}",
            f"{statistics.median(r['control_reads'] for r in rounds):.3f}",
            f"{statistics.median(control):.3f}",
            f"{statistics.median(r['trailer_bytes'] for r in rounds):.0f}",
            str(sum(r["errors"] for r in rounds))]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    opts = Options(a.duration, a.warmup, a.rounds, True, a.pytriton_python, True,
                   ROOT / "docs" / "benchmarks.md", None, set())
    model = ROOT / "models" / "bench" / "light.onnx"
    if not model.exists():
        write_example(model, **MODELS["light"])
    log_dir = ROOT / "build" / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = [SERVERS[s] for s in a.servers.split(",")]
    levels = [*([Level("open", a.rate)] if a.rate else []),
              *([Level("closed", a.concurrency)] if a.concurrency else [])]
    rows: dict[str, list[dict[str, Any]]] = {f"{s.label}, {lv.label}": []
                                             for lv in levels for s in servers}
    for i in range(a.rounds):
        for server in servers:
            with serve(server, model, log_dir, opts) as served:
                for level in levels:
                    say(f"client cpu: {server.label}, {level.label}, round {i + 1}")
                    row = measure(served, server, opts, level, a.frames_duration,
                                  a.streaming)
                    say(f"  {row}")
                    rows[f"{server.label}, {level.label}"].append(row)
    print(table(rows))
    print()
    for label, rounds in rows.items():
        types = sorted({k for r in rounds for k in r["by_type"]})
        sent = ", ".join(f"{k} {statistics.median(r['by_type'].get(k, 0) for r in rounds):.3f}"
                         for k in types)
        print(f"{label}: server frames/request: {sent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What N frontends cost one request at a time (issue 18: under +60 us), measured so that
the host's drift cannot hide it: servers side by side, short bursts interleaved.

    python -m benchmarks.frontends_c1 [--pairs 4] [--bursts 12] [--seconds 1]
                                      [--frontends 8] [--with=FLAGS ...]

`benchmarks.frontends_rows cpu` starts one server at a time, so the difference of two p50s
also holds whatever the host did between the runs: on the 16-core GPU host its rounds
spread over 400 us (docs/processes-measured.md, "Session 20"), far more than the cost
asked about. Here each "pair" starts every configuration's server at once (`benchmarks.cpu`'s
`light` model, the bundled example's shape, on ONNX Runtime, as `cpu` serves it), then
runs `--bursts` rounds; in each round every server gets one burst of `--seconds` at
concurrency 1 (after 0.2 s of warm-up), in an order that rotates from round to round. A
burst's p50 is set against the one-process burst of the same round, so drift slower than a
round cancels. Configurations: one process (`--frontends 1`), `--frontends N`, and for
each `--with=FLAGS` N frontends with those flags too (`--with=--engine-spin-us=1000`: the
engine's poll, `server.engine_spin_us`).

Printed: per pair, each configuration's median p50 and the median of its round-by-round
differences, and the median of its bursts' p90s; then over all pairs the median
difference and the range of the pairs' medians (each pair is a fresh placement of the
processes on the cores: the spread a user starting the server would see), the bursts'
median p90 (a poll that competes for cores shows there first) and the server's cores used
while a burst ran. Stopped by SIGTERM (a `timeout`), it prints the table of the pairs done.
"""

from __future__ import annotations

# First, before grpc loads: the client on the transport `trtserve-client bench` uses.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import contextlib
import signal
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from benchmarks.cpu import cli
from benchmarks.cpu.harness import Served, say, trtserve
from trtserve.client.bench import V1_INFER, BenchConfig, Level
from trtserve.client.bench.requests import prepare

WARM_S = 0.2


@dataclass
class Config:
    name: str
    flags: list[str]
    p50_us: list[list[float]] = field(default_factory=list)  # per pair, per round
    p90_us: list[float] = field(default_factory=list)  # per burst: the tail a poll may raise
    cores: list[float] = field(default_factory=list)  # per burst


def configs(frontends: int, variants: Sequence[str] = ()) -> list[Config]:
    """One process, N frontends, and N frontends with each variant's `trtserve serve`
    flags (one string, split at spaces)."""
    many = ["--frontends", str(frontends)]
    return [Config("one process", ["--frontends", "1"]),
            Config(f"{frontends} frontends", many),
            *(Config(f"{frontends} frontends {v}", [*many, *v.split()]) for v in variants)]


def burst(served: Served, payloads: list[bytes],
          seconds: float) -> tuple[float, float, float]:
    """(p50 and p90 in us, server cores) of `seconds` of calls one at a time, after a
    warm-up."""
    with grpc.insecure_channel(served.url) as channel:
        call = channel.unary_unary(V1_INFER, request_serializer=None,
                                   response_deserializer=None)
        warm_end = time.monotonic() + WARM_S
        while time.monotonic() < warm_end:
            call(payloads[0], timeout=10)
        took: list[float] = []
        cpu0, t0 = served.child.cpu_s(tree=True), time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            sent = time.perf_counter()
            call(payloads[len(took) % len(payloads)], timeout=10)
            took.append(time.perf_counter() - sent)
        cores = (served.child.cpu_s(tree=True) - cpu0) / (time.monotonic() - t0)
    p90 = statistics.quantiles(took, n=10)[-1] if len(took) > 1 else took[0]
    return statistics.median(took) * 1e6, p90 * 1e6, cores


def pair(index: int, cfgs: Sequence[Config], bursts: int, seconds: float) -> None:
    models, logs = cli.models_and_logs()
    with contextlib.ExitStack() as stack:
        served = []
        for c in cfgs:
            _stop_if_asked()
            served.append(stack.enter_context(trtserve("light", models["light"], logs,
                                                       extra=c.flags)))
        payloads = [prepare(BenchConfig(url=s.url, model=s.model, levels=(Level("closed", 1),)),
                            variants=4) for s in served]
        say(f"pair {index + 1}: {len(served)} servers ready")
        rounds: list[list[float]] = [[] for _ in cfgs]
        for r in range(bursts):
            order = [(r + k) % len(cfgs) for k in range(len(cfgs))]
            for k in order:
                _stop_if_asked()
                p50, p90, cores = burst(served[k], payloads[k], seconds)
                rounds[k].append(p50)
                cfgs[k].p90_us.append(p90)
                cfgs[k].cores.append(cores)
        for c, got in zip(cfgs, rounds, strict=True):
            c.p50_us.append(got)
    base = cfgs[0].p50_us[-1]
    parts = [f"{cfgs[0].name} p50 {statistics.median(base):.0f} us "
             f"(p90 {statistics.median(cfgs[0].p90_us[-bursts:]):.0f})"]
    for c in cfgs[1:]:
        diffs = [a - b for a, b in zip(c.p50_us[-1], base, strict=True)]
        parts.append(f"{c.name} {statistics.median(c.p50_us[-1]):.0f} us "
                     f"({statistics.median(diffs):+.0f}, rounds {min(diffs):+.0f} to "
                     f"{max(diffs):+.0f}; p90 {statistics.median(c.p90_us[-bursts:]):.0f})")
    print(f"pair {index + 1}: " + "; ".join(parts), flush=True)


def summary(cfgs: Sequence[Config]) -> list[str]:
    """The table's lines: each configuration's median p50, and against one process the
    median of every round's difference and the range of the pairs' medians."""
    base = cfgs[0]
    lines = [f"{'configuration':<40} {'p50 us':>8} {'cost us':>8} {'pairs':>18} "
             f"{'p90 us':>8} {'cores':>6}"]
    for c in cfgs:
        p50 = statistics.median(x for got in c.p50_us for x in got)
        p90 = statistics.median(c.p90_us)
        cores = statistics.median(c.cores)
        if c is base:
            lines.append(f"{c.name:<40} {p50:>8.0f} {'':>8} {'':>18} {p90:>8.0f} "
                         f"{cores:>6.2f}")
            continue
        pairs = list(zip(c.p50_us, base.p50_us, strict=True))
        every = [a - b for mine, theirs in pairs for a, b in zip(mine, theirs, strict=True)]
        per_pair = [statistics.median(a - b for a, b in zip(mine, theirs, strict=True))
                    for mine, theirs in pairs]
        spread = f"{min(per_pair):+.0f} to {max(per_pair):+.0f}"
        lines.append(f"{c.name:<40} {p50:>8.0f} {statistics.median(every):>+8.0f} "
                     f"{spread:>18} {p90:>8.0f} {cores:>6.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="fresh sets of servers")
    parser.add_argument("--bursts", type=int, default=12, help="rounds of bursts per pair")
    parser.add_argument("--seconds", type=float, default=1.0, help="measured seconds a burst")
    parser.add_argument("--frontends", type=int, default=8)
    parser.add_argument("--with", dest="variants", action="append", default=[],
                        metavar="FLAGS", help="also N frontends with these `trtserve serve` "
                        "flags, e.g. --with=--engine-spin-us=1000; repeatable")
    args = parser.parse_args()
    cfgs = configs(args.frontends, args.variants)
    # A time limit (`timeout` sends SIGTERM) still gets the table of the pairs done.
    signal.signal(signal.SIGTERM, _stop)
    try:
        for i in range(args.pairs):
            _stop_if_asked()
            pair(i, cfgs, args.bursts, args.seconds)
    except _Stopped:
        done = len(cfgs[0].p50_us)
        say(f"stopped after {done} of {args.pairs} pairs")
        if not done:
            raise SystemExit(1) from None
        for c in cfgs:  # the bursts of the pair cut short
            del c.p90_us[done * args.bursts:], c.cores[done * args.bursts:]
    print("\n".join(summary(cfgs)), flush=True)


class _Stopped(Exception):
    pass


# Set by SIGTERM, acted on between servers and bursts: an exception raised from the
# handler itself could land inside Popen, after the fork, and leave that server running
# with no one to stop it (a test's SIGTERM left one behind).
_stop_asked = False


def _stop(signum: int, frame: object) -> None:
    global _stop_asked
    _stop_asked = True


def _stop_if_asked() -> None:
    if _stop_asked:
        raise _Stopped


if __name__ == "__main__":
    main()

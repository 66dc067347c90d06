"""What `trtserve profile` found: results per batch size, the recommendation
drawn from them, and the table or JSON that shows them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# max_batch_size: the smallest batch reaching this share of the best throughput.
NEAR_PEAK = 0.95
# Preferred sizes must reach at least this share of the best throughput.
PREFERRED_FLOOR = 0.80


@dataclass
class SizeResult:
    batch_size: int
    workers: int
    batches: int  # completed inside the window, all workers
    window_s: float
    rows_per_s: float
    batches_per_s: float
    latency_ms: dict[str, float]  # wall time of one executor.run: mean, p50, p90, p95, p99, max
    compute_ms: dict[str, float]  # the backend's own compute time (BatchResult.compute_s)


@dataclass
class Recommendation:
    max_batch_size: int
    preferred_batch_sizes: list[int]
    peak_rows_per_s: float
    reason: str


@dataclass
class SweepReport:
    model: str
    path: str
    backend: str
    workers: int
    intra_op_threads: int
    duration_s: float
    warmup_s: float
    results: list[SizeResult] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    recommendation: Recommendation | None = None


def recommend(results: Sequence[SizeResult], latency_budget_ms: float | None = None
              ) -> Recommendation | None:
    """max_batch_size: the smallest batch within 5% of the best throughput (and, with a
    budget, whose p99 fits it). Preferred sizes: up to that, those that beat both
    measured neighbours on throughput (a smaller batch can win when it stays in cache)
    and reach 80% of the best, plus max_batch_size itself."""
    usable = [r for r in results if r.batches > 0 and (
        latency_budget_ms is None or r.latency_ms["p99"] <= latency_budget_ms)]
    if not usable:
        return None
    usable.sort(key=lambda r: r.batch_size)
    peak = max(r.rows_per_s for r in usable)
    best = next(r for r in usable if r.rows_per_s >= NEAR_PEAK * peak)
    preferred = {best.batch_size}
    for i, r in enumerate(usable):
        if r.batch_size > best.batch_size or r.rows_per_s < PREFERRED_FLOOR * peak:
            continue
        left = usable[i - 1].rows_per_s if i > 0 else -1.0
        right = usable[i + 1].rows_per_s if i + 1 < len(usable) else -1.0
        if r.rows_per_s >= left and r.rows_per_s >= right:
            preferred.add(r.batch_size)
    budget = f" with p99 <= {latency_budget_ms:g} ms" if latency_budget_ms is not None else ""
    reason = (f"batch {best.batch_size} reaches {best.rows_per_s / peak:.0%} of the best "
              f"throughput measured{budget} ({peak:,.0f} rows/s); larger batches add "
              "latency for at most 5% more throughput")
    return Recommendation(best.batch_size, sorted(preferred), peak, reason)


COLUMNS = ("batch", "rows/s", "batches/s", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
           "compute p50 ms")


def _row(r: SizeResult) -> list[str]:
    lat = r.latency_ms
    return [str(r.batch_size), f"{r.rows_per_s:,.0f}", f"{r.batches_per_s:,.1f}",
            *(f"{lat[k]:.3f}" for k in ("mean", "p50", "p90", "p95", "p99")),
            f"{r.compute_ms['p50']:.3f}"]


def table(report: SweepReport) -> str:
    threads = f", intra-op threads {report.intra_op_threads}" if report.intra_op_threads else ""
    lines = [f"profile of '{report.model}' ({report.backend}, {report.path}): "
             f"{report.workers} worker(s) running at once{threads}, "
             f"{report.warmup_s:g}s warm-up + {report.duration_s:g}s per batch size"]
    rows = [list(COLUMNS), *(_row(r) for r in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    lines.append("latency: wall time of one batch on one worker; rows/s: all workers together")
    for size, why in report.skipped.items():
        lines.append(f"skipped batch {size}: {why}")
    rec = report.recommendation
    if rec is not None:
        sizes = ",".join(str(s) for s in rec.preferred_batch_sizes)
        lines.append(f"recommended: max_batch_size = {rec.max_batch_size}, "
                     f"preferred_batch_sizes = {sizes}")
        lines.append(f"  because {rec.reason}")
        lines.append(f"  trtserve serve --model {report.model}={report.path} "
                     f"--workers {report.workers} --max-batch-size {rec.max_batch_size} "
                     f"--preferred-batch-sizes {sizes}")
    return "\n".join(lines)


def to_json(report: SweepReport) -> str:
    data = asdict(report)
    data["skipped"] = {str(k): v for k, v in report.skipped.items()}
    return json.dumps(data, indent=2)

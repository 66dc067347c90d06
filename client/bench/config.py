"""What a bench run is asked to do, and what it found: levels, config, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtserve.client.bench.recorder import ARRIVALS

PROTOCOLS = ("v1", "kserve")
# A client process above this share of one core is likely the bottleneck.
CLIENT_BUSY = 0.85


@dataclass(frozen=True)
class Level:
    """One load level: `closed` with `value` requests outstanding, or `open` at `value`/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.mode == "closed" else f"{self.value:g}/s"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # wire name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for dynamic dimensions, batch first


@dataclass(frozen=True)
class BenchConfig:
    url: str
    model: str
    levels: tuple[Level, ...]
    protocol: str = "v1"
    duration_s: float = 10.0
    warmup_s: float = 2.0
    processes: int = 1
    # gRPC connections per client process (unary levels), the requests spread over
    # them in turn. A server of N frontend processes gets connections, not requests,
    # spread over its processes by the kernel: give it several.
    connections: int = 1
    # Requests over the protocol's bidirectional stream (InferStream /
    # ModelStreamInfer) instead of one call each.
    streaming: bool = False
    batch_rows: int = 1
    # name -> .npy file; inputs not named get random data of the model's shapes.
    input_files: tuple[tuple[str, str], ...] = ()
    # name -> full shape, for dynamic non-batch dimensions.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    timeout_s: float = 60.0
    # Open loop: requests outstanding per process at most; more are counted as
    # dropped. None: no cap (every arrival is sent, however many are in flight).
    max_outstanding: int | None = 10_000
    # Open loop: "poisson" arrivals (exponential gaps, as real clients arrive) or
    # "even" ones (exactly 1/rate apart).
    arrivals: str = "poisson"
    seed: int = 0
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    # "system" or "cuda": tensors in registered shared-memory regions, not in requests.
    shared_memory: str = "none"

    def __post_init__(self) -> None:
        checks = [
            (self.protocol in PROTOCOLS, f"--protocol: got {self.protocol!r}, "
                                         f"expected one of {PROTOCOLS}"),
            (bool(self.levels), "no load levels: give --concurrency or --rate"),
            (all(lv.value > 0 for lv in self.levels), "load levels must be above 0"),
            (all(lv.mode in ("closed", "open") for lv in self.levels),
             "a level's mode is 'closed' or 'open'"),
            (self.duration_s > 0, f"--duration: got {self.duration_s}, expected > 0"),
            (self.warmup_s >= 0, f"--warmup: got {self.warmup_s}, expected >= 0"),
            (self.processes >= 1, f"--processes: got {self.processes}, expected >= 1"),
            (self.connections >= 1,
             f"--connections: got {self.connections}, expected >= 1"),
            (self.batch_rows >= 1, f"--batch-rows: got {self.batch_rows}, expected >= 1"),
            (self.max_outstanding is None or self.max_outstanding >= 1,
             f"--max-outstanding: got {self.max_outstanding}, expected >= 1 (0: no cap)"),
            (self.arrivals in ARRIVALS,
             f"--arrivals: got {self.arrivals!r}, expected one of {ARRIVALS}"),
            (self.shared_memory in ("none", "system", "cuda"),
             f"--shared-memory: got {self.shared_memory!r}, expected none, system or cuda"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class LevelResult:
    mode: str
    load: float
    processes: int
    window_s: float
    requests: int  # answered OK within the window
    throughput_rps: float
    rows_per_s: float
    latency_ms: dict[str, float]  # mean, p50, p90, p95, p99, max
    errors: dict[str, int]  # gRPC status name -> count, within the window
    client_cpu: list[float]  # per process: CPU seconds / window seconds (1.0 = one core)
    dropped: int = 0  # open loop: due but not sent (max_outstanding reached)
    send_lag_p99_ms: float | None = None  # open loop: how late requests left
    server_mean_batch: float | None = None  # from trtserve Stats, when the server has it
    server_batches: int | None = None

    @property
    def label(self) -> str:
        return Level(self.mode, self.load).label

    @property
    def client_bound(self) -> bool:
        return max(self.client_cpu, default=0.0) >= CLIENT_BUSY


@dataclass
class BenchReport:
    config: dict[str, Any]
    results: list[LevelResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

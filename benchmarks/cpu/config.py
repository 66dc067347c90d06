"""What every step shares: the repository's paths, the models and server settings, and the
run's options."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PY = sys.executable
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PYTRITON_VENV = Path("/tmp/pytriton-venv")

# The models, written in code (trtserve.service.example_model.make_mlp): FP32 MLPs with a
# dynamic batch dimension. "heavy": a batch of 64 costs on the order of 100 ms
# on two cores; "medium": about a third of that; "light": the bundled example.
MODELS = {
    "heavy": {"in_features": 1024, "hidden": 4096, "out_features": 16, "layers": 8},
    "medium": {"in_features": 1024, "hidden": 4096, "out_features": 16, "layers": 4},
    "light": {"in_features": 64, "hidden": 256, "out_features": 16, "layers": 2},
}
WORKERS = 2
MAX_BATCH = 64
DELAY_US = 500  # a typical opportunistic-batching delay; the server default is 0


@dataclass
class Options:
    duration_s: float
    warmup_s: float
    rounds: int
    pytriton: bool
    pytriton_python: str
    install_pytriton: bool
    out: Path
    json_out: Path | None
    only: set[str]
    render_only: list[Path] | None = None



STEPS = ("served", "gain", "pytriton", "overhead", "memory", "profile", "threads",
         "frontends")

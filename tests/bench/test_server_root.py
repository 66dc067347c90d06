"""`--server-root` of benchmarks/scrape_storm.py and stats_flood.py serves that checkout.

This checkout is installed editable, so a PYTHONPATH of another checkout alone still
imported this one's `trtserve.service`, and a comparison ran one tree twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.scrape_storm import serving_env


def test_the_other_checkout_is_the_one_imported(tmp_path: Path) -> None:
    other = tmp_path / "other"
    for part in ("service", "client"):
        (other / part).mkdir(parents=True)
        (other / part / "__init__.py").write_text(f"WHERE = 'other {part}'\n")
    env = serving_env(str(other), tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", "import trtserve.service as s, trtserve.client as c; "
                               "print(s.WHERE, c.WHERE)"],
        env=env, cwd=other, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["other", "service", "other", "client"]

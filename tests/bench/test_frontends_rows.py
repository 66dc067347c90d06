"""benchmarks.frontends_rows' `gpu` summary: the ratios it prints from the runs' results
(the served runs themselves need a GPU: docs/gpu.md)."""

from __future__ import annotations

from benchmarks.frontends_rows import summary


def _run(requests_per_s: float, rows: int = 1, served_raw: float = 0.0) -> dict[str, float]:
    return {"requests_per_s": requests_per_s, "rows_per_s": requests_per_s * rows,
            "served_raw": served_raw}


def test_capacity_is_each_sides_best_load_not_the_same_load():
    # One process peaks at 256 clients, the frontends at 1024: a capacity each.
    one = {256: _run(4_600), 512: _run(4_500), 1024: _run(4_000)}
    many = {256: _run(24_000, served_raw=0.08), 512: _run(32_000, served_raw=0.1),
            1024: _run(36_800, served_raw=0.13)}
    line = summary(8, one, many, _run(3_000, rows=8), _run(15_000, rows=8))
    assert "256 clients 5.22x, 512 clients 7.11x, 1024 clients 9.20x" in line
    assert "36,800 / 4,600 = 8.00x (target 8x)" in line
    assert "served/raw there 0.13" in line
    assert "8 rows, rows/s: 5.00x" in line
    assert line.endswith("[stand-in, not TensorRT]")


def test_loads_print_in_order_of_clients_whatever_order_they_came():
    one = {1024: _run(4_000), 256: _run(4_000)}
    many = {1024: _run(8_000), 256: _run(4_000)}
    line = summary(2, one, many, _run(1_000, rows=8), _run(1_000, rows=8))
    assert "requests/s: 256 clients 1.00x, 1024 clients 2.00x;" in line
    assert line.startswith("2 frontends / 1 process")

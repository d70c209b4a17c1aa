"""Smoke test of benchmarks/bench_distributed.py: a tiny 2-rank run measures both modes and prints a verdict."""

from __future__ import annotations

from benchmarks import bench_distributed


def test_tiny_run_measures_both_modes_and_prints_the_verdict(capsys):
    bench_distributed.main(["--batch", "16", "--dim", "8", "--repeats", "1", "--timeout", "60", "--deadline", "180"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "goal ≤ 1.15" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(bench_distributed.CASES)
    for row in rows:
        gather_s, ring_s, ratio = (float(cell) for cell in row.split("|")[2:5])
        assert gather_s > 0 and ring_s > 0 and ratio > 0
        assert ("met" in row.split("|")[5]) == (ratio <= bench_distributed.GOAL), row

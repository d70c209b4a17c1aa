"""Smoke test of benchmarks/bench_sentence_transformers.py: a tiny run measures both losses and prints the verdicts."""

from __future__ import annotations

from benchmarks import bench_sentence_transformers as bench


def test_tiny_run_measures_both_losses_and_prints_the_verdicts(capsys):
    report = bench.main(["--batches", "32", "--mini-batch", "8", "--hidden", "16", "--layers", "1", "--threads", "1",
                         "--timeout", "600"])  # fmt: skip
    out = capsys.readouterr().out
    (row,) = report["rows"]
    for method in bench.METHODS:
        assert "error" not in row["memory"][method], row["memory"][method]
        assert row["memory"][method]["cache_bytes"] == 2 * 3 * 32 * 16 * 4
        assert row["steps"][method]["seconds"] > 0
    # The same loss of the same model and batch, in the memory subprocesses and in the timed steps.
    memory_losses = [row["memory"][m]["loss"] for m in bench.METHODS]
    step_losses = [row["steps"][m]["loss"] for m in bench.METHODS]
    assert abs(memory_losses[0] - memory_losses[1]) <= 1e-5 * memory_losses[0]
    assert abs(step_losses[0] - step_losses[1]) <= 1e-5 * step_losses[0]
    assert row["time_ratio"] == row["steps"]["ours"]["seconds"] / row["steps"]["theirs"]["seconds"]
    verdicts = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert len(verdicts) == 2
    assert ("MISSED" not in verdicts[1]) == (row["time_ratio"] <= bench.TIME_GOAL)
    assert ("MISSED" not in verdicts[0]) == (row["memory_ratio"] <= bench.MEMORY_GOAL)

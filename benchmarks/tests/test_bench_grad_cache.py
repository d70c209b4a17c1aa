"""Smoke test of benchmarks/bench_grad_cache.py: a tiny run measures the three loops and prints the verdict."""

from __future__ import annotations

from benchmarks import bench_grad_cache


def test_tiny_run_counts_losses_matches_logged_losses_and_prints_the_verdict(capsys):
    report = bench_grad_cache.main(["--micro", "8", "--accum", "3", "--dim", "16", "--threads", "1",
                                    "--sweep", "4:2", "--sweep-repeats", "1", "--timeout", "300"])  # fmt: skip
    out = capsys.readouterr().out
    steps = report["main"]
    for method in bench_grad_cache.METHODS:
        assert "error" not in steps[method], steps[method]
        assert steps[method]["seconds"] > 0 and steps[method]["peak_extra_bytes"] > 0
    # open_clip's accumulation evaluates the loss once per micro-batch, the grad cache and one big batch once.
    assert [steps[m]["loss_calls"] for m in bench_grad_cache.METHODS] == [3, 1, 1]
    losses = [steps[m]["loss"] for m in bench_grad_cache.METHODS]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert steps["grad_cache"]["logged"] == [f"{steps['grad_cache']['loss']:#.5g}"]
    ratio = steps["grad_cache"]["seconds"] / steps["open_clip_accum"]["seconds"]
    assert abs(report["ratio"] - ratio) <= 1e-12
    verdict = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert len(verdict) == 1 and ("met" in verdict[0] and "MISSED" not in verdict[0]) == (ratio <= 0.6)
    assert [(row["global_batch"], row["accum"]) for row in report["sweep"]] == [(8, 2)]
    assert report["sweep"][0]["ratio"] > 0

"""Smoke test of benchmarks/bench_distributed_filter.py: a tiny 3-rank run measures every mode and setting
against the single process and prints a verdict that agrees with its numbers."""

from __future__ import annotations

import itertools

import pytest

import semclip_kernels as sk
from benchmarks import bench_distributed_filter as bench

pytestmark = pytest.mark.skipif(not sk.backend_status("cpp", "cpu")[0], reason="the cpp backend is not built")


def test_tiny_run_measures_every_mode_and_setting(capsys):
    report = bench.main(["--regime", "small-tiles", "--alignment", "varied", "--batch", "32", "--dim", "16",
                         "--timeout", "120"])  # fmt: skip
    out = capsys.readouterr().out
    result = report["small-tiles varied"]
    assert 0.0 <= result["single"] <= 1.0
    expected_keys = {f"local_loss={int(ll)} gather_with_grad={int(g)} {mode}"
                     for (ll, g), mode in itertools.product(bench.SETTINGS, bench.MODES)}  # fmt: skip
    assert set(result) - {"single"} == expected_keys
    for key in expected_keys:
        assert 0.0 <= result[key] <= 1.0, key
        assert key in out
    met = all(result[key] >= bench.SKIP_GOAL * result["single"] for key in expected_keys)
    assert report["ok"] == met
    assert ("goal" in out) and (("met" if met else "MISSED") in out.splitlines()[-1])


def test_single_process_fraction_counts_the_loss_backward():
    """The single-process figure is the fraction `last_backward_stats` reports for that backward."""
    fraction = bench.single_process_fraction(2, 64, 16, 16, "cpp", "uniform")
    stats = sk.backends.last_backward_stats("cpp")
    assert stats.tiles == (2 * 64 // 16) * (3 * 2 * 64 // 16)
    assert fraction == stats.skipped_fraction

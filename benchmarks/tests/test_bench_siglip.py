"""benchmarks/bench_siglip.py runs end to end on a tiny batch and every method computes the same loss."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_siglip


def test_every_method_computes_the_same_loss():
    inputs = bench_siglip.make_inputs(48, 16)
    values = {method: bench_siglip.run_method(method, inputs) for method in bench_siglip.METHODS}
    for method, value in values.items():
        assert value == pytest.approx(values["reference"], rel=1e-5), method
    assert inputs["logit_bias"].grad is not None  # the last call's backward reached the bias


def test_main_reports_the_ratios():
    ratios = bench_siglip.main(
        ["--batch", "64", "--dim", "16", "--repeats", "1", "--methods", "reference,torch,cpp,open_clip"]
    )
    assert "time cpp vs open_clip" in ratios  # the memory ratios need peaks above RSS resolution
    assert all(torch.isfinite(torch.tensor(value)) and value > 0 for value in ratios.values())

"""Smoke test of the benchmark scripts: a tiny sweep writes sane JSON, markdown and plots.

The loss values the benchmark records are checked against the independent float64
oracle, and the memory figures against a physical lower bound (the materialized
loss must hold its `B × K` logits), so a broken measurement fails here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from oracle import semclip_loss_float64

from benchmarks import bench_loss
from benchmarks.measure import REPO_ROOT, Point, make_inputs

METHODS = ["reference", "torch", "open_clip"]
BATCHES = [64, 512]
DIM = 32


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--out", str(out), "--methods", *METHODS, "--batches", *map(str, BATCHES)]
    argv += ["--dim", str(DIM), "--dims", "--extras", "--dtypes", "--repeats", "1", "--budget-gb", "0.001"]
    report = bench_loss.main(argv)
    return out, report


def test_every_point_measured_and_written(tiny_sweep):
    out, report = tiny_sweep
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["points"] == report["points"]
    assert sorted((p["method"], p["batch"]) for p in on_disk["points"]) == sorted(
        (m, b) for m in METHODS for b in BATCHES
    )
    for point in on_disk["points"]:
        assert "error" not in point, point
        assert point["seconds"] > 0 and point["gemm_seconds"] > 0
        assert math.isclose(point["gemm_equivalents"], point["seconds"] / point["gemm_seconds"])
        assert point["peak_extra_bytes"] >= 0
        assert point["n_cols"] == 3 * point["batch"]  # one paraphrase and one negation per image


def test_recorded_losses_match_float64_oracle(tiny_sweep):
    _, report = tiny_sweep
    for point in report["points"]:
        inputs = make_inputs(Point(method=point["method"], batch=point["batch"], dim=DIM, seed=point["seed"]))
        expected = semclip_loss_float64(
            inputs["image"], inputs["text"], inputs["logit_scale"], inputs["paraphrase"], inputs["negation"]
        ).item()
        assert abs(point["loss"] - expected) <= 1e-5 * abs(expected), (point["method"], point["batch"])


def test_reference_memory_holds_its_logits(tiny_sweep):
    _, report = tiny_sweep
    (reference,) = [p for p in report["points"] if p["method"] == "reference" and p["batch"] == 512]
    logits_bytes = reference["batch"] * reference["n_cols"] * 4
    assert reference["peak_extra_bytes"] >= logits_bytes


def test_markdown_and_plots(tiny_sweep):
    out, _ = tiny_sweep
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | float32 | " in line]
    assert len(rows) == len(METHODS) * len(BATCHES)
    for method in METHODS:
        assert f"| {method} | 512 | 1536 | {DIM} | 1 | 1 | float32 |" in table
    assert "Largest batch within a 0.001 GB budget" in table
    for name in ("time_vs_batch.png", "memory_vs_batch.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_budget_fit_of_quadratic_memory():
    results = [
        {"method": "m", "batch": b, "peak_extra_bytes": 4 * b * b} for b in (1024, 2048, 4096)
    ]  # 4 bytes × B²: quadratic
    fit = bench_loss.budget_fit(results, "m", budget_bytes=4 * 3000**2)
    assert fit["largest_measured"] == 2048
    assert fit["exponent"] == pytest.approx(2.0)
    assert fit["estimated"] == pytest.approx(3000, abs=1)


def test_side_sweep_plan_covers_each_axis_once():
    args = bench_loss.parse_args(
        ["--device", "cpu", "--methods", "torch", "--batches", "64", "--side-batch", "32"]
        + ["--dims", "16", "512", "--extras", "0,0", "1,1", "--dtypes", "bfloat16"]
    )
    batch_sweep, side_sweep = bench_loss.plan(args)
    assert [(p.batch, p.dim) for p in batch_sweep] == [(64, 512)]
    # d=512 and "1,1" are the main configuration: not repeated in the side sweep.
    shapes = [(p.batch, p.dim, p.n_paraphrases, p.n_negations, p.dtype) for p in side_sweep]
    assert shapes == [(32, 16, 1, 1, "float32"), (32, 512, 0, 0, "float32"), (32, 512, 1, 1, "bfloat16")]


def test_peak_memory_sees_a_temporary_allocation():
    # In a fresh process, as the benchmark measures every point: in this long-lived pytest process,
    # memory freed by earlier tests is still resident and a new block may reuse it unseen.
    script = (
        "import torch\n"
        "from benchmarks.measure import PeakMemory\n"
        "with PeakMemory(torch.device('cpu')) as memory:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # touched: resident\n"
        "    del block\n"
        "print(memory.extra_bytes)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    n_bytes = 64 * 2**20
    # A few pages of the block may reuse memory that was already resident.
    assert 0.95 * n_bytes <= int(result.stdout.split()[-1]) < 2 * n_bytes

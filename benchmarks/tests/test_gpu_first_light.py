"""benchmarks/gpu_first_light.py on CPU: its code path at tiny sizes (`--device cpu --dry-run`), its checks
against float64, and the goal verdicts. The figures themselves need a GPU (benchmarks/gpu_first_light.sh)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from benchmarks import gpu_first_light as fl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_dry_run_writes_every_check_and_timing(tmp_path):
    status = fl.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "first_light.json").read_text())
    assert status in (0, 1) and data["checks_ok"] == (status == 0)
    checks = {(c["method"], c["dtype"], c["regime"]): c for c in data["checks"]}
    methods = {"triton", "torch", "reference"}
    assert {m for m, _, _ in checks} >= methods
    for (_method, dtype, regime), check in checks.items():
        assert not check["error"], check
        floor = checks[("reference", dtype, regime)]["grad_error"]  # the dtype's own arithmetic
        assert check["grad_error"] <= max(check["tolerance"], 2 * floor), check
        assert check["loss_error"] <= check["tolerance"], check
    tiles = fl.triton_tiles(32)
    labels = {t["method"] for t in data["timings"]}
    assert labels == {f"triton {tile}" for tile in tiles} | {"torch", "reference"}
    assert len(data["timings"]) == 2 * len(labels)  # both regimes, one batch
    assert all(t["seconds"] > 0 and t["gemms"] > 0 and not t["error"] for t in data["timings"])
    assert len(data["goals"]) == 2
    markdown = (tmp_path / "first_light.md").read_text()
    assert "## Correctness against float64" in markdown and "GEMM-equiv." in markdown


def test_checks_catch_a_wrong_gradient(monkeypatch):
    # A backend 1 % off in its image gradient fails the float32 check (1e-4).
    real = fl.loss_call

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def wrong_call(backend):
        call = real(backend)
        return lambda image, **rest: call(Scaled.apply(image), **rest)

    monkeypatch.setattr(fl, "loss_call", lambda backend: wrong_call(backend) if backend == "torch" else real(backend))
    checks = [c for c in fl.check_backends(["torch"], "cpu", 16, 8) if c.dtype == "float32"]
    assert checks and not any(c.ok for c in checks)
    assert all(0.009 < c.grad_error < 0.011 for c in checks)


def test_goals_read_the_largest_batch():
    report = fl.Report({})
    report.timings = [
        fl.Timing("triton 128x64x64:8:3", "random", 32768, 768, 0.010, 100 * 2**20, 4.0),
        fl.Timing("triton 128x128x32:8:3", "random", 32768, 768, 0.012, 100 * 2**20, 4.8),
        fl.Timing("reference", "random", 32768, 768, 0.030, 60 * 100 * 2**20, 12.0),
        fl.Timing("triton 128x64x64:8:3", "trained", 32768, 768, 0.030, 100 * 2**20, 6.0),
        fl.Timing("reference", "trained", 8192, 768, 0.001, 2**20, 1.0),
    ]
    random, trained = fl.goals(report)
    assert "triton 128x64x64:8:3 4.00 GEMM-equivalents (ok" in random
    assert "3.00× reference's speed (ok)" in random and "= 60 (ok" in random
    assert "6.00 GEMM-equivalents (MISS" in trained and "reference did not run" in trained


def test_first_light_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "gpu_first_light.sh")], capture_output=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "out, dry_run, environ, expected",
    [
        ("given", True, {"OUT": "env"}, "given"),  # --out wins
        (None, True, {"OUT": "env"}, "env"),  # then $OUT (the device tool's folder)
        (None, False, {}, "first_light"),  # a real run: the documented default
    ],
)
def test_output_folder_order(out, dry_run, environ, expected):
    assert fl.output_folder(out, dry_run, environ) == expected


def test_dry_run_without_out_writes_outside_the_working_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = fl.output_folder(None, True, {})
    assert os.path.isdir(folder) and not os.path.abspath(folder).startswith(str(tmp_path))
    os.rmdir(folder)
    assert not (tmp_path / "first_light").exists()

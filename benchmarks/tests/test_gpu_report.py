"""benchmarks/gpu_report.py: formatting on synthetic numbers, and a clean exit without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_report  # noqa: E402


def synthetic():
    checks = [
        gpu_report.Check("triton", "bfloat16", "trained", 1.5e-4, 3.1e-3, 2e-2),
        gpu_report.Check("torch", "float32", "random", 2e-7, 4e-4, 1e-4),  # over tolerance
        gpu_report.Check("inf_cl", "float32", "random", float("nan"), float("nan"), 1e-4, error="ImportError: x"),
    ]
    timings = [
        gpu_report.Timing("triton", "random", "bfloat16", 512, 4096, seconds=0.0123, peak_bytes=3 * 2**20),
        gpu_report.Timing("triton", "random", "bfloat16", 512, 8192, seconds=0.0456, peak_bytes=6 * 2**20),
        gpu_report.Timing("reference", "random", "bfloat16", 512, 4096, seconds=0.02, peak_bytes=2**30),
        gpu_report.Timing("reference", "random", "bfloat16", 512, 8192, error="out of memory"),
        gpu_report.Timing("torch", "trained", "float32", 768, 4096, seconds=0.5, peak_bytes=512),
    ]
    return checks, timings


def test_markdown_tables():
    checks, timings = synthetic()
    text = gpu_report.to_markdown({"gpu": "Synthetic GPU", "torch": "0.0"}, checks, timings)
    assert "gpu: Synthetic GPU, torch: 0.0" in text
    assert "| triton | bfloat16 | trained | 1.5e-04 | 3.1e-03 | 2e-02 | ok |" in text
    assert "| torch | float32 | random | 2.0e-07 | 4.0e-04 | 1e-04 | FAIL |" in text
    assert "ERROR ImportError: x" in text
    assert "### random, bfloat16, d = 512" in text and "### trained, float32, d = 768" in text
    assert "| B | triton | reference |" in text
    assert "| 4096 | 12.3 / 3.0 MiB | 20.0 / 1.0 GiB |" in text
    assert "| 8192 | 45.6 / 6.0 MiB | out of memory |" in text
    assert "| 4096 | 500.0 / 512 B |" in text
    assert [c.ok for c in checks] == [True, False, False]


def test_plot_and_json_roundtrip(tmp_path):
    checks, timings = synthetic()
    path = tmp_path / "time.png"
    if gpu_report.write_plot(timings, str(path)):
        assert path.stat().st_size > 1000
    record = json.loads(json.dumps([gpu_report.asdict(t) for t in timings]))
    assert record[3]["error"] == "out of memory" and record[0]["seconds"] == 0.0123


def test_methods_and_variants():
    assert gpu_report.method_call("triton-tf32", "bfloat16") is None
    assert gpu_report.method_call("triton-tf32", "float32") is not None
    methods = gpu_report.available_methods("cuda", backends=gpu_report.TRITON_VARIANTS)  # listed even without CUDA
    assert methods[:3] == list(gpu_report.TRITON_VARIANTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_says_so_and_exits_zero(capsys, tmp_path):
    assert gpu_report.main(["--out", str(tmp_path / "report")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "report").exists()


def test_check_and_time_run_on_any_device():
    # The CUDA code paths, run on CPU with the portable backends at toy sizes.
    checks = gpu_report.check_backends(["torch", "reference"], "cpu", batch=40, dim=16)
    assert {(c.method, c.dtype, c.regime) for c in checks} == {
        (m, t, r) for m in ("torch", "reference") for t in ("float32", "bfloat16") for r in ("random", "trained")
    }
    assert all(c.ok for c in checks if c.dtype == "float32"), checks
    assert all(c.grad_error < 0.1 and not c.error for c in checks), checks  # bfloat16: see the report's verdicts
    timings = gpu_report.time_methods(["torch"], [16], [32, 64], "cpu", repeats=1, max_call_seconds=60.0)
    assert len(timings) == 2 * 2 * 2  # regimes × dtypes × batches
    assert all(t.seconds > 0 and not t.error for t in timings)

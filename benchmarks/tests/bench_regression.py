"""pytest-benchmark suite: forward+backward time of the main configurations, for regression tracking.

Not part of the test command: pytest collects `test_*.py` files, and this one is named so that only an
explicit path runs it (timings mean something only against a baseline recorded on the same machine).

    python -m pytest benchmarks/tests/bench_regression.py --benchmark-autosave      # record a baseline
    python -m pytest benchmarks/tests/bench_regression.py --benchmark-compare \\
        --benchmark-compare-fail=median:20%                                           # fail on a 20% slowdown

Each configuration also benchmarks one `B×d @ d×K` product (`gemm_reference`): compare a
method's time against it to tell a regression from a slower machine.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.measure import Point, available_methods, forward_backward, loss_function, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 16384 if DEVICE == "cuda" else 2048
CONFIGS = {  # name: (dim, paraphrases per image, negations per image, dtype)
    "semclip-d512-fp32": (512, 1, 1, "float32"),
    "clip-d512-fp32": (512, 0, 0, "float32"),
    "semclip-d512-bf16": (512, 1, 1, "bfloat16"),
}
METHODS = available_methods(DEVICE)


def config_point(config: str, method: str) -> Point:
    dim, n_para, n_neg, dtype = CONFIGS[config]
    return Point(
        method=method, batch=BATCH, dim=dim, n_paraphrases=n_para, n_negations=n_neg, dtype=dtype, device=DEVICE
    )


def synchronized(fn):
    def run(*args):
        value = fn(*args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return value

    return run


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_backward(benchmark, config: str, method: str) -> None:
    point = config_point(config, method)
    inputs = make_inputs(point)
    benchmark.group = config
    benchmark.extra_info.update(batch=point.batch, n_cols=point.n_cols, dim=point.dim, dtype=point.dtype)
    loss = benchmark.pedantic(
        synchronized(forward_backward), args=(loss_function(method), inputs), rounds=5, warmup_rounds=1
    )
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gemm_reference(benchmark, config: str) -> None:
    point = config_point(config, "gemm")
    dtype = getattr(torch, point.dtype)
    rows = torch.randn(point.batch, point.dim, device=DEVICE, dtype=dtype)
    cols_t = torch.randn(point.dim, point.n_cols, device=DEVICE, dtype=dtype)
    benchmark.group = config
    benchmark.extra_info.update(batch=point.batch, n_cols=point.n_cols, dim=point.dim, dtype=point.dtype)
    benchmark.pedantic(synchronized(torch.mm), args=(rows, cols_t), rounds=5, warmup_rounds=1)

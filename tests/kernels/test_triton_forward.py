"""backend="triton", forward: the fused partitions kernel against float64 evaluations.

Without a GPU the kernels run on CPU tensors through Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before anything imports Triton), so every
code path of the compiled kernel runs here: ragged masks, the d-loop, both
directions, biases, each dtype. Shapes stay small because the interpreter is slow.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from oracle import make_case, semclip_loss_float64
from primitive import partitions

import semclip_kernels as sk
from semclip_kernels.backends.options import PartitionOptions

config = pytest.importorskip("semclip_kernels.triton_kernels.config")

triton_fused = pytest.importorskip("semclip_kernels.backends.triton_fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not triton_fused.is_available(torch.device(DEVICE))[0]:
    pytest.skip(f"Triton backend unavailable: {triton_fused.is_available(torch.device(DEVICE))[1]}",
                allow_module_level=True)

# log(0) = -inf is the intended value of an empty partition; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.needs_triton
TILES = {"block_rows": 16, "block_cols": 16}  # several ragged tiles at the sizes below


def lse_float64(rows, cols, scale, col_bias, n_query_cols):
    """Direct float64 log-partitions of `scale·rows·colsᵀ` (materialized: fine at these sizes)."""
    logits = float(scale) * rows.double() @ cols.double().T
    row_lse = torch.logsumexp(logits + col_bias.double(), dim=1)
    col_lse = torch.logsumexp(logits[:, :n_query_cols], dim=0)
    return row_lse, col_lse


def random_features(n, dim, dtype, gen, norm_range=(0.3, 3.0)):
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.empty(n, 1, dtype=torch.float64).uniform_(*norm_range, generator=gen)
    return x.to(dtype).to(DEVICE)


def scaled_tol(expected, rel):
    """Absolute tolerance for log-partitions: relative to their magnitude (at least 1)."""
    return rel * (1 + (expected.abs().max().item() if expected.numel() else 0.0))


def assert_close_lse(actual, expected, tol):
    assert actual.dtype == torch.float32
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual.cpu()), finite), "wrong -inf pattern"
    err = (actual.cpu().double() - expected)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= tol, f"log-partition off by {err:.3e}"


@pytest.mark.parametrize(
    "n_rows,n_cols,n_query_cols,dim",
    [
        (1, 1, 1, 1),  # single element, d below the smallest block
        (5, 9, 3, 8),  # everything smaller than one tile
        (37, 70, 50, 129),  # ragged in M, K, Kq and d (d-loop with a ragged last slice)
        (16, 48, 16, 64),  # exact multiples of the tile
        (23, 40, 0, 33),  # no query columns at all
        (40, 31, 31, 17),  # every column a query column
    ],
)
def test_partitions_match_float64(n_rows, n_cols, n_query_cols, dim):
    gen = torch.Generator().manual_seed(n_rows * 100 + dim)
    rows = random_features(n_rows, dim, torch.float32, gen)
    cols = random_features(n_cols, dim, torch.float32, gen)
    scale = torch.tensor(14.3, device=DEVICE)
    col_bias = torch.zeros(n_cols, device=DEVICE)
    col_bias[n_query_cols:] = math.log(0.4)
    row_lse, col_lse = partitions("triton", rows, cols, scale, col_bias, n_query_cols, PartitionOptions(**TILES))
    expected_row, expected_col = lse_float64(rows.cpu(), cols.cpu(), scale, col_bias.cpu(), n_query_cols)
    assert row_lse.shape == (n_rows,) and col_lse.shape == (n_query_cols,)
    assert_close_lse(row_lse, expected_row, scaled_tol(expected_row, 2e-6))
    assert_close_lse(col_lse, expected_col, scaled_tol(expected_col, 2e-6))


def test_default_blocks_and_strided_columns():
    # Default (heuristic) tiles, and columns that are a non-contiguous view of a bigger tensor.
    gen = torch.Generator().manual_seed(1)
    rows = random_features(33, 72, torch.float32, gen)
    wide = random_features(45, 144, torch.float32, gen)
    cols = wide[:, ::2]
    assert not cols.is_contiguous()
    scale = torch.tensor(30.0, device=DEVICE)
    col_bias = torch.zeros(45, device=DEVICE)
    row_lse, col_lse = partitions("triton", rows, cols, scale, col_bias, 20, PartitionOptions())
    expected_row, expected_col = lse_float64(rows.cpu(), cols.cpu(), scale, col_bias.cpu(), 20)
    assert_close_lse(row_lse, expected_row, scaled_tol(expected_row, 2e-6))
    assert_close_lse(col_lse, expected_col, scaled_tol(expected_col, 2e-6))


def test_minus_inf_bias_and_large_logits():
    # A -inf column bias (β = 0 at the primitive level) removes the column; τ = 100 with
    # norms up to 3 gives logits near 900, which overflow exp() without running maxima.
    gen = torch.Generator().manual_seed(2)
    rows = random_features(21, 40, torch.float32, gen, norm_range=(2.0, 3.0))
    cols = random_features(35, 40, torch.float32, gen, norm_range=(2.0, 3.0))
    scale = torch.tensor(100.0, device=DEVICE)
    col_bias = torch.zeros(35, device=DEVICE)
    col_bias[20:] = -math.inf
    row_lse, col_lse = partitions("triton", rows, cols, scale, col_bias, 20, PartitionOptions(**TILES))
    expected_row, expected_col = lse_float64(rows.cpu(), cols.cpu(), scale, col_bias.cpu(), 20)
    assert expected_row.abs().max() > 150  # exp() overflows float32 beyond 88
    assert_close_lse(row_lse, expected_row, scaled_tol(expected_row, 2e-6))
    assert_close_lse(col_lse, expected_col, scaled_tol(expected_col, 2e-6))
    # Every column biased to -inf: empty partitions are -inf, not NaN.
    row_lse, _ = partitions("triton", rows, cols, scale, torch.full_like(col_bias, -math.inf), 0,
                                         PartitionOptions(**TILES))
    assert torch.all(row_lse == -math.inf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_partitions(dtype):
    # 16-bit operands, float32 statistics: against float64 on the same (rounded) inputs.
    gen = torch.Generator().manual_seed(3)
    rows = random_features(29, 100, dtype, gen, norm_range=(0.9, 1.1))
    cols = random_features(50, 100, dtype, gen, norm_range=(0.9, 1.1))
    scale = torch.tensor(50.0, device=DEVICE)
    col_bias = torch.zeros(50, device=DEVICE)
    row_lse, col_lse = partitions("triton", rows, cols, scale, col_bias, 30, PartitionOptions(**TILES))
    expected_row, expected_col = lse_float64(rows.cpu(), cols.cpu(), scale, col_bias.cpu(), 30)
    assert_close_lse(row_lse, expected_row, scaled_tol(expected_row, 2e-6))
    assert_close_lse(col_lse, expected_col, scaled_tol(expected_col, 2e-6))


def loss_of(case, backend, w=1.0, beta=1.0, **options):
    return sk.semclip_loss(
        case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
        paraphrase_weight=w, hard_negative_weight=beta, backend=backend, **options,
    )  # fmt: skip


def oracle_loss(case, w=1.0, beta=1.0):
    return semclip_loss_float64(case.image.detach(), case.text.detach(), case.logit_scale.detach(),
                                None if case.paraphrase is None else case.paraphrase.detach(),
                                None if case.negation is None else case.negation.detach(), w, beta)


@pytest.mark.parametrize(
    "n_para,n_neg,w,beta",
    [(None, None, 1.0, 1.0), (1, None, 1.0, 1.0), (None, 2, 1.0, 1.0), (3, 2, 0.5, 2.5), (2, 1, 1.0, 0.0)],
)
def test_loss_value_matches_oracle_and_torch_backend(n_para, n_neg, w, beta):
    case = make_case(19, 45, n_para, n_neg, tau=20.0, seed=11)
    with torch.no_grad():
        loss = loss_of(case, "triton", w, beta, **TILES)
        torch_loss = loss_of(case, "torch", w, beta, **TILES)
    expected = oracle_loss(case, w, beta)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - expected) <= 1e-5 * abs(expected)
    assert abs(loss.double() - torch_loss.double()) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_value_each_dtype(dtype):
    case = make_case(24, 64, 1, 1, tau=30.0, dtype=dtype, seed=5, normalize=True)
    with torch.no_grad():
        loss = loss_of(case, "triton")  # default (heuristic) blocks
    expected = oracle_loss(case)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.double() - expected) <= tol * abs(expected), (float(loss), float(expected))


def test_nan_features_propagate():
    case = make_case(10, 20, 1, 1, tau=10.0, seed=6)
    with torch.no_grad():
        case.text[3, 5] = float("nan")
        assert torch.isnan(loss_of(case, "triton", **TILES))


@contextlib.contextmanager
def allow_tf32(value: bool):
    """Set PyTorch's TF32 switch and restore it.

    Not monkeypatch.setattr: `torch.backends.cuda.matmul` is a module object whose attributes are
    properties of its class, so pytest >= 9.2 finds no instance attribute to restore and calls
    delattr at teardown (AttributeError).
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = value
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def test_availability_and_precision_switches(monkeypatch):
    ok, reason = triton_fused.is_available(torch.device(DEVICE))
    assert ok, reason
    assert not triton_fused.is_available(torch.device("meta"))[0]
    # TF32 only for float32 inputs with PyTorch's TF32 switch on, and never in the interpreter.
    monkeypatch.setattr(config.tl_utils, "INTERPRETED", False)
    with allow_tf32(True):
        assert config.dot_precision(torch.float32) == "tf32"
        assert config.dot_precision(torch.bfloat16) == "ieee"
    assert config.upcast_dot(torch.bfloat16) is False
    with allow_tf32(False):
        assert config.dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(config.tl_utils, "INTERPRETED", True)
    assert config.upcast_dot(torch.bfloat16) is True
    with allow_tf32(True):
        assert config.dot_precision(torch.float32) == "ieee"

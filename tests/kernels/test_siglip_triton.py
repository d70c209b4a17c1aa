"""backend="triton" of the sigmoid loss (docs/contract.md §8, docs/siglip.md) against the independent float64
oracle (tests/sigmoid_oracle.py): value and every gradient, ragged shapes, weights including 0, 16-bit
inputs, the gradient filter, bitwise determinism.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton). Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import make_case, max_norm_rel_err
from sigmoid_oracle import semsiglip_loss_float64
from test_siglip import NAMES, assert_matches, bias_of, leaves_of, run_backend

import semclip_kernels as sk
from semclip_kernels.backends import sigmoid_dispatch
from semclip_kernels.backends.sigmoid_dispatch import sigmoid_backend_status

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not sigmoid_backend_status("triton", DEVICE)[0]:
    pytest.skip(f"triton unavailable: {sigmoid_backend_status('triton', DEVICE)[1]}", allow_module_level=True)

TILES = {"block_rows": 16, "block_cols": 16}  # the smallest tl.dot tile: several ragged tiles below


@pytest.mark.parametrize(
    "batch,dim,n_para,n_neg",
    [(1, 1, None, None), (2, 3, 1, None), (13, 129, 2, 1), (31, 17, None, 2), (40, 64, 3, 2)],
)
def test_matches_float64_oracle(batch, dim, n_para, n_neg):
    case = make_case(batch, dim, n_para, n_neg, tau=10.0, seed=batch * 7 + dim)
    assert_matches(case, bias_of(-3.0), "triton", w=0.7, beta=1.3, loss_tol=1e-6, grad_tol=2e-6, **TILES)


@pytest.mark.parametrize(
    "tau,bias,w,beta",
    [(30.0, -10.0, 0.5, 2.0), (100.0, -12.7, 1.0, 0.25), (10.0, 5.0, 0.0, 1.0), (10.0, -5.0, 2.0, 0.0),
     (0.0, -1.0, 1.0, 1.0)],
)  # fmt: skip
def test_scales_biases_and_weights(tau, bias, w, beta):
    """(τ = 0: grad_τ = Σ dS·<A, C> sums terms of both signs per row in float32, measured 2.6e-6.)"""
    case = make_case(24, 32, 2, 2, tau=tau, seed=3)
    assert_matches(case, bias_of(bias), "triton", w=w, beta=beta, loss_tol=1e-6, grad_tol=1e-5, **TILES)


def test_confident_pairs_keep_their_loss():
    """Every pair far on its side (x < −17): softplus(x) ≈ e^x is below float32's resolution of 1 + e^x, so
    a `log(1 + e)` would sum to 0; the kernel's log1p keeps each pair's loss. (Filter off: every gradient
    here is below the default threshold, which is exact against O(1) gradients only.)"""
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.functional.normalize(torch.randn(20, 64, generator=gen), dim=1)
    case = make_case(20, 64, None, None, tau=1.0)
    case.image, case.text = base.clone().requires_grad_(), base.clone().requires_grad_()
    case.logit_scale = torch.tensor(60.0, requires_grad=True)
    assert_matches(case, bias_of(-30.0), "triton", loss_tol=1e-5, grad_tol=1e-5, grad_filter_eps=0.0, **TILES)


def test_default_tiles_and_frozen_inputs():
    case = make_case(150, 48, 1, 1, tau=20.0, seed=5, extra_as_2d=True)
    assert_matches(case, bias_of(-8.0), "triton", loss_tol=1e-6, grad_tol=2e-6)
    case = make_case(17, 16, 2, 2, tau=10.0, seed=6)
    bias = bias_of(-3.0)
    for name, leaf in zip(NAMES, leaves_of(case, bias)):
        if name in ("image", "logit_scale", "logit_bias"):  # only the column gradients: the column kernel alone
            leaf.requires_grad_(False)
    assert_matches(case, bias, "triton", w=0.5, beta=2.0, **TILES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Feature gradients carry the 16-bit cast of dS (the tensor-core operand) and their own rounding."""
    case = make_case(33, 64, 2, 1, tau=10.0, dtype=dtype, seed=2)
    assert_matches(case, bias_of(-4.0), "triton", loss_tol=1e-6, grad_tol=1e-2, **TILES)


@pytest.mark.parametrize("gradients_in_forward", [True, False])
def test_gradients_in_forward_and_by_recomputation_agree(gradients_in_forward, monkeypatch):
    monkeypatch.setitem(sigmoid_dispatch.GRADIENTS_IN_FORWARD, "triton", gradients_in_forward)
    case = make_case(29, 40, 1, 2, tau=15.0, seed=9)
    assert_matches(case, bias_of(-6.0), "triton", loss_tol=1e-6, grad_tol=2e-6, **TILES)


def test_filter_skips_negligible_tiles_and_stays_accurate():
    """The trained regime (positives aligned, negatives far below the bias): the default, exact filter skips
    most tiles; gradients stay within 1e-4; a NaN is never filtered away."""
    gen = torch.Generator().manual_seed(0)
    batch, dim = 128, 64
    base = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    image = base.clone().requires_grad_()
    text = (base + 0.05 * torch.randn(batch, dim, generator=gen)).requires_grad_()
    case = make_case(batch, dim, None, None, tau=1.0)
    case.image, case.text, case.logit_scale = image, text, torch.tensor(100.0, requires_grad=True)
    bias = bias_of(-60.0)
    assert_matches(case, bias, "triton", **TILES)
    stats = sigmoid_dispatch.last_sigmoid_backward_stats("triton")
    assert stats.tiles == (batch // 16) ** 2
    assert stats.skipped_tiles > stats.tiles // 2, stats
    image.data[3, 0] = math.nan
    loss, grads = run_backend(case, bias, "triton", **TILES)
    assert math.isnan(float(loss)) and bool(grads[1].isnan().any()) and bool(grads[4].isnan())


def test_bitwise_deterministic():
    """docs/contract.md §4: every output element has one owner program, partial sums are added in order."""
    case = make_case(40, 24, 1, 2, tau=10.0, seed=13)
    bias = bias_of(-4.0)
    runs = [run_backend(case, bias, "triton", **TILES) for _ in range(2)]
    assert torch.equal(runs[1][0], runs[0][0])
    for grad, first in zip(runs[1][1], runs[0][1]):
        assert grad is None or torch.equal(grad, first)


def test_auto_picks_triton_on_cuda_only():
    expected = "triton" if DEVICE.type == "cuda" else ("cpp", "torch")
    chosen = sigmoid_dispatch.resolve_sigmoid_backend("auto", DEVICE)
    assert chosen == expected if DEVICE.type == "cuda" else chosen in expected
    case = make_case(4, 8, None, None, tau=10.0)
    loss = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -1.0, backend="triton")
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


def test_float64_features():
    """float64 features accumulate in float64 (the gradcheck dtype): errors at float64 rounding."""
    case = make_case(21, 24, 1, 2, tau=10.0, dtype=torch.float64, seed=3)
    case.logit_scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss, grads = run_backend(case, bias, "triton", 0.7, 1.3, **TILES)
    copies = [t.detach().clone().requires_grad_() for t in leaves_of(case, bias)]
    expected = semsiglip_loss_float64(*copies[:2], copies[4], copies[5], copies[2], copies[3], 0.7, 1.3)
    expected.backward()
    assert loss.dtype == torch.float64 and abs(float(loss - expected)) <= 1e-13 * abs(float(expected))
    for name, grad, copy in zip(NAMES, grads, copies):
        assert grad.dtype == torch.float64, name
        assert max_norm_rel_err(grad, copy.grad) <= 1e-12, name

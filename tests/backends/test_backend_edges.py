"""Edges of the chunked CPU backends (issue 17): large logits with β ≠ 1, NaN through the gradient
filter, far hard negatives, and τ's gradient alone. Every expectation is a float64 evaluation
(tests/oracle.py or a materialized float64 log-sum-exp), never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import make_case, max_norm_rel_err
from primitive import last_backward_stats, partitions_backward
from test_cpp import peaked_case
from test_loss import run_backend, run_oracle

import semclip_kernels as sk
from semclip_kernels.backends.options import PartitionOptions


def grad_errors(case, backend, beta, **options) -> list[float]:
    _, grads = run_backend(case, backend, beta=beta, **options)
    _, expected = run_oracle(case, beta=beta)
    return [max_norm_rel_err(g, e) for g, e in zip(grads, expected)]


def scaled_case(seed: int, n_para, n_neg, low: float, high: float):
    """B = 8, d = 4 unit features scaled to norms in [low, high]: logits of ±1e4 and beyond at τ = 100."""
    case = make_case(8, 4, n_para, n_neg, tau=100.0, seed=seed, normalize=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for leaf in case.leaves()[:-1]:
            leaf.mul_(torch.empty(*leaf.shape[:-1], 1).uniform_(low, high, generator=gen))
    return case


@pytest.mark.parametrize("beta", [3.0, 0.5])
@pytest.mark.parametrize("seed,n_para,n_neg,low,high", [(1, None, 1, 30, 30), (0, 1, 2, 30, 30)])
def test_cpp_large_logits_with_hard_negative_weight_within_10x_of_reference(beta, seed, n_para, n_neg, low, high):
    # docs/contract.md §4: beyond ±1000 every backend stays within 10× of the reference backend's own error.
    # The bias log β used to be added to logits of ~1e4 before the shift (rounding it to ~5e-4), and the
    # statistics were rounded to float32 at that magnitude.
    case = scaled_case(seed, n_para, n_neg, low, high)
    reference_errors = grad_errors(case, "reference", beta)
    for backend in ("cpp", "torch"):
        for err, ref_err in zip(grad_errors(case, backend, beta), reference_errors):
            assert math.isfinite(err) and err <= 10 * max(ref_err, 1e-7), (backend, err, ref_err)


@pytest.mark.parametrize("nan_leaf", [1, 3])  # a caption (query column), a negation (non-query column)
def test_cpp_filter_never_swallows_nan(nan_leaf):
    case = peaked_case(128, 32)
    run_backend(case, "cpp", block_rows=16, block_cols=32)
    assert last_backward_stats("cpp").skipped_tiles > 0  # without NaN the filter does skip tiles here
    with torch.no_grad():
        case.leaves()[nan_leaf].view(-1)[40] = math.nan  # e.g. another rank's feature in the distributed layer
    _, unfiltered = run_backend(case, "cpp", block_rows=16, block_cols=32, grad_filter_eps=0.0)
    _, filtered = run_backend(case, "cpp", block_rows=16, block_cols=32)
    for got, expected in zip(filtered, unfiltered):
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(filtered[0]).all()  # every image row sees the NaN column
    # the backward-only entry (the ring's use), given statistics: NaN reaches it too
    rows, cols = case.image.detach(), case.negation.detach().reshape(-1, 32)
    row_lse = torch.full((128,), math.nan)
    grads = partitions_backward("cpp", rows, cols, case.logit_scale.detach(), torch.zeros(128), 0, row_lse,
                                    torch.zeros(0), torch.ones(128), None, (True, True, False),
                                    PartitionOptions(16, 32))
    assert torch.isnan(grads[0]).all() and torch.isnan(grads[1]).all()


def far_negation_case(logit_gap: float):
    """Orthonormal images, captions at cosine 0.9 (logit 9 at τ = 10), and every negation anti-aligned with
    all images alike, `logit_gap` nats below each row's log-partition: the whole negation gradient is made
    of row weights ~exp(−logit_gap)."""
    batch, tau = 64, 10.0
    case = make_case(batch, 3 * batch, None, 1, tau=tau, seed=11)
    basis = torch.eye(3 * batch, dtype=torch.float64)
    image = basis[:batch]
    mean_direction = image.sum(0) / math.sqrt(batch)
    row_lse = math.log(math.exp(9.0) + batch - 1)  # logits 9 (own caption) and 0 (the others)
    norm = (logit_gap - row_lse) * math.sqrt(batch) / tau  # every negation logit is −τ·norm/√B
    with torch.no_grad():
        case.image.copy_(image)
        case.text.copy_(0.9 * image + math.sqrt(1 - 0.81) * basis[batch:2 * batch])
        case.negation.copy_((-norm * mean_direction + 0.1 * basis[2 * batch:])[:, None])
    return case


def test_cpp_filter_keeps_a_negation_gradient_made_only_of_tiny_weights():
    # Negation weights ~e^-45 ≈ 3e-20, below the default eps (~3e-10): a filter judging weights only
    # against the row's unit mass skipped every negation tile and returned a zero negation gradient.
    # The column-mass bound keeps them: each is compared with its own column's mass.
    case = far_negation_case(45.0)
    errors = grad_errors(case, "cpp", 1.0, block_rows=16, block_cols=32)
    assert max(errors) <= 1e-4, errors


def test_cpp_gradients_below_float32_normal_range_flush_to_zero():
    # Decision (docs/cpu_kernel.md, Denormals): weights ~e^-95 make a negation gradient of ~1e-40, a float32
    # subnormal. The kernel flushes subnormals to zero (FTZ/DAZ, for speed); float32 has no relative
    # precision there, so the contract holds in absolute terms: every entry within float32's smallest
    # normal of float64. Everything that is a normal float32 still meets the relative tolerance.
    case = far_negation_case(95.0)
    _, grads = run_backend(case, "cpp", block_rows=16, block_cols=32)
    _, expected = run_oracle(case)
    negation_grad, negation_expected = grads[2], expected[2]
    assert 0 < float(negation_expected.abs().max()) < torch.finfo(torch.float32).tiny
    assert float((negation_grad.double() - negation_expected).abs().max()) < torch.finfo(torch.float32).tiny
    for grad, exp in zip(grads[:2] + grads[3:], expected[:2] + expected[3:]):
        assert max_norm_rel_err(grad, exp) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_scale_only_gradient_with_identical_image_rows(backend):
    # Both towers frozen, every image row the same: τ's gradient is a sum of B·K equal-sign terms that the
    # positive logits nearly cancel. The torch backend recomputed the logits differently from its forward
    # (inconsistent weights) and accumulated in float32: 1.3e-5 off, against 1e-7 for cpp and reference.
    gen = torch.Generator().manual_seed(0)
    batch, dim, tau = 2048, 8, 30.0
    image = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=1).expand(batch, dim).contiguous()
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    scale64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    from oracle import semclip_loss_float64

    semclip_loss_float64(image, text, scale64).backward()
    scale = torch.tensor(tau, requires_grad=True)
    sk.semclip_loss(image, text, scale, backend=backend).backward()
    assert max_norm_rel_err(scale.grad, scale64.grad) <= 1e-6

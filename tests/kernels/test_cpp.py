"""The compiled CPU kernel (backend="cpp"): checks beyond the shared ones of test_loss.py.

Everything is compared with float64 evaluations that share no code with the kernel: the oracle of
tests/oracle.py for the loss, and a materialized float64 log-sum-exp written here for the primitive.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch
from oracle import make_case, max_norm_rel_err, semclip_loss_float64
from primitive import last_backward_stats, partitions
from test_loss import assert_matches, run_backend

import semclip_kernels as sk
from semclip_kernels.backends import cpp
from semclip_kernels.backends.options import PartitionOptions

# The extension is part of the build (setup.py, CI): an unbuilt one fails here with the build command,
# unless the build was skipped on purpose with SEMCLIP_SKIP_CPP=1.
pytestmark = pytest.mark.needs_cpp


def test_extension_is_built():
    ok, reason = cpp.is_available(torch.device("cpu"))
    assert ok, reason
    assert sk.backend_status("cpp", "cpu") == (True, "")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert cpp._C.has_avx2(), "setup.py should compile the vectorized exp (-mavx2 -mfma) on x86-64"


def primitive_float64(rows, cols, scale, col_bias, n_query_cols, g_row, g_col):
    """row_lse, col_lse and the gradients of Σ g_row·row_lse + Σ g_col·col_lse, all materialized in float64."""
    rows64, cols64 = rows.detach().double().requires_grad_(), cols.detach().double().requires_grad_()
    scale64 = torch.tensor(float(scale.detach()), dtype=torch.float64, requires_grad=True)
    logits = scale64 * rows64 @ cols64.T
    row_lse = torch.logsumexp(logits + col_bias.double(), dim=1)
    col_lse = torch.logsumexp(logits[:, :n_query_cols], dim=0)
    ((row_lse * g_row.double()).sum() + (col_lse * g_col.double()).sum()).backward()
    return row_lse.detach(), col_lse.detach(), rows64.grad, cols64.grad, scale64.grad


def primitive_cpp(rows, cols, scale, col_bias, n_query_cols, g_row, g_col, **options):
    rows, cols = rows.detach().clone().requires_grad_(), cols.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    row_lse, col_lse = partitions("cpp", rows, cols, scale, col_bias, n_query_cols, PartitionOptions(**options))
    ((row_lse * g_row).sum() + (col_lse * g_col).sum()).backward()
    return row_lse.detach(), col_lse.detach(), rows.grad, cols.grad, scale.grad


def primitive_inputs(n_rows, n_cols, n_query_cols, dim, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, dim, generator=gen) / math.sqrt(dim) * 2
    cols = torch.randn(n_cols, dim, generator=gen) / math.sqrt(dim) * 2
    col_bias = torch.zeros(n_cols)
    col_bias[n_query_cols:] = math.log(0.3)  # negations weighted by β = 0.3
    g_row = torch.rand(n_rows, generator=gen)
    g_col = torch.rand(n_query_cols, generator=gen)
    return rows, cols, torch.tensor(tau), col_bias, n_query_cols, g_row, g_col


def assert_close_to(got, expected, value_tol=1e-5, grad_tol=1e-4):
    names = ["row_lse", "col_lse", "grad_rows", "grad_cols", "grad_scale"]
    for name, a, b in zip(names, got, expected):
        if b.numel() == 0:  # no query columns
            assert a.numel() == 0
            continue
        tol = value_tol if name.endswith("lse") else grad_tol
        err = max_norm_rel_err(a, b)
        assert err <= tol, f"{name} off by {err:.2e} (rel. max-norm)"


# Ragged primitive shapes: rows and columns not multiples of any tile, query columns 0, some or all.
PRIMITIVE_SHAPES = [(1, 1, 1, 1), (5, 3, 0, 7), (37, 91, 40, 33), (130, 257, 257, 64), (64, 200, 100, 17)]
BLOCKS = [(1, 1), (3, 5), (8, 16), (64, 32), (None, None)]


# 1x1 tiles only on the shapes where they stay fast.
PRIMITIVE_CASES = [shape + blocks for shape in PRIMITIVE_SHAPES for blocks in BLOCKS
                   if blocks != (1, 1) or shape[0] * shape[1] <= 10_000]


@pytest.mark.parametrize("n_rows,n_cols,n_query_cols,dim,block_rows,block_cols", PRIMITIVE_CASES)
def test_primitive_matches_float64(n_rows, n_cols, n_query_cols, dim, block_rows, block_cols):
    args = primitive_inputs(n_rows, n_cols, n_query_cols, dim, tau=14.3, seed=n_rows + n_cols + dim)
    got = primitive_cpp(*args, block_rows=block_rows, block_cols=block_cols)
    assert got[0].dtype == torch.float32 and got[1].shape == (n_query_cols,)
    assert_close_to(got, primitive_float64(*args))


@pytest.mark.parametrize("eps", [None, 0.0, 1e-12, 1e-7])
@pytest.mark.parametrize("batch,dim,n_para,n_neg", [(45, 24, 1, 1), (70, 17, 2, 3), (33, 40, None, 2)])
def test_loss_every_filter_setting_on_ragged_tiles(eps, batch, dim, n_para, n_neg):
    # Random features at tau = 14.3 hold no negligible tile: every eps must give docs/contract.md §4 accuracy.
    case = make_case(batch, dim, n_para, n_neg, tau=14.3, seed=batch + dim)
    assert_matches(case, "cpp", block_rows=16, block_cols=24, grad_filter_eps=eps)


def peaked_case(batch, dim, tau=100.0, seed=0):
    """The trained regime: caption and paraphrase near their image, negation a bit farther, all else far."""
    gen = torch.Generator().manual_seed(seed)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    def near(center, spread):
        return unit(center + spread * unit(torch.randn(center.shape, generator=gen, dtype=torch.float64)))

    image = unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    case = make_case(batch, dim, 1, 1, tau=tau, seed=seed)
    with torch.no_grad():
        case.image.copy_(image)
        case.text.copy_(near(image, 0.35))
        case.paraphrase.copy_(near(image, 0.45)[:, None])
        case.negation.copy_(near(image, 0.8)[:, None])
    return case


def test_trained_regime_default_filter_skips_most_tiles_and_stays_exact():
    case = peaked_case(384, 64)
    assert_matches(case, "cpp", block_rows=32, block_cols=64)  # default eps
    stats = last_backward_stats("cpp")
    assert stats.skipped_tiles >= 0.5 * stats.tiles, stats
    assert_matches(case, "cpp", block_rows=32, block_cols=64, grad_filter_eps=0.0)
    assert last_backward_stats("cpp").skipped_tiles == 0


def test_larger_filter_eps_skips_more_and_error_stays_bounded():
    case = peaked_case(256, 64, seed=1)
    _, exact_grads = run_backend(case, "cpp", block_rows=32, block_cols=32, grad_filter_eps=0.0)
    skipped = []
    for eps in (1e-9, 1e-6, 1e-3):
        _, grads = run_backend(case, "cpp", block_rows=32, block_cols=32, grad_filter_eps=eps)
        skipped.append(last_backward_stats("cpp").skipped_tiles)
        # Dropped weights are each < eps, at most K = 3B of them per row or column: every gradient moves by
        # at most ~K·eps times the scale of the largest gradient (the negations' own are ~1e-9 here).
        bound = max(1e-6, 3 * case.image.shape[0] * eps)
        largest = max(float(g.abs().max()) for g in exact_grads[:4])
        for grad, exact in zip(grads, exact_grads):
            assert float((grad - exact).abs().max()) <= bound * largest
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0] > 0, skipped


def test_large_logits_take_the_exact_path_and_match():
    # Norms up to ~9 at tau = 100: tiles span hundreds of nats, so the shared-shift exponentials of some
    # rows and columns would underflow; those are recomputed exactly with their own shift.
    case = make_case(40, 32, 1, 1, tau=100.0, seed=21)
    with torch.no_grad():
        case.image.mul_(3.0)
        case.text.mul_(3.0)
    assert_matches(case, "cpp", block_rows=16, block_cols=32, grad_filter_eps=0.0)
    assert last_backward_stats("cpp").exact_lines > 0


def test_thread_counts_agree_and_each_is_deterministic():
    case = make_case(300, 48, 1, 1, tau=14.3, seed=17)
    previous = torch.get_num_threads()
    results = {}
    try:
        # 3 threads (oversubscribed here) take the ordered grad_cols deposits; 2 the unordered ones.
        for threads in (1, 2, 2, 3, 3):
            torch.set_num_threads(threads)
            loss, grads = run_backend(case, "cpp", block_rows=32, block_cols=64)
            results.setdefault(threads, []).append((loss, [g.clone() for g in grads]))
    finally:
        torch.set_num_threads(previous)
    (loss1, grads1), = results[1]
    for threads in (2, 3):
        (loss_n, grads_n), (_, grads_n_again) = results[threads]
        assert abs(float(loss1) - float(loss_n)) <= 1e-6 * abs(float(loss1))
        for g1, g_n, g_n_again in zip(grads1, grads_n, grads_n_again):
            assert max_norm_rel_err(g_n, g1) <= 1e-5
            assert torch.equal(g_n, g_n_again)  # the same thread count gives the same bits
    loss2 = results[2][0][0]
    ref_loss = semclip_loss_float64(*(t.detach() for t in (case.image, case.text, case.logit_scale,
                                                          case.paraphrase, case.negation)))
    assert abs(float(loss2) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))


def test_only_scale_requires_grad():
    rows, cols, scale, col_bias, n_query, g_row, g_col = primitive_inputs(20, 30, 20, 8, tau=5.0, seed=3)
    scale.requires_grad_()
    row_lse, col_lse = partitions("cpp", rows, cols, scale, col_bias, n_query, PartitionOptions(4, 8))
    ((row_lse * g_row).sum() + (col_lse * g_col).sum()).backward()
    expected = primitive_float64(rows, cols, scale, col_bias, n_query, g_row, g_col)[4]
    assert max_norm_rel_err(scale.grad, expected) <= 1e-4


def test_zero_scale_gradient():
    # tau = 0: the kernel cannot recover A·Cᵀ from S = tau·A·Cᵀ, and takes the product explicitly.
    args = primitive_inputs(9, 14, 9, 5, tau=0.0, seed=4)
    assert_close_to(primitive_cpp(*args, block_rows=4, block_cols=4), primitive_float64(*args))


def test_unbuilt_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "ImportError: no module named semclip_kernels._C")
    ok, reason = sk.backend_status("cpp", "cpu")
    assert not ok and "pip install --no-build-isolation -e ." in reason
    case = make_case(4, 3, None, None, tau=2.0)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        sk.semclip_loss(case.image, case.text, case.logit_scale, backend="cpp")


def test_not_available_off_cpu():
    ok, reason = cpp.is_available(torch.device("meta"))
    assert not ok and "CPU" in reason

"""backend="triton", backward: gradients of all five inputs against the float64 oracle.

Runs through Triton's interpreter on CPU (see conftest.py). Covers the
paraphrase/negation layouts, β = 0, frozen inputs, each dtype, τ up to 100,
gradient filtering on (default), off (grad_filter_eps=0) and forced, and the
primitive's optional upstream gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import Case, make_case, max_norm_rel_err, semclip_loss_float64
from primitive import last_backward_stats, partitions

import semclip_kernels as sk
from semclip_kernels.backends.options import PartitionOptions

triton_fused = pytest.importorskip("semclip_kernels.backends.triton_fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not triton_fused.is_available(torch.device(DEVICE))[0]:
    pytest.skip(f"Triton backend unavailable: {triton_fused.is_available(torch.device(DEVICE))[1]}",
                allow_module_level=True)

pytestmark = pytest.mark.needs_triton
TILES = {"block_rows": 16, "block_cols": 16}
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale")


def on_device(case: Case) -> Case:
    def move(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)

    return Case(*(move(t) for t in (case.image, case.text, case.paraphrase, case.negation, case.logit_scale)))


def run(case: Case, backend: str, w=1.0, beta=1.0, **options):
    """Loss and the gradient of every present input (None where the input is frozen)."""
    for leaf in case.leaves():
        leaf.grad = None
    loss = sk.semclip_loss(
        case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
        paraphrase_weight=w, hard_negative_weight=beta, backend=backend, **options,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in case.leaves()]


def run_oracle(case: Case, w=1.0, beta=1.0):
    leaves = [leaf.detach().cpu().double().requires_grad_(leaf.requires_grad) for leaf in case.leaves()]
    present = dict(zip([n for n, t in zip(NAMES, (1, 1, case.paraphrase, case.negation, 1)) if t is not None], leaves))
    loss = semclip_loss_float64(present["image"], present["text"], present["logit_scale"],
                                present.get("paraphrase"), present.get("negation"), w, beta)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_matches_oracle(case: Case, w=1.0, beta=1.0, loss_tol=1e-5, grad_tol=1e-4, **options):
    loss, grads = run(case, "triton", w, beta, **options)
    ref_loss, ref_grads = run_oracle(case, w, beta)
    assert abs(loss.cpu().double() - ref_loss) <= loss_tol * abs(ref_loss), (float(loss), float(ref_loss))
    for leaf, grad, ref in zip(case.leaves(), grads, ref_grads):
        if not leaf.requires_grad:
            assert grad is None
            continue
        if grad is None:  # an input that does not enter the loss (negations at β = 0)
            assert ref is None or torch.count_nonzero(ref) == 0
            continue
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        err = max_norm_rel_err(grad.cpu(), ref)
        assert err <= grad_tol, f"gradient off by {err:.2e} (rel. max-norm)"
    return grads


EXTRAS = [(None, None), (1, None), (None, 1), (1, 1), (3, 2), (2, 4)]


@pytest.mark.parametrize("batch,dim", [(13, 40), (21, 72)])  # d: 2 and 3 ragged BLOCK_D slices
@pytest.mark.parametrize("n_para,n_neg", EXTRAS)
def test_gradients_match_oracle(batch, dim, n_para, n_neg):
    case = on_device(make_case(batch, dim, n_para, n_neg, tau=14.3, seed=batch + dim, extra_as_2d=True))
    assert_matches_oracle(case, **TILES)


@pytest.mark.parametrize("tau", [1.0, 50.0, 100.0])
@pytest.mark.parametrize("w,beta", [(1.0, 0.0), (0.5, 2.5)])
def test_scales_and_weights(tau, w, beta):
    case = on_device(make_case(19, 33, 2, 2, tau=tau, seed=int(tau) + int(10 * beta)))
    assert_matches_oracle(case, w=w, beta=beta, **TILES)


def test_large_logits_default_blocks():
    # Norms up to ~9 at τ = 100: logits in the thousands; default (heuristic) tiles.
    case = make_case(30, 48, 1, 1, tau=100.0, seed=3)
    with torch.no_grad():
        case.image.mul_(3.0)
        case.text.mul_(3.0)
    assert_matches_oracle(on_device(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    case = on_device(make_case(29, 72, 1, 2, tau=14.3, dtype=dtype, seed=7, normalize=True))
    triton_grads = assert_matches_oracle(case, loss_tol=2e-2, grad_tol=2e-2, **TILES)
    _, torch_grads = run(case, "torch", **TILES)
    for grad, ref in zip(triton_grads, torch_grads):
        assert max_norm_rel_err(grad.cpu(), ref.cpu()) <= 2e-2


@pytest.mark.parametrize("frozen", ["image", "text", "extras", "scale", "all_features"])
def test_frozen_inputs(frozen):
    case = on_device(make_case(17, 24, 1, 1, tau=5.0, seed=4))
    targets = {
        "image": [case.image],
        "text": [case.text],
        "extras": [case.paraphrase, case.negation],
        "scale": [case.logit_scale],
        "all_features": [case.image, case.text, case.paraphrase, case.negation],
    }[frozen]
    for leaf in targets:
        leaf.requires_grad_(False)
    assert_matches_oracle(case, **TILES)


def test_gradcheck_float64():
    # float64 end to end (the kernels accumulate in float64 for float64 inputs).
    case = on_device(make_case(4, 3, 1, 1, tau=3.0, dtype=torch.float64, seed=1))
    scale = case.logit_scale.detach().double().requires_grad_()

    def loss(image, text, tau, para, neg):
        return sk.semclip_loss(image, text, tau, para, neg, paraphrase_weight=0.7, hard_negative_weight=1.3,
                               backend="triton", block_rows=2, block_cols=3)

    inputs = (case.image, case.text, scale, case.paraphrase, case.negation)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def trained_regime_case(batch: int, dim: int, seed: int) -> Case:
    """τ = 100 with aligned pairs: captions at cosine 0.6 to their image, paraphrases at 0.58,
    negations at 0.59 (hard negatives); unrelated pairs at ~0 ± 1/√d, so off-diagonal softmax
    weights are ~e^-40. The positives and hard negatives share the mass, which keeps the float32
    gradients well conditioned enough to compare with the float64 oracle at the tolerance of docs/contract.md §4."""
    gen = torch.Generator().manual_seed(seed)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    image = unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))

    def near(cos):
        noise = unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
        noise = unit(noise - (noise * image).sum(-1, keepdim=True) * image)
        return (cos * image + math.sqrt(1 - cos**2) * noise).float().requires_grad_()

    return on_device(Case(image.float().requires_grad_(), near(0.6), near(0.58), near(0.59),
                          torch.tensor(100.0, requires_grad=True)))


def test_filtering_is_exact_and_skips_most_tiles_when_trained():
    case = trained_regime_case(40, 128, seed=12)
    filtered = assert_matches_oracle(case, **TILES)
    stats = last_backward_stats("triton", DEVICE)
    assert stats.skipped_fraction >= 0.5, stats  # the tiles off the three diagonals (T, P, N): 13 of 24
    unfiltered = assert_matches_oracle(case, grad_filter_eps=0.0, **TILES)
    assert last_backward_stats("triton", DEVICE).skipped_tiles == 0
    for a, b in zip(filtered, unfiltered):
        # Skipped weights are below float32's resolution: the same gradients up to rounding.
        assert max_norm_rel_err(a.cpu(), b.cpu()) <= 1e-6


def test_filter_threshold_is_honoured():
    # A threshold above every weight skips every tile: only the positive terms' gradients remain.
    case = on_device(make_case(20, 16, 1, 1, tau=1.0, seed=9, normalize=True))
    _, grads = run(case, "triton", grad_filter_eps=0.5, **TILES)
    stats = last_backward_stats("triton", DEVICE)
    assert stats.skipped_tiles == stats.tiles > 1
    assert torch.count_nonzero(grads[3]) == 0  # negations enter the loss only through the partitions
    _, ref_grads = run_oracle(case)
    assert max_norm_rel_err(grads[0].cpu(), ref_grads[0]) > 0.1
    # Random features at τ = 1: no weight is small enough for the default threshold.
    assert_matches_oracle(case, **TILES)
    assert last_backward_stats("triton", DEVICE).skipped_tiles == 0


@pytest.mark.parametrize("upstream", ["rows_only", "cols_only", "both"])
def test_primitive_optional_upstream_gradients(upstream):
    # The distributed layer may use only one direction's log-partitions of a block.
    gen = torch.Generator().manual_seed(21)
    rows = torch.randn(27, 36, generator=gen, dtype=torch.float64)
    cols = torch.randn(45, 36, generator=gen, dtype=torch.float64)
    col_bias = torch.zeros(45, dtype=torch.float64)
    col_bias[30:] = math.log(0.5)
    g_row = torch.rand(27, generator=gen, dtype=torch.float64)
    g_col = torch.rand(30, generator=gen, dtype=torch.float64)

    def objective(backend_partitions, dtype):
        a = rows.to(dtype).to(DEVICE).requires_grad_()
        c = cols.to(dtype).to(DEVICE).requires_grad_()
        s = torch.tensor(4.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=DEVICE, requires_grad=True)
        row_lse, col_lse = backend_partitions(a, c, s, col_bias.to(s.dtype).to(DEVICE), 30,
                                              PartitionOptions(**TILES))
        total = 0
        if upstream in ("rows_only", "both"):
            total = total + (row_lse.double().cpu() * g_row).sum()
        if upstream in ("cols_only", "both"):
            total = total + (col_lse.double().cpu() * g_col).sum()
        return [g.cpu().double() for g in torch.autograd.grad(total, [a, c, s])]


    expected = objective(lambda *a: partitions("reference", *a), torch.float64)
    for actual, ref in zip(objective(lambda *a: partitions("triton", *a), torch.float32), expected):
        assert max_norm_rel_err(actual, ref) <= 1e-5

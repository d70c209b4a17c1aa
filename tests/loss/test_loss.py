"""Every CPU backend against the independent float64 oracle: values and all five gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from oracle import make_case, max_norm_rel_err, semclip_loss_float64

import semclip_kernels as sk

CPU_BACKENDS = [name for name in ("reference", "torch", "cpp") if sk.backend_status(name, "cpu")[0]]
# Small tiles so that every shape below spans several ragged tiles.
TILES = {"block_rows": 8, "block_cols": 16}


def run_backend(case, backend, w=1.0, beta=1.0, **options):
    for leaf in case.leaves():
        leaf.grad = None
    loss = sk.semclip_loss(
        case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
        paraphrase_weight=w, hard_negative_weight=beta, backend=backend, **options,
    )
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in case.leaves()]


def run_oracle(case, w=1.0, beta=1.0):
    leaves = [leaf.detach().double().requires_grad_() for leaf in case.leaves()]
    it = iter(leaves)
    image, text = next(it), next(it)
    para = next(it) if case.paraphrase is not None else None
    neg = next(it) if case.negation is not None else None
    scale = next(it)
    loss = semclip_loss_float64(image, text, scale, para, neg, w, beta)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_matches(case, backend, w=1.0, beta=1.0, loss_tol=1e-5, grad_tol=1e-4, **options):
    loss, grads = run_backend(case, backend, w, beta, **options)
    ref_loss, ref_grads = run_oracle(case, w, beta)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss) <= loss_tol * abs(ref_loss), (float(loss), float(ref_loss))
    names = ["image", "text", "paraphrase", "negation", "logit_scale"]
    present = [n for n, t in zip(names, (case.image, case.text, case.paraphrase, case.negation, True)) if t is not None]
    for name, leaf, grad, ref in zip(present, case.leaves(), grads, ref_grads):
        if not leaf.requires_grad:  # frozen: no gradient at all
            assert grad is None, f"frozen {name} got a gradient"
            continue
        assert grad is None or grad.dtype == leaf.dtype, f"grad of {name} has dtype {grad.dtype}"
        err = max_norm_rel_err(grad, ref)
        assert err <= grad_tol, f"{backend}: grad of {name} off by {err:.2e} (rel. max-norm)"


SHAPES = [(1, 1), (2, 3), (7, 129), (13, 64), (31, 17), (40, 512)]
EXTRAS = [(None, None), (1, None), (None, 1), (1, 1), (3, 2), (2, 4)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,dim", SHAPES)
@pytest.mark.parametrize("n_para,n_neg", EXTRAS)
def test_matches_float64_oracle(backend, batch, dim, n_para, n_neg):
    case = make_case(batch, dim, n_para, n_neg, tau=14.3, seed=batch * 1000 + dim, extra_as_2d=True)
    assert_matches(case, backend, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 14.3, 50.0, 100.0])
@pytest.mark.parametrize("w,beta", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 2.5), (2.0, 0.3)])
def test_scales_and_weights(backend, tau, w, beta):
    case = make_case(23, 33, 2, 2, tau=tau, seed=int(tau) + int(10 * w) + int(100 * beta))
    assert_matches(case, backend, w=w, beta=beta, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits_are_stable(backend):
    # Norms up to ~3 at tau = 100 give logits of several hundred: exp overflows without running maxima.
    case = make_case(19, 40, 1, 1, tau=100.0, seed=3)
    with torch.no_grad():
        for leaf in (case.image, case.text):
            leaf.mul_(3.0)
    assert_matches(case, backend, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    case = make_case(29, 48, 1, 2, tau=14.3, dtype=dtype, seed=7, normalize=True)
    assert_matches(case, backend, loss_tol=2e-2, grad_tol=2e-2, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_tiling_many_tiles(backend):
    case = make_case(1500, 24, 1, 1, tau=30.0, seed=11, normalize=True)
    assert_matches(case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_zero_remove_extras(backend):
    case = make_case(17, 20, 2, 3, tau=20.0, seed=5)
    no_para = sk.semclip_loss(case.image, case.text, case.logit_scale, None, case.negation, backend=backend)
    w_zero = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                             paraphrase_weight=0.0, backend=backend)
    torch.testing.assert_close(w_zero, no_para, rtol=1e-6, atol=0)
    no_neg = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, None, backend=backend)
    beta_zero = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                                hard_negative_weight=0.0, backend=backend)
    torch.testing.assert_close(beta_zero, no_neg, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_semantics_pull_paraphrase_push_negation(backend):
    # Orthonormal images isolate each image's own pull and push in the gradient.
    case = make_case(9, 16, 1, 1, tau=10.0, seed=2, extra_as_2d=True)
    with torch.no_grad():
        case.image.copy_(torch.eye(9, 16))
    _, (_, _, g_para, g_neg, _) = run_backend(case, backend)
    # A gradient-descent step moves the paraphrase toward its image and the negation away from it.
    assert ((-g_para) * case.image.detach()).sum(-1).gt(0).all()
    assert ((-g_neg) * case.image.detach()).sum(-1).lt(0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_para,n_neg", [(None, None), (2, None), (1, 2)])
def test_gradcheck_float64(backend, n_para, n_neg):
    case = make_case(5, 4, n_para, n_neg, tau=3.0, dtype=torch.float64, seed=1)
    scale = case.logit_scale.detach().double().requires_grad_()
    inputs = [case.image, case.text, scale] + [t for t in (case.paraphrase, case.negation) if t is not None]

    def fn(image, text, tau, *extras):
        it = iter(extras)
        para = next(it) if n_para else None
        neg = next(it) if n_neg else None
        return sk.semclip_loss(image, text, tau, para, neg, paraphrase_weight=0.7,
                               hard_negative_weight=1.3, backend=backend, block_rows=2, block_cols=3)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", ["image", "text", "both_extras", "scale"])
def test_frozen_inputs_get_no_gradient(backend, frozen):
    case = make_case(11, 9, 1, 1, tau=5.0, seed=4)
    targets = {"image": [case.image], "text": [case.text], "both_extras": [case.paraphrase, case.negation],
               "scale": [case.logit_scale]}[frozen]
    for leaf in targets:
        leaf.requires_grad_(False)
    loss, grads = run_backend(case, backend, **TILES)
    _, ref_grads = run_oracle(case)
    for leaf, grad, ref in zip(case.leaves(), grads, ref_grads):
        if any(leaf is t for t in targets):
            assert grad is None
        else:
            assert max_norm_rel_err(grad, ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equals_open_clip_clip_loss(backend):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    case = make_case(24, 32, None, None, tau=14.3, seed=9, normalize=True)
    ref = open_clip_loss.ClipLoss()(case.image, case.text, case.logit_scale)
    ref.backward()
    ref_grads = [leaf.grad.clone() for leaf in case.leaves()]
    module = sk.SemCLIPLoss(backend=backend, block_rows=8, block_cols=16)
    for leaf in case.leaves():
        leaf.grad = None
    out = module(case.image, case.text, case.logit_scale, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    out["contrastive_loss"].backward()
    torch.testing.assert_close(out["contrastive_loss"], ref, rtol=1e-5, atol=0)
    for leaf, expected in zip(case.leaves(), ref_grads):
        assert max_norm_rel_err(leaf.grad, expected) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equals_negclip_with_negations_only(backend):
    case = make_case(16, 12, None, 1, tau=20.0, seed=6, extra_as_2d=True)
    loss, grads = run_backend(case, backend, **TILES)
    image, text, neg = (t.detach().double().requires_grad_() for t in (case.image, case.text, case.negation))
    scale = case.logit_scale.detach().double().requires_grad_()
    labels = torch.arange(16)
    logits_i2t = scale * image @ torch.cat([text, neg]).T  # NegCLIP: CE over [T; N]
    logits_t2i = scale * text @ image.T
    negclip = (torch.nn.functional.cross_entropy(logits_i2t, labels)
               + torch.nn.functional.cross_entropy(logits_t2i, labels)) / 2
    negclip.backward()
    negclip_value = float(negclip.detach())
    assert abs(float(loss) - negclip_value) <= 1e-5 * abs(negclip_value)
    for grad, ref in zip(grads, (image.grad, text.grad, neg.grad, scale.grad)):
        assert max_norm_rel_err(grad, ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logit_bias_has_no_effect_and_scale_forms(backend):
    case = make_case(10, 8, 1, 1, tau=12.0, seed=8)
    module = sk.SemCLIPLoss(backend=backend)
    base = module(case.image, case.text, case.logit_scale,
                  paraphrase_features=case.paraphrase, negation_features=case.negation)
    biased = module(case.image, case.text, case.logit_scale, torch.tensor(-10.0),
                    paraphrase_features=case.paraphrase, negation_features=case.negation)
    as_float = module(case.image, case.text, 12.0,
                      paraphrase_features=case.paraphrase, negation_features=case.negation)
    torch.testing.assert_close(biased, base)
    torch.testing.assert_close(as_float, base)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_features_give_nan_loss(backend):
    case = make_case(6, 5, 1, 1, tau=10.0, seed=12)
    image = case.image.detach().clone()
    image[2, 3] = float("nan")
    loss = sk.semclip_loss(image, case.text, 10.0, case.paraphrase, case.negation, backend=backend)
    assert torch.isnan(loss)


def test_backends_agree_bitwise_shape_grid():
    """The chunked backend tracks the reference closely across every tiling of a shape."""
    case = make_case(37, 21, 2, 1, tau=25.0, seed=13)
    ref = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                          backend="reference")
    for block_rows, block_cols in itertools.product([1, 5, 37, 64], [1, 7, 111, 256]):
        got = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                              backend="torch", block_rows=block_rows, block_cols=block_cols)
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_torch_backend_shared_shift_and_per_line_paths(spread, monkeypatch):
    """Random logits take the one-exponential path; logits spanning hundreds of nats the per-line one."""
    from semclip_kernels.backends import torch_tiled

    calls = {"per_line": 0}
    real_logsumexp = torch.logsumexp

    def counting_logsumexp(*args, **kwargs):
        calls["per_line"] += 1
        return real_logsumexp(*args, **kwargs)

    monkeypatch.setattr(torch_tiled.torch, "logsumexp", counting_logsumexp)
    case = make_case(33, 16, 1, 1, tau=8.0, seed=21, normalize=True)
    with torch.no_grad():
        case.image[::3].mul_(spread)  # some rows far from the others' scale
    run_backend(case, "torch", beta=0.5, **TILES)
    monkeypatch.undo()
    assert (calls["per_line"] > 0) == (spread > 1.0)
    assert_matches(case, "torch", beta=0.5, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tau", [0.0, 7.0])
def test_scale_gradient_alone_and_at_zero_scale(backend, tau):
    """Only τ trainable (both towers frozen), and τ = 0 (every logit 0): grad_τ still exact."""
    case = make_case(21, 13, 2, 1, tau=tau, seed=17)
    if tau:
        for leaf in (case.image, case.text, case.paraphrase, case.negation):
            leaf.requires_grad_(False)
    assert_matches(case, backend, **TILES)

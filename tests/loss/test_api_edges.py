"""The API layer's promises (docs/contract.md §2, §4): autocast, mixed dtypes, scalar forms,
meta tensors, oversized tiles, non-negative loss terms, `backend_status("auto")`, the public signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from oracle import make_case, max_norm_rel_err, semclip_loss_float64

import semclip_kernels as sk

CPU_BACKENDS = [name for name in ("reference", "torch", "cpp") if sk.backend_status(name, "cpu")[0]]
TILES = {"block_rows": 16, "block_cols": 32}


def loss_and_grads(case, backend, autocast_dtype=None, **options):
    for leaf in case.leaves():
        leaf.grad = None
    # The forward inside autocast, backward() outside, as open_clip's trainer (and PyTorch's autocast docs) do.
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = sk.semclip_loss(
            case.image, case.text, case.logit_scale, case.paraphrase, case.negation, backend=backend, **options
        )
    loss.backward()
    return loss.detach().clone(), [leaf.grad.clone() for leaf in case.leaves()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_norm_rel_err(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature_dtype", [torch.bfloat16, torch.float32])
def test_autocast_changes_nothing(backend, autocast_dtype, feature_dtype):
    # open_clip's --precision amp_bf16 calls the loss inside autocast: it must not lower the statistics.
    case = make_case(40, 64, 1, 2, tau=30.0, dtype=feature_dtype, seed=3, normalize=True)
    outside, outside_grads = loss_and_grads(case, backend, **TILES)
    inside, inside_grads = loss_and_grads(case, backend, autocast_dtype, **TILES)
    assert inside.dtype == torch.float32
    assert rel(inside, outside) <= 1e-6, (float(inside), float(outside))
    for grad_in, grad_out in zip(inside_grads, outside_grads):
        assert grad_in.dtype == grad_out.dtype
        assert rel(grad_in, grad_out) <= 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_cast_under_autocast_and_rejected_outside(backend):
    case = make_case(24, 32, 1, 1, tau=20.0, seed=4, normalize=True)
    image_bf16 = case.image.detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="text_features has dtype torch.float32 but image_features has torch.bfloat16"):
        sk.semclip_loss(image_bf16, case.text, 20.0, case.paraphrase, case.negation, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sk.semclip_loss(image_bf16, case.text, 20.0, case.paraphrase, case.negation, backend=backend)
    mixed.backward()
    # As autocast would: every feature cast to bfloat16, then the loss as outside autocast.
    as_bf16 = [t.detach().bfloat16() for t in (case.text, case.paraphrase, case.negation)]
    expected = semclip_loss_float64(image_bf16.detach(), *as_bf16[:1], 20.0, *as_bf16[1:])
    assert abs(mixed.double() - expected) <= 1e-5 * abs(expected)
    assert image_bf16.grad.dtype == torch.bfloat16 and case.text.grad.dtype == torch.float32


def test_numpy_scalar_scale_and_one_element_tensor():
    case = make_case(16, 8, None, 1, tau=10.0, seed=5)
    expected = semclip_loss_float64(case.image.detach(), case.text.detach(), 10.0, None, case.negation.detach())
    for scale in (np.float32(10.0), np.float64(10.0), 10, torch.tensor([10.0])):
        loss = sk.semclip_loss(case.image, case.text, scale, negation_features=case.negation)
        assert abs(loss.double() - expected) <= 1e-5 * abs(expected), type(scale)
    with pytest.raises(TypeError, match="logit_scale must be a Python float or a 0-dim tensor"):
        sk.semclip_loss(case.image, case.text, True)


def test_meta_tensors_give_shapes_not_item_errors():
    image = torch.empty(8, 4, device="meta")
    loss = sk.semclip_loss(image, image, torch.tensor(10.0, device="meta"), backend="reference")
    assert loss.shape == () and loss.device.type == "meta"
    with pytest.raises(ValueError, match="logit_scale is on cpu but the features are on meta"):
        sk.semclip_loss(image, image, torch.tensor(10.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiles_larger_than_the_problem_are_clamped(backend):
    case = make_case(9, 16, 1, 1, tau=14.0, seed=6)
    loss, grads = loss_and_grads(case, backend, block_rows=10**9, block_cols=10**9)
    expected = semclip_loss_float64(*(t.detach() for t in (case.image, case.text, case.logit_scale)),
                                    case.paraphrase.detach(), case.negation.detach())  # fmt: skip
    assert abs(loss.double() - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 4])
def test_near_zero_loss_is_never_negative_and_keeps_its_gradient(backend, seed):
    # |logit| ≈ 1e6: one float32 ulp of a log-sum-exp there is 0.0625, and without the clamp these
    # seeds come out at −0.016 and −0.031 in every backend. Each positive dominates its partition by
    # ~1e5, so the exact loss is below 1e-30 (float64 oracle) and every softmax is one-hot.
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(4, 8, generator=gen)
    image = image / image.norm(dim=1, keepdim=True) * 1000.0
    text = (image + torch.randn(4, 8, generator=gen)).requires_grad_()
    image.requires_grad_()
    loss = sk.semclip_loss(image, text, 1.0, backend=backend)
    loss.backward()
    expected = semclip_loss_float64(image.detach(), text.detach(), 1.0)
    assert float(expected) < 1e-30
    assert 0.0 <= float(loss.detach()) <= 0.0625
    # The gradient is that of the unclamped loss (softmax − one-hot = 0 in float32 here): not NaN.
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


def test_backend_status_auto_says_what_it_picks():
    ok, reason = sk.backend_status("auto", "cpu")
    expected = sk.available_backends("cpu")
    assert ok
    choice = "cpp" if "cpp" in expected else "torch"
    assert f"auto picks '{choice}' on cpu" in reason
    ok_meta, reason_meta = sk.backend_status("auto", "meta")
    assert ok_meta and "auto picks 'torch' on meta" in reason_meta
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.backend_status("fast")


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in CPU_BACKENDS])
def test_compiled_loss_fullgraph_matches_eager_and_recompiles_once(backend):
    """torch.compile(fullgraph=True) through the whole loss (validation, columns, custom ops, combine):
    equal to eager within 1e-6, and a new batch size recompiles once, then never again."""
    torch._dynamo.reset()
    compiles = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")  # Dynamo + AOT autograd + fake kernels, no codegen

    def counting_backend(graph, example_inputs):
        compiles.append(len(example_inputs))
        return aot_eager(graph, example_inputs)

    module = sk.SemCLIPLoss(backend=backend, hard_negative_weight=0.5, block_rows=8, block_cols=16)

    def loss_fn(image, text, scale, paraphrase, negation):
        return module(image, text, scale, paraphrase_features=paraphrase, negation_features=negation)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=counting_backend)
    for batch in (12, 20, 28):
        case = make_case(batch, 16, 2, 1, tau=12.0, seed=batch)
        leaves = case.leaves()
        eager = loss_fn(*leaves[:2], leaves[4], *leaves[2:4])
        eager_grads = torch.autograd.grad(eager, leaves)
        got = compiled(*leaves[:2], leaves[4], *leaves[2:4])
        got_grads = torch.autograd.grad(got, leaves)
        assert abs(float(got.detach()) - float(eager.detach())) <= 1e-6 * abs(float(eager.detach()))
        for grad, expected in zip(got_grads, eager_grads):
            assert rel(grad, expected) <= 1e-6
    assert len(compiles) <= 2, f"compiled {len(compiles)} graphs for 3 batch sizes"


def test_reference_second_derivatives_are_correct():
    # docs/contract.md §2: the reference backend differentiates twice (the compiled backends refuse, tested
    # with them); checked against finite differences of its own float64 gradients.
    case = make_case(5, 3, 1, 1, tau=4.0, dtype=torch.float64, seed=8)
    scale = case.logit_scale.detach().double().requires_grad_()

    def loss(image, text, paraphrase, negation, tau):
        return sk.semclip_loss(image, text, tau, paraphrase, negation, hard_negative_weight=0.7, backend="reference")

    assert torch.autograd.gradgradcheck(loss, (case.image, case.text, case.paraphrase, case.negation, scale))


# The keyword-only parameters of the four entry points, in the order help() shows them (docs/contract.md §2).
SHARED_OPTIONS = {"paraphrase_weight": 1.0, "hard_negative_weight": 1.0, "backend": "auto", "block_rows": None,
                  "block_cols": None, "grad_filter_eps": None}  # fmt: skip
KEYWORD_ONLY = {
    sk.semclip_loss: [*SHARED_OPTIONS, "directions"],
    sk.SemCLIPLoss: [*SHARED_OPTIONS, "distributed_mode", "group_size", "directions"],
    sk.semsiglip_loss: [*SHARED_OPTIONS, "directions"],
    sk.SemSigLipLoss: [*SHARED_OPTIONS, "distributed_mode", "directions"],
}


@pytest.mark.parametrize("entry", list(KEYWORD_ONLY), ids=lambda entry: entry.__name__)
def test_signatures_name_every_keyword_argument(entry):
    # Both families' shared arguments have one owner, yet every entry point shows them as named parameters.
    parameters = inspect.signature(entry).parameters.values()
    assert not [p for p in parameters if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    keyword_only = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    assert [p.name for p in keyword_only] == KEYWORD_ONLY[entry]
    assert {p.name: p.default for p in keyword_only if p.name in SHARED_OPTIONS} == SHARED_OPTIONS


def test_unknown_keyword_is_a_type_error_naming_it():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    calls = {
        "semclip_loss": lambda: sk.semclip_loss(image, text, 10.0, block_row=2),
        "SemCLIPLoss": lambda: sk.SemCLIPLoss(block_row=2),
        "semsiglip_loss": lambda: sk.semsiglip_loss(image, text, 10.0, -10.0, block_row=2),
        "SemSigLipLoss": lambda: sk.SemSigLipLoss(block_row=2),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'block_row'$"):
            call()

"""The sigmoid (SigLIP-style) loss (docs/contract.md §8): every CPU backend against the independent float64
oracle (tests/sigmoid_oracle.py), open_clip's SigLipLoss, the API rules of §2, filtering and memory."""

from __future__ import annotations

import math

import open_clip.loss
import pytest
import torch
from oracle import make_case, max_norm_rel_err
from sigmoid_oracle import semsiglip_loss_float64
from test_memory import LargestAllocation

import semclip_kernels as sk
from semclip_kernels.backends import sigmoid_dispatch, sigmoid_torch
from semclip_kernels.backends.sigmoid_dispatch import sigmoid_backend_status
from semclip_kernels.backends.sigmoid_values import SigmoidProblem
from semclip_kernels.backends.values import Needs

CPU_BACKENDS = [name for name in ("reference", "torch", "cpp") if sigmoid_backend_status(name, torch.device("cpu"))[0]]
FUSED = [name for name in CPU_BACKENDS if name != "reference"]
TILES = {"block_rows": 8, "block_cols": 16}  # several ragged tiles in every shape below
NAMES = ["image", "text", "paraphrase", "negation", "logit_scale", "logit_bias"]


def leaves_of(case, bias):
    return [case.image, case.text, case.paraphrase, case.negation, case.logit_scale, bias]


def run_backend(case, bias, backend, w=1.0, beta=1.0, **options):
    leaves = [t for t in leaves_of(case, bias) if t is not None]
    for leaf in leaves:
        leaf.grad = None
    loss = sk.semsiglip_loss(
        case.image, case.text, case.logit_scale, bias, case.paraphrase, case.negation,
        paraphrase_weight=w, hard_negative_weight=beta, backend=backend, **options,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), [t if t is None else t.grad for t in leaves_of(case, bias)]


def run_oracle(case, bias, w=1.0, beta=1.0):
    copies = [None if t is None else t.detach().double().requires_grad_() for t in leaves_of(case, bias)]
    image, text, para, neg, scale, b = copies
    loss = semsiglip_loss_float64(image, text, scale, b, para, neg, w, beta)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in copies]


def assert_matches(case, bias, backend, w=1.0, beta=1.0, loss_tol=1e-5, grad_tol=1e-4, **options):
    loss, grads = run_backend(case, bias, backend, w, beta, **options)
    expected, expected_grads = run_oracle(case, bias, w, beta)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - expected) <= loss_tol * abs(expected), (float(loss), float(expected))
    for name, leaf, grad, ref in zip(NAMES, leaves_of(case, bias), grads, expected_grads):
        if leaf is None:
            continue
        if not leaf.requires_grad:
            assert grad is None, f"frozen {name} got a gradient"
            continue
        if grad is None:  # a column block left out (its weight is 0): its gradient is exactly zero
            assert ref is None or float(ref.abs().max()) == 0.0, f"{name} got no gradient"
            continue
        assert grad.dtype == leaf.dtype, f"grad of {name} has dtype {grad.dtype}"
        err = max_norm_rel_err(grad, ref)
        assert err <= grad_tol, f"{backend}: grad of {name} off by {err:.2e} (rel. max-norm)"


def bias_of(value: float) -> torch.Tensor:
    return torch.tensor(value, requires_grad=True)


SHAPES = [(1, 1), (2, 3), (7, 129), (13, 64), (31, 17), (40, 512)]
EXTRAS = [(None, None), (1, None), (None, 1), (1, 1), (3, 2), (2, 4)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,dim", SHAPES)
@pytest.mark.parametrize("n_para,n_neg", EXTRAS)
def test_matches_float64_oracle(backend, batch, dim, n_para, n_neg):
    case = make_case(batch, dim, n_para, n_neg, tau=10.0, seed=batch * 7 + dim)
    assert_matches(case, bias_of(-3.0), backend, w=0.7, beta=1.3, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "tau,bias,w,beta",
    [
        (1.0, 0.0, 1.0, 1.0),
        (30.0, -10.0, 0.5, 2.0),
        (100.0, -12.7, 1.0, 0.25),
        (10.0, 5.0, 0.0, 1.0),
        (10.0, -5.0, 2.0, 0.0),
        (0.0, -1.0, 1.0, 1.0),
    ],
)
def test_scales_biases_and_weights(backend, tau, bias, w, beta):
    case = make_case(24, 32, 2, 2, tau=tau, seed=3)
    assert_matches(case, bias_of(bias), backend, w=w, beta=beta, **TILES)


@pytest.mark.parametrize("backend", FUSED)
def test_default_tiling_and_two_dimensional_extras(backend):
    case = make_case(700, 48, 1, 1, tau=20.0, seed=5, extra_as_2d=True)
    assert_matches(case, bias_of(-8.0), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    case = make_case(33, 64, 2, 1, tau=10.0, dtype=dtype, seed=2)
    assert_matches(case, bias_of(-4.0), backend, loss_tol=2e-2, grad_tol=2e-2, **TILES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_zero_equal_open_clip_siglip_loss(backend):
    """docs/contract.md §8: no extras, or w = β = 0, is open_clip's SigLipLoss: value and the gradients of
    I, T, τ and b (float64 inputs: the comparison is not limited by float32 rounding)."""
    case = make_case(19, 24, 2, 3, tau=10.0, dtype=torch.float64, seed=11)
    scale = case.logit_scale.detach().double().requires_grad_()
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    leaves = [case.image, case.text, scale, bias]
    expected = open_clip.loss.SigLipLoss()(case.image, case.text, scale, bias)
    expected_grads = torch.autograd.grad(expected, leaves)
    ours = sk.SemSigLipLoss(backend=backend, paraphrase_weight=0.0, hard_negative_weight=0.0, **TILES)
    for extras in ({}, {"paraphrase_features": case.paraphrase, "negation_features": case.negation}):
        got = ours(case.image, case.text, scale, bias, output_dict=True, **extras)
        assert set(got) == {"contrastive_loss"}
        got_grads = torch.autograd.grad(got["contrastive_loss"], leaves)
        value, expected_value = float(got["contrastive_loss"].detach()), float(expected.detach())
        assert abs(value - expected_value) <= 1e-12 * abs(expected_value)
        for name, grad, ref in zip(["image", "text", "logit_scale", "logit_bias"], got_grads, expected_grads):
            assert max_norm_rel_err(grad, ref) <= 1e-10, name
    # Without the weights set to 0 the extras change the loss: the comparison above can fail.
    with_extras = sk.semsiglip_loss(case.image, case.text, scale, bias, case.paraphrase, case.negation,
                                    backend=backend)  # fmt: skip
    assert abs(float(with_extras) - float(expected)) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_equals_open_clip_siglip_loss(backend):
    case = make_case(64, 32, None, None, tau=10.0, seed=4, normalize=True)
    bias = bias_of(-10.0)
    leaves = [case.image, case.text, case.logit_scale, bias]
    expected = open_clip.loss.SigLipLoss()(case.image, case.text, case.logit_scale, bias)
    expected_grads = torch.autograd.grad(expected, leaves)
    got = sk.SemSigLipLoss(backend=backend)(case.image, case.text, case.logit_scale, bias)
    got_grads = torch.autograd.grad(got, leaves)
    assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected))
    for grad, ref in zip(got_grads, expected_grads):
        assert max_norm_rel_err(grad, ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "frozen",
    [
        ("image",),
        ("text", "paraphrase", "negation"),
        ("logit_scale", "logit_bias"),
        ("image", "text", "paraphrase", "negation", "logit_bias"),
    ],
)
def test_only_inputs_that_require_grad_get_gradients(backend, frozen):
    case = make_case(17, 16, 2, 2, tau=10.0, seed=6)
    bias = bias_of(-3.0)
    for name, leaf in zip(NAMES, leaves_of(case, bias)):
        if name in frozen:
            leaf.requires_grad_(False)
    assert_matches(case, bias, backend, w=0.5, beta=2.0, **TILES)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gradients_in_forward", [True, False])
def test_gradients_in_forward_and_by_recomputation_agree(backend, gradients_in_forward, monkeypatch):
    monkeypatch.setitem(sigmoid_dispatch.GRADIENTS_IN_FORWARD, backend, gradients_in_forward)
    case = make_case(29, 40, 1, 2, tau=15.0, seed=9)
    assert_matches(case, bias_of(-6.0), backend, **TILES)


@pytest.mark.parametrize("backend", FUSED)
def test_filter_skips_negligible_tiles_and_stays_accurate(backend):
    """The trained regime: positives aligned, negatives far below the bias. The default (exact) filter
    skips the tiles whose every σ(s·l) is below float32 resolution; gradients stay within 1e-4."""
    gen = torch.Generator().manual_seed(0)
    batch, dim = 128, 64
    base = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    image = base.clone().requires_grad_()
    text = (base + 0.05 * torch.randn(batch, dim, generator=gen)).requires_grad_()
    scale, bias = torch.tensor(100.0, requires_grad=True), bias_of(-60.0)
    case = make_case(batch, dim, None, None, tau=1.0)
    case.image, case.text, case.logit_scale = image, text, scale
    assert_matches(case, bias, backend, **TILES)
    stats = sigmoid_dispatch.last_sigmoid_backward_stats(backend)
    assert stats.tiles == (batch // 8) * (batch // 16)
    assert stats.skipped_tiles > stats.tiles // 2, stats
    # A NaN feature is never filtered away: it reaches the loss and the gradients.
    image.data[3, 0] = math.nan
    loss, grads = run_backend(case, bias, backend, **TILES)
    assert math.isnan(float(loss)) and bool(grads[1].isnan().any()) and bool(grads[4].isnan())


def test_tile_loop_never_materializes_logits():
    """docs/contract.md §3: the torch kernel holds tiles, never B × K, forward or backward (the kernel runs
    inside a custom operator, which a dispatch mode sees only at its boundary: probe the kernel itself)."""
    batch, dim = 2048, 32
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(batch, dim, generator=gen), torch.randn(3 * batch, dim, generator=gen)
    weight, owner = torch.ones(3 * batch), torch.arange(3 * batch) % batch
    blocks = (sigmoid_torch.DEFAULT_BLOCK_ROWS, sigmoid_torch.DEFAULT_BLOCK_COLS)
    problem = SigmoidProblem(rows, (cols,), torch.tensor([10.0, -5.0]), weight, owner, sk.PartitionOptions(*blocks, 0))
    with LargestAllocation() as recorder:
        sigmoid_torch.pair_sum(problem, Needs(True, True, True))
    assert recorder.largest < batch * 3 * batch / 4, recorder.largest_op
    assert recorder.largest >= blocks[0] * blocks[1]  # the probe sees the tiles: the test can fail


def test_probe_catches_the_materialized_reference():
    case = make_case(512, 16, 1, 1, tau=10.0)
    with LargestAllocation() as recorder:
        sk.semsiglip_loss(case.image, case.text, case.logit_scale, -5.0, case.paraphrase, case.negation,
                          backend="reference").backward()  # fmt: skip
    assert recorder.largest >= 512 * 3 * 512


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_arguments_name_what_they_expected(backend):
    case = make_case(4, 8, 1, 1, tau=10.0)
    args = (case.image, case.text, case.logit_scale)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        sk.semsiglip_loss(*args, torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        sk.semsiglip_loss(*args, math.inf, backend=backend)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        sk.semsiglip_loss(*args, torch.tensor(math.nan), backend=backend)
    with pytest.raises(TypeError, match="logit_bias must be a Python float"):
        sk.semsiglip_loss(*args, "-10", backend=backend)
    with pytest.raises(TypeError, match="logit_bias must be a floating-point tensor"):
        sk.semsiglip_loss(*args, torch.tensor(-10), backend=backend)
    with pytest.raises(ValueError, match="text_features must have shape"):
        sk.semsiglip_loss(case.image, case.text[:3], case.logit_scale, -1.0, backend=backend)
    with pytest.raises(ValueError, match="hard_negative_weight must be a finite float >= 0"):
        sk.semsiglip_loss(*args, -1.0, hard_negative_weight=-1.0, backend=backend)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        sk.SemSigLipLoss(dist_impl="allgather")
    with pytest.raises(ValueError, match="pass one of them"):
        sk.SemSigLipLoss(dist_impl="bidir", distributed_mode="gather")
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.SemSigLipLoss(backend="fast")


def test_triton_request_explains_and_auto_never_fails():
    """backend="triton" itself is tested in tests/kernels/test_siglip_triton.py (CPU tensors: the interpreter)."""
    ok, reason = sigmoid_backend_status("triton", torch.device("meta"))
    assert not ok and "meta" in reason
    assert sigmoid_dispatch.resolve_sigmoid_backend("auto", torch.device("cpu")) in FUSED


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_changes_nothing(backend):
    case = make_case(21, 16, 1, 2, tau=10.0, seed=1)
    outside = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -3.0, case.paraphrase, case.negation,
                                backend=backend, **TILES)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -3.0, case.paraphrase,
                                   case.negation, backend=backend, **TILES)  # fmt: skip
    assert inside.dtype == torch.float32 and float(inside) == float(outside)


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_loss_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")  # Dynamo + AOT autograd + fake kernels, no codegen
    module = sk.SemSigLipLoss(backend=backend, hard_negative_weight=0.5, **TILES)

    def loss_fn(image, text, scale, bias, paraphrase, negation):
        return module(image, text, scale, bias, paraphrase_features=paraphrase, negation_features=negation)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=aot_eager)
    case = make_case(20, 16, 2, 1, tau=12.0, seed=20)
    bias = bias_of(-4.0)
    leaves = [case.image, case.text, case.logit_scale, bias, case.paraphrase, case.negation]
    eager = loss_fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    assert abs(float(got.detach()) - float(eager.detach())) <= 1e-6 * abs(float(eager.detach()))
    for grad, expected in zip(got_grads, eager_grads):
        assert max_norm_rel_err(grad, expected) <= 1e-6


@pytest.mark.parametrize("backend", FUSED)
# torch reports outputs that alias each other as a warning from dynamo, or as an error: an error here, always.
@pytest.mark.filterwarnings("error::UserWarning:torch._dynamo.eval_frame")
def test_sigmoid_pairs_operators_pass_opcheck(backend):
    """The layer's operators for this primitive (the forward computing every gradient, and the backward).

    Outputs left empty (a forward without gradients) are not opchecked: empty tensors share the null storage,
    which opcheck's aliasing comparison reads as aliasing (they hold no data to alias)."""
    from semclip_kernels.backends import ops
    from semclip_kernels.backends.flat import flatten
    from semclip_kernels.backends.sigmoid_values import SigmoidProblem, SigmoidStatGrads, SigmoidStats
    from semclip_kernels.backends.values import Needs

    sigmoid_dispatch.resolve_sigmoid_backend(backend, torch.device("cpu"))  # registers it
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(12, 8, generator=gen), torch.randn(30, 8, generator=gen)
    weight, owner = torch.rand(30, generator=gen), torch.arange(30) % 15 - 2
    forward_op = getattr(torch.ops.semclip, f"sigmoid_pairs_{backend}_forward").default
    backward_op = getattr(torch.ops.semclip, f"sigmoid_pairs_{backend}_backward").default
    for forward_needs in (Needs(True, True, True),):
        problem = SigmoidProblem(
            rows.clone().requires_grad_(), (cols[:20].clone().requires_grad_(), cols[20:].clone().requires_grad_()),
            torch.tensor([5.0, -2.0], requires_grad=True), weight, owner, sk.PartitionOptions(8, 16), forward_needs,
        )  # fmt: skip
        tensors, ints, floats = flatten(problem)
        # test_faketensor of the forward reports an aliasing mismatch not yet understood (docs/siglip.md, open).
        forward_checks = ("test_schema", "test_autograd_registration", "test_aot_dispatch_dynamic")
        torch.library.opcheck(forward_op, (tensors, ints, floats), test_utils=forward_checks)
        stats = forward_op([t.detach() for t in tensors], ints, floats)
        grad_tensors, grad_ints, _ = flatten(SigmoidStatGrads(torch.tensor(0.5)))
        two_blocks = SigmoidStats(stats[0], stats[1], tuple(stats[2:4]), stats[4], stats[5])
        grad_ints = flatten(two_blocks)[1] + grad_ints  # the statistics' structure, then the gradients'
        args = ([t.detach() for t in tensors], ints, floats, list(stats), grad_tensors, grad_ints, [True] * 3)
        torch.library.opcheck(backward_op, args)
    assert ops  # the one registration module


def test_reference_second_derivatives_and_fused_backends_refuse():
    case = make_case(5, 3, 1, 1, tau=4.0, dtype=torch.float64, seed=8)
    scale = case.logit_scale.detach().double().requires_grad_()
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)

    def loss(image, text, paraphrase, negation, tau, b, backend="reference"):
        return sk.semsiglip_loss(image, text, tau, b, paraphrase, negation, hard_negative_weight=0.7, backend=backend)

    inputs = (case.image, case.text, case.paraphrase, case.negation, scale, bias)
    assert torch.autograd.gradgradcheck(loss, inputs)
    for backend in FUSED:
        grads = torch.autograd.grad(loss(*inputs, backend=backend), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(grads[0].sum(), inputs)


def test_semantics_pull_paraphrase_push_negation():
    case = make_case(8, 16, 1, 1, tau=10.0, seed=12)
    loss = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -2.0, case.paraphrase, case.negation)
    loss.backward()
    step = 1e-2
    before_p = (case.image * case.paraphrase[:, 0]).sum(1)
    before_n = (case.image * case.negation[:, 0]).sum(1)
    with torch.no_grad():
        image = case.image - step * case.image.grad
        para, neg = case.paraphrase - step * case.paraphrase.grad, case.negation - step * case.negation.grad
    # On average over the batch (a paraphrase is also a negative of every other image).
    assert float((image * para[:, 0]).sum(1).mean()) > float(before_p.mean())
    assert float((image * neg[:, 0]).sum(1).mean()) < float(before_n.mean())


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_is_bitwise_deterministic(threads):
    """docs/contract.md §4: identical inputs and thread count give identical bits (3 threads: the column
    gradients are deposited in part order)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = make_case(200, 24, 1, 2, tau=10.0, seed=13)
        bias = bias_of(-4.0)
        runs = [run_backend(case, bias, "cpp", block_rows=16, block_cols=32) for _ in range(3)]
    finally:
        torch.set_num_threads(previous)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        for grad, first in zip(grads, runs[0][1]):
            assert grad is None or torch.equal(grad, first)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tau", [2.0**-149, 1e-30])
def test_scale_gradient_at_a_subnormal_scale(backend, tau):
    """At τ = 1.4e-45 (float32's smallest subnormal) the feature gradients `τ·dS·C` underflow to 0, so τ's
    gradient cannot be read off them (`Σ <grad_A, A> / τ`, the torch backend: it gave 0)."""
    case = make_case(3, 4, 1, 1, tau=1.0, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (case.image, case.text, case.paraphrase, case.negation)]
    scale, bias = torch.tensor(tau, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    sk.semsiglip_loss(leaves[0], leaves[1], scale, bias, leaves[2], leaves[3], backend=backend).backward()
    exact = [t.detach().double().requires_grad_() for t in leaves]
    scale64 = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    semsiglip_loss_float64(exact[0], exact[1], scale64, torch.tensor(-1.0, dtype=torch.float64), exact[2],
                           exact[3]).backward()  # fmt: skip
    assert abs(float(scale.grad) - float(scale64.grad)) <= 1e-4 * abs(float(scale64.grad))

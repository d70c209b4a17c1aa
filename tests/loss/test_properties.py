"""Property-based tests of the single-process losses (docs/testing.md): hypothesis draws the shapes, the
extras, the weights, τ, the tiles and the data's seed within each (regime, backend, dtype) case;
tests/property_regimes.py says what is drawn (every case, every gradient checked).

- value and gradients within docs/contract.md §4 of the float64 evaluation (tests/oracle.py) of the same
  (rounded) inputs, softmax and sigmoid families;
- bitwise repeatable: the same call twice gives identical bits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracle import max_norm_rel_err, semclip_loss_float64
from property_regimes import (
    DTYPES,
    LOSS_FLOOR,
    REGIMES,
    Example,
    example_bounds,
    examples,
    gradient_floor,
    scale_gradient_bound,
)
from sigmoid_oracle import semsiglip_loss_float64

import semclip_kernels as sk

BACKENDS = [name for name in ("reference", "torch", "cpp", "triton") if sk.backend_status(name, "cpu")[0]]
# Repeatability draws half as many examples as the value properties (each example runs twice); Triton's
# interpreter takes seconds per call, so its cases draw a third.
REPEAT_EXAMPLES = max(1, settings.default.max_examples // 2)
TRITON_EXAMPLES = max(1, settings.default.max_examples // 3)
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale", "logit_bias")


def cases(interpreted: bool = False) -> list:
    """Every (regime, backend, dtype) case; `interpreted`: Triton's (its interpreter is slow)."""
    backends = [b for b in BACKENDS if (b == "triton") == interpreted]
    return [pytest.param(regime, backend, dtype, id=f"{regime}-{backend}-{dtype}")
            for regime in REGIMES for backend in backends for dtype in DTYPES]  # fmt: skip


def run(ex: Example, backend: str, sigmoid: bool = False) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss and the gradient of every input (`None` for absent inputs)."""
    leaves = [None if t is None else t.requires_grad_() for t in ex.features()]
    scale = torch.tensor(ex.tau, requires_grad=True)
    weights = {"paraphrase_weight": ex.paraphrase_weight, "hard_negative_weight": ex.hard_negative_weight}
    image, text, para, neg = leaves
    if sigmoid:
        bias = torch.tensor(ex.bias, requires_grad=True)
        loss = sk.semsiglip_loss(image, text, scale, bias, para, neg, backend=backend, **weights, **ex.options())
        inputs = leaves + [scale, bias]
    else:
        loss = sk.semclip_loss(image, text, scale, para, neg, backend=backend, **weights, **ex.options())
        inputs = leaves + [scale]
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in inputs]


def float64_run(ex: Example, sigmoid: bool = False) -> tuple[float, list[torch.Tensor | None]]:
    """The oracle on the example's inputs as the backend sees them (rounded to its dtype), in float64."""
    leaves = [None if t is None else t.double().requires_grad_() for t in ex.features()]
    # τ as `run` passes it (a float32 tensor): near convergence ∂L/∂τ can be 2e-9, where τ's own float32 rounding
    # (1e-8 relative) moves it by 3e-4 relative.
    scale = torch.tensor(ex.tau).double().requires_grad_()
    weights = {"paraphrase_weight": ex.paraphrase_weight, "hard_negative_weight": ex.hard_negative_weight}
    image, text, para, neg = leaves
    if sigmoid:
        bias = torch.tensor(ex.bias, dtype=torch.float64, requires_grad=True)
        loss = semsiglip_loss_float64(image, text, scale, bias, para, neg, **weights)
        inputs = leaves + [scale, bias]
    else:
        loss = semclip_loss_float64(image, text, scale, para, neg, **weights)
        inputs = leaves + [scale]
    loss.backward()
    return float(loss.detach()), [None if t is None else t.grad for t in inputs]


def assert_gradients_within_contract(ex: Example, grads: list, expected: list, family: str, what: str) -> None:
    """Each checked gradient within §4's bound of `expected`, or within its dtype's subnormal step where the
    dtype cannot hold that bound (`gradient_floor`)."""
    _, grad_tol = example_bounds(ex)
    floor = gradient_floor(ex.dtype)
    for name, grad, want in zip(NAMES, grads, expected):
        err = max_norm_rel_err(grad, want)
        largest = 0.0 if want is None else float(want.abs().max())
        tol = scale_gradient_bound(ex, float(want), family) if name == "logit_scale" else grad_tol
        assert err * largest <= floor or err <= tol, (
            f"{what} {ex}: {name} gradient off by {err:.3g} (bound {tol:.3g}; largest entry {largest:.3g})"
        )


def assert_within_contract(ex: Example, backend: str, sigmoid: bool) -> None:
    expected_loss, expected = float64_run(ex, sigmoid)
    assume(expected_loss >= LOSS_FLOOR)
    loss, grads = run(ex, backend, sigmoid)
    loss_tol, _ = example_bounds(ex)
    loss_err = abs(float(loss) - expected_loss) / max(abs(expected_loss), 1e-30)
    assert loss_err <= loss_tol, f"{backend} {ex}: loss {float(loss)!r} vs {expected_loss!r}, rel. error {loss_err:.3g}"
    assert_gradients_within_contract(ex, grads, expected, "sigmoid" if sigmoid else "softmax", backend)


def assert_bitwise_repeatable(ex: Example, backend: str, sigmoid: bool) -> None:
    first, second = run(ex, backend, sigmoid), run(ex, backend, sigmoid)
    assert torch.equal(first[0], second[0]), f"{backend} {ex}: loss {first[0]!r} then {second[0]!r}"
    for name, a, b in zip(NAMES, first[1], second[1]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{backend} {ex}: {name} gradient"


@pytest.mark.parametrize("regime,backend,dtype", cases())
@given(data=st.data())
def test_softmax_value_and_gradients_within_contract(regime, backend, dtype, data):
    assert_within_contract(data.draw(examples(regime, dtype, backend)), backend, sigmoid=False)


@pytest.mark.parametrize("regime,backend,dtype", cases())
@given(data=st.data())
def test_sigmoid_value_and_gradients_within_contract(regime, backend, dtype, data):
    assert_within_contract(data.draw(examples(regime, dtype, backend, sigmoid=True)), backend, sigmoid=True)


@pytest.mark.parametrize("regime,backend,dtype", cases())
@settings(max_examples=REPEAT_EXAMPLES)
@given(data=st.data())
def test_softmax_bitwise_repeatable(regime, backend, dtype, data):
    assert_bitwise_repeatable(data.draw(examples(regime, dtype, backend)), backend, sigmoid=False)


@pytest.mark.parametrize("regime,backend,dtype", cases())
@settings(max_examples=REPEAT_EXAMPLES)
@given(data=st.data())
def test_sigmoid_bitwise_repeatable(regime, backend, dtype, data):
    assert_bitwise_repeatable(data.draw(examples(regime, dtype, backend, sigmoid=True)), backend, sigmoid=True)


@pytest.mark.parametrize("regime,backend,dtype", cases(interpreted=True))
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_softmax_value_gradients_and_repeatability(regime, backend, dtype, data):
    ex = data.draw(examples(regime, dtype, backend))
    assert_within_contract(ex, backend, sigmoid=False)
    assert_bitwise_repeatable(ex, backend, sigmoid=False)


@pytest.mark.parametrize("regime,backend,dtype", cases(interpreted=True))
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_sigmoid_value_gradients_and_repeatability(regime, backend, dtype, data):
    ex = data.draw(examples(regime, dtype, backend, sigmoid=True))
    assert_within_contract(ex, backend, sigmoid=True)
    assert_bitwise_repeatable(ex, backend, sigmoid=True)

"""Bad input gets a ValueError/TypeError naming the argument and the expected shape (docs/contract.md §2)."""

from __future__ import annotations

import re

import pytest
import torch

import semclip_kernels as sk
from semclip_kernels.backends import resolve_backend

B, D = 4, 6


def feats(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def call(image=None, text=None, scale=10.0, para=None, neg=None, **kwargs):
    image = feats(B, D) if image is None else image
    text = feats(B, D) if text is None else text
    return sk.semclip_loss(image, text, scale, para, neg, backend="reference", **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(text=feats(B + 1, D)), ValueError, r"text_features.*\[B, d\] = \[4, 6\]"),
        (dict(text=feats(B, D + 1)), ValueError, r"text_features.*\[4, 6\]"),
        (dict(image=feats(B, D, 2)), ValueError, r"image_features must have shape \[B, d\]"),
        (dict(image=feats(B)), ValueError, r"image_features must have shape \[B, d\]"),
        (dict(image=feats(0, D), text=feats(0, D)), ValueError, r"image_features.*B >= 1"),
        (dict(para=feats(B + 1, D)), ValueError, r"paraphrase_features.*B=4, d=6"),
        (dict(neg=feats(B, 2, D + 1)), ValueError, r"negation_features.*B=4, d=6"),
        (dict(neg=feats(B, 2, 3, D)), ValueError, r"negation_features must have shape \[B, d\] or \[B, n, d\]"),
        (dict(text=feats(B, D, dtype=torch.float16)), TypeError, r"text_features has dtype torch.float16"),
        (dict(para=feats(B, D, dtype=torch.bfloat16)), TypeError, r"paraphrase_features has dtype"),
        (dict(text=torch.ones(B, D, dtype=torch.int64)), TypeError, r"text_features must be float32"),
        (dict(text=[[1.0] * D] * B), TypeError, r"text_features must be a torch.Tensor"),
        (dict(scale=torch.ones(2)), ValueError, r"logit_scale must be a scalar"),
        (dict(scale=float("inf")), ValueError, r"logit_scale must be finite"),
        (dict(scale=torch.tensor(float("nan"))), ValueError, r"logit_scale must be finite"),
        (dict(scale="10"), TypeError, r"logit_scale must be a Python float or a 0-dim tensor"),
        (dict(paraphrase_weight=-1.0), ValueError, r"paraphrase_weight must be a finite float >= 0"),
        (dict(hard_negative_weight=-0.5), ValueError, r"hard_negative_weight must be a finite float >= 0"),
        (dict(backend_name="fast"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input_is_named(kwargs, error, pattern):
    if "backend_name" in kwargs:
        with pytest.raises(error, match=pattern):
            sk.semclip_loss(feats(B, D), feats(B, D), 10.0, backend=kwargs["backend_name"])
        return
    with pytest.raises(error, match=pattern):
        call(**kwargs)


def test_mixed_devices_rejected():
    meta = torch.empty(B, D, device="meta")
    with pytest.raises(ValueError, match=re.escape("text_features is on meta")):
        sk.semclip_loss(feats(B, D), meta, 10.0)


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.SemCLIPLoss(backend="nope")
    with pytest.raises(ValueError, match="hard_negative_weight"):
        sk.SemCLIPLoss(hard_negative_weight=-1)
    with pytest.raises(ValueError, match="rank"):
        sk.SemCLIPLoss(rank=3, world_size=2)
    with pytest.raises(ValueError, match="block_rows"):
        sk.semclip_loss(feats(B, D), feats(B, D), 10.0, block_rows=0)


def test_accepts_one_element_scale_and_2d_extras():
    loss = call(scale=torch.tensor([10.0]), para=feats(B, D), neg=feats(B, D))
    assert loss.shape == () and torch.isfinite(loss)


def test_explicit_unavailable_backend_raises_clearly_and_auto_never_fails(monkeypatch):
    import semclip_kernels.backends as dispatch

    real_load = dispatch._load

    def load_without_compiled(name, *primitive):  # as on a machine where neither Triton nor the extension exist
        if name in ("triton", "cpp"):
            return None, f"ImportError: {name} is not installed"
        return real_load(name, *primitive)

    monkeypatch.setattr(dispatch, "_load", load_without_compiled)
    monkeypatch.setattr(dispatch, "_warned_fallbacks", set())
    monkeypatch.setattr(dispatch, "_resolved", {})  # availability is resolved once per process
    for name in ("triton", "cpp"):
        with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot run on cpu: ImportError"):
            sk.semclip_loss(feats(B, D), feats(B, D), 10.0, backend=name)
    with pytest.warns(UserWarning, match="'cpp' is unavailable") as record:
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert len(record) == 1  # said once, not on every call
    assert torch.isfinite(sk.semclip_loss(feats(B, D), feats(B, D), 10.0))


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        # 1e300 is finite in float64 but inf in float32, the statistics' dtype of float32 features
        (dict(scale=1e300), ValueError, r"logit_scale must be finite in torch.float32"),
        (dict(scale=torch.tensor(-1e300, dtype=torch.float64)), ValueError, r"logit_scale must be finite in"),
        # an empty extra is "absent", but its dtype and device are checked like any other
        (dict(para=feats(B, 0, D, dtype=torch.float16)), TypeError, r"paraphrase_features has dtype torch.float16"),
        (dict(neg=feats(B, 0, D, dtype=torch.bfloat16)), TypeError, r"negation_features has dtype"),
        (dict(paraphrase_weight=torch.tensor(1.0, requires_grad=True)), TypeError, r"paraphrase_weight is a tensor"),
        (dict(hard_negative_weight=torch.tensor(0.5, requires_grad=True)), TypeError, r"hard_negative_weight is a"),
        (dict(block_rows=True), TypeError, r"block_rows must be a positive int"),
        (dict(block_cols=4.0), TypeError, r"block_cols must be a positive int"),
        (dict(grad_filter_eps="x"), TypeError, r"grad_filter_eps must be a float"),
        (dict(grad_filter_eps=True), TypeError, r"grad_filter_eps must be a float"),
        (dict(grad_filter_eps=float("nan")), ValueError, r"grad_filter_eps must be in \[0, 1\)"),
    ],
)
def test_inputs_that_used_to_pass_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**kwargs)


def test_float64_features_accept_a_large_finite_scale():
    """The overflow check is against the statistics' dtype: float64 features keep float64 statistics."""
    image = feats(B, D, dtype=torch.float64)
    loss = sk.semclip_loss(image, feats(B, D, dtype=torch.float64), 1e30, backend="reference")  # inf in float32
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_empty_extras_mean_absent():
    image, text = feats(B, D), feats(B, D)
    plain = call(image=image, text=text)
    assert torch.equal(call(image=image, text=text, para=feats(B, 0, D), neg=feats(B, 0, D)), plain)


def test_numpy_integer_tiles_are_accepted():
    import numpy as np

    loss = sk.semclip_loss(feats(B, D), feats(B, D), 10.0, backend="torch", block_rows=np.int64(2), block_cols=3)
    assert torch.isfinite(loss)

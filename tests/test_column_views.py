"""`adjacent_view_columns`: zero-copy `[T; P; N]` from views of one text-tower output.

The gradient test consumes the columns the way the loss does (partitions over the joined
columns, positives through the views themselves) and compares the shared buffer's gradient
with the float64 oracle's gradients on independent copies of T, P and N.
"""

from __future__ import annotations

import pytest
import torch
from oracle import semclip_loss_float64

from semclip_kernels.column_views import adjacent_view_columns

B, PN, MN, D = 5, 2, 3, 8
K = B * (1 + PN + MN)


def split(out: torch.Tensor, pn: int = PN, mn: int = MN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout the open_clip integration produces: [captions; paraphrases; negations], image-major."""
    dim = out.shape[-1]
    return out[:B], out[B : B + B * pn].view(B, pn, dim), out[B + B * pn :].view(B, mn, dim)


def test_adjacent_views_join_without_copy():
    out = torch.randn(K, D)
    text, para, neg = split(out)
    cols = adjacent_view_columns(text, para, neg)
    assert cols is not None
    assert cols.shape == (K, D)
    assert cols.data_ptr() == out.data_ptr()  # no copy: the same memory
    assert torch.equal(cols, out)


@pytest.mark.parametrize("present", ["para", "neg"])
def test_two_blocks(present):
    out = torch.randn(B * 3, D)
    text = out[:B]
    rest = out[B:].view(B, 2, D)
    cols = adjacent_view_columns(text, rest, None) if present == "para" else adjacent_view_columns(text, None, rest)
    assert cols is not None and cols.data_ptr() == out.data_ptr() and torch.equal(cols, out)


def test_two_dimensional_extras():
    out = torch.randn(3 * B, D)
    cols = adjacent_view_columns(out[:B], out[B : 2 * B], out[2 * B :])
    assert cols is not None and torch.equal(cols, out) and cols.data_ptr() == out.data_ptr()


def test_offset_inside_a_larger_buffer():
    big = torch.randn(K + 7, D)
    out = big[3 : 3 + K]
    text, para, neg = split(out)
    cols = adjacent_view_columns(text, para, neg)
    assert cols is not None and torch.equal(cols, out) and cols.data_ptr() == out.data_ptr()


def test_not_adjacent_is_none():
    out = torch.randn(K + 1, D)
    text = out[:B]
    para = out[B : B + B * PN].view(B, PN, D)
    neg = out[B + B * PN + 1 :].view(B, MN, D)  # one row gap
    assert adjacent_view_columns(text, para, neg) is None
    # separate tensors: different storages
    assert adjacent_view_columns(text.clone(), para.clone(), neg.clone()) is None


def test_wrong_order_is_none():
    out = torch.randn(K, D)
    neg = out[: B * MN].view(B, MN, D)  # negations first in the buffer
    text = out[B * MN : B * MN + B]
    para = out[B * MN + B :].view(B, PN, D)
    assert adjacent_view_columns(text, para, neg) is None
    text, para, neg = split(out)
    assert adjacent_view_columns(text, neg, para) is None  # arguments swapped


def test_non_contiguous_is_none():
    out = torch.randn(D, K).t()  # [K, D] with column-major strides
    text, para, neg = out[:B], out[B : B + B * PN].reshape(B, PN, D), out[B + B * PN :].reshape(B, MN, D)
    assert not text.is_contiguous()
    assert adjacent_view_columns(text, para, neg) is None


def test_overlap_and_mismatch_are_none():
    out = torch.randn(K, D)
    text, para, _ = split(out)
    assert adjacent_view_columns(text, out[:B * PN].view(B, PN, D), None) is None  # overlaps text
    assert adjacent_view_columns(text, para.double(), None) is None  # dtype
    wide = torch.randn(B * 2, 2 * D)
    assert adjacent_view_columns(wide[:B, :D], wide[B:].view(B, 2, D), None) is None  # width / contiguity


def test_text_alone_is_itself():
    text = torch.randn(B, D)
    assert adjacent_view_columns(text) is text


def test_views_of_different_bases_are_none():
    # Same storage and adjacent, but the paraphrase block is a view of a different autograd base.
    leaf = torch.randn(K, D, requires_grad=True)
    out = leaf * 1.0
    other = out.detach().requires_grad_()  # shares storage, separate autograd identity
    text, _, neg = split(out)
    para = other[B : B + B * PN].view(B, PN, D)
    assert adjacent_view_columns(text, para, neg) is None


def test_detached_block_is_none():
    # A detached block must not start receiving gradient through the joined columns.
    out = torch.randn(K, D, requires_grad=True) * 1.0
    text, para, _ = split(out)
    neg = out.detach()[B + B * PN :].view(B, MN, D)
    assert not neg.requires_grad and neg.data_ptr() == out[B + B * PN :].data_ptr()
    assert adjacent_view_columns(text, para, neg) is None


def loss_through_columns(image, cols, text, para, tau, n_neg):
    """docs/contract.md §1 consuming the joined columns for every partition and the views for the
    positives, i.e. two autograd paths into the same buffer (as the loss layer does)."""
    logits = tau * image @ cols.T  # [B, K]
    z = torch.logsumexp(logits, dim=1)
    n_query = B * (1 + PN)
    y = torch.logsumexp(logits[:, :n_query], dim=0)
    text_pos = tau * (image * text).sum(-1)
    para_pos = tau * torch.einsum("bd,bpd->bp", image, para)
    i2t = (z - text_pos) + (z[:, None] - para_pos).sum(1)
    t2i = (y[:B] - text_pos) + (y[B:].view(B, PN) - para_pos).sum(1)
    assert cols.shape[0] == n_query + B * n_neg
    return (i2t.mean() + t2i.mean()) / (2 * (1 + PN))


def test_gradient_reaches_the_shared_buffer_once():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(K, D, generator=gen, requires_grad=True)
    image = torch.randn(B, D, generator=gen, requires_grad=True)
    tau = torch.tensor(3.0, requires_grad=True)
    out = torch.nn.functional.normalize(weights, dim=-1)  # a non-leaf tower output, like encode_text's
    text, para, neg = split(out)
    cols = adjacent_view_columns(text, para, neg)
    assert cols is not None and cols.requires_grad and cols.data_ptr() == out.data_ptr()
    assert cols._base is out  # whole-buffer case: a plain view of the tower output
    loss = loss_through_columns(image, cols, text, para, tau, MN)
    loss.backward()

    # Oracle: float64, on independent copies of the three blocks (no views, no shared buffer).
    w64 = weights.detach().double().requires_grad_()
    out64 = torch.nn.functional.normalize(w64, dim=-1)
    t64 = out64[:B].clone()
    p64 = out64[B : B + B * PN].clone().view(B, PN, D)
    n64 = out64[B + B * PN :].clone().view(B, MN, D)
    img64 = image.detach().double().requires_grad_()
    tau64 = tau.detach().double().requires_grad_()
    expected = semclip_loss_float64(img64, t64, tau64, p64, n64)
    expected.backward()

    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=0)
    for got, want in ((weights.grad, w64.grad), (image.grad, img64.grad), (tau.grad, tau64.grad)):
        rel = (got.double() - want).abs().max() / want.abs().max()
        assert rel < 1e-4, rel


def test_gradient_through_a_part_of_a_larger_buffer():
    # The blocks cover only rows 2..K+2 of the base: the as_strided path, whose gradient must land on
    # exactly those rows of the base and nowhere else.
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(K + 5, D, generator=gen).div(3).requires_grad_()
    image = torch.randn(B, D, generator=gen).div(3)
    out = big * 1.0
    text, para, neg = split(out[2 : 2 + K])
    cols = adjacent_view_columns(text, para, neg)
    assert cols is not None and cols.data_ptr() == out[2].data_ptr() and cols._base is out
    loss_through_columns(image, cols, text, para, 2.0, MN).backward()

    b64 = big.detach().double().requires_grad_()
    part = b64[2 : 2 + K]
    expected = semclip_loss_float64(
        image.double(), part[:B].clone(), 2.0, part[B : B + B * PN].clone().view(B, PN, D),
        part[B + B * PN :].clone().view(B, MN, D),
    )
    expected.backward()
    assert torch.equal(big.grad[:2], torch.zeros(2, D)) and torch.equal(big.grad[2 + K :], torch.zeros(3, D))
    rel = (big.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()
    assert rel < 1e-4, rel


def test_gradient_reaches_a_leaf_buffer():
    # Views of a leaf: the column gradient must land in leaf.grad next to the view paths' gradients.
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(K, D, generator=gen).div(3).requires_grad_()
    image = torch.randn(B, D, generator=gen).div(3)
    text, para, neg = split(buf)
    cols = adjacent_view_columns(text, para, neg)
    assert cols is not None
    loss_through_columns(image, cols, text, para, 2.0, MN).backward()

    b64 = buf.detach().double().requires_grad_()
    expected = semclip_loss_float64(
        image.double(), b64[:B].clone(), 2.0, b64[B : B + B * PN].clone().view(B, PN, D),
        b64[B + B * PN :].clone().view(B, MN, D),
    )
    expected.backward()
    rel = (buf.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()
    assert rel < 1e-4, rel

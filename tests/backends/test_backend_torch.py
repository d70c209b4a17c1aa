"""The torch backend's 16-bit gradient products (issue 10 item 3) and its double-backward refusal (issue 11).

On CUDA the gradient products run in the 16-bit input dtype; dS is scaled by a power of two before the
cast and the scale is undone in float32. CPU runs the same code when the product path is forced.
"""

from __future__ import annotations

import pytest
import torch
from oracle import make_case, max_norm_rel_err
from test_loss import run_oracle

import semclip_kernels as sk
from semclip_kernels.backends import torch_tiled


def test_operand_scaling_keeps_weights_that_a_plain_float16_cast_flushes():
    gen = torch.Generator().manual_seed(0)
    # A tile of softmax weights spanning 1e-2 .. 1e-9 (B = 32768 puts off-diagonal weights near 1e-8).
    weights = torch.exp(torch.empty(64, 128).uniform_(-20.0, -4.6, generator=gen))
    scaled, inverse = torch_tiled.scaled_to_operand_dtype(weights, torch.float16)
    assert scaled.dtype == torch.float16 and inverse.dtype == torch.float32 and inverse.shape == ()
    restored = scaled.double() * inverse.double()
    relative = ((restored - weights.double()).abs() / weights.double()).max()
    assert relative <= 2.0 ** -11  # float16's half ulp, for every weight
    assert float(inverse) == 2.0 ** round(torch.log2(inverse).item())  # a power of two: undone exactly


@pytest.mark.parametrize("special", [0.0, float("nan"), float("inf")])
def test_operand_scaling_leaves_zero_and_non_finite_tiles_alone(special):
    tile = torch.full((4, 4), special)
    scaled, inverse = torch_tiled.scaled_to_operand_dtype(tile, torch.bfloat16)
    assert float(inverse) == 1.0
    assert torch.equal(scaled.float().isnan(), tile.isnan()) and torch.equal(scaled.float().nan_to_num(),
                                                                             tile.nan_to_num())


def test_float16_products_at_large_batch_keep_the_negative_part(monkeypatch):
    # Issue 10's reproduction: float16, B = 2048, d = 16, one paraphrase and one negation, loss × 0.05.
    # With the 16-bit product path forced on CPU, every feature gradient within 2e-3 of float64.
    monkeypatch.setattr(torch_tiled, "_low_precision_products", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    case = make_case(2048, 16, 1, 1, tau=14.3, dtype=torch.float16, seed=5)
    loss = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation, backend="torch")
    (loss * 0.05).backward()
    _, expected = run_oracle(case)
    for leaf, ref in zip(case.leaves()[:4], expected[:4]):
        assert leaf.grad.dtype == torch.float16
        assert max_norm_rel_err(leaf.grad, ref * 0.05) <= 2e-3


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_double_backward_raises_naming_the_backend(backend):
    case = make_case(6, 5, 1, 1, tau=3.0, seed=2)
    loss = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                           backend=backend)
    grads = torch.autograd.grad(loss, [case.image, case.logit_scale], create_graph=True)
    _, expected = run_oracle(case)
    assert max_norm_rel_err(grads[0].detach(), expected[0]) <= 1e-4  # first derivatives stay right
    with pytest.raises(RuntimeError, match=f"backend='{backend}' does not support double backward"):
        torch.autograd.grad(grads[0].square().sum(), [case.text])


def _loss_and_grads(backend_options, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    leaves = [torch.randn(200, 24, generator=gen).requires_grad_() for _ in range(4)]
    scale = torch.tensor(20.0, requires_grad=True)
    loss = sk.semclip_loss(*leaves[:2], scale, *leaves[2:], backend="torch", **backend_options)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves] + [scale.grad]


def test_tile_rows_on_workers_give_the_serial_loops_bits(monkeypatch):
    # The workers' column accumulations (col_lse, grad_C) take turns in row-tile order: the same additions in
    # the same order as one serial loop of single-threaded ops, whichever worker finishes first.
    tiles = {"block_rows": 16, "block_cols": 24}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(torch_tiled, "_tile_workers", lambda x: 1)
            serial = _loss_and_grads(tiles)
    finally:
        torch.set_num_threads(threads)
    for n_workers in (2, 3):
        with monkeypatch.context() as patch:
            patch.setattr(torch_tiled, "_tile_workers", lambda x, n=n_workers: n)
            for _ in range(3):
                threaded = _loss_and_grads(tiles)
                assert all(torch.equal(a, b) for a, b in zip(serial, threaded)), n_workers


def test_an_error_in_a_tile_row_is_raised_in_the_caller():
    def row_tile(i, turns):
        with turns.turn(i, 0):
            if i == 1:
                raise ValueError("tile row 1")

    with pytest.raises(ValueError, match="tile row 1"):
        torch_tiled._run_row_tiles(5, 2, row_tile, 2)
    assert torch_tiled._run_row_tiles(3, 1, lambda i, turns: None, 2) is None  # the workers are still serving

"""Portable tiled sigmoid pair sum (docs/contract.md §8): plain PyTorch ops over tiles of the logits.

A pure kernel: no autograd, no operator registration (the layer's dispatch table lists it). One pass over
`block_rows × block_cols` tiles of `l = τ·A·Cᵀ + b` computes the pair sum and, for the inputs asked for,
its gradients: each pair's gradient is local, `dS_ic = a_c·s_ic·σ(s_ic·l_ic)`, so no statistic of a row or
column is needed and the tile's gradient products follow at once:

    grad_A[r] += τ·dS·C[c],   grad_C[c] += τ·dSᵀ·A[r],   grad_τ += Σ dS ⊙ (A·Cᵀ),   grad_b += Σ dS

A tile whose every `a_c·σ(s·l)` is below the filter threshold skips its two gradient products. Nothing of
`M × K` elements is ever held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import stat_dtype
from .sigmoid_values import PairSums, SigmoidProblem
from .values import Needs

DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_COLS = 1024
# The forward's one pass computes the gradients as well (docs/siglip.md measured it faster).
gradients_in_forward = True


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _tiles(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def pair_sum(problem: SigmoidProblem, needs: Needs) -> PairSums:
    """The sum and its gradients (None where `needs` says no; `needs.scale` stands for τ and b), sum and scalars
    in the statistics dtype, feature gradients in the features' dtypes; the tiles the gradient pass visited and
    filtered."""
    rows, cols, scale, bias = problem.rows, problem.joined_cols(), problem.scale, problem.bias
    col_weight, col_owner = problem.col_weight, problem.col_owner
    block_rows, block_cols, grad_filter_eps = (problem.options.block_rows, problem.options.block_cols,
                                               problem.options.grad_filter_eps)  # fmt: skip
    needs = (needs.rows, needs.cols, needs.scale, needs.scale)
    need_rows, need_cols, need_scale, need_bias = needs
    need_any = any(needs)
    dtype = stat_dtype(scale.dtype)
    # The products run in float32 (float64): CPU half-precision GEMMs are slow and round their output.
    compute = dtype
    # The kernel runs eagerly (inside a custom operator under torch.compile): τ and b as host numbers.
    tau, b = float(scale), float(bias)
    weight = col_weight.to(dtype)
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    grad_rows = torch.zeros(rows.shape, dtype=compute, device=rows.device) if need_rows else None
    grad_cols = torch.zeros(cols.shape, dtype=compute, device=rows.device) if need_cols else None
    # dτ = Σ dS ⊙ A·Cᵀ = Σ_i <grad_A_i, A_i> / τ: read off a feature gradient after the loop when there is one
    # (and |τ| ≥ 1e-30: below, τ·dS·C falls into float32's subnormals and keeps nothing of dτ), else summed per
    # tile. float64 partial sums: the τ and b gradients add B·K terms of both signs.
    scale_per_tile = need_scale and (abs(tau) < 1e-30 or not (need_rows or need_cols))
    grad_scale = torch.zeros((), dtype=torch.float64, device=rows.device)
    grad_bias = torch.zeros((), dtype=torch.float64, device=rows.device)
    row_tiles, col_tiles = _tiles(n_rows, block_rows), _tiles(n_cols, block_cols)
    skipped = 0
    for r in row_tiles:
        row_tile = rows[r].to(compute)
        for c in col_tiles:
            col_tile = cols[c].to(compute)
            products = row_tile @ col_tile.T  # A·Cᵀ of the tile
            # (in place unless the products are still needed for dτ)
            signed_logits = (products.mul(tau) if scale_per_tile else products.mul_(tau)).add_(b)
            # This tile's positives (row, column): a column's owner among these rows; their sign s = −1.
            owner = col_owner[c] - r.start
            positive_cols = torch.nonzero((owner >= 0) & (owner < r.stop - r.start)).squeeze(1)
            positive_rows = owner[positive_cols]
            signed_logits[positive_rows, positive_cols] *= -1
            # −log σ(−x), not softplus(x): torch's softplus returns x above x = 20 (an error of up to 2e-9).
            pair_losses = F.logsigmoid(signed_logits.neg())
            # Column sums in the tile's dtype (torch sums pairwise), the weighted total in float64.
            total -= pair_losses.sum(0).double() @ weight[c].double()
            if not need_any:
                continue
            grad_logits = torch.sigmoid_(signed_logits).mul_(weight[c])  # |dS| = a·σ(s·l)
            # NaN compares False: a tile with a NaN is never skipped.
            if grad_filter_eps > 0 and bool(grad_logits.amax() < grad_filter_eps):
                skipped += 1
                continue
            grad_logits[positive_rows, positive_cols] *= -1  # dS = s·a·σ(s·l)
            if need_rows:
                grad_rows[r].addmm_(grad_logits, col_tile, alpha=tau)
            if need_cols:
                grad_cols[c].addmm_(grad_logits.T, row_tile, alpha=tau)
            if scale_per_tile:
                grad_scale += torch.dot(grad_logits.reshape(-1).double(), products.reshape(-1).double())
            if need_bias:
                grad_bias += grad_logits.sum().double()
    if need_scale and not scale_per_tile:
        feature, grad = (rows, grad_rows) if need_rows else (cols, grad_cols)
        for t in row_tiles if need_rows else col_tiles:  # float64 one tile at a time (§3's tile budget)
            grad_scale += torch.dot(grad[t].double().reshape(-1), feature[t].double().reshape(-1))
        grad_scale /= tau
    return PairSums(
        total.to(dtype),
        None if grad_rows is None else grad_rows.to(rows.dtype),
        None if grad_cols is None else grad_cols.to(cols.dtype),
        grad_scale.to(scale.dtype) if need_scale else None,
        grad_bias.to(bias.dtype) if need_bias else None,
        (len(row_tiles) * len(col_tiles) if need_any else 0, skipped),
    )

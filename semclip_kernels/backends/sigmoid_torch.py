"""Portable tiled sigmoid pair sum (docs/contract.md §8): plain PyTorch ops over tiles of the logits.

A pure kernel: no autograd, no operator registration (`sigmoid_dispatch.py` wires it in). One pass over
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

from .base import BackwardStats
from .dtypes import stat_dtype
from .options import PartitionOptions, default_grad_filter_eps

DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_COLS = 1024

_last_stats = BackwardStats()


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def last_backward_stats() -> BackwardStats:
    """Tiles visited and skipped by the gradient filter in the most recent gradient pass."""
    return _last_stats


def _tiles(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def resolve_options(options: PartitionOptions, n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """`(block_rows, block_cols, grad_filter_eps)`, the backend's defaults where `options` says None."""
    eps = options.grad_filter_eps
    return (
        options.block_rows or DEFAULT_BLOCK_ROWS,
        options.block_cols or DEFAULT_BLOCK_COLS,
        default_grad_filter_eps(n_rows, n_cols, dtype) if eps is None else eps,
    )


def pair_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    needs: tuple[bool, bool, bool, bool],
    block_rows: int,
    block_cols: int,
    grad_filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(pair_sum, grad_rows, grad_cols, grad_scale, grad_bias)`: the sum and its gradients (None where
    `needs = (rows, cols, scale, bias)` says no), sum and scalars in the statistics dtype, feature gradients
    in the features' dtypes."""
    global _last_stats
    need_rows, need_cols, need_scale, need_bias = needs
    need_any = any(needs)
    dtype = stat_dtype(scale.dtype)
    # The products run in float32 (float64): CPU half-precision GEMMs are slow and round their output.
    compute = dtype if rows.dtype != torch.float64 else torch.float64
    tau, b = scale.to(dtype), bias.to(dtype)
    tau_value = float(scale) if need_rows or need_cols else 0.0  # the kernel runs eagerly (see below)
    weight, owner = col_weight.to(dtype), col_owner
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    grad_rows = torch.zeros(rows.shape, dtype=compute, device=rows.device) if need_rows else None
    grad_cols = torch.zeros(cols.shape, dtype=compute, device=rows.device) if need_cols else None
    # float64 partial sums: the τ and b gradients add B·K terms of both signs.
    grad_scale = torch.zeros((), dtype=torch.float64, device=rows.device)
    grad_bias = torch.zeros((), dtype=torch.float64, device=rows.device)
    row_tiles, col_tiles = _tiles(n_rows, block_rows), _tiles(n_cols, block_cols)
    skipped = 0
    for r in row_tiles:
        row_tile = rows[r].to(compute)
        row_ids = torch.arange(r.start, r.stop, device=rows.device)[:, None]
        for c in col_tiles:
            col_tile = cols[c].to(compute)
            products = row_tile @ col_tile.T  # A·Cᵀ of the tile
            signs = 1.0 - 2.0 * (owner[c][None, :] == row_ids).to(dtype)  # s = −1 on positives
            signed_logits = signs * (products.to(dtype) * tau + b)
            # −log σ(−x), not softplus(x): torch's softplus returns x above x = 20 (an error of up to 2e-9).
            total -= (F.logsigmoid(-signed_logits) * weight[c]).sum(dtype=torch.float64)
            if not need_any:
                continue
            magnitude = torch.sigmoid(signed_logits).mul_(weight[c])  # |dS| = a·σ(s·l)
            # Host-side decision: the kernel runs eagerly (inside a custom operator under torch.compile).
            # NaN compares False: a tile with a NaN is never skipped.
            if grad_filter_eps > 0 and bool(magnitude.amax() < grad_filter_eps):
                skipped += 1
                continue
            grad_logits = magnitude.mul_(signs)
            if need_rows:
                grad_rows[r].addmm_(grad_logits.to(compute), col_tile, alpha=tau_value)
            if need_cols:
                grad_cols[c].addmm_(grad_logits.to(compute).T, row_tile, alpha=tau_value)
            if need_scale:
                grad_scale += (grad_logits.double() * products.double()).sum()
            if need_bias:
                grad_bias += grad_logits.sum(dtype=torch.float64)
    if not torch.compiler.is_compiling():  # informative only
        _last_stats = BackwardStats(tiles=len(row_tiles) * len(col_tiles) if need_any else 0, skipped_tiles=skipped)
    return (
        total.to(dtype),
        None if grad_rows is None else grad_rows.to(rows.dtype),
        None if grad_cols is None else grad_cols.to(cols.dtype),
        grad_scale.to(scale.dtype) if need_scale else None,
        grad_bias.to(bias.dtype) if need_bias else None,
    )

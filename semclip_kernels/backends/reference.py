"""The materialized partitions: the whole `M × K` logits matrix in differentiable torch ops.

Written for clarity, not speed; the fast backends are tested against it (and against an independent
float64 evaluation of the loss). Its forward is plain autograd (second derivatives work), so the
autograd layer (`ops`) calls it directly instead of registering custom ops.
"""

from __future__ import annotations

import math

import torch

from .values import (
    Grads,
    Needs,
    Problem,
    StatGrads,
    Stats,
    add_positive_terms,
    column_mass_bounds,
    counts,
    positive_entries,
)

differentiable = True


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _logits(problem: Problem, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dtype = problem.stat_dtype
    return scale.to(dtype) * (rows.to(dtype) @ cols.to(dtype).T)  # [M, K]


def _positive_mask(problem: Problem, device: torch.device) -> torch.Tensor | None:
    """`[M, K]`: the entries `Problem.positives` leaves out of the partitions (None: none)."""
    return positive_entries(problem.positives, slice(0, problem.n_rows), slice(0, problem.n_cols), device)


def _referenced_lse(
    products: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor | float, dim: int
) -> torch.Tensor:
    """`log Σ exp(scale·products + bias)` along `dim`, as `scale·r + log Σ exp(scale·(products − r) + bias)` with
    `r` each line's largest product outside `mask` (a constant: every derivative is exact); masked entries are
    left out.

    Its τ-derivative is then `r + Σ w·(products − r)`: the float32 weights `w` meet only the small, one-signed
    `products − r`. Plain `logsumexp` gives `Σ w·products`, whose weights sum to 1 only up to the rounding of a
    log-partition near `τ·r` (7.6e-6 at 100): τ's gradient, a difference of such lines and the positives' terms,
    was 6.3e-4 off on a trained-like batch at τ = 100.
    """
    with torch.no_grad():
        top = products if mask is None else products.masked_fill(mask, -math.inf)
        top = top.amax(dim, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = scale * (products - top)
    if mask is not None:
        shifted = shifted.masked_fill(mask, -math.inf)
    shifted = shifted + bias
    return scale * top.squeeze(dim) + torch.logsumexp(shifted, dim=dim)


def forward(problem: Problem) -> Stats:
    dtype = problem.stat_dtype
    products = problem.rows.to(dtype) @ problem.joined_cols().to(dtype).T  # [M, K]
    mask = _positive_mask(problem, products.device)
    scale = problem.scale.to(dtype)
    row_lse = _referenced_lse(products, mask, scale, problem.col_bias, 1)
    n_query = problem.n_query_cols
    query_lse = _referenced_lse(products[:, :n_query], None if mask is None else mask[:, :n_query], scale, 0.0, 0)
    with torch.no_grad():
        logits = scale * products
        if mask is not None:
            logits.masked_fill_(mask, -math.inf)
        bounds = column_mass_bounds(problem.col_bias, torch.logsumexp(logits, dim=0), row_lse.detach())
    return Stats(row_lse, query_lse, bounds, own=True)


def stats_like(problem: Problem) -> Stats:
    return Stats.like(problem)


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
    """The weights `dS` of the partitions materialized, then autograd through the logits: `Σ dS ⊙ S` has the
    gradients of `Σ g_row·row_lse + Σ g_query·query_lse`; the positive bands' `Σ g·S[band]` is added by
    `add_positive_terms` (τ's part in float64: near-duplicate positives make it a difference of O(1) terms).
    Float32 leaves: the gradients come back in the statistics dtype."""
    dtype = problem.stat_dtype
    n_query = problem.n_query_cols
    flags = (needs.rows, needs.cols, needs.scale)
    leaves = [t.detach().to(dtype).requires_grad_(need)
              for t, need in zip((problem.rows, problem.joined_cols(), problem.scale), flags)]  # fmt: skip
    with torch.enable_grad():
        logits = _logits(problem, *leaves)
        with torch.no_grad():
            grad_logits = torch.zeros_like(logits)
            if grads.row is not None:
                weights = torch.exp(logits + problem.col_bias.to(dtype) - stats.row_lse.to(dtype)[:, None])
                grad_logits += grads.row.to(dtype)[:, None] * weights
            if grads.query is not None:
                weights = torch.exp(logits[:, :n_query] - stats.query_lse.to(dtype))
                grad_logits[:, :n_query] += grads.query.to(dtype) * weights
            mask = _positive_mask(problem, logits.device)
            if mask is not None:  # left out of the partitions: the bands reach these entries (below)
                grad_logits.masked_fill_(mask, 0.0)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        result = iter(torch.autograd.grad(logits, wanted, grad_logits) if wanted else ())
    grad_rows, grad_cols, grad_scale = (next(result) if need else None for need in flags)
    if grad_cols is not None:
        sizes = [block.shape[0] for block in problem.cols]
        grad_cols = tuple(g.reshape(b.shape) for g, b in zip(torch.split(grad_cols, sizes), problem.cols))
    return add_positive_terms(problem, grads.positives, Grads(grad_rows, grad_cols, grad_scale, counts(1)), needs)
